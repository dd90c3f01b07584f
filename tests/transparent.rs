//! The transparent path in-process: real sockets on loopback, a fixed
//! original destination, real upstream servers that count what reaches
//! them.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALERT_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

fn host_entry(host: &str, up: &Upstream) -> String {
    format!("{host}:{}", up.addr.port())
}

#[tokio::test]
async fn allowed_http_gets_the_upstream_answer() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;

    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: API.test\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.ends_with("upstream GET /hello host=api.test body=0"),
        "{resp}"
    );
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_host_not_allowed_is_403_and_never_reaches_upstream() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;

    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(
        resp.contains("\r\nx-deny-reason: host_not_allowed\r\n"),
        "{resp}"
    );
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn a_port_not_allowed_is_403() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    // No port in the entry: only allowed_ports (80, 443) apply.
    gw.register("c1", "127.0.0.1", &["api.test"], 600).await;
    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: port_not_allowed"), "{resp}");
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn an_unregistered_source_is_unknown_source() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    let resp = gw
        .request_from("127.0.0.2", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: unknown_source"), "{resp}");
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn a_registered_token_that_expires_is_token_expired() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 1)
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: token_expired"), "{resp}");
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn an_allowed_client_hello_passes_through_byte_for_byte() {
    let hello = capture("clienthello-pq.bin");
    let up = raw_upstream(b"server-hello", hello.len()).await;
    let gw = start(up.addr, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&host_entry("api.example.test", &up)],
        600,
    )
    .await;

    let mut s = gw.connect_from("127.0.0.1").await;
    // In three segments with pauses: the gateway must reassemble.
    for part in [&hello[..3], &hello[3..1100], &hello[1100..]] {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut got = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"server-hello");
    assert_eq!(up.received(), hello);
}

#[tokio::test]
async fn a_denied_client_hello_gets_the_access_denied_alert() {
    let up = raw_upstream(b"", 0).await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("secure.test", &up)], 600)
        .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(&capture("clienthello-curl.bin")).await.unwrap();
    assert_eq!(read_all(&mut s).await, ALERT_ACCESS_DENIED);
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn a_second_request_to_another_host_on_a_kept_alive_connection_is_denied() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;

    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET /one HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut s)
            .await
            .ends_with("upstream GET /one host=api.test body=0")
    );
    // A body whose bytes look like a request: framing keeps them a body.
    let body = "GET /smuggled HTTP/1.1\r\nHost: other.test\r\n\r\n";
    let req = format!(
        "POST /two HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let resp = read_response(&mut s).await;
    assert!(
        resp.ends_with(&format!(
            "upstream POST /two host=api.test body={}",
            body.len()
        )),
        "{resp}"
    );
    s.write_all(b"POST /three HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").await.unwrap();
    assert!(read_response(&mut s).await.contains("upstream POST /three"));

    s.write_all(b"GET /four HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await
        .unwrap();
    let resp = String::from_utf8(read_all(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("x-deny-reason: host_not_allowed"), "{resp}");
    let seen = String::from_utf8(up.received()).unwrap();
    assert!(
        !seen.contains("/four"),
        "the denied request reached the upstream: {seen}"
    );
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_smuggling_shaped_request_is_400() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    let resp = gw.request_from("127.0.0.1", b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("x-deny-reason: bad_request"));
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn half_close_is_passed_on() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    // The answer still comes back after our write half closed.
    let resp = String::from_utf8(read_all(&mut s).await).unwrap();
    assert!(
        resp.ends_with("upstream GET /x host=api.test body=0"),
        "{resp}"
    );
}

#[tokio::test]
async fn silence_and_slow_drips_end_at_the_peek_timeout() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| c.gateway.peek_timeout_ms = 300).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;

    let started = Instant::now();
    let mut silent = gw.connect_from("127.0.0.1").await;
    assert!(read_all(&mut silent).await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));

    // One byte every 100 ms never completes a head: cut at the deadline,
    // not reset by each byte.
    let mut drip = gw.connect_from("127.0.0.1").await;
    let started = Instant::now();
    let mut answer = Vec::new();
    for b in b"GET / HTTP/1.1\r\nHost: api.test\r\n".iter() {
        if drip.write_all(&[*b]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), drip.read(&mut buf)).await
        {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 {
                break;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("x-deny-reason: peek_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn other_protocols_are_closed() {
    let up = raw_upstream(b"", 0).await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    for first in [
        &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x00\x00\x00",
    ] {
        let mut s = gw.connect_from("127.0.0.1").await;
        s.write_all(first).await.unwrap();
        assert!(read_all(&mut s).await.is_empty());
    }
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn private_destinations_are_refused_after_resolution() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| {
        c.gateway
            .resolve
            .insert("internal.test".into(), vec![ip("10.1.2.3")]);
        c.gateway
            .resolve
            .insert("meta.test".into(), vec![ip("::ffff:169.254.169.254")]);
    })
    .await;
    let port = up.addr.port();
    gw.register(
        "c1",
        "127.0.0.1",
        &[
            &format!("internal.test:{port}"),
            &format!("meta.test:{port}"),
        ],
        600,
    )
    .await;
    for host in ["internal.test", "meta.test"] {
        let resp = gw
            .request_from(
                "127.0.0.1",
                format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
            )
            .await;
        assert!(
            resp.contains("x-deny-reason: private_destination"),
            "{host}: {resp}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = start(closed, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.test:{}", closed.port())],
        600,
    )
    .await;
    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert!(resp.contains("x-deny-reason: upstream_unreachable"));
}

