//! The fleet store on a real `redis-server` (Debian's), started by this
//! test on a free loopback port (never a system service): two gateways
//! share it. A registration's session appears with its token's remaining
//! life as TTL and goes with DELETE; a revocation on one gateway is
//! refused by the other within 1 s; with Redis gone both keep serving and
//! report it; a revocation made meanwhile reaches the other gateway once an
//! empty Redis is back; and a gateway restarted later still refuses it.
//!
//! A token replaced on one gateway is re-checked on the other: the live
//! connection the new token drops closes there within 1 s, the one it
//! keeps carries on. An organisation's daily budget, leased in slices
//! from Redis, stops its sandboxes on both gateways together.
//!
//! Without redis-server it skips with a reason (a failure with `CI=true`).

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::config::{Config, StoreBackend};
use support::*;

/// A redis-server of this test's own, killed (by its id) on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Redis { child, port };
        let start = Instant::now();
        while r.cli(&["PING"]).trim() != "PONG" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A token minted on `gw` for `container`: the token and its jti.
async fn mint(gw: &Gw, container: &str) -> (String, String) {
    let (_, minted) = gw
        .admin(
            "POST",
            "/v1/tokens",
            Some(json!({"container_id": container, "user_id": "u", "allowed_hosts": ["api.test"], "ttl_seconds": 600})),
        )
        .await;
    (
        minted["token"].as_str().unwrap().to_owned(),
        minted["jti"].as_str().unwrap().to_owned(),
    )
}

/// A token minted on `one`, accepted by `two`, revoked on `one`: refused
/// by `two` within 1 s. Returns the token.
async fn revoked_across(one: &Gw, two: &Gw, container: &str) -> String {
    let (token, jti) = mint(one, container).await;
    assert!(two.running.verifier.verify(&token).is_ok());
    let revoked_at = Instant::now();
    let (status, _) = one
        .admin("POST", "/v1/revocations", Some(json!({"jti": jti})))
        .await;
    assert_eq!(status, 204);
    eventually(
        Duration::from_secs(1),
        "the revocation on the other",
        || two.running.verifier.verify(&token).is_err(),
    )
    .await;
    eprintln!("revocation across gateways: {:?}", revoked_at.elapsed());
    token
}

async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fleet(port: u16, keys: std::path::PathBuf) -> impl FnOnce(&mut Config) + Clone {
    move |c: &mut Config| {
        c.store.backend = StoreBackend::Redis;
        c.store.redis_url = format!("redis://127.0.0.1:{port}/0");
        c.store.key_prefix = "t:".into();
        // One key pair for the fleet: both gateways verify each other's
        // tokens.
        c.auth.jwks_file = Some(keys.join("jwks.json"));
        c.auth.signing_key_file = Some(keys.join("private-key.pem"));
        // One inspection key: every gateway makes the same placeholders
        // and sandbox CAs. And a credential, whose secret must never
        // reach Redis.
        c.inspect.key_file = keys.join("inspect.key");
        c.credentials.insert(
            "gh".into(),
            sluice::config::CredentialConfig {
                hosts: vec!["api.gh.test".into()],
                secret_file: keys.join("gh.secret"),
                header: "authorization".into(),
                format: "Bearer {secret}".into(),
                env: "GH_TOKEN".into(),
                ..Default::default()
            },
        );
    }
}

/// The fleet's credential secret (never in Redis).
const FLEET_SECRET: &str = "fl33t-S3CRET-c0ffee";

/// A redis-server of the test's own and two gateways sharing it, both
/// connected.
struct Fleet<T> {
    port: u16,
    redis: Redis,
    keys: tempfile::TempDir,
    tweak: T,
    one: Gw,
    two: Gw,
}

impl Fleet<()> {
    async fn start() -> Fleet<impl FnOnce(&mut Config) + Clone> {
        Fleet::start_with("127.0.0.1:9".parse().unwrap(), |_| {}).await
    }

