//! Tokens that must not open a connection: expired, revoked, forged,
//! oversized, not yet valid, for another container. Registered sandboxes
//! on the transparent path; the same through the proxy's credentials.

#![allow(clippy::unwrap_used)]

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn bad_tokens_open_nothing() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let host = format!("api.test:{port}");
    let gw = start(up.addr, |_| {}).await;
    gw.register("expiring", "127.0.0.2", &[&host], 1).await;
    gw.register("revoked", "127.0.0.3", &[&host], 600).await;
    let (_, r) = gw.admin("GET", "/v1/sandboxes/revoked", None).await;
    let (status, _) = gw
        .admin("POST", "/v1/revocations", Some(json!({"jti": r["jti"]})))
        .await;
    assert_eq!(status, 204);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
    let cases = vec![
        Case {
            name: "an expired registration",
            source: "127.0.0.2",
            send: req.clone(),
            refusal: Refusal::Http(403),
            protocol: "http",
            reason: "token_expired",
        },
        Case {
            name: "a revoked registration",
            source: "127.0.0.3",
            send: req.clone(),
            refusal: Refusal::Http(403),
            protocol: "http",
            reason: "token_revoked",
        },
    ];
    run_cases(&gw, &[&up], cases).await;

    // Through the proxy: credentials that must be refused with 407.
    let (_, minted) = gw
        .admin(
            "POST",
            "/v1/tokens",
            Some(json!({"container_id": "p1", "user_id": "u", "allowed_hosts": [host]})),
        )
        .await;
    let good = minted["token"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = good.split('.').collect();
    let forge = |header: serde_json::Value| {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            parts[1],
            parts[2]
        )
    };
    let payload: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let mut widened = payload.clone();
    widened["allowed_hosts"] = json!("*.test");
    let swapped = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(widened.to_string()),
        parts[2]
    );
    let basic = |id: &str, token: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("container_{id}:jwt_{token}"))
        )
    };
    let baseline = {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        open_fds()
    };
    for (what, auth, reason) in [
        (
            "alg none",
            basic(
                "p1",
                &format!(
                    "{}.{}.",
                    URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"sluice-1"}"#),
                    parts[1]
                ),
            ),
            "token_invalid",
        ),
        (
            "HS256 header on an ES256 signature",
            basic("p1", &forge(json!({"alg": "HS256", "kid": "sluice-1"}))),
            "token_invalid",
        ),
        (
            "an unknown kid",
            basic("p1", &forge(json!({"alg": "ES256", "kid": "other"}))),
            "token_invalid",
        ),
        (
            "no kid",
            basic("p1", &forge(json!({"alg": "ES256"}))),
            "token_invalid",
        ),
        (
            "a widened allowlist under the old signature",
            basic("p1", &swapped),
            "token_invalid",
        ),
        (
            "an oversized token",
            basic("p1", &"a".repeat(9000)),
            "token_invalid",
        ),
        (
            "another container's name",
            basic("p2", &good),
            "container_mismatch",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.running.proxy_addr)
            .await
            .unwrap();
        let _ = s
            .write_all(
                format!("GET http://{host}/ HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n")
                    .as_bytes(),
            )
            .await;
        let answer = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
        assert!(answer.starts_with("HTTP/1.1 407 "), "{what}: {answer}");
        assert!(
            answer.contains(&format!("x-deny-reason: {reason}")),
            "{what}: {answer}"
        );
        drop(s);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while open_fds() > baseline && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(open_fds() <= baseline, "{what}: descriptors leaked");
    }
    assert_eq!(up.accepted(), 0, "an upstream saw a connection");
}
