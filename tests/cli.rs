//! The `sluice` binary's subcommands and exit codes (0 ok, 1 rejected
//! input, 2 usage).

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn keygen_mint_and_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = sluice(&["keygen", "--out", keys.to_str().unwrap(), "--kid", "k7"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(keys.join("private-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(keys.join("jwks.json")).unwrap()).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "k7");
    assert_eq!(jwks["keys"][0]["use"], "sig");

    let key = keys.join("private-key.pem");
    let out = sluice(&[
        "token",
        "mint",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "k7",
        "--container-id",
        "sb1",
        "--user-id",
        "alice",
        "--allow",
        "api.test,*.wild.test:8443",
        "--ttl",
        "30m",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3);

    let jwks_path = keys.join("jwks.json");
    let out = sluice(&[
        "token",
        "verify",
        "--jwks",
        jwks_path.to_str().unwrap(),
        &token,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["container_id"], "sb1");
    assert_eq!(claims["allowed_hosts"], "api.test,*.wild.test:8443");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        1800
    );

    // A tampered token, the wrong audience: exit 1 with the reason.
    let out = sluice(&[
        "token",
        "verify",
        "--jwks",
        jwks_path.to_str().unwrap(),
        &format!("{token}x"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("token_invalid"),
        "{}",
        text(&out.stderr)
    );
    let out = sluice(&[
        "token",
        "verify",
        "--jwks",
        jwks_path.to_str().unwrap(),
        "--audience",
        "other",
        &token,
    ]);
    assert_eq!(out.status.code(), Some(1));

    // A bare `*` is refused when minting.
    let out = sluice(&[
        "token",
        "mint",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "k7",
        "--container-id",
        "sb1",
        "--user-id",
        "alice",
        "--allow",
        "*",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains('*'), "{}", text(&out.stderr));
}

#[test]
fn check_reports_every_error_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[gateway]\nallowed_ports = [443]\n").unwrap();
    let out = sluice(&["check", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[gateway]\npeek_timeout_ms = 0\nmax_connections = 0\n[auth]\nsigning_kid = \"\"\n",
    )
    .unwrap();
    let out = sluice(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for key in [
        "gateway.peek_timeout_ms",
        "gateway.max_connections",
        "auth.signing_kid",
    ] {
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    let out = sluice(&[
        "check",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(sluice(&[]).status.code(), Some(2));
    assert_eq!(sluice(&["serve", "--bogus"]).status.code(), Some(2));
    assert_eq!(
        sluice(&["token", "mint", "--key", "k"]).status.code(),
        Some(2)
    );
    let out = sluice(&[
        "token",
        "mint",
        "--key",
        "k",
        "--kid",
        "k",
        "--container-id",
        "c",
        "--user-id",
        "u",
        "--allow",
        "a.test",
        "--ttl",
        "soon",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_refuses_a_broken_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gateway\n").unwrap();
    let out = sluice(&["serve", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));

    let cfg = dir.path().join("ok.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[gateway]\ntransparent_listen = \"127.0.0.1:0\"\nproxy_listen = \"127.0.0.1:0\"\nupstream_mark = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let token = dir.path().join("state/admin-token");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !token.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(token.exists(), "serve did not create its state");
    std::thread::sleep(std::time::Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