#[tokio::test]
async fn unregistering_closes_live_connections() {
    let hello = capture("clienthello-curl.bin");
    let up = raw_upstream(b"ok", 1).await;
    let gw = start(up.addr, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&host_entry("api.example.test", &up)],
        600,
    )
    .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(&hello).await.unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).await.unwrap();
    let (_, listed) = gw.admin("GET", "/v1/sandboxes/c1", None).await;
    assert_eq!(listed["live_connections"], 1);

    let (status, _) = gw.admin("DELETE", "/v1/sandboxes/c1", None).await;
    assert_eq!(status, 204);
    let started = Instant::now();
    let rest = read_all(&mut s).await;
    assert!(rest.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn idle_pairs_are_closed() {
    let up = raw_upstream(b"hi", 1).await;
    let gw = start(up.addr, |c| c.gateway.idle_timeout_ms = 300).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&host_entry("api.example.test", &up)],
        600,
    )
    .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(&capture("clienthello-curl.bin")).await.unwrap();
    let started = Instant::now();
    let got = read_all(&mut s).await;
    assert_eq!(got, b"hi");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_arrive_intact_both_ways() {
    const LEN: usize = 24 * 1024 * 1024;
    let hello = capture("clienthello-curl.bin");
    // Upstream: after the hello, sends LEN bytes and reads everything back.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let hello_len = hello.len();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut first = vec![0u8; hello_len];
        s.read_exact(&mut first).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let sender = tokio::spawn(async move {
            w.write_all(&pattern(LEN)).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        sender.await.unwrap();
        Sha256::digest(&got)
    });
    let gw = start(up_addr, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.example.test:{}", up_addr.port())],
        600,
    )
    .await;
    let s = gw.connect_from("127.0.0.1").await;
    let (mut r, mut w) = s.into_split();
    w.write_all(&hello).await.unwrap();
    let uploader = tokio::spawn(async move {
        w.write_all(&pattern(LEN / 2)).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    uploader.await.unwrap();
    assert_eq!(got.len(), LEN);
    assert_eq!(Sha256::digest(&got), Sha256::digest(pattern(LEN)));
    assert_eq!(server.await.unwrap(), Sha256::digest(pattern(LEN / 2)));
}

#[tokio::test]
async fn shutdown_drains_then_cuts() {
    let up = raw_upstream(b"ok", 1).await;
    let gw = start(up.addr, |c| c.gateway.drain_timeout_ms = 300).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&host_entry("api.example.test", &up)],
        600,
    )
    .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(&capture("clienthello-curl.bin")).await.unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).await.unwrap();
    let transparent = gw.running.transparent_addr;
    let started = Instant::now();
    let cut = gw.running.shutdown().await;
    assert_eq!(cut, 1);
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(read_all(&mut s).await.is_empty());
    // New connections are refused once stopped.
    assert!(tokio::net::TcpStream::connect(transparent).await.is_err());
}

#[tokio::test]
async fn one_sandbox_cannot_take_more_than_its_share() {
    let up = raw_upstream(b"ok", 1).await;
    let gw = start(up.addr, |c| c.gateway.max_connections_per_sandbox = 2).await;
    let hosts = [
        format!("api.example.test:{}", up.addr.port()),
        format!("api.test:{}", up.addr.port()),
    ];
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    gw.register("greedy", "127.0.0.1", &hosts, 600).await;
    gw.register("other", "127.0.0.2", &hosts, 600).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = gw.connect_from("127.0.0.1").await;
        s.write_all(&capture("clienthello-curl.bin")).await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: overloaded"), "{resp}");
    // Another sandbox is not affected; and a freed slot is usable again.
    let mut s = gw.connect_from("127.0.0.2").await;
    s.write_all(&capture("clienthello-curl.bin")).await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(&capture("clienthello-curl.bin")).await.unwrap();
    s.read_exact(&mut b).await.unwrap();
}