    /// Two gateways whose transparent connections go to `orig`, with
    /// `extra` applied to both configs.
    async fn start_with(
        orig: std::net::SocketAddr,
        extra: impl Fn(&mut Config) + Clone,
    ) -> Fleet<impl FnOnce(&mut Config) + Clone> {
        let port = free_port();
        let redis = Redis::start(port);
        let keys = tempfile::tempdir().unwrap();
        sluice::identity::token::KeyPair::generate("sluice-1")
            .unwrap()
            .write(keys.path())
            .unwrap();
        std::fs::write(keys.path().join("inspect.key"), [42u8; 32]).unwrap();
        std::fs::write(keys.path().join("gh.secret"), FLEET_SECRET).unwrap();
        let base = fleet(port, keys.path().to_owned());
        let tweak = move |c: &mut Config| {
            base(c);
            extra(c);
        };
        let one = start(orig, tweak.clone()).await;
        let two = start(orig, tweak.clone()).await;
        eventually(Duration::from_secs(5), "both connected", || {
            one.running.store_up() && two.running.store_up()
        })
        .await;
        Fleet {
            port,
            redis,
            keys,
            tweak,
            one,
            two,
        }
    }
}

#[tokio::test]
async fn two_gateways_share_sessions_and_revocations_through_redis() {
    if !have_tool(
        "redis-server",
        "--version",
        "two_gateways_share_sessions_and_revocations_through_redis",
    ) {
        return;
    }
    let Fleet {
        port,
        mut redis,
        keys: _keys,
        tweak,
        one,
        two,
    } = Fleet::start().await;

    // A session per registration, with the token's remaining life.
    let token = one
        .register("sb-one", "198.18.0.2", &["api.test"], 600)
        .await;
    let key = "t:session:sb-one";
    let mut session = String::new();
    eventually(Duration::from_secs(2), "the session", || {
        session = redis.cli(&["GET", key]);
        !session.trim().is_empty()
    })
    .await;
    let s: serde_json::Value = serde_json::from_str(session.trim()).unwrap();
    assert_eq!(s["container_id"], "sb-one");
    assert_eq!(s["source_ip"], "198.18.0.2");
    for field in [
        "organization_uuid",
        "gateway",
        "jti",
        "created_at",
        "expires_at",
    ] {
        assert!(s.get(field).is_some(), "{field} missing: {s}");
    }
    let ttl: u64 = redis.cli(&["TTL", key]).trim().parse().unwrap();
    assert!((590..=600).contains(&ttl), "TTL {ttl}");
    let (status, _) = one.admin("DELETE", "/v1/sandboxes/sb-one", None).await;
    assert_eq!(status, 204);
    eventually(Duration::from_secs(2), "the session gone", || {
        redis.cli(&["EXISTS", key]).trim() == "0"
    })
    .await;

    // A revocation on one is refused by the other within 1 s.
    let tx = revoked_across(&one, &two, "sb-x").await;
    drop(token);

    // Redis gone: both keep serving from local state and say so.
    redis.kill();
    eventually(Duration::from_secs(5), "both report the store down", || {
        !one.running.store_up() && !two.running.store_up()
    })
    .await;
    let page = one.metrics().await;
    assert_eq!(metric(&page, "sluice_store_up"), 0.0, "{page}");
    one.register("sb-during", "198.18.0.3", &["api.test"], 600)
        .await;
    let (ty, jti_y) = mint(&one, "sb-y").await;
    let (status, _) = one
        .admin("POST", "/v1/revocations", Some(json!({"jti": jti_y})))
        .await;
    assert_eq!(status, 204, "revoking works with the fleet store down");
    assert!(two.running.verifier.verify(&ty).is_ok(), "not shared yet");

    // An empty Redis comes back: re-seeded, and the revocation made
    // meanwhile reaches the other gateway.
    let redis = Redis::start(port);
    eventually(
        Duration::from_secs(15),
        "the other learns the revocation",
        || two.running.verifier.verify(&ty).is_err(),
    )
    .await;
    eventually(Duration::from_secs(5), "both up again", || {
        one.running.store_up() && two.running.store_up()
    })
    .await;
    assert_eq!(metric(&two.metrics().await, "sluice_store_up"), 1.0);
    assert_ne!(
        redis.cli(&["GET", "t:session:sb-during"]).trim(),
        "",
        "the session registered meanwhile was re-seeded"
    );
    let score = redis.cli(&["ZSCORE", "t:revoked", &jti_y]);
    assert!(!score.trim().is_empty(), "the revocation was re-seeded");

    // The other gateway, restarted later, still refuses both revocations.
    let Gw { running, dir } = two;
    running.shutdown().await;
    let two = start_in(dir, "127.0.0.1:9".parse().unwrap(), tweak).await;
    assert!(two.running.verifier.verify(&tx).is_err());
    assert!(two.running.verifier.verify(&ty).is_err());
}

