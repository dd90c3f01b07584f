//! The admin API over real HTTP: authentication, every call's success and
//! its error shapes, and the metrics endpoint.

#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use support::*;

async fn gw() -> Gw {
    start("127.0.0.1:9".parse().unwrap(), |_| {}).await
}

#[tokio::test]
async fn health_and_jwks_need_no_token() {
    let gw = gw().await;
    let (status, body) = admin_request(gw.running.admin_addr, "GET", "/healthz", None, None).await;
    assert_eq!((status, body), (200, json!("ok")));
    let (status, jwks) = admin_request(
        gw.running.admin_addr,
        "GET",
        "/.well-known/jwks.json",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["crv"].as_str(),
            key["alg"].as_str(),
            key["use"].as_str()
        ),
        (Some("EC"), Some("P-256"), Some("ES256"), Some("sig"))
    );
    assert_eq!(key["kid"], "sluice-1");
}

#[tokio::test]
async fn v1_needs_the_admin_token() {
    let gw = gw().await;
    for token in [None, Some("wrong"), Some("")] {
        let (status, body) =
            admin_request(gw.running.admin_addr, "GET", "/v1/sandboxes", None, token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["error"], "unauthorized");
    }
    // A prefix of the real token is not the token.
    let prefix = &gw.running.admin_token[..10];
    let (status, _) = admin_request(
        gw.running.admin_addr,
        "GET",
        "/v1/sandboxes",
        None,
        Some(prefix),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn minting_tokens() {
    let gw = gw().await;
    let (status, body) = gw
        .admin("POST", "/v1/tokens", Some(json!({"container_id": "c1", "user_id": "u1", "allowed_hosts": ["api.test", "*.wild.test:8443"], "ttl_seconds": 60})))
        .await;
    assert_eq!(status, 201, "{body}");
    let grant = gw
        .running
        .verifier
        .verify(body["token"].as_str().unwrap())
        .unwrap();
    assert_eq!(grant.claims.jti, body["jti"].as_str().unwrap());
    assert_eq!(grant.claims.exp, body["expires_at"].as_u64().unwrap());

    for (what, req) in [
        (
            "bare wildcard",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["*"]}),
        ),
        (
            "bad host",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["a b"]}),
        ),
        (
            "a wildcard over a public suffix",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["api.test", "*.co.uk"]}),
        ),
        (
            "a wildcard over a top-level domain",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["*.com"]}),
        ),
        (
            "a wildcard over a registrable namespace (PSL private section)",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["*.github.io"]}),
        ),
        (
            "a wildcard over a wildcard-DNS service",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["*.nip.io"]}),
        ),
        (
            "a wildcard under a wildcard-DNS service",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["*.x.sslip.io:443"]}),
        ),
        (
            "the unspecified address",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["0.0.0.0:15001"]}),
        ),
        (
            "a token no verifier would accept",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts":
                (0..400).map(|i| format!("host-{i:04}.example.test")).collect::<Vec<_>>()}),
        ),
        (
            "no hosts",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": []}),
        ),
        (
            "unsafe user",
            json!({"container_id": "c", "user_id": "../x", "allowed_hosts": ["a.test"]}),
        ),
        (
            "ttl too long",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["a.test"], "ttl_seconds": 99_999_999}),
        ),
        (
            "zero ttl",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["a.test"], "ttl_seconds": 0}),
        ),
        (
            "unknown field",
            json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["a.test"], "admin": true}),
        ),
        (
            "missing field",
            json!({"user_id": "u", "allowed_hosts": ["a.test"]}),
        ),
        (
            "wrong type",
            json!({"container_id": 5, "user_id": "u", "allowed_hosts": ["a.test"]}),
        ),
    ] {
        let (status, body) = gw.admin("POST", "/v1/tokens", Some(req)).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"], "bad_request", "{what}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}"
        );
    }
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_json_errors() {
    let gw = gw().await;
    let token = gw.running.admin_token.clone();
    let req = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Length: 6\r\nConnection: close\r\n\r\n{{nope}}"
    );
    let (status, body) = raw_http(gw.running.admin_addr, &req).await;
    assert_eq!(status, 400);
    assert!(body.contains("\"error\":\"bad_request\""), "{body}");
    let big = "x".repeat(100 * 1024);
    let req = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
        big.len()
    );
    let (status, body) = raw_http(gw.running.admin_addr, &req).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"error\":\"payload_too_large\""), "{body}");
    let (status, body) = gw.admin("GET", "/v1/nothing-here", None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
}

