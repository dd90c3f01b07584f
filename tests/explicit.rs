//! The explicit proxy in-process: CONNECT and absolute-form requests with
//! credentials in `Proxy-Authorization`, over raw sockets on loopback.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn mint(gw: &Gw, container: &str, hosts: &[&str], ttl: u64) -> String {
    let (status, body) = gw
        .admin("POST", "/v1/tokens", Some(json!({"container_id": container, "user_id": "u", "allowed_hosts": hosts, "ttl_seconds": ttl})))
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

fn basic(container: &str, token: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("container_{container}:jwt_{token}"))
    )
}

async fn proxy(gw: &Gw) -> TcpStream {
    TcpStream::connect(gw.running.proxy_addr).await.unwrap()
}

async fn one_shot(gw: &Gw, req: String) -> String {
    let mut s = proxy(gw).await;
    s.write_all(req.as_bytes()).await.unwrap();
    String::from_utf8_lossy(&read_all(&mut s).await).into_owned()
}

#[tokio::test]
async fn absolute_form_is_forwarded_in_origin_form_without_credentials() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let token = mint(&gw, "sb1", &[&format!("api.test:{port}")], 600).await;
    let mut s = proxy(&gw).await;
    s.write_all(
        format!(
            "GET http://api.test:{port}/x?y=1 HTTP/1.1\r\nHost: api.test:{port}\r\nProxy-Authorization: {}\r\nProxy-Connection: keep-alive\r\n\r\n",
            basic("sb1", &token)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.ends_with(&format!("upstream GET /x?y=1 host=api.test:{port} body=0")),
        "{resp}"
    );
    let seen = String::from_utf8(up.received()).unwrap();
    assert!(seen.starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{seen}");
    assert!(
        !seen.to_lowercase().contains("proxy-"),
        "hop-by-hop headers reached the upstream: {seen}"
    );
    assert!(!seen.contains(&token), "the token reached the upstream");
}

#[tokio::test]
async fn connect_tunnels_to_the_allowed_host() {
    let up = raw_upstream(b"tunnel-ok", 5).await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let token = mint(&gw, "sb1", &[&format!("secure.test:{port}")], 600).await;
    let mut s = proxy(&gw).await;
    // The first tunnel bytes arrive right behind the CONNECT head.
    s.write_all(format!("CONNECT secure.test:{port} HTTP/1.1\r\nHost: secure.test:{port}\r\nProxy-Authorization: Bearer {token}\r\n\r\nhello").as_bytes())
        .await
        .unwrap();
    let mut got = vec![0u8; "HTTP/1.1 200 Connection established\r\n\r\n".len() + 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "HTTP/1.1 200 Connection established\r\n\r\ntunnel-ok"
    );
    s.write_all(b" world").await.unwrap();
    s.shutdown().await.unwrap();
    read_all(&mut s).await;
    assert_eq!(up.received(), b"hello world");
}

#[tokio::test]
async fn credentials_are_required_and_checked() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let host = format!("api.test:{port}");
    let token = mint(&gw, "sb1", &[&host], 600).await;
    let expired = mint(&gw, "sb2", &[&host], 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let req = |auth: Option<String>| {
        let auth = auth
            .map(|a| format!("Proxy-Authorization: {a}\r\n"))
            .unwrap_or_default();
        format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n")
    };
    for (what, auth, reason) in [
        ("none", None, "token_invalid"),
        ("garbage", Some("Basic !!!".to_owned()), "token_invalid"),
        ("not a token", Some(basic("sb1", "abc")), "token_invalid"),
        ("expired", Some(basic("sb2", &expired)), "token_expired"),
        (
            "another container's name",
            Some(basic("sb9", &token)),
            "container_mismatch",
        ),
        (
            "no container name",
            Some(format!(
                "Basic {}",
                STANDARD.encode(format!(":jwt_{token}"))
            )),
            "container_mismatch",
        ),
    ] {
        let resp = one_shot(&gw, req(auth)).await;
        assert!(resp.starts_with("HTTP/1.1 407 "), "{what}: {resp}");
        assert!(
            resp.contains("Proxy-Authenticate: Basic realm=\"sluice\""),
            "{what}: {resp}"
        );
        assert!(
            resp.contains(&format!("x-deny-reason: {reason}")),
            "{what}: {resp}"
        );
    }
    assert_eq!(up.accepted(), 0);
    let mut s = proxy(&gw).await;
    s.write_all(req(Some(format!("Bearer {token}"))).as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test]
async fn policy_denies_and_bad_requests() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let token = mint(&gw, "sb1", &[&format!("api.test:{port}")], 600).await;
    let auth = basic("sb1", &token);
    for (what, req, status, reason) in [
        (
            "other host",
            format!(
                "GET http://other.test:{port}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"
            ),
            403,
            "host_not_allowed",
        ),
        (
            "other port",
            format!("GET http://api.test:1/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            403,
            "port_not_allowed",
        ),
        (
            "CONNECT other host",
            format!("CONNECT other.test:{port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            403,
            "host_not_allowed",
        ),
        (
            "Host contradicts URI",
            format!(
                "GET http://api.test:{port}/ HTTP/1.1\r\nHost: other.test\r\nProxy-Authorization: {auth}\r\n\r\n"
            ),
            400,
            "bad_request",
        ),
        (
            "origin-form",
            format!(
                "GET / HTTP/1.1\r\nHost: api.test:{port}\r\nProxy-Authorization: {auth}\r\n\r\n"
            ),
            400,
            "bad_request",
        ),
        (
            "https URI",
            format!("GET https://api.test:{port}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"),
            400,
            "bad_request",
        ),
    ] {
        let resp = one_shot(&gw, req).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {resp}"
        );
        assert!(
            resp.contains(&format!("x-deny-reason: {reason}")),
            "{what}: {resp}"
        );
    }
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn every_request_on_a_kept_alive_connection_is_judged_by_its_own_host() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let token = mint(
        &gw,
        "sb1",
        &[&format!("api.test:{port}"), &format!("secure.test:{port}")],
        600,
    )
    .await;
    let auth = basic("sb1", &token);
    let mut s = proxy(&gw).await;
    for (host, path) in [
        ("api.test", "/1"),
        ("api.test", "/2"),
        ("secure.test", "/3"),
    ] {
        s.write_all(
            format!(
                "GET http://{host}:{port}{path} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let resp = read_response(&mut s).await;
        assert!(
            resp.ends_with(&format!("upstream GET {path} host={host}:{port} body=0")),
            "{resp}"
        );
    }
    // Same authority reused, another allowed one dialled anew.
    assert_eq!(up.accepted(), 2);
    s.write_all(
        format!("GET http://other.test:{port}/4 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let resp = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
    assert!(
        resp.starts_with("HTTP/1.1 403") && resp.contains("x-deny-reason: host_not_allowed"),
        "{resp}"
    );
    assert!(!String::from_utf8(up.received()).unwrap().contains("/4"));
    assert_eq!(up.accepted(), 2);
}

#[tokio::test]
async fn the_connection_limit_is_shared_with_the_transparent_listener() {
    let up = raw_upstream(b"x", 1).await;
    let gw = start(up.addr, |c| c.gateway.max_connections = 1).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.example.test:{}", up.addr.port())],
        600,
    )
    .await;
    let mut held = gw.connect_from("127.0.0.1").await;
    held.write_all(&capture("clienthello-curl.bin"))
        .await
        .unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();
    // The one slot is taken: the proxy listener refuses at once.
    let mut s = proxy(&gw).await;
    let _ = s.write_all(b"GET http://api.test/ HTTP/1.1\r\n\r\n").await;
    assert!(read_all(&mut s).await.is_empty());
    let page = gw.metrics().await;
    assert!(
        metric(
            &page,
            r#"sluice_connections_total{mode="proxy",protocol="other",decision="deny",reason="overloaded"}"#
        ) >= 1.0,
        "{page}"
    );
}

#[tokio::test]
async fn heads_are_bounded_in_size_and_time() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| {
        c.gateway.peek_timeout_ms = 300;
        c.gateway.max_request_head_bytes = 4096;
    })
    .await;
    // Silence, then a head that never ends: both cut at the deadline.
    for first in [&b""[..], b"GET http://api.test/ HTTP/1.1\r\nX: "] {
        let started = std::time::Instant::now();
        let mut s = proxy(&gw).await;
        s.write_all(first).await.unwrap();
        let resp = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
        assert!(resp.contains("x-deny-reason: peek_timeout"), "{resp}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // A head over the limit: 400 before it ends.
    let big = format!(
        "GET http://api.test/ HTTP/1.1\r\nX-Big: {}\r\n",
        "a".repeat(8192)
    );
    let resp = one_shot(&gw, big).await;
    assert!(
        resp.starts_with("HTTP/1.1 400") && resp.contains("x-deny-reason: bad_request"),
        "{resp}"
    );
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn a_client_hello_in_a_tunnel_must_name_the_connect_host() {
    let hello = capture("clienthello-curl.bin"); // SNI api.example.test
    let up = raw_upstream(b"", usize::MAX).await;
    let gw = start(up.addr, |c| c.gateway.peek_timeout_ms = 2000).await;
    let port = up.addr.port();
    let token = mint(
        &gw,
        "sb1",
        &[
            &format!("secure.test:{port}"),
            &format!("api.example.test:{port}"),
        ],
        600,
    )
    .await;
    let connect = |host: &str| {
        format!("CONNECT {host}:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n")
    };
    const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

    // Tunnel to secure.test, hello for api.example.test: the alert.
    let mut s = proxy(&gw).await;
    s.write_all(connect("secure.test").as_bytes())
        .await
        .unwrap();
    s.write_all(&hello).await.unwrap();
    let got = read_all(&mut s).await;
    assert!(got.starts_with(ESTABLISHED), "{got:?}");
    assert_eq!(
        &got[ESTABLISHED.len()..],
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49]
    );
    assert!(up.received().is_empty(), "the hello reached the upstream");

    // The same hello through a tunnel to its own name passes untouched.
    let mut s = proxy(&gw).await;
    s.write_all(connect("api.example.test").as_bytes())
        .await
        .unwrap();
    let mut established = vec![0u8; ESTABLISHED.len()];
    s.read_exact(&mut established).await.unwrap();
    s.write_all(&hello).await.unwrap();
    for _ in 0..50 {
        if up.received().len() >= hello.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.received(), hello);
}

#[tokio::test]
async fn server_first_protocols_are_not_held_up_by_the_tunnel_check() {
    let up = raw_upstream(b"SSH-2.0-OpenSSH_9.2\r\n", 0).await;
    let gw = start(up.addr, |c| c.gateway.peek_timeout_ms = 5000).await;
    let port = up.addr.port();
    let token = mint(&gw, "sb1", &[&format!("ssh.test:{port}")], 600).await;
    let mut s = proxy(&gw).await;
    let started = std::time::Instant::now();
    s.write_all(
        format!("CONNECT ssh.test:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let want = b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-OpenSSH_9.2\r\n";
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], &want[..]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn proxied_websocket_upgrades_are_relayed_raw() {
    let up = upgrade_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let token = mint(&gw, "sb1", &[&format!("api.test:{port}")], 600).await;
    let mut s = proxy(&gw).await;
    s.write_all(
        format!("GET http://api.test:{port}/chat HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let mut got = vec![0u8; head.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..], &head[..]);
    s.write_all(b"\x82\x02hi").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"\x82\x02hi");
    let seen = String::from_utf8(up.received()).unwrap();
    assert!(
        seen.starts_with("GET /chat HTTP/1.1\r\n")
            && seen.contains("Upgrade: websocket")
            && !seen.contains(&token),
        "{seen}"
    );
}

#[tokio::test]
async fn pipelined_requests_get_every_answer_before_a_refusal() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let token = mint(
        &gw,
        "sb1",
        &[&format!("api.test:{port}"), &format!("secure.test:{port}")],
        600,
    )
    .await;
    let auth = format!("Proxy-Authorization: Bearer {token}\r\n");
    // Three requests in one write: two authorities, then a refused one.
    let burst = format!(
        "GET http://api.test:{port}/1 HTTP/1.1\r\n{auth}\r\nGET http://secure.test:{port}/2 HTTP/1.1\r\n{auth}\r\nGET http://other.test:{port}/3 HTTP/1.1\r\n{auth}\r\n"
    );
    let answer = one_shot(&gw, burst).await;
    let first = answer.find("upstream GET /1 host=api.test").expect(&answer);
    let second = answer
        .find("upstream GET /2 host=secure.test")
        .expect(&answer);
    let refused = answer
        .find("x-deny-reason: host_not_allowed")
        .expect(&answer);
    assert!(first < second && second < refused, "{answer}");
    assert!(!String::from_utf8(up.received()).unwrap().contains("/3"));
}

#[tokio::test]
async fn one_container_cannot_take_more_than_its_share_through_the_proxy() {
    let up = raw_upstream(b"", usize::MAX).await;
    let gw = start(up.addr, |c| c.gateway.max_connections_per_sandbox = 2).await;
    let port = up.addr.port();
    let greedy = mint(&gw, "greedy", &[&format!("ssh.test:{port}")], 600).await;
    let other = mint(&gw, "other", &[&format!("ssh.test:{port}")], 600).await;
    let tunnel = |token: String| {
        let gw = &gw;
        async move {
            let mut s = proxy(gw).await;
            s.write_all(format!("CONNECT ssh.test:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut got = vec![0u8; "HTTP/1.1 200 Connection established\r\n\r\n".len()];
            let ok = s.read_exact(&mut got).await.is_ok() && got.starts_with(b"HTTP/1.1 200");
            (s, ok, String::from_utf8_lossy(&got).into_owned())
        }
    };
    let (a, ok_a, _) = tunnel(greedy.clone()).await;
    let (_b, ok_b, _) = tunnel(greedy.clone()).await;
    assert!(ok_a && ok_b);
    let (mut c, ok_c, head) = tunnel(greedy.clone()).await;
    assert!(!ok_c, "{head}");
    let rest = String::from_utf8_lossy(&read_all(&mut c).await).into_owned();
    assert!(
        format!("{head}{rest}").contains("x-deny-reason: overloaded"),
        "{head}{rest}"
    );
    let (_d, ok_d, _) = tunnel(other).await;
    assert!(ok_d, "another container was refused");
    // A freed slot is usable again.
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_e, ok_e, _) = tunnel(greedy).await;
    assert!(ok_e);
}

#[tokio::test]
async fn a_stalled_request_body_ends_at_the_idle_timeout() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| c.gateway.idle_timeout_ms = 600).await;
    let port = up.addr.port();
    let token = mint(&gw, "sb1", &[&format!("api.test:{port}")], 600).await;
    let mut s = proxy(&gw).await;
    s.write_all(
        format!("POST http://api.test:{port}/ HTTP/1.1\r\nHost: api.test:{port}\r\nProxy-Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n0123456789")
            .as_bytes(),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), read_all(&mut s)).await;
    let took = started.elapsed();
    // Not the 5 s peek deadline, nor the default 300 s idle: the
    // configured idle timeout, in the body phase too.
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test]
async fn connections_are_counted_per_source_from_accept() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| c.gateway.max_connections_per_source = 2).await;
    // Two silent connections, not yet identified, hold the source's share.
    let _a = proxy(&gw).await;
    let _b = proxy(&gw).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = proxy(&gw).await;
    let closed = tokio::time::timeout(Duration::from_secs(2), read_all(&mut third)).await;
    assert!(matches!(closed, Ok(ref b) if b.is_empty()), "{closed:?}");
    let page = gw.metrics().await;
    assert!(
        metric(
            &page,
            r#"sluice_connections_total{mode="proxy",protocol="other",decision="deny",reason="overloaded"}"#
        ) >= 1.0,
        "{page}"
    );
    // One count per source for both doors: with the source's share held on
    // the proxy door, the transparent door closes a third connection too.
    let mut transparent = gw.connect_from("127.0.0.1").await;
    let closed = tokio::time::timeout(Duration::from_secs(2), read_all(&mut transparent)).await;
    assert!(matches!(closed, Ok(ref b) if b.is_empty()), "{closed:?}");
    let page = gw.metrics().await;
    assert!(
        metric(
            &page,
            r#"sluice_connections_total{mode="transparent",protocol="other",decision="deny",reason="overloaded"}"#
        ) >= 1.0,
        "{page}"
    );
}

#[tokio::test]
async fn a_tightened_policy_applies_to_the_next_dial_of_a_live_connection() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let token = mint(
        &gw,
        "sb1",
        &[&format!("api.test:{port}"), &format!("other.test:{port}")],
        600,
    )
    .await;
    let mut s = proxy(&gw).await;
    let req = |host: &str| {
        format!(
            "GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
        )
    };
    s.write_all(req("api.test").as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // SIGHUP: loopback is no longer exempt from the destination guard.
    let mut tightened = test_config(gw.dir.path());
    tightened.gateway.allow_destinations.clear();
    gw.running.reload_config(&tightened).unwrap();
    // The same connection, a new upstream: dialled under the new policy.
    s.write_all(req("other.test").as_bytes()).await.unwrap();
    let answer = read_response(&mut s).await;
    assert!(
        answer.contains("x-deny-reason: private_destination"),
        "{answer}"
    );
    assert_eq!(up.accepted(), 1);
}