/// Fleet input is hostile input: entries a peer (or anyone with the
/// Redis) wrote that revoke for ever, cannot be read as a number, or are
/// no jti at all, and messages that are none of sluice's, neither stop
/// the catch-up nor survive a Redis restart as poison: both gateways come
/// back up, and a revocation still spreads within 1 s.
#[tokio::test]
async fn hostile_fleet_entries_do_not_stop_revocations() {
    if !have_tool(
        "redis-server",
        "--version",
        "hostile_fleet_entries_do_not_stop_revocations",
    ) {
        return;
    }
    let Fleet {
        port,
        mut redis,
        keys: _keys,
        tweak: _,
        one,
        two,
    } = Fleet::start().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let soon = (now + 100).to_string();
    for (score, member) in [
        ("1e300", "poison-far"),
        ("+inf", "poison-inf"),
        (&format!("{soon}.5"), "fraction-ok"),
        (&soon, "bad jti!"),
        (&soon, "x".repeat(300).as_str()),
    ] {
        assert_eq!(redis.cli(&["ZADD", "t:revoked", score, member]).trim(), "1");
    }
    for message in [
        "revoke overflow 99999999999999999999999999999",
        "revoke",
        "nonsense from a peer",
        "sync",
    ] {
        redis.cli(&["PUBLISH", "t:revocations", message]);
    }
    // The readable entry in range is applied; the rest are refused and
    // counted, and nothing stops.
    eventually(Duration::from_secs(5), "the readable entry applied", || {
        two.running.verifier.is_revoked("fraction-ok")
    })
    .await;
    assert!(!two.running.verifier.is_revoked("poison-inf"));
    let rejected = metric(&two.metrics().await, "sluice_fleet_entries_rejected_total");
    assert!(rejected >= 2.0, "rejected {rejected}");
    // The far-future revocation arrived by message too: kept, but only for
    // the longest life a token may have here.
    assert!(two.running.verifier.is_revoked("overflow"));
    let latest = two.running.verifier.latest_exp(now + 5);
    for (jti, exp) in two.running.verifier.revoked() {
        assert!(exp <= latest, "{jti} kept until {exp}");
    }

    // A Redis restart: both come back up, what they re-seed is bounded...
    redis.kill();
    eventually(Duration::from_secs(5), "both report the store down", || {
        !one.running.store_up() && !two.running.store_up()
    })
    .await;
    let redis = Redis::start(port);
    eventually(Duration::from_secs(10), "both up again", || {
        one.running.store_up() && two.running.store_up()
    })
    .await;
    let far: f64 = redis
        .cli(&["ZSCORE", "t:revoked", "overflow"])
        .trim()
        .parse()
        .unwrap();
    assert!(far as u64 <= latest, "re-seeded until {far}");
    // ... and a revocation on one is refused by the other within 1 s.
    revoked_across(&one, &two, "sb-z").await;
}

/// Every gateway of a fleet gives a sandbox the same placeholders and the
/// same CA (both derived from the shared inspection key), and neither the
/// secret nor any private key ever reaches Redis.
#[tokio::test]
async fn a_fleet_shares_placeholders_and_cas_but_never_secrets() {
    if !have_tool(
        "redis-server",
        "--version",
        "a_fleet_shares_placeholders_and_cas_but_never_secrets",
    ) {
        return;
    }
    let Fleet {
        redis,
        keys: _keys,
        one,
        two,
        ..
    } = Fleet::start().await;
    let (status, minted) = one
        .admin(
            "POST",
            "/v1/tokens",
            Some(json!({"container_id": "sb-sealed", "user_id": "u", "allowed_hosts": ["api.gh.test"],
                        "credentials": ["gh"], "ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().unwrap();
    let mut placeholders = Vec::new();
    let mut keys_of_cas = Vec::new();
    for (gw, ip) in [(&one, "198.18.0.2"), (&two, "198.18.0.3")] {
        let (status, reg) = gw
            .admin(
                "POST",
                "/v1/sandboxes",
                Some(json!({"source_ip": ip, "token": token})),
            )
            .await;
        assert_eq!(status, 201, "{reg}");
        placeholders.push(reg["credentials"]["gh"].as_str().unwrap().to_owned());
        let pem = admin_text(gw, "/v1/sandboxes/sb-sealed/ca.pem").await;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        keys_of_cas.push(cert.tbs_certificate.subject_pki.raw.to_vec());
    }
    assert!(placeholders[0].starts_with("sluice-sealed-gh-"));
    assert_eq!(
        placeholders[0], placeholders[1],
        "placeholders differ across the fleet"
    );
    assert_eq!(
        keys_of_cas[0], keys_of_cas[1],
        "CAs differ across the fleet"
    );

    // Everything in Redis, read back: no secret, no private key.
    let mut all = String::new();
    for key in redis.cli(&["--scan", "--pattern", "t:*"]).lines() {
        let value = match redis.cli(&["TYPE", key]).trim() {
            "string" => redis.cli(&["GET", key]),
            "zset" => redis.cli(&["ZRANGE", key, "0", "-1", "WITHSCORES"]),
            "hash" => redis.cli(&["HGETALL", key]),
            "set" => redis.cli(&["SMEMBERS", key]),
            "list" => redis.cli(&["LRANGE", key, "0", "-1"]),
            other => panic!("{key} is a {other}"),
        };
        all.push_str(key);
        all.push_str(&value);
    }
    assert!(all.contains("sb-sealed"), "the session is missing: {all}");
    assert!(!all.contains(FLEET_SECRET), "the secret is in Redis");
    assert!(!all.contains("PRIVATE KEY"), "a private key is in Redis");
}

/// An admin GET whose answer is text.
async fn admin_text(gw: &Gw, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.running.admin_addr)
        .await
        .unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        gw.running.admin_token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// An upstream for downloads: `GET /slow` sends a byte every 20 ms for
/// up to 30 s; `GET /big?n=N` sends N bytes at once. Each connection on
/// its own task.
async fn download_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                if text.starts_with("GET /slow") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                        .await;
                    for _ in 0..1500 {
                        if s.write_all(b".").await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    return;
                }
                let n: usize = text
                    .split_once("n=")
                    .and_then(|(_, r)| r.split(' ').next()?.parse().ok())
                    .unwrap_or(0);
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())
                    .await;
                let chunk = vec![b'x'; 16 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if s.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
            });
        }
    });
    addr
}

