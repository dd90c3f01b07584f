//! Registrations over time: revocation, expiry and the reaper, and a
//! registry that survives restarts (clean, and kill -9 of the binary).

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn revocation_refuses_the_token_and_closes_its_connections() {
    let up = raw_upstream(b"ok", 1).await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    gw.register(
        "c1",
        "127.0.0.1",
        &[
            &format!("api.example.test:{port}"),
            &format!("api.test:{port}"),
        ],
        600,
    )
    .await;
    let (_, listed) = gw.admin("GET", "/v1/sandboxes/c1", None).await;
    let jti = listed["jti"].as_str().unwrap().to_owned();

    let mut live = gw.connect_from("127.0.0.1").await;
    live.write_all(&capture("clienthello-curl.bin"))
        .await
        .unwrap();
    let mut b = [0u8; 2];
    live.read_exact(&mut b).await.unwrap();

    for bad in [
        json!({}),
        json!({"jti": ""}),
        json!({"jti": "a/b"}),
        json!({"jti": "x", "more": 1}),
    ] {
        let (status, _) = gw.admin("POST", "/v1/revocations", Some(bad)).await;
        assert_eq!(status, 400);
    }
    let (status, _) = gw
        .admin("POST", "/v1/revocations", Some(json!({"jti": jti})))
        .await;
    assert_eq!(status, 204);
    let started = Instant::now();
    assert!(read_all(&mut live).await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));

    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: token_revoked"), "{resp}");
}

