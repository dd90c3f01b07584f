//! The properties every parser of untrusted bytes must keep, as functions
//! that panic when one is broken. The fuzz targets (`fuzz/`) and the corpus
//! replay in the test suite (`tests/fuzz_corpus.rs`) both call these, so
//! the fuzzer and CI check the same things.

use crate::host::{Host, HostPattern, split_authority};
use crate::policy::Allowlist;
use crate::proxy::http::{origin_form_head, strip_proxy_authorization};
use crate::proxy::sniff::{
    ChunkProgress, ChunkedState, HeadReader, HelloReader, Incremental, Parsed, classify,
    parse_client_hello, parse_request_head,
};

/// Feeds `data` to an incremental reader in pieces whose sizes the input
/// itself chooses; returns the first answer and the length it came at.
fn feed<P: Incremental>(mut reader: P, data: &[u8]) -> (Parsed<P::Output>, usize) {
    let step = usize::from(data.first().copied().unwrap_or(0) % 13) + 1;
    let mut end = 0;
    while end < data.len() {
        end = (end + step).min(data.len());
        match reader.poll(&data[..end]) {
            Parsed::NeedMore => {}
            done => return (done, end),
        }
    }
    (Parsed::NeedMore, end)
}

/// A ClientHello parse never panics and names only normalised hosts; the
/// incremental reader, fed the same bytes in pieces, answers what the
/// one-shot parser answers for the bytes it had, and never later than it.
pub fn client_hello(data: &[u8]) {
    let whole = parse_client_hello(data, 16 * 1024);
    if let Parsed::Found(hello) = &whole {
        let name = hello.sni.as_str();
        assert_eq!(name, name.to_ascii_lowercase());
        assert!(!name.ends_with('.'));
    }
    let (answer, at) = feed(HelloReader::new(16 * 1024), data);
    match answer {
        Parsed::NeedMore => assert_eq!(whole, Parsed::NeedMore),
        answer => assert_eq!(answer, parse_client_hello(&data[..at], 16 * 1024)),
    }
}

/// A head parse never panics or claims bytes it was not given; the
/// incremental reader finds a complete head as the one-shot parser does;
/// the rewrites for the next hop give heads that parse, with no
/// `Proxy-Authorization` left.
pub fn http_head(data: &[u8]) {
    let _ = classify(data);
    let whole = parse_request_head(data, 64 * 1024);
    if let Parsed::Found(head) = &whole {
        assert!(head.head_len <= data.len());
        let bytes = &data[..head.head_len];
        let stripped = strip_proxy_authorization(bytes).unwrap_or_default();
        if let Parsed::Found(h) = parse_request_head(&stripped, 64 * 1024) {
            assert!(h.proxy_authorization.is_none());
        }
        if let Ok(origin) = origin_form_head(bytes)
            && let Parsed::Found(h) = parse_request_head(&origin, 64 * 1024)
        {
            assert!(h.proxy_authorization.is_none());
            assert!(!h.absolute_form);
        }
    }
    let (answer, at) = feed(HeadReader::new(64 * 1024), data);
    if let Parsed::Found(head) = answer {
        assert_eq!(
            Parsed::Found(head),
            parse_request_head(&data[..at], 64 * 1024)
        );
    }
    crate::proxy::http::response_head(data);
}

/// A chunked body ends at the same byte whether fed whole or in two.
pub fn chunked_body(data: &[u8]) {
    let whole = ChunkedState::default().feed(data);
    let cut = data.len() / 2;
    let mut st = ChunkedState::default();
    let split = match st.feed(&data[..cut]) {
        ChunkProgress::Consumed => match st.feed(&data[cut..]) {
            ChunkProgress::Done(n) => ChunkProgress::Done(n + cut),
            other => other,
        },
        other => other,
    };
    assert_eq!(whole, split);
}

/// An allowlist entry prints back to itself; a name matches its own entry.
pub fn host_pattern(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = s.parse::<HostPattern>() {
        let again: Result<HostPattern, _> = p.to_string().parse();
        assert_eq!(again.as_ref(), Ok(&p));
    }
    if let Ok((ref host @ Host::Name(ref name), _)) = split_authority(s) {
        let list = Allowlist::new([HostPattern::Exact(name.clone(), None)]);
        assert!(list.decide(host, 443, &[443]).is_ok());
    }
}

/// Any bytes as a token: refused (a signature cannot be guessed), never a
/// panic, whether it reaches verification or stops at the header.
pub fn token(data: &[u8]) {
    use crate::identity::token::{Jwks, KeyPair, Verifier};
    use std::sync::OnceLock;
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| {
        let pair = KeyPair::generate("fuzz").unwrap_or_else(|e| panic!("keygen: {e}"));
        let jwks = Jwks::parse(&pair.jwks().to_string()).unwrap_or_else(|e| panic!("jwks: {e}"));
        Verifier::new(jwks, "secure-egress-control", "egress-proxy", 30)
    });
    if let Ok(s) = std::str::from_utf8(data) {
        assert!(verifier.verify_uncached(s).is_err());
        let _ = serde_json::from_str::<crate::identity::token::Claims>(s);
    }
    let _ = serde_json::from_slice::<crate::identity::token::Claims>(data);
}

