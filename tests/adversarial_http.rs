//! Hostile HTTP/1 on the transparent path: every case refused in HTTP's
//! form with its reason, never reaching the upstream, leaking nothing.

#![allow(clippy::unwrap_used)]

mod support;

use support::*;

#[tokio::test]
async fn hostile_http_is_refused_cleanly() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    gw.register("c1", "127.0.0.1", &[&format!("api.test:{port}")], 600)
        .await;
    let case = |name, send: String, status, reason| Case {
        name,
        source: "127.0.0.1",
        send: send.into_bytes(),
        refusal: Refusal::Http(status),
        protocol: "http",
        reason,
    };
    let many_headers: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let cases = vec![
        case("host not allowed", "GET / HTTP/1.1\r\nHost: other.test\r\n\r\n".into(), 403, "host_not_allowed"),
        case("no Host", "GET / HTTP/1.1\r\n\r\n".into(), 403, "no_host"),
        case("two Hosts", "GET / HTTP/1.1\r\nHost: api.test\r\nHost: other.test\r\n\r\n".into(), 400, "bad_request"),
        case("CL and TE", "POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, "bad_request"),
        case("two lengths", "POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".into(), 400, "bad_request"),
        case("invalid length", "POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: -1\r\n\r\n".into(), 400, "bad_request"),
        case("obs-fold", "GET / HTTP/1.1\r\nHost: api.test\r\nX: a\r\n b\r\n\r\n".into(), 400, "bad_request"),
        case("bare CR", "GET / HTTP/1.1\r\nHost: api.test\rX: y\r\n\r\n".into(), 400, "bad_request"),
        case("empty header name", "GET / HTTP/1.1\r\nHost: api.test\r\n: v\r\n\r\n".into(), 400, "bad_request"),
        case("101 headers", format!("GET / HTTP/1.1\r\nHost: api.test\r\n{many_headers}\r\n"), 400, "bad_request"),
        case("a head over 64 KiB", format!("GET / HTTP/1.1\r\nHost: api.test\r\nX: {}\r\n\r\n", "a".repeat(70 * 1024)), 400, "bad_request"),
        case("CONNECT on the transparent port", format!("CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\n"), 400, "bad_request"),
        case("absolute URI against Host", "GET http://api.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n".into(), 400, "bad_request"),
        case("userinfo in Host", "GET / HTTP/1.1\r\nHost: me@api.test\r\n\r\n".into(), 400, "bad_request"),
        case("an address-like name", "GET / HTTP/1.1\r\nHost: 127.1\r\n\r\n".into(), 400, "bad_request"),
        case("Connection names Content-Length", "POST / HTTP/1.1\r\nHost: api.test\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 44\r\n\r\nGET /x HTTP/1.1\r\nHost: other.test\r\n\r\n".into(), 400, "bad_request"),
        case("Connection names Transfer-Encoding", "POST / HTTP/1.1\r\nHost: api.test\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, "bad_request"),
        case("a coding list", "POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".into(), 400, "bad_request"),
        case("chunked and a non-ASCII space", "POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\u{a0}\r\n\r\n0\r\n\r\n".into(), 400, "bad_request"),
        case("chunked on HTTP/1.0", "POST / HTTP/1.0\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, "bad_request"),
        case("two Transfer-Encodings", "POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, "bad_request"),
        case("a second request to another host", "GET /1 HTTP/1.1\r\nHost: api.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: other.test\r\n\r\n".to_string(), 200, "host_not_allowed"),
    ];
    // The last case is allowed first: it is checked by hand below.
    let (kept_alive, cases): (Vec<_>, Vec<_>) = cases
        .into_iter()
        .partition(|c| c.name.starts_with("a second"));
    let mut closed = vec![
        Case {
            name: "HTTP/2 prior knowledge",
            source: "127.0.0.1",
            send: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            refusal: Refusal::Closed,
            protocol: "other",
            reason: "unsupported_protocol",
        },
        Case {
            name: "not HTTP at all",
            source: "127.0.0.1",
            send: b"\x00\x01\x02\x03".to_vec(),
            refusal: Refusal::Closed,
            protocol: "other",
            reason: "unsupported_protocol",
        },
        Case {
            name: "an unknown source",
            source: "127.0.0.9",
            send: b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n".to_vec(),
            refusal: Refusal::Http(403),
            protocol: "http",
            reason: "unknown_source",
        },
    ];
    let mut all = cases;
    all.append(&mut closed);
    run_cases(&gw, &[&up], all).await;

    // Pipelined behind an allowed request, a request to another host is
    // refused and never forwarded; the first is answered.
    let send = &kept_alive[0].send;
    let answer = gw.request_from("127.0.0.1", send).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("x-deny-reason: host_not_allowed"),
        "{answer}"
    );
    assert!(!String::from_utf8(up.received()).unwrap().contains("GET /2"));
}

/// Every answer is paired with the request it answers: an upstream that
/// switches protocols (`101`) before the upgrade request went up whole
/// does not turn the connection raw, so what the client sends next is
/// still judged (and a request for another host never reaches it).
#[tokio::test]
async fn an_early_switch_does_not_open_a_raw_path() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        1,
    )
    .await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    gw.register("c1", "127.0.0.1", &[&format!("api.test:{port}")], 600)
        .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"POST /ws HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 4\r\n\r\n")
        .await
        .unwrap();
    // The upstream answers 101 while the body is still to come.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = s.write_all(b"body").await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = s
        .write_all(b"GET /after HTTP/1.1\r\nHost: forbidden.test\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), s.read_to_end(&mut out)).await;
    let seen = String::from_utf8_lossy(&up.received()).into_owned();
    assert!(!seen.contains("forbidden.test"), "the upstream got: {seen}");
    assert!(
        !String::from_utf8_lossy(&out).contains("101"),
        "the client was told of a switch"
    );
}