#[tokio::test]
async fn revoked_proxy_tokens_are_407_and_their_tunnels_close() {
    let up = raw_upstream(b"ok", 1).await;
    let gw = start(up.addr, |_| {}).await;
    let port = up.addr.port();
    let (_, minted) = gw
        .admin("POST", "/v1/tokens", Some(json!({"container_id": "p1", "user_id": "u", "allowed_hosts": [format!("secure.test:{port}")]})))
        .await;
    let token = minted["token"].as_str().unwrap();
    let mut tunnel = tokio::net::TcpStream::connect(gw.running.proxy_addr)
        .await
        .unwrap();
    tunnel
        .write_all(format!("CONNECT secure.test:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\nx").as_bytes())
        .await
        .unwrap();
    let mut got = vec![0u8; "HTTP/1.1 200 Connection established\r\n\r\nok".len()];
    tunnel.read_exact(&mut got).await.unwrap();

    let (status, _) = gw
        .admin(
            "POST",
            "/v1/revocations",
            Some(json!({"jti": minted["jti"]})),
        )
        .await;
    assert_eq!(status, 204);
    assert!(read_all(&mut tunnel).await.is_empty());

    let mut s = tokio::net::TcpStream::connect(gw.running.proxy_addr)
        .await
        .unwrap();
    s.write_all(
        format!(
            "CONNECT secure.test:{port} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
    assert!(
        resp.starts_with("HTTP/1.1 407") && resp.contains("x-deny-reason: token_revoked"),
        "{resp}"
    );
}

#[tokio::test]
async fn expiry_closes_connections_then_the_reaper_unregisters() {
    let up = raw_upstream(b"ok", 1).await;
    let gw = start(up.addr, |c| c.sandbox.reap_after_s = 2).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.example.test:{}", up.addr.port())],
        2,
    )
    .await;
    let mut live = gw.connect_from("127.0.0.1").await;
    live.write_all(&capture("clienthello-curl.bin"))
        .await
        .unwrap();
    let mut b = [0u8; 2];
    live.read_exact(&mut b).await.unwrap();
    // Closed within a couple of seconds of expiry.
    let started = Instant::now();
    assert!(read_all(&mut live).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Still listed (denied token_expired) until reap_after_s has passed.
    let (_, body) = gw.admin("GET", "/v1/sandboxes", None).await;
    assert_eq!(body["sandboxes"].as_array().unwrap().len(), 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, body) = gw.admin("GET", "/v1/sandboxes", None).await;
    assert!(body["sandboxes"].as_array().unwrap().is_empty(), "{body}");
}

#[tokio::test]
async fn registrations_and_revocations_survive_a_restart() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let host = format!("api.test:{}", up.addr.port());
    gw.register("keep", "127.0.0.1", &[&host], 600).await;
    gw.register("gone", "127.0.0.3", &[&host], 600).await;
    gw.register("revoked", "127.0.0.4", &[&host], 600).await;
    let (status, _) = gw.admin("DELETE", "/v1/sandboxes/gone", None).await;
    assert_eq!(status, 204);
    let (_, r) = gw.admin("GET", "/v1/sandboxes/revoked", None).await;
    let (status, _) = gw
        .admin("POST", "/v1/revocations", Some(json!({"jti": r["jti"]})))
        .await;
    assert_eq!(status, 204);

    let Gw { running, dir } = gw;
    running.shutdown().await;
    let gw = start_in(dir, up.addr, |_| {}).await;
    let (_, body) = gw.admin("GET", "/v1/sandboxes", None).await;
    let ids: Vec<&str> = body["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["container_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["keep", "revoked"]);
    let resp = gw
        .request_from("127.0.0.4", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: token_revoked"), "{resp}");
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
}

/// `sluice serve` as a process: what the API acknowledged is there after
/// SIGKILL and a restart.
#[test]
fn a_kill_minus_nine_loses_no_acknowledged_registration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    let admin_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[gateway]\ntransparent_listen = \"127.0.0.1:0\"\nproxy_listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = \"127.0.0.1:0\"\nupstream = [\"127.0.0.1:9\"]\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let serve = || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let wait_up = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "sluice did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let token = || {
        std::fs::read_to_string(dir.path().join("state/admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    };

    let mut child = serve();
    wait_up();
    // Tokens first, then a burst of registrations from 16 clients at once;
    // SIGKILL lands in the middle of it, with registrations in flight
    // (several waiting on one shared commit).
    let total = 400;
    let t = token();
    let tokens: Vec<(String, String)> = (0..total)
        .map(|i| {
            let id = format!("c{i:03}");
            let (status, minted) = rt.block_on(admin_request(
                addr,
                "POST",
                "/v1/tokens",
                Some(json!({"container_id": id, "user_id": "u", "allowed_hosts": ["a.test"]})),
                Some(&t),
            ));
            assert_eq!(status, 201);
            (id, minted["token"].as_str().unwrap().to_owned())
        })
        .collect();
    let tokens = std::sync::Arc::new(tokens);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (tokens, next, acked, t) = (
                std::sync::Arc::clone(&tokens),
                std::sync::Arc::clone(&next),
                std::sync::Arc::clone(&acked),
                t.clone(),
            );
            rt.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((id, token)) = tokens.get(i) else {
                        return;
                    };
                    let ip = format!("198.18.{}.{}", i / 200, i % 200 + 2);
                    // A connection the kill cuts (its task panics in the
                    // helper) is not an acknowledgement.
                    let call = {
                        let (t, body) = (t.clone(), json!({"source_ip": ip, "token": token}));
                        async move {
                            admin_request(addr, "POST", "/v1/sandboxes", Some(body), Some(&t)).await
                        }
                    };
                    let Ok(Ok((status, _))) =
                        tokio::time::timeout(Duration::from_secs(5), tokio::spawn(call)).await
                    else {
                        return;
                    };
                    if status == 201 {
                        acked.lock().unwrap().push(id.clone());
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 100 {
        assert!(Instant::now() < deadline, "registrations did not get going");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL, mid-burst
    child.wait().unwrap();
    for c in clients {
        let _ = rt.block_on(c);
    }
    let mut acknowledged = acked.lock().unwrap().clone();
    assert!(
        acknowledged.len() < total,
        "the kill came after the burst, not in it"
    );

    let mut child = serve();
    wait_up();
    let (_, body) = rt.block_on(admin_request(
        addr,
        "GET",
        "/v1/sandboxes?limit=1000",
        None,
        Some(&token()),
    ));
    let ids: Vec<String> = body["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["container_id"].as_str().unwrap().to_owned())
        .collect();
    acknowledged.sort();
    child.kill().unwrap();
    child.wait().unwrap();
    // Every acknowledged one is there; one in flight may be too (it was on
    // disk, its answer lost).
    let missing: Vec<_> = acknowledged.iter().filter(|id| !ids.contains(id)).collect();
    assert!(missing.is_empty(), "lost after SIGKILL: {missing:?}");
    assert!(ids.len() >= acknowledged.len());
}

#[tokio::test]
async fn the_jwks_is_reloaded_when_it_changes_and_a_broken_one_is_ignored() {
    use sluice::identity::token::{KeyPair, MintRequest, Signer};
    let gw = start("127.0.0.1:9".parse().unwrap(), |_| {}).await;
    let jwks_path = gw.dir.path().join("keys/jwks.json");
    let mint = |signer: &Signer, id: &str| {
        signer
            .mint(&MintRequest {
                limits: Default::default(),
                organization_uuid: None,
                enforce: Default::default(),
                credentials: Vec::new(),
                container_id: id.into(),
                user_id: "u".into(),
                allowed_hosts: vec!["a.test".into()],
                ttl: Duration::from_secs(600),
            })
            .unwrap()
            .token
    };
    let old = Signer::load(
        &gw.dir.path().join("keys/private-key.pem"),
        "sluice-1",
        "secure-egress-control",
        "egress-proxy",
    )
    .unwrap();
    let rotated = KeyPair::generate("sluice-2").unwrap();
    let new = Signer::from_pem(
        rotated.private_pem.as_bytes(),
        "sluice-2",
        "secure-egress-control",
        "egress-proxy",
    )
    .unwrap();
    let register = |token: String, ip: &'static str| {
        let gw = &gw;
        async move {
            gw.admin(
                "POST",
                "/v1/sandboxes",
                Some(json!({"source_ip": ip, "token": token})),
            )
            .await
        }
    };
    // Before: the old key verifies, the new one is unknown.
    assert_eq!(register(mint(&old, "o1"), "127.0.0.1").await.0, 201);
    assert_eq!(register(mint(&new, "n1"), "198.18.0.3").await.0, 400);

    // Rotate: the JWKS now holds only the new key.
    std::fs::write(&jwks_path, rotated.jwks().to_string()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = register(mint(&new, "n2"), "198.18.0.4").await;
        if status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "the new key was never loaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = register(mint(&old, "o2"), "198.18.0.5").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("token_invalid")),
        "{body}"
    );
    // The sandbox registered under the old key is refused at its next
    // connection too (its grant is re-verified against the new set).
    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: token_invalid"), "{resp}");

    // A broken file keeps the last good set.
    std::fs::write(&jwks_path, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(gw.running.reload().is_err());
    assert_eq!(register(mint(&new, "n3"), "198.18.0.6").await.0, 201);
}

#[tokio::test]
async fn a_policy_reload_changes_new_connections_and_drops_none() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let gw = start(up.addr, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.test:{port}"), "other.test"],
        600,
    )
    .await;

    // A kept-alive connection, open across the reload.
    let mut live = gw.connect_from("127.0.0.1").await;
    live.write_all(b"GET /before HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut live)
            .await
            .ends_with("GET /before host=api.test body=0")
    );
    // other.test names no port: only allowed_ports apply, which lack this one.
    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await;
    assert!(resp.contains("x-deny-reason: port_not_allowed"), "{resp}");

    let mut config = test_config(gw.dir.path());
    config.gateway.allowed_ports = vec![80, 443, port];
    gw.running.reload_config(&config).unwrap();
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET /after HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut s)
            .await
            .ends_with("GET /after host=other.test body=0")
    );
    live.write_all(b"GET /still HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut live)
            .await
            .ends_with("GET /still host=api.test body=0")
    );

    // A config that does not validate changes nothing.
    let mut broken = config.clone();
    broken.gateway.peek_timeout_ms = 0;
    assert!(gw.running.reload_config(&broken).is_err());
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET /again HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut s)
            .await
            .ends_with("GET /again host=other.test body=0")
    );

    // Resolution is policy too: other.test now points at a private address.
    config
        .gateway
        .resolve
        .insert("other.test".into(), vec![ip("10.9.9.9")]);
    gw.running.reload_config(&config).unwrap();
    let resp = gw
        .request_from("127.0.0.1", b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await;
    assert!(
        resp.contains("x-deny-reason: private_destination"),
        "{resp}"
    );
}

/// A restart serves at once from the stored claims; every restored token
/// is then verified in full, and one that no longer verifies is refused on
/// its first use and its sandbox removed.
#[tokio::test]
async fn a_restart_verifies_restored_tokens_without_waiting_for_them() {
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    let host = format!("api.test:{}", up.addr.port());
    gw.register("good", "127.0.0.1", &[&host], 600).await;
    gw.register("forged", "127.0.0.5", &[&host], 600).await;
    let Gw { running, dir } = gw;
    running.shutdown().await;

    // The stored token of "forged" gets another token's signature: its
    // claims still read, but it no longer verifies.
    {
        use sluice::identity::store::{Change, Store};
        let store = Store::open(dir.path()).unwrap();
        let snap = store.load().unwrap();
        let sig_of = |token: &str| token.rsplit('.').next().unwrap().to_owned();
        let good = snap
            .sandboxes
            .iter()
            .find(|s| s.container_id == "good")
            .unwrap();
        let good_sig = sig_of(&good.token);
        let mut forged = snap
            .sandboxes
            .iter()
            .find(|s| s.container_id == "forged")
            .unwrap()
            .clone();
        let (head, _) = forged.token.rsplit_once('.').unwrap();
        forged.token = format!("{head}.{good_sig}");
        store.apply(vec![Change::Put(forged)]).await.unwrap();
    }

    let gw = start_in(dir, up.addr, |_| {}).await;
    let resp = gw
        .request_from(
            "127.0.0.5",
            format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
    assert!(
        resp.contains("x-deny-reason: token_invalid")
            || resp.contains("x-deny-reason: unknown_source"),
        "{resp}"
    );
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // The background pass removes the forged registration.
    let mut gone = false;
    for _ in 0..100 {
        let (status, _) = gw.admin("GET", "/v1/sandboxes/forged", None).await;
        if status == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(gone, "the forged registration was not removed");
    let (status, _) = gw.admin("GET", "/v1/sandboxes/good", None).await;
    assert_eq!(status, 200);
}

/// SIGHUP applies `[presets]` (to minting and to tokens verified from
/// then on) and `[dns]` (a new resolver with the new rate), and keeps the
/// running value of what needs a restart, in the data plane as in the
/// control plane: a changed `l2_bind_iface` does not make a registration
/// without a MAC fail, since nothing was bound on the new bridge.
#[tokio::test]
async fn a_reload_applies_presets_and_dns_and_keeps_what_needs_a_restart() {
    let gw = start("127.0.0.1:9".parse().unwrap(), |c| {
        c.dns.queries_per_second = 1000;
        c.dns.burst = 1000;
    })
    .await;
    let mint = |hosts: serde_json::Value| {
        let gw = &gw;
        async move {
            gw.admin(
                "POST",
                "/v1/tokens",
                Some(serde_json::json!({"container_id": "sb-r", "user_id": "u", "allowed_hosts": hosts, "ttl_seconds": 600})),
            )
            .await
        }
    };
    let (status, _) = mint(serde_json::json!(["@team"])).await;
    assert_eq!(status, 400, "an unknown preset");
    let mut config = test_config(gw.dir.path());
    config
        .presets
        .insert("team".into(), vec!["api.team.test".into()]);
    config.dns.queries_per_second = 1;
    config.dns.burst = 1;
    config.gateway.l2_bind_iface = "br-new".into();
    gw.running.reload_config(&config).unwrap();
    let (status, body) = mint(serde_json::json!(["@team"])).await;
    assert_eq!(status, 201, "{body}");
    // The new DNS rate: the second query at once is refused.
    gw.register("sb-dns", "127.0.0.6", &["api.test"], 600).await;
    let q = {
        let mut m = hickory_proto::op::Message::new(
            7,
            hickory_proto::op::MessageType::Query,
            hickory_proto::op::OpCode::Query,
        );
        m.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("api.test.").unwrap(),
            hickory_proto::rr::RecordType::A,
        ));
        m.to_vec().unwrap()
    };
    let sock = tokio::net::UdpSocket::bind("127.0.0.6:0").await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..2 {
        sock.send_to(&q, gw.running.dns_addr).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
        codes.push(m.metadata.response_code);
    }
    assert_eq!(
        codes,
        [
            hickory_proto::op::ResponseCode::NoError,
            hickory_proto::op::ResponseCode::Refused
        ]
    );
    // l2_bind_iface needs a restart: registrations still work as before
    // (no MAC required, none bound).
    gw.register("sb-l2", "127.0.0.7", &["api.test"], 600).await;
}