/// Any bytes as an admin request body: an error or a request, never a
/// panic; launch requests go through their validation too.
pub fn admin_bodies(data: &[u8]) {
    use crate::admin::{ExecRequest, RegisterRequest, RevokeRequest, TokenRequest};
    let _ = serde_json::from_slice::<TokenRequest>(data);
    let _ = serde_json::from_slice::<RegisterRequest>(data);
    let _ = serde_json::from_slice::<ExecRequest>(data);
    let _ = serde_json::from_slice::<RevokeRequest>(data);
    if let Ok(req) = serde_json::from_slice::<crate::sandbox::LaunchRequest>(data) {
        let _ = crate::sandbox::validate_launch(&crate::config::Config::default(), &req);
    }
}

/// Any text as a config: an error or a config, never a panic.
pub fn config(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(s);
    }
}

/// A DNS message from a client never panics the door's parser or its
/// answer builder; every answer parses, keeps the query's ID, and fits
/// the client's UDP size.
pub fn dns_message(data: &[u8]) {
    use crate::dns::{Answer, parse, respond, udp_limit};
    let Ok(request) = parse(data) else { return };
    let limit = udp_limit(&request);
    for answer in [
        Answer::Addresses(vec![std::net::Ipv4Addr::new(198, 18, 1, 10); 50], 30),
        Answer::Empty,
        Answer::NxDomain,
        Answer::FormErr,
    ] {
        let bytes = respond(&request, &answer, limit);
        if let Ok(back) = hickory_proto::op::Message::from_vec(&bytes) {
            assert_eq!(back.metadata.id, request.metadata.id);
            assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
        }
    }
}

/// Any bytes as a message on the fleet's revocations channel, or as a
/// score read back from its sorted set: never a panic; a revocation that
/// parses names a jti-shaped id; a score that parses is a finite,
/// non-negative number.
pub fn fleet_message(data: &[u8]) {
    use crate::fleet::{Message, is_jti, parse_message, parse_score};
    let text = String::from_utf8_lossy(data);
    if let Some(Message::Revoke(jti, _)) = parse_message(&text) {
        assert!(is_jti(jti), "{jti:?}");
        assert!(text.starts_with("revoke "));
    }
    if parse_score(&text).is_some() {
        let ok = text.parse::<u64>().is_ok()
            || text.parse::<f64>().is_ok_and(|f| f.is_finite() && f >= 0.0);
        assert!(ok, "{text:?} read as a score");
    }
}

/// Any bytes as a request target: normalising never panics; what it
/// gives is a path in normal form (one leading `/`, no empty, `.` or `..`
/// segment, no query), normalising it again changes nothing, and matching
/// it against globs never panics. A rule that requires a query parameter
/// admits a query only when the parameter is in it.
pub fn request_path(data: &[u8]) {
    use crate::policy::rules::{PathGlob, RequestRule, normalize_path, query_of};
    let text = String::from_utf8_lossy(data);
    let rule = RequestRule::parse(&["GET", "/**?service=git-upload-pack"]);
    if let Ok(rule) = rule
        && rule.admits("GET", "/x", query_of(&text))
    {
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("service=git-upload-pack") || text.contains('%'));
    }
    let Ok(normal) = normalize_path(&text) else {
        return;
    };
    assert!(normal.starts_with('/'), "{normal:?}");
    assert!(!normal.contains('?'), "{normal:?}");
    let inner = normal.trim_end_matches('/');
    for seg in inner.split('/').skip(1) {
        assert!(!seg.is_empty() && seg != "." && seg != "..", "{normal:?}");
    }
    assert_eq!(normalize_path(&normal).as_deref(), Ok(normal.as_str()));
    for glob in ["/**", "/acme/**", "/acme/*/info/refs", "/*/*.git/**/x"] {
        if let Ok(g) = PathGlob::parse(glob) {
            let _ = g.matches(&normal);
        }
    }
}

/// Any bytes as a request head a sandbox holding credentials sends: the
/// placeholder scan (plain, inside `Basic` credentials, in a name) never
/// panics, and finds a placeholder that is there, whatever surrounds it.
pub fn placeholder_scan(data: &[u8]) {
    use crate::credentials::{Credentials, Sealed};
    let sealed = Sealed::new(b"fuzz", "c1", &["gh".into()], &Credentials::default());
    let placeholder = sealed.items[0].1.clone();
    let _ = sealed.find_in(data);
    let _ = sealed.find_in_name(&String::from_utf8_lossy(data));
    let mut with = data.to_vec();
    with.extend_from_slice(placeholder.as_bytes());
    with.extend_from_slice(data);
    assert_eq!(sealed.find_in(&with), Some("gh"));
}
