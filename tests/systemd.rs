//! The systemd unit as systemd sees it: `systemd-analyze verify` prints
//! nothing for it (it exits 0 even on unknown keys, so any output fails),
//! and `sluice serve` under `NOTIFY_SOCKET` says `READY=1` once it serves,
//! `RELOADING=1` then `READY=1` around a SIGHUP, and `STOPPING=1` on
//! SIGTERM, which is what `Type=notify` waits for. Without
//! `systemd-analyze` the verify test skips with a reason, except with
//! `CI=true`.

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/sluice.service");

#[test]
fn the_unit_passes_systemd_analyze_verify_without_a_word() {
    if !support::have_tool(
        "systemd-analyze",
        "--version",
        "the_unit_passes_systemd_analyze_verify_without_a_word",
    ) {
        return;
    }
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(
        unit.contains("\nType=notify\n"),
        "the unit is not Type=notify"
    );
    // verify checks that ExecStart's program exists: point it at the
    // binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sluice.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/sluice", env!("CARGO_BIN_EXE_sluice")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
}

/// Reads notifications until one contains `want`, or the deadline.
fn wait_for(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn serve_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = admin.local_addr().unwrap();
    drop(admin);
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[gateway]\ntransparent_listen = \"127.0.0.1:0\"\nproxy_listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"{admin_addr}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = \"127.0.0.1:0\"\nupstream = [\"127.0.0.1:9\"]\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let socket_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut seen = Vec::new();
    let ready = wait_for(&sock, "READY=1", &mut seen);
    // Ready means serving: the admin API answers at once.
    let serving = std::net::TcpStream::connect(admin_addr).is_ok();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = wait_for(&sock, "RELOADING=1", &mut seen);
    let ready_again = wait_for(&sock, "READY=1", &mut seen);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopping = wait_for(&sock, "STOPPING=1", &mut seen);
    let status = child.wait().unwrap();
    assert!(ready, "no READY=1: {seen:?}");
    assert!(serving, "READY=1 before the admin API listened");
    assert!(
        reloading && ready_again,
        "no RELOADING=1, READY=1 around SIGHUP: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|m| m.lines().any(|l| l.starts_with("MONOTONIC_USEC="))),
        "RELOADING=1 without MONOTONIC_USEC: {seen:?}"
    );
    assert!(stopping, "no STOPPING=1: {seen:?}");
    assert_eq!(status.code(), Some(0));
}