/// Reads until the connection ends (or 10 s pass): bytes read, and when
/// it ended.
async fn read_until_end(s: &mut tokio::net::TcpStream) -> (usize, Instant) {
    use tokio::io::AsyncReadExt;
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (got, Instant::now()),
            Ok(Ok(n)) => got += n,
        }
    }
}

/// Downloads `n` bytes through `gw`'s transparent door from `ip`: how
/// many arrived (with the response head).
async fn download(gw: &Gw, ip: &str, n: u64) -> u64 {
    use tokio::io::AsyncWriteExt;
    let mut s = gw.connect_from(ip).await;
    s.write_all(format!("GET /big?n={n} HTTP/1.1\r\nHost: api.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until_end(&mut s).await.0 as u64
}

/// A token with `extra` claims' request fields, minted on `gw`.
async fn mint_with(gw: &Gw, body: serde_json::Value) -> String {
    let (status, minted) = gw.admin("POST", "/v1/tokens", Some(body)).await;
    assert_eq!(status, 201, "{minted}");
    minted["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_token_replaced_on_one_gateway_is_rechecked_on_the_other() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !have_tool(
        "redis-server",
        "--version",
        "a_token_replaced_on_one_gateway_is_rechecked_on_the_other",
    ) {
        return;
    }
    let up = download_upstream().await;
    let Fleet {
        port: _,
        redis: _redis,
        keys: _keys,
        tweak: _,
        one,
        two,
    } = Fleet::start_with(up, |_| {}).await;
    let old = mint_with(
        &one,
        json!({"container_id": "fl-1", "user_id": "u", "allowed_hosts": [format!("api.test:{}", up.port()), format!("other.test:{}", up.port())], "ttl_seconds": 600}),
    )
    .await;
    for gw in [&one, &two] {
        let (status, body) = gw
            .admin(
                "POST",
                "/v1/sandboxes",
                Some(json!({"source_ip": "127.0.0.2", "token": old})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // Two live downloads through the second gateway.
    let mut dropped = two.connect_from("127.0.0.2").await;
    dropped
        .write_all(b"GET /slow HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let mut kept = two.connect_from("127.0.0.2").await;
    kept.write_all(b"GET /slow HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    for s in [&mut dropped, &mut kept] {
        let n = s.read(&mut first).await.unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &first[..n]);
    }

    // A refused replacement changes nothing anywhere.
    let other = mint_with(
        &one,
        json!({"container_id": "fl-2", "user_id": "u", "allowed_hosts": ["other.test"], "ttl_seconds": 600}),
    )
    .await;
    let (status, body) = one
        .admin(
            "PUT",
            "/v1/sandboxes/fl-1/token",
            Some(json!({"token": other})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("container_mismatch"))
    );

    let new = mint_with(
        &one,
        json!({"container_id": "fl-1", "user_id": "u", "allowed_hosts": [format!("other.test:{}", up.port())], "ttl_seconds": 600}),
    )
    .await;
    let at = Instant::now();
    let (status, body) = one
        .admin(
            "PUT",
            "/v1/sandboxes/fl-1/token",
            Some(json!({"token": new})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, closed_at) = read_until_end(&mut dropped).await;
    let took = closed_at.duration_since(at);
    eprintln!("closed on the other gateway {took:?} after the replacement");
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    // The kept one still moves.
    let mut more = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), kept.read(&mut more))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0, "the kept download stopped");
    // The second gateway's registration holds the new token.
    let (_, view) = two.admin("GET", "/v1/sandboxes/fl-1", None).await;
    assert_eq!(
        view["allowed_hosts"],
        json!([format!("other.test:{}", up.port())]),
        "{view}"
    );
    let page = two.metrics().await;
    assert_eq!(
        metric(&page, "sluice_policy_changes_total{outcome=\"closed\"}"),
        1.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "sluice_policy_changes_total{outcome=\"kept\"}"),
        1.0,
        "{page}"
    );
}

#[tokio::test]
async fn an_organisation_budget_spent_through_two_gateways_stops_both() {
    if !have_tool(
        "redis-server",
        "--version",
        "an_organisation_budget_spent_through_two_gateways_stops_both",
    ) {
        return;
    }
    const BUDGET: u64 = 2 << 20;
    let up = download_upstream().await;
    let Fleet {
        port: _,
        redis,
        keys: _keys,
        tweak: _,
        one,
        two,
    } = Fleet::start_with(up, |c: &mut Config| {
        c.limits.organizations.insert(
            "org-a".into(),
            sluice::config::OrgLimitConfig {
                bytes_per_day: BUDGET,
            },
        );
    })
    .await;
    for (gw, id, ip) in [(&one, "o-1", "127.0.0.3"), (&two, "o-2", "127.0.0.4")] {
        let token = mint_with(
            gw,
            json!({"container_id": id, "user_id": "u", "allowed_hosts": [format!("api.test:{}", up.port())], "ttl_seconds": 600, "organization_uuid": "org-a"}),
        )
        .await;
        let (status, body) = gw
            .admin(
                "POST",
                "/v1/sandboxes",
                Some(json!({"source_ip": ip, "token": token})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // Half the budget through the first gateway: served whole.
    let a = download(&one, "127.0.0.3", BUDGET / 2 - 4096).await;
    assert!(a > BUDGET / 2 - 4096, "{a}");
    // The whole budget through the second: cut at what is left (less
    // what the first holds: under half a slice, and the next slice of
    // 128 KiB it leased then).
    let b = download(&two, "127.0.0.4", BUDGET).await;
    assert!(b < BUDGET / 2 + 4096, "cut: {b}");
    assert!(b + 2 * (128 << 10) > BUDGET / 2, "cut early: {b}");
    // The first spends the rest of its slice, then is cut too.
    let c = download(&one, "127.0.0.3", BUDGET).await;
    assert!(c <= 192 << 10, "{c}");
    let spent: u64 = redis
        .cli(&["KEYS", "t:org:org-a:*"])
        .lines()
        .map(|k| {
            redis
                .cli(&["GET", k.trim()])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum();
    assert!(spent >= BUDGET, "the fleet's count: {spent}");
    // Both gateways refuse the organisation now (429).
    for (gw, ip) in [(&one, "127.0.0.3"), (&two, "127.0.0.4")] {
        let mut refused = String::new();
        for _ in 0..50 {
            refused = gw
                .request_from(ip, b"GET /big?n=10 HTTP/1.1\r\nHost: api.test\r\n\r\n")
                .await;
            if refused.starts_with("HTTP/1.1 429") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
        assert!(refused.contains("quota_exceeded"), "{refused}");
    }
    let moved = a + b + c;
    eprintln!("the organisation moved {moved} of {BUDGET} bytes; Redis counted {spent}");
    assert!(moved <= BUDGET, "over the budget: {moved}");
    let (_, view) = one.admin("GET", "/v1/sandboxes/o-1", None).await;
    assert_eq!(
        view["usage"]["organization_bytes_per_day"], BUDGET,
        "{view}"
    );
    let page = two.metrics().await;
    assert!(
        metric(
            &page,
            "sluice_limited_total{limit=\"organization_bytes_per_day\"}"
        ) >= 1.0,
        "{page}"
    );
}
