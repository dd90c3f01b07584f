use super::*;

const CAP: usize = 16 * 1024;
const HEAD_CAP: usize = 64 * 1024;

fn capture(name: &str) -> Vec<u8> {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The handshake message inside a one-record capture.
fn message_of(record: &[u8]) -> &[u8] {
    &record[5..]
}

/// Re-frames a handshake message into records of at most `size` bytes.
fn split_records(msg: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in msg.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn ext(t: u16, data: &[u8]) -> Vec<u8> {
    let mut v = t.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn sni_ext(names: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for n in names {
        list.push(0u8);
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    ext(0, &data)
}

/// A minimal TLS 1.2-shaped ClientHello record with the given extensions.
fn hello(exts: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let ext_bytes: Vec<u8> = exts.concat();
    body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext_bytes);
    let mut msg = vec![0x01];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    split_records(&msg, MAX_RECORD)
}

fn sni(buf: &[u8]) -> Parsed<String> {
    match parse_client_hello(buf, CAP) {
        Parsed::Found(h) => Parsed::Found(h.sni.to_string()),
        Parsed::NeedMore => Parsed::NeedMore,
        Parsed::Invalid(d) => Parsed::Invalid(d),
    }
}

/// Every strict prefix asks for more; the whole finds the name.
fn check_all_prefixes(buf: &[u8], want: &str) {
    for n in 0..buf.len() {
        assert_eq!(sni(&buf[..n]), Parsed::NeedMore, "prefix of {n} bytes");
    }
    assert_eq!(sni(buf), Parsed::Found(want.to_owned()));
}

#[test]
fn real_client_hellos_every_prefix() {
    check_all_prefixes(&capture("clienthello-curl.bin"), "api.example.test");
    check_all_prefixes(&capture("clienthello-openssl.bin"), "openssl.example.test");
    check_all_prefixes(&capture("clienthello-python.bin"), "python.example.test");
}

#[test]
fn post_quantum_hello_with_sni_past_1024() {
    let pq = capture("clienthello-pq.bin");
    assert!(pq.len() > 1500);
    let at = pq
        .windows(16)
        .position(|w| w == b"api.example.test")
        .unwrap();
    assert!(at > 1024, "SNI at {at}");
    check_all_prefixes(&pq, "api.example.test");
}

#[test]
fn hello_split_across_records() {
    for file in ["clienthello-curl.bin", "clienthello-pq.bin"] {
        let record = capture(file);
        for size in [1, 7, 100, 512, 1024] {
            let split = split_records(message_of(&record), size);
            check_all_prefixes(&split, "api.example.test");
        }
    }
}

#[test]
fn bytes_after_the_hello_are_left_alone() {
    let mut buf = capture("clienthello-curl.bin");
    buf.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
    assert_eq!(sni(&buf), Parsed::Found("api.example.test".into()));
}

#[test]
fn grease_and_uppercase_and_trailing_dot() {
    let buf = hello(&[
        ext(0x1a1a, b""),
        sni_ext(&[b"API.Example.TEST."]),
        ext(0xfafa, b"\0"),
    ]);
    assert_eq!(sni(&buf), Parsed::Found("api.example.test".into()));
}

#[test]
fn encrypted_client_hello_uses_the_outer_name() {
    let buf = hello(&[sni_ext(&[b"public.example.test"]), ext(0xfe0d, &[0; 40])]);
    match parse_client_hello(&buf, CAP) {
        Parsed::Found(h) => {
            assert_eq!(h.sni.as_str(), "public.example.test");
            assert!(h.ech);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_hellos_are_denied() {
    let cases: Vec<(&str, Vec<u8>, Deny)> = vec![
        ("no extensions at all", hello(&[]), Deny::NoHost),
        (
            "no SNI",
            hello(&[ext(0x000a, &[0, 2, 0, 0x1d])]),
            Deny::NoHost,
        ),
        (
            "two names",
            hello(&[sni_ext(&[b"a.test", b"b.test"])]),
            Deny::NoHost,
        ),
        (
            "duplicate SNI extension",
            hello(&[sni_ext(&[b"a.test"]), sni_ext(&[b"b.test"])]),
            Deny::NoHost,
        ),
        (
            "duplicate other extension",
            hello(&[sni_ext(&[b"a.test"]), ext(10, b""), ext(10, b"")]),
            Deny::NoHost,
        ),
        ("empty name", hello(&[sni_ext(&[b""])]), Deny::NoHost),
        (
            "NUL in name",
            hello(&[sni_ext(&[b"a.test\0.evil.test"])]),
            Deny::NoHost,
        ),
        (
            "IP literal",
            hello(&[sni_ext(&[b"198.18.0.1"])]),
            Deny::NoHost,
        ),
        (
            "bad characters",
            hello(&[sni_ext(&[b"a b.test"])]),
            Deny::NoHost,
        ),
        (
            "SNI list with trailing bytes",
            hello(&[ext(0, &[0, 8, 0, 0, 3, b'a', b'.', b't', 9, 9])]),
            Deny::NoHost,
        ),
        (
            "SNI of another name type",
            hello(&[ext(0, &[0, 9, 1, 0, 6, b'a', b'.', b't', b'e', b's', b't'])]),
            Deny::NoHost,
        ),
        ("empty SNI extension", hello(&[ext(0, b"")]), Deny::NoHost),
    ];
    for (what, buf, want) in cases {
        assert_eq!(sni(&buf), Parsed::Invalid(want), "{what}");
    }
}

#[test]
fn malformed_records_are_denied() {
    let good = hello(&[sni_ext(&[b"a.test"])]);
    let mut not_handshake = good.clone();
    not_handshake[0] = 0x17;
    let mut bad_version = good.clone();
    bad_version[1] = 2;
    let mut zero_len = good.clone();
    zero_len[3] = 0;
    zero_len[4] = 0;
    let mut server_hello = good.clone();
    server_hello[5] = 0x02;
    let mut huge_record = good.clone();
    huge_record[3] = 0x50;
    // An extension whose length runs past the end of the list.
    let mut truncated_ext = hello(&[sni_ext(&[b"a.test"]), ext(10, b"abcd")]);
    let n = truncated_ext.len();
    truncated_ext[n - 5] = 0x40;
    for (what, buf, want) in [
        (
            "application data record",
            not_handshake,
            Deny::UnsupportedProtocol,
        ),
        (
            "SSLv2-style version",
            bad_version,
            Deny::UnsupportedProtocol,
        ),
        ("zero-length record", zero_len, Deny::UnsupportedProtocol),
        ("not a ClientHello", server_hello, Deny::UnsupportedProtocol),
        ("record over 2^14", huge_record, Deny::UnsupportedProtocol),
        (
            "truncated extension",
            truncated_ext,
            Deny::UnsupportedProtocol,
        ),
    ] {
        assert_eq!(sni(&buf), Parsed::Invalid(want), "{what}");
    }
}

#[test]
fn a_hello_over_the_cap_is_no_host_before_it_arrives() {
    let pq = capture("clienthello-pq.bin");
    // Only the headers are needed to refuse it.
    assert_eq!(
        parse_client_hello(&pq[..9], 1024),
        Parsed::Invalid(Deny::NoHost)
    );
    assert!(matches!(parse_client_hello(&pq, 2048), Parsed::Found(_)));
}

#[test]
fn a_non_handshake_record_between_fragments_is_denied() {
    let record = capture("clienthello-curl.bin");
    let mut split = split_records(message_of(&record), 100);
    split[105] = 0x15; // the second record's type: alert
    assert_eq!(sni(&split), Parsed::Invalid(Deny::UnsupportedProtocol));
}

#[test]
fn garbage_never_panics() {
    // A cheap stand-in for the fuzzer: every short byte pattern.
    let mut buf = [0u8; 12];
    for seed in 0..20_000u32 {
        let mut x = seed.wrapping_mul(2_654_435_761);
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        buf[0] = 0x16;
        buf[1] = 3;
        let _ = parse_client_hello(&buf, CAP);
        let _ = parse_request_head(&buf, HEAD_CAP);
        let _ = classify(&buf);
    }
}

// ---------------------------------------------------------------- HTTP --

fn head(raw: &str) -> Parsed<RequestHead> {
    parse_request_head(raw.as_bytes(), HEAD_CAP)
}

fn found(raw: &str) -> RequestHead {
    match head(raw) {
        Parsed::Found(h) => h,
        other => panic!("{raw:?}: {other:?}"),
    }
}

#[test]
fn classify_protocols() {
    assert_eq!(classify(&capture("clienthello-curl.bin")), Protocol::Tls);
    assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Protocol::Http);
    assert_eq!(classify(b"GE"), Protocol::Http);
    assert_eq!(
        classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        Protocol::Other
    );
    assert_eq!(classify(b"PRI"), Protocol::Other);
    assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Protocol::Other);
    assert_eq!(classify(b"\x00\x01"), Protocol::Other);
    assert_eq!(classify(b"get / HTTP/1.1\r\n"), Protocol::Other);
}

#[test]
fn plain_requests() {
    let h = found("GET /x HTTP/1.1\r\nHost: API.Example.TEST.:8080\r\nAccept: */*\r\n\r\n");
    assert_eq!(h.host.to_string(), "api.example.test");
    assert_eq!(h.port, Some(8080));
    assert_eq!(h.framing, Framing::None);
    assert!(!h.absolute_form);
    let h = found("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(h.framing, Framing::Length(5));
    assert_eq!(
        h.head_len,
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\n".len()
    );
    let h = found("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding:  Chunked \r\n\r\n");
    assert_eq!(h.framing, Framing::Chunked);
    let h = found("GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n");
    assert_eq!(h.host.to_string(), "[2001:db8::1]");
    let h = found(
        "GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(h.upgrade);
    let h = found("GET / HTTP/1.0\r\nHost: a.test\r\n\r\n");
    assert_eq!(h.host.to_string(), "a.test");
}

#[test]
fn absolute_form_must_agree_with_host() {
    let h = found("GET http://a.test/path HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(h.absolute_form);
    assert_eq!(h.host.to_string(), "a.test");
    let h = found("GET http://a.test:8080/ HTTP/1.1\r\n\r\n");
    assert_eq!(h.port, Some(8080));
    assert_eq!(
        head("GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n"),
        Parsed::Invalid(Deny::BadRequest)
    );
    assert_eq!(
        head("GET http://user@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"),
        Parsed::Invalid(Deny::BadRequest)
    );
    assert_eq!(
        head("GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"),
        Parsed::Invalid(Deny::BadRequest)
    );
}

#[test]
fn hostile_heads_are_refused() {
    let many_headers: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let cases: Vec<(&str, String, Deny)> = vec![
        ("no Host", "GET / HTTP/1.1\r\n\r\n".into(), Deny::NoHost),
        ("empty Host", "GET / HTTP/1.1\r\nHost: \r\n\r\n".into(), Deny::NoHost),
        ("duplicate Host", "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n".into(), Deny::BadRequest),
        ("identical duplicate Host", "GET / HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n".into(), Deny::BadRequest),
        ("Host with a path", "GET / HTTP/1.1\r\nHost: a.test/evil\r\n\r\n".into(), Deny::BadRequest),
        ("Host with userinfo", "GET / HTTP/1.1\r\nHost: x@a.test\r\n\r\n".into(), Deny::BadRequest),
        ("CL and TE", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n".into(), Deny::BadRequest),
        ("two lengths", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n".into(), Deny::BadRequest),
        ("repeated length", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n".into(), Deny::BadRequest),
        ("list length", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3, 3\r\n\r\n".into(), Deny::BadRequest),
        ("signed length", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +3\r\n\r\n".into(), Deny::BadRequest),
        ("huge length", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999\r\n\r\n".into(), Deny::BadRequest),
        ("TE not chunked last", "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".into(), Deny::BadRequest),
        ("obs-fold", "GET / HTTP/1.1\r\nHost: a.test\r\nX: a\r\n b\r\n\r\n".into(), Deny::BadRequest),
        ("bare CR", "GET / HTTP/1.1\r\nHost: a.test\rX: b\r\n\r\n".into(), Deny::BadRequest),
        ("empty header name", "GET / HTTP/1.1\r\nHost: a.test\r\n: v\r\n\r\n".into(), Deny::BadRequest),
        ("space before colon", "GET / HTTP/1.1\r\nHost : a.test\r\n\r\n".into(), Deny::BadRequest),
        ("101 headers", format!("GET / HTTP/1.1\r\nHost: a.test\r\n{many_headers}\r\n"), Deny::BadRequest),
        ("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(), Deny::UnsupportedProtocol),
        ("CONNECT without a port", "CONNECT a.test HTTP/1.1\r\nHost: a.test\r\n\r\n".into(), Deny::BadRequest),
        ("CONNECT with a path", "CONNECT a.test:443/x HTTP/1.1\r\n\r\n".into(), Deny::BadRequest),
        ("two Proxy-Authorization", "GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: a\r\nProxy-Authorization: b\r\n\r\n".into(), Deny::BadRequest),
        ("relative target", "GET a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n".into(), Deny::BadRequest),
        ("NUL in Host", "GET / HTTP/1.1\r\nHost: a.test\0b\r\n\r\n".into(), Deny::BadRequest),
    ];
    for (what, raw, want) in cases {
        assert_eq!(head(&raw), Parsed::Invalid(want), "{what}");
    }
}

#[test]
fn a_head_over_the_cap_is_refused() {
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ");
    raw.push_str(&"a".repeat(70 * 1024));
    assert_eq!(head(&raw), Parsed::Invalid(Deny::BadRequest));
    raw.push_str("\r\n\r\n");
    assert_eq!(head(&raw), Parsed::Invalid(Deny::BadRequest));
}

#[test]
fn every_prefix_of_a_head_needs_more() {
    let raw = "POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\n";
    for n in 0..raw.len() {
        assert_eq!(head(&raw[..n]), Parsed::NeedMore, "prefix {n}");
    }
    assert!(matches!(head(raw), Parsed::Found(_)));
}

#[test]
fn chunked_bodies_end_where_they_end() {
    let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1\r\n";
    let end = body.len() - "GET / HTTP/1.1\r\n".len();
    assert_eq!(ChunkedState::default().feed(body), ChunkProgress::Done(end));
    // Byte by byte, the same end.
    let mut st = ChunkedState::default();
    for (i, b) in body.iter().enumerate() {
        match st.feed(std::slice::from_ref(b)) {
            ChunkProgress::Consumed => assert!(i + 1 < end),
            ChunkProgress::Done(1) => {
                assert_eq!(i + 1, end);
                break;
            }
            other => panic!("at {i}: {other:?}"),
        }
    }
    assert_eq!(
        ChunkedState::default().feed(b"0\r\n\r\n"),
        ChunkProgress::Done(5)
    );
    for bad in [
        &b"x\r\n"[..],
        b"5\r\nhelloXX",
        b"\r\n",
        b"5\nhello\r\n",
        b"fffffffffffffffff\r\n",
        b"0\r\nbad\nline\r\n",
    ] {
        assert_eq!(
            ChunkedState::default().feed(bad),
            ChunkProgress::Invalid,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long_ext = format!("1;{}\r\n", "e".repeat(5000));
    assert_eq!(
        ChunkedState::default().feed(long_ext.as_bytes()),
        ChunkProgress::Invalid
    );
}

#[test]
fn connect_and_proxy_credentials() {
    let h = found(
        "CONNECT Secure.TEST:8443 HTTP/1.1\r\nHost: secure.test:8443\r\nProxy-Authorization: Basic eA==\r\n\r\n",
    );
    assert!(h.connect);
    assert_eq!(
        (h.host.to_string().as_str(), h.port),
        ("secure.test", Some(8443))
    );
    assert_eq!(h.proxy_authorization.as_deref(), Some("Basic eA=="));
    let h = found("GET https://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(h.https && h.absolute_form);
}

#[test]
fn framing_that_parsers_could_read_differently_is_refused() {
    for raw in [
        // A coding list, even one ending in chunked.
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        // chunked followed by a non-ASCII space (U+00A0 in UTF-8).
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\u{a0}\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        // chunked on HTTP/1.0.
        "POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        // Connection naming the headers that frame the message.
        "POST / HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a.test\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: host\r\n\r\n",
    ] {
        assert_eq!(head(raw), Parsed::Invalid(Deny::BadRequest), "{raw:?}");
    }
}

#[test]
fn trailer_lines_must_be_fields() {
    let mut ok = ChunkedState::default();
    assert_eq!(ok.feed(b"0\r\nX-Sum: 1\r\n\r\n"), ChunkProgress::Done(15));
    for bad in [
        &b"0\r\nno-colon-here\r\n\r\n"[..],
        b"0\r\n: empty name\r\n\r\n",
        b"0\r\n bad: 1\r\n\r\n",
    ] {
        let mut s = ChunkedState::default();
        assert_eq!(s.feed(bad), ChunkProgress::Invalid, "{bad:?}");
    }
}

/// Feeds `bytes` to an incremental reader one byte at a time, as a
/// client sending one byte per segment would.
fn byte_by_byte<P: Incremental>(mut p: P, bytes: &[u8]) -> (Parsed<P::Output>, usize) {
    let mut buf = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        buf.push(*b);
        match p.poll(&buf) {
            Parsed::NeedMore => {}
            done => return (done, i + 1),
        }
    }
    (Parsed::NeedMore, bytes.len())
}

#[test]
fn a_hello_a_byte_at_a_time_is_found_at_its_last_byte() {
    for name in ["clienthello-curl.bin", "clienthello-pq.bin"] {
        let hello = capture(name);
        let (got, at) = byte_by_byte(HelloReader::new(CAP), &hello);
        assert!(matches!(got, Parsed::Found(_)), "{name}: {got:?}");
        assert_eq!(at, hello.len(), "{name}");
        // And split into 7-byte records, a byte at a time.
        let split = split_records(message_of(&hello), 7);
        let (got, at) = byte_by_byte(HelloReader::new(CAP), &split);
        assert!(matches!(got, Parsed::Found(_)), "{name}: {got:?}");
        assert_eq!(at, split.len(), "{name}");
    }
    let (got, _) = byte_by_byte(
        HelloReader::new(CAP),
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
    );
    assert_eq!(got, Parsed::Invalid(Deny::UnsupportedProtocol));
}

#[test]
fn a_head_a_byte_at_a_time_is_found_at_its_last_byte() {
    let mut raw = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for _ in 0..90 {
        raw.extend_from_slice(b"X-a: b\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    let (got, at) = byte_by_byte(HeadReader::new(HEAD_CAP), &raw);
    assert!(matches!(got, Parsed::Found(_)), "{got:?}");
    assert_eq!(at, raw.len());
    // A bad first line is refused early, not at the cap.
    let (got, at) = byte_by_byte(
        HeadReader::new(HEAD_CAP),
        &[b"G\x01T / HTTP/1.1\r\n".as_slice(), &[b'x'; 4096]].concat(),
    );
    assert_eq!(got, Parsed::Invalid(Deny::BadRequest));
    assert!(at < 64, "{at}");
}
