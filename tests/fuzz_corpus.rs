//! Replays every committed fuzz input (`fuzz/corpus/<target>/`) through its
//! target's invariants (`sluice::invariants`), on stable Rust: any input
//! the fuzzer kept, a crash it found included, stays a regression test.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no corpus for {target}");
    for path in paths {
        // A running fuzzer may replace an input with a smaller one.
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target}: {} breaks an invariant", path.display());
        }
    }
}

#[test]
fn client_hello_corpus() {
    replay("client_hello", sluice::invariants::client_hello);
}

#[test]
fn http_head_corpus() {
    replay("http_head", sluice::invariants::http_head);
}

#[test]
fn chunked_body_corpus() {
    replay("chunked_body", sluice::invariants::chunked_body);
}

#[test]
fn host_pattern_corpus() {
    replay("host_pattern", sluice::invariants::host_pattern);
}

#[test]
fn config_corpus() {
    replay("config", sluice::invariants::config);
}

#[test]
fn token_corpus() {
    replay("token", sluice::invariants::token);
}

#[test]
fn admin_bodies_corpus() {
    replay("admin_bodies", sluice::invariants::admin_bodies);
}

#[test]
fn dns_message_corpus() {
    replay("dns_message", sluice::invariants::dns_message);
}

#[test]
fn fleet_message_corpus() {
    replay("fleet_message", sluice::invariants::fleet_message);
}

#[test]
fn request_path_corpus() {
    replay("request_path", sluice::invariants::request_path);
}

#[test]
fn placeholder_scan_corpus() {
    replay("placeholder_scan", sluice::invariants::placeholder_scan);
}