#[tokio::test]
async fn websocket_upgrades_are_checked_then_relayed_raw() {
    let up = upgrade_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let head =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let mut got = vec![0u8; head.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..], &head[..]);
    // Binary frames, and bytes that would be a request head to another
    // host if they were still parsed as HTTP: all relayed as they are.
    let frames = b"\x82\x05hello\x81\x03GET /x HTTP/1.1\r\nHost: other.test\r\n\r\n";
    s.write_all(frames).await.unwrap();
    let mut echo = vec![0u8; frames.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo[..], &frames[..]);

    // The upgrade request itself is still checked.
    let resp = gw
        .request_from("127.0.0.1", b"GET /chat HTTP/1.1\r\nHost: other.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: host_not_allowed"), "{resp}");
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_head_dribbled_in_hundreds_of_segments_is_served() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.set_nodelay(true).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n")
        .await
        .unwrap();
    // 90 headers (under the 100 limit), each in two segments read on their
    // own: a valid head in 180 reads, parsed incrementally, not refused.
    for _ in 0..90 {
        for piece in [&b"X-a: "[..], b"b\r\n"] {
            s.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    s.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    let answer = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_client_hello_sent_a_byte_per_segment_is_allowed() {
    let up = raw_upstream(b"", 0).await;
    let gw = start(up.addr, |c| c.gateway.peek_timeout_ms = 20_000).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&host_entry("api.example.test", &up)],
        600,
    )
    .await;
    // The post-quantum hello, 1,819 bytes.
    let hello = capture("clienthello-pq.bin");
    let mut s = gw.connect_from("127.0.0.1").await;
    s.set_nodelay(true).unwrap();
    for b in &hello {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
        tokio::time::sleep(Duration::from_micros(300)).await;
    }
    for _ in 0..200 {
        if up.received().len() >= hello.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.received(), hello, "the hello reached the upstream whole");
}

#[tokio::test]
async fn the_sandboxs_own_proxy_authorization_is_never_forwarded() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    let answer = gw
        .request_from(
            "127.0.0.1",
            b"GET / HTTP/1.1\r\nHost: api.test\r\nProxy-Authorization: Bearer the.sandbox.jwt\r\nX-Kept: 1\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = String::from_utf8_lossy(&up.received()).to_ascii_lowercase();
    assert!(seen.contains("x-kept: 1"), "{seen}");
    assert!(!seen.contains("proxy-authorization"), "{seen}");
    assert!(!seen.contains("the.sandbox.jwt"), "{seen}");
}

#[tokio::test]
async fn a_stalled_request_body_ends_at_the_idle_timeout() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| c.gateway.idle_timeout_ms = 600).await;
    gw.register("c1", "127.0.0.1", &[&host_entry("api.test", &up)], 600)
        .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), read_all(&mut s)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// Both directions of one raw connection saturated at once: the relay
/// drives them in one task, and neither may starve the other or lose,
/// reorder or duplicate a byte. The pipes grow on the way (8 MiB each
/// way fills them many times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_full_speed_at_once_arrive_whole() {
    const EACH_WAY: usize = 8 << 20;
    let hello = capture("clienthello-pq.bin");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let hello_len = hello.len();
    let upstream = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let mut first = vec![0u8; hello_len];
        r.read_exact(&mut first).await.unwrap();
        let send = tokio::spawn(async move {
            w.write_all(&pattern(EACH_WAY)).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(EACH_WAY);
        r.read_to_end(&mut got).await.unwrap();
        send.await.unwrap();
        (first, got)
    });
    let gw = start(up, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.example.test:{}", up.port())],
        600,
    )
    .await;
    let s = gw.connect_from("127.0.0.1").await;
    let (mut r, mut w) = s.into_split();
    let (hello2, data) = (hello.clone(), pattern(EACH_WAY));
    let send = tokio::spawn(async move {
        w.write_all(&hello2).await.unwrap();
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(EACH_WAY);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .expect("the download stalled")
        .unwrap();
    send.await.unwrap();
    let (first, upload) = tokio::time::timeout(Duration::from_secs(60), upstream)
        .await
        .expect("the upload stalled")
        .unwrap();
    assert_eq!(first, hello);
    assert_eq!(got.len(), EACH_WAY);
    assert!(got == pattern(EACH_WAY), "the download arrived changed");
    assert_eq!(upload.len(), EACH_WAY);
    assert!(upload == pattern(EACH_WAY), "the upload arrived changed");
}