#[tokio::test]
async fn registering_listing_and_unregistering() {
    let gw = gw().await;
    let token = gw.register("c1", "198.18.0.2", &["api.test"], 600).await;

    let (status, body) = gw.admin("GET", "/v1/sandboxes", None).await;
    assert_eq!(status, 200);
    let list = body["sandboxes"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["container_id"], "c1");
    assert_eq!(list[0]["source_ip"], "198.18.0.2");
    assert_eq!(list[0]["allowed_hosts"], json!(["api.test"]));
    assert_eq!(list[0]["origin"], "registered");
    assert_eq!(list[0]["live_connections"], 0);

    // The same address, or the same container, twice: 409.
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(json!({"source_ip": "198.18.0.2", "token": token})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("address_taken"))
    );
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(json!({"source_ip": "198.18.0.3", "token": token})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("container_taken"))
    );
    // An IPv4-mapped spelling is the same address.
    let (status, _) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(json!({"source_ip": "::ffff:198.18.0.2", "token": token})),
        )
        .await;
    assert_eq!(status, 409);

    let (status, body) = gw.admin("GET", "/v1/sandboxes/c1", None).await;
    assert_eq!(
        (status, body["source_ip"].as_str()),
        (200, Some("198.18.0.2"))
    );
    let (status, _) = gw.admin("GET", "/v1/sandboxes/nope", None).await;
    assert_eq!(status, 404);

    let (status, _) = gw.admin("DELETE", "/v1/sandboxes/c1", None).await;
    assert_eq!(status, 204);
    let (status, body) = gw.admin("DELETE", "/v1/sandboxes/c1", None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    // Unregistering revoked the token: it registers nowhere again (and
    // the proxy door refuses it too).
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(json!({"source_ip": "198.18.0.2", "token": token})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("token_revoked"))
    );
    // The address is free again, for a new token.
    gw.register("c1", "198.18.0.2", &["api.test"], 600).await;
}

