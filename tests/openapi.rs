//! `GET /v1/openapi.json` describes the admin API that is served: every
//! documented call is routed, needs the admin token where it says so, and
//! `schemathesis` (PyPI), run against a live gateway, finds no 5xx, no
//! answer that breaks the schema (status, content type, body) and no bad
//! input accepted.
//!
//! Without schemathesis the second test skips with a reason (a failure with
//! `CI=true`).

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{admin_request, have_tool, raw_http, start};

async fn document(gw: &support::Gw) -> Value {
    let (status, body) = raw_http(
        gw.running.admin_addr,
        "GET /v1/openapi.json HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn every_documented_call_is_served_and_guarded_as_documented() {
    let gw = start("127.0.0.1:9".parse().unwrap(), |_| {}).await;
    let doc = document(&gw).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    assert_eq!(
        doc["components"]["securitySchemes"]["admin"]["scheme"],
        "bearer"
    );
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 10, "{paths:?}");
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let concrete = path.replace("{container_id}", "no-such-sandbox");
            let method = method.to_uppercase();
            let guarded = op.get("security").is_some();
            assert_eq!(
                guarded,
                path.starts_with("/v1/") && path != "/v1/openapi.json",
                "{method} {path}: security as the contract says"
            );
            // Without the token: 401 where guarded, else an answer.
            let (status, body) =
                admin_request(gw.running.admin_addr, &method, &concrete, None, None).await;
            if guarded {
                assert_eq!(status, 401, "{method} {path}: {body}");
                assert_eq!(body["error"], "unauthorized");
            } else {
                assert_eq!(status, 200, "{method} {path}: {body}");
            }
            // The event stream does not end: tests/events.rs reads it.
            if path == "/v1/events" {
                continue;
            }
            // With it: routed (never the fallback's 404 "no such endpoint",
            // nor 405), and every status it gives is documented.
            let (status, body) = gw.admin(&method, &concrete, None).await;
            assert_ne!(status, 405, "{method} {path}");
            assert_ne!(body["detail"], "no such endpoint", "{method} {path}");
            assert!(
                op["responses"].get(status.to_string()).is_some(),
                "{method} {path}: {status} is not documented: {body}"
            );
        }
    }
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    if !have_tool(
        "schemathesis",
        "--version",
        "schemathesis_finds_no_server_error_and_no_schema_violation",
    ) {
        return;
    }
    let gw = start("127.0.0.1:9".parse().unwrap(), |_| {}).await;
    // Something to list, show and explain.
    gw.register("sb-openapi", "127.0.0.2", &["a.test"], 600)
        .await;
    let schema = format!("http://{}/v1/openapi.json", gw.running.admin_addr);
    let token = gw.running.admin_token.clone();
    let workdir = gw.dir.path().to_owned();
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new("schemathesis")
            .current_dir(&workdir)
            .args([
                "run",
                &schema,
                "--header",
                &format!("Authorization: Bearer {token}"),
                // Every check but "schema-valid input is accepted": a
                // schema cannot say that a token must carry a valid
                // signature, or an entry name a real host.
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                // Valid and invalid input both.
                "--mode",
                "all",
                // Launching starts real gVisor sandboxes: its input
                // checks are tested in tests/admin.rs and e2e_runsc.rs.
                "--exclude-path",
                "/v1/sandboxes/launch",
                // A stream that does not end: tests/events.rs reads it.
                "--exclude-path",
                "/v1/events",
                "--max-examples",
                "40",
                "--seed",
                "20261202",
                "--request-timeout",
                "10",
            ])
            .output(),
    )
    .await
    .expect("schemathesis within 600 s")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    // It really ran: hundreds of cases over every operation but launch.
    let generated: usize = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find_map(|w| w[1].starts_with("generated").then(|| w[0].parse().ok())?)
        .unwrap_or(0);
    assert!(generated >= 200, "{generated} cases:\n{text}");
    assert!(text.contains("Tested: 15"), "{text}");
}
