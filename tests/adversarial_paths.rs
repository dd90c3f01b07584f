//! Hostile paths to a host with request rules, on the transparent path:
//! every trick that could make the gateway and the upstream read a path
//! differently is refused (`400 bad_request`) or judged on the path the
//! upstream will serve (`403 request_not_allowed`), and never reaches the
//! upstream. A refused request's body is dropped by its own framing, so
//! a request hidden in it is never read as one, while the connection goes
//! on to the next real request.

#![allow(clippy::unwrap_used)]

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The answers on one connection, as status and deny reason each.
fn answers(text: &str) -> Vec<(u16, String)> {
    text.split("HTTP/1.1 ")
        .skip(1)
        .map(|a| {
            let status = a.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
            let reason = a
                .lines()
                .find_map(|l| l.strip_prefix("x-deny-reason: "))
                .unwrap_or("")
                .trim()
                .to_owned();
            (status, reason)
        })
        .collect()
}

#[tokio::test]
async fn path_tricks_are_refused_before_the_upstream() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.test:{port} GET|HEAD /ok/**")],
        600,
    )
    .await;
    let table: &[(&str, u16, &str)] = &[
        ("/ok/../other", 403, "request_not_allowed"),
        ("/ok/%2e%2e/other", 403, "request_not_allowed"),
        ("/ok/.%2e/other", 403, "request_not_allowed"),
        ("/ok/%2E./other", 403, "request_not_allowed"),
        ("/ok/sub/../../other", 403, "request_not_allowed"),
        ("/OK/x", 403, "request_not_allowed"),
        ("/oK/x", 403, "request_not_allowed"),
        ("/ok.", 403, "request_not_allowed"),
        ("/ok%20/x", 403, "request_not_allowed"),
        ("/%6f%6b/../other", 403, "request_not_allowed"),
        ("*", 400, "bad_request"),
        ("//ok/x", 400, "bad_request"),
        ("/ok//x", 400, "bad_request"),
        ("/ok/x//", 400, "bad_request"),
        ("/ok%2Fx", 400, "bad_request"),
        ("/ok%2fx", 400, "bad_request"),
        ("/ok%5C..%5Cother", 400, "bad_request"),
        ("/ok/%00", 400, "bad_request"),
        ("/ok/%", 400, "bad_request"),
        ("/ok/%g0", 400, "bad_request"),
        ("/ok/..;/other", 400, "bad_request"),
        ("/ok/.;x/other", 400, "bad_request"),
        ("/ok/../..", 400, "bad_request"),
        ("/ok/%2e%2e/%2e%2e/etc", 400, "bad_request"),
        ("/ok/%252e%252e/other", 200, ""),
        ("/ok/a?x=/../../other", 200, ""),
        ("/ok/a#/../../other", 400, "bad_request"),
    ];
    for (path, status, reason) in table {
        let req = format!("GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");
        let answer = gw.request_from("127.0.0.1", req.as_bytes()).await;
        let got = answers(&answer);
        assert_eq!(got, vec![(*status, reason.to_string())], "{path}: {answer}");
        let seen = String::from_utf8_lossy(&up.received()).into_owned();
        let forwarded = seen.contains(&format!("GET {path} "));
        assert_eq!(forwarded, *status == 200, "{path}: the upstream got {seen}");
    }

    // A refused POST whose body is a request: the body is dropped by its
    // length, never read as a request; the GET after it is served on the
    // same connection. The same with a chunked body.
    let hidden = "GET /ok/smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let chunked = format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len());
    for (framing, body) in [
        (
            format!("Content-Length: {}", hidden.len()),
            hidden.to_owned(),
        ),
        ("Transfer-Encoding: chunked".to_owned(), chunked),
    ] {
        let mut s = gw.connect_from("127.0.0.1").await;
        let send = format!(
            "GET /ok/first HTTP/1.1\r\nHost: api.test\r\n\r\n\
             POST /ok/post HTTP/1.1\r\nHost: api.test\r\n{framing}\r\n\r\n{body}\
             GET /ok/after HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"
        );
        s.write_all(send.as_bytes()).await.unwrap();
        // The test upstream keeps its side open: read until the third
        // answer is whole.
        let mut out = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut chunk = [0u8; 4096];
            while !String::from_utf8_lossy(&out).contains("upstream GET /ok/after") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{framing}: the connection hung");
        let text = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(
            answers(&text),
            vec![
                (200, String::new()),
                (403, "request_not_allowed".to_owned()),
                (200, String::new())
            ],
            "{framing}: {text}"
        );
        assert!(text.contains("upstream GET /ok/after"), "{text}");
        let seen = String::from_utf8_lossy(&up.received()).into_owned();
        assert!(!seen.contains("smuggled"), "{framing}: {seen}");
        assert!(!seen.contains("/ok/post"), "{framing}: {seen}");
    }

    // What cannot go on closes after the refusal: `Expect` (the client
    // may never send the body), `Connection: close`, a body over the
    // most that is dropped, and a malformed chunked body.
    for (what, send) in [
        (
            "Expect",
            "POST /ok/p HTTP/1.1\r\nHost: api.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
                .to_owned(),
        ),
        (
            "a body over the cap",
            format!(
                "POST /ok/p HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n",
                2 * 1024 * 1024
            ),
        ),
        (
            "malformed chunks",
            "POST /ok/p HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\nGET /ok/after2 HTTP/1.1\r\nHost: api.test\r\n\r\n"
                .to_owned(),
        ),
    ] {
        let mut s = gw.connect_from("127.0.0.1").await;
        s.write_all(send.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.read_to_end(&mut out),
        )
        .await;
        assert!(read.is_ok(), "{what}: the connection was left open");
        let text = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(
            answers(&text),
            vec![(403, "request_not_allowed".to_owned())],
            "{what}: {text}"
        );
        let seen = String::from_utf8_lossy(&up.received()).into_owned();
        assert!(!seen.contains("/ok/p ") && !seen.contains("after2"), "{what}: {seen}");
    }
    // Each refused request was audited and counted on its own.
    let page = gw.metrics().await;
    assert!(
        metric(
            &page,
            r#"sluice_refused_requests_total{reason="request_not_allowed",decision="deny"}"#
        ) >= 12.0,
        "{page}"
    );
}