#[tokio::test]
async fn registering_bad_tokens_and_addresses_fails_with_the_reason() {
    let gw = gw().await;
    let good = {
        let (_, body) = gw
            .admin(
                "POST",
                "/v1/tokens",
                Some(json!({"container_id": "c1", "user_id": "u", "allowed_hosts": ["a.test"]})),
            )
            .await;
        body["token"].as_str().unwrap().to_owned()
    };
    for (what, ip, token, reason) in [
        (
            "garbage token",
            "198.18.0.2",
            "not-a-jwt".to_owned(),
            "token_invalid",
        ),
        (
            "tampered token",
            "198.18.0.2",
            format!("{good}x"),
            "token_invalid",
        ),
        ("bad address", "999.1.1.1", good.clone(), "bad_request"),
        (
            "unspecified address",
            "0.0.0.0",
            good.clone(),
            "bad_request",
        ),
    ] {
        let (status, body) = gw
            .admin(
                "POST",
                "/v1/sandboxes",
                Some(json!({"source_ip": ip, "token": token})),
            )
            .await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"], reason, "{what}");
    }
    let (_, body) = gw.admin("POST", "/v1/tokens", Some(json!({"container_id": "c2", "user_id": "u", "allowed_hosts": ["a.test"], "ttl_seconds": 1}))).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(json!({"source_ip": "198.18.0.9", "token": body["token"]})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("token_expired"))
    );
    let (_, body) = gw.admin("GET", "/v1/sandboxes", None).await;
    assert!(body["sandboxes"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn metrics_are_served_with_the_contract_names() {
    let gw = gw().await;
    gw.register("c1", "198.18.0.2", &["api.test"], 600).await;
    let page = gw.metrics().await;
    for name in [
        "sluice_registered_sandboxes",
        "sluice_active_connections",
        "sluice_claims_cache_misses_total",
    ] {
        assert!(page.contains(name), "{name} missing:\n{page}");
    }
    let build = format!(
        "sluice_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(page.contains(&build), "{build} missing:\n{page}");
}

#[tokio::test]
async fn launching_without_a_runtime_or_rootfs_is_503_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for (what, runtime, root) in [
        ("runtime", "/nonexistent/runsc", rootfs.clone()),
        ("rootfs", "sh", dir.path().join("no-such-rootfs")),
    ] {
        let (runtime, root) = (runtime.to_owned(), root.clone());
        let gw = start("127.0.0.1:9".parse().unwrap(), move |c| {
            c.sandbox.runtime = runtime;
            c.sandbox.rootfs = root;
            c.sandbox.subnet = "198.18.9.0/30".parse().unwrap();
        })
        .await;
        let req = json!({"user_id": "u", "allowed_hosts": ["a.test"], "command": ["sleep", "1"]});
        for _ in 0..3 {
            // Three tries on a /30 (one sandbox address): the address is
            // released each time, or the second would be subnet_exhausted.
            let (status, body) = gw
                .admin("POST", "/v1/sandboxes/launch", Some(req.clone()))
                .await;
            assert_eq!(status, 503, "{what}: {body}");
            assert_eq!(body["error"], "runtime_unavailable", "{what}: {body}");
        }
        let (_, body) = gw.admin("GET", "/v1/sandboxes", None).await;
        assert!(
            body["sandboxes"].as_array().unwrap().is_empty(),
            "{what}: {body}"
        );
        let Gw { running, dir } = gw;
        running.shutdown().await;
        let saved = sluice::identity::store::Store::open(dir.path())
            .unwrap()
            .load()
            .unwrap();
        assert!(saved.sandboxes.is_empty(), "{what}: {saved:?}");
    }
}

#[tokio::test]
async fn exec_needs_a_launched_sandbox() {
    let gw = gw().await;
    gw.register("reg", "198.18.0.2", &["api.test"], 600).await;
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes/reg/exec",
            Some(json!({"command": ["id"]})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("not_launched"))
    );
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes/nope/exec",
            Some(json!({"command": ["id"]})),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = gw
        .admin(
            "POST",
            "/v1/sandboxes/reg/exec",
            Some(json!({"command": ["id"], "shell": true})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn presets_expand_and_explain_names_the_entry_that_matched() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let gw = start(up.addr, |c| {
        c.presets
            .insert("local".into(), vec![format!("api.test:{port}")]);
    })
    .await;
    // An unknown preset is refused at mint; a known one is listed in the
    // token as given.
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/tokens",
            Some(json!({"container_id": "c", "user_id": "u", "allowed_hosts": ["@nope"]})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("unknown preset @nope"),
        "{body}"
    );
    let token = gw
        .register(
            "c1",
            "127.0.0.1",
            &["@package_managers", "@local", "*.wild.test", "ssh.test:22"],
            600,
        )
        .await;
    let grant = gw.running.verifier.verify(&token).unwrap();
    assert_eq!(
        grant.claims.allowed_hosts.0,
        vec!["@package_managers", "@local", "*.wild.test", "ssh.test:22"]
    );

    let explain = |host: &str, port: Option<u16>| {
        let path = match port {
            Some(p) => format!("/v1/explain?container_id=c1&host={host}&port={p}"),
            None => format!("/v1/explain?container_id=c1&host={host}"),
        };
        let gw = &gw;
        async move { gw.admin("GET", &path, None).await }
    };
    // host, port, decision, reason, the entry that matched
    type Explained<'a> = (&'a str, Option<u16>, &'a str, &'a str, Option<&'a str>);
    let cases: &[Explained] = &[
        (
            "pypi.org",
            None,
            "allow",
            "none",
            Some("pypi.org (@package_managers)"),
        ),
        ("deb.debian.org", Some(80), "deny", "host_not_allowed", None),
        (
            "a.b.wild.test",
            Some(443),
            "allow",
            "none",
            Some("*.wild.test"),
        ),
        ("ssh.test", Some(22), "allow", "none", Some("ssh.test:22")),
        ("ssh.test", Some(443), "deny", "port_not_allowed", None),
        ("elsewhere.test", None, "deny", "host_not_allowed", None),
    ];
    for (host, port, decision, reason, matched) in cases {
        let (status, body) = explain(host, *port).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["decision"], *decision, "{host}: {body}");
        assert_eq!(body["reason"], *reason, "{host}: {body}");
        assert_eq!(body["matched"].as_str(), *matched, "{host}: {body}");
    }
    let (status, _) = gw
        .admin("GET", "/v1/explain?container_id=nope&host=a.test", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = gw
        .admin("GET", "/v1/explain?container_id=c1&host=a%20b", None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = gw.admin("GET", "/v1/explain?container_id=c1", None).await;
    assert_eq!(status, 400);

    // The data plane expands the preset the same way.
    let answer = gw
        .request_from(
            "127.0.0.1",
            format!("GET / HTTP/1.1\r\nHost: api.test:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn the_sandbox_list_pages_in_container_id_order() {
    let gw = gw().await;
    for i in [3, 1, 4, 0, 2] {
        gw.register(
            &format!("c{i}"),
            &format!("198.18.0.{}", 10 + i),
            &["api.test"],
            600,
        )
        .await;
    }
    let page = |q: &str| {
        let gw = &gw;
        let path = format!("/v1/sandboxes{q}");
        async move { gw.admin("GET", &path, None).await }
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["container_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, all) = page("").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&all), ["c0", "c1", "c2", "c3", "c4"]);
    assert!(all["next"].is_null());
    let (_, first) = page("?limit=2").await;
    assert_eq!(
        (ids(&first), first["next"].as_str()),
        (vec!["c0".to_owned(), "c1".to_owned()], Some("c1"))
    );
    let (_, second) = page("?limit=2&after=c1").await;
    assert_eq!(
        (ids(&second), second["next"].as_str()),
        (vec!["c2".to_owned(), "c3".to_owned()], Some("c3"))
    );
    let (_, last) = page("?limit=2&after=c3").await;
    assert_eq!(ids(&last), ["c4"]);
    assert!(last["next"].is_null());
    // After an id that is not (or no longer) registered: from the next one.
    let (_, from) = page("?after=c20").await;
    assert_eq!(ids(&from), ["c3", "c4"]);
    for bad in ["?limit=0", "?limit=1001", "?limit=x", "?bogus=1"] {
        let (status, body) = page(bad).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
}
