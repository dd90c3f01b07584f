//! Token replacement and per-sandbox limits on the real path (issue 23):
//! a sandbox namespace whose TCP the project's rules send to sluice, an
//! upstream namespace with this test's own HTTP server (fast and slow
//! downloads, and a WebSocket that ticks), names through
//! `[gateway.resolve]`, and curl as the client on both doors.
//!
//! - A live download and an open WebSocket to a host the replacement
//!   token drops close within 1 s (`policy_changed`), on the transparent
//!   door and the proxy door, while a download from a host it keeps runs
//!   to its end; refused replacements change nothing.
//! - A sandbox limited to 1 MiB/s downloads at 1 MiB/s ± 10% while an
//!   unlimited one beside it runs at full speed; a daily budget cuts a
//!   download at its byte count and refuses the next (429); connection
//!   count and rate limits answer 429 `quota_exceeded`.
//!
//! Needs root; skips (failing under CI=true) without it.

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netns::Lab;

const FILES: &str = "198.18.1.10";
const KEEP: &str = "198.18.1.11";
const MIB: usize = 1 << 20;

/// The upstream: for every request, by path, `/big?n=N` (N bytes, as fast
/// as the client takes them), `/slow?n=N` (N bytes at about 640 KiB/s),
/// `/ws` (101, then a byte every 100 ms). Stopped on drop; every
/// connection ends within a minute.
struct Server {
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(lab: &Lab, addrs: &[&str]) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    for addr in addrs {
        let addr = format!("{addr}:80");
        let listener = Lab::in_ns(&lab.up, move || TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let stop = Arc::clone(&stop);
                        std::thread::spawn(move || answer(s, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
    Server { stop }
}

fn answer(mut s: TcpStream, stop: &AtomicBool) {
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let target = text.split(' ').nth(1).unwrap_or("/").to_owned();
    let path = target
        .strip_prefix("http://")
        .map(|rest| &rest[rest.find('/').unwrap_or(rest.len())..])
        .unwrap_or(&target)
        .to_owned();
    let n: usize = path
        .split_once("n=")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(MIB);
    let chunk = vec![b'x'; 16 * 1024];
    if path.starts_with("/ws") {
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        );
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if s.write_all(b".").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        return;
    }
    let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes());
    let slow = path.starts_with("/slow");
    let mut left = n;
    while left > 0 && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let k = left.min(chunk.len());
        if s.write_all(&chunk[..k]).is_err() {
            return;
        }
        left -= k;
        if slow {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn start(lab: &mut Lab) -> Server {
    let server = serve(lab, &[FILES, KEEP]);
    lab.start_sluice(&format!(
        "[gateway.resolve]\n\"files.test\" = [\"{FILES}\"]\n\"keep.test\" = [\"{KEEP}\"]\n"
    ));
    server
}

/// Mints a token on the lab's gateway.
fn mint(lab: &Lab, container: &str, hosts: &[&str], limits: serde_json::Value, ttl: u64) -> String {
    let v = lab.admin(
        "POST",
        "/v1/tokens",
        &serde_json::json!({"container_id": container, "user_id": "t", "allowed_hosts": hosts,
                            "ttl_seconds": ttl, "limits": limits}),
    );
    v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned()
}

/// curl in the sandbox namespace, started now and left running.
fn curl_bg(lab: &Lab, args: &[&str]) -> Child {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.sb))
        .args([
            "timeout",
            "60",
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{speed_download}",
        ])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` (at most `within`): when it ended, and what it printed.
fn ended(child: &mut Child, within: Duration) -> (Instant, String) {
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            let at = Instant::now();
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (at, format!("{out} | {err}"));
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An open WebSocket from the sandbox to files.test: the thread returns
/// when it is cut, with when.
fn websocket(lab: &Lab) -> std::thread::JoinHandle<Instant> {
    let sb = lab.sb.clone();
    std::thread::spawn(move || {
        Lab::in_ns(&sb, || {
            let mut s = TcpStream::connect(format!("{FILES}:80")).unwrap();
            s.write_all(
                b"GET /ws HTTP/1.1\r\nHost: files.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 101"), "{text}");
            assert!(text.ends_with(".."), "ticks came: {text}");
            Instant::now()
        })
    })
}

#[test]
fn a_replaced_token_closes_what_it_no_longer_allows_within_a_second() {
    if !netns::require_root("a_replaced_token_closes_what_it_no_longer_allows_within_a_second") {
        return;
    }
    let mut lab = Lab::with_rules("rp", "--proxy-port 8443");
    let _server = start(&mut lab);
    let old = mint(
        &lab,
        "swap-1",
        &["files.test", "keep.test"],
        serde_json::json!({}),
        600,
    );
    lab.register(&old, "198.18.0.2");
    let old_jti = lab.admin("GET", "/v1/sandboxes/swap-1", &serde_json::Value::Null)["jti"].clone();

    // Refused replacements change nothing: another container's token, a
    // token that does not verify, an expired one.
    let other = mint(&lab, "swap-2", &["files.test"], serde_json::json!({}), 600);
    let expiring = mint(&lab, "swap-1", &["keep.test"], serde_json::json!({}), 1);
    std::thread::sleep(Duration::from_millis(2100));
    for (token, reason) in [
        (other.as_str(), "container_mismatch"),
        ("not.a.token", "token_invalid"),
        (expiring.as_str(), "token_expired"),
        (old.as_str(), "bad_request"),
    ] {
        let (status, body) = lab.admin_status(
            "PUT",
            "/v1/sandboxes/swap-1/token",
            &serde_json::json!({"token": token}),
        );
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(reason)),
            "{body}"
        );
    }
    let (status, _) = lab.admin_status(
        "PUT",
        "/v1/sandboxes/nobody/token",
        &serde_json::json!({"token": other}),
    );
    assert_eq!(status, 404);
    let view = lab.admin("GET", "/v1/sandboxes/swap-1", &serde_json::Value::Null);
    assert_eq!(view["jti"], old_jti, "{view}");

    // Live: a slow download and a WebSocket to files.test (transparent),
    // a slow download through the proxy door, and one from keep.test
    // that the new token still allows (about 4 s long).
    let resolve = format!("files.test:80:{FILES}");
    let mut files = curl_bg(
        &lab,
        &["--resolve", &resolve, "http://files.test/slow?n=100000000"],
    );
    let proxy_user = format!("container_swap-1:jwt_{old}");
    let mut proxied = curl_bg(
        &lab,
        &[
            "-x",
            "http://198.18.0.1:8443",
            "-U",
            &proxy_user,
            "http://files.test/slow?n=100000000",
        ],
    );
    let keep_resolve = format!("keep.test:80:{KEEP}");
    let keep_len = 2_500_000;
    let keep_url = format!("http://keep.test/slow?n={keep_len}");
    let mut keep = curl_bg(&lab, &["--resolve", &keep_resolve, &keep_url]);
    let ws = websocket(&lab);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(files.try_wait().unwrap().is_none(), "the download runs");
    assert!(
        proxied.try_wait().unwrap().is_none(),
        "the proxied download runs"
    );

    let new = mint(&lab, "swap-1", &["keep.test"], serde_json::json!({}), 600);
    let at = Instant::now();
    let (status, body) = lab.admin_status(
        "PUT",
        "/v1/sandboxes/swap-1/token",
        &serde_json::json!({"token": new}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["container_id"], "swap-1");
    assert_eq!(body["source_ip"], "198.18.0.2");
    assert_eq!(body["closed"], 3, "{body}");
    assert_eq!(body["kept"], 1, "{body}");

    let (files_end, files_out) = ended(&mut files, Duration::from_secs(5));
    let (proxied_end, proxied_out) = ended(&mut proxied, Duration::from_secs(5));
    let ws_end = ws.join().unwrap();
    for (what, end) in [
        ("download", files_end),
        ("proxied download", proxied_end),
        ("websocket", ws_end),
    ] {
        let took = end.saturating_duration_since(at);
        eprintln!("{what} closed {took:?} after the replacement");
        assert!(
            took < Duration::from_secs(1),
            "{what} closed after {took:?}"
        );
    }
    assert!(!files_out.starts_with("200 100000000"), "{files_out}");
    assert!(!proxied_out.starts_with("200 100000000"), "{proxied_out}");
    let (_, keep_out) = ended(&mut keep, Duration::from_secs(30));
    assert!(
        keep_out.starts_with(&format!("200 {keep_len} ")),
        "kept: {keep_out}"
    );

    // The new token holds; the old one is refused on both doors.
    let view = lab.admin("GET", "/v1/sandboxes/swap-1", &serde_json::Value::Null);
    assert_ne!(view["jti"], old_jti);
    assert_eq!(view["allowed_hosts"], serde_json::json!(["keep.test"]));
    assert_eq!(
        code_of(&lab, &["--resolve", &resolve, "http://files.test/big?n=10"]),
        "403"
    );
    assert_eq!(
        code_of(
            &lab,
            &[
                "-x",
                "http://198.18.0.1:8443",
                "-U",
                &proxy_user,
                "http://keep.test/big?n=10"
            ]
        ),
        "407"
    );
    assert_eq!(
        code_of(
            &lab,
            &["--resolve", &keep_resolve, "http://keep.test/big?n=10"]
        ),
        "200"
    );
    let log = lab.sluice_log();
    assert_eq!(log.matches("end=policy_changed").count(), 3, "{log}");
    assert!(log.contains("token replaced"), "{log}");
    assert!(
        !log.contains(&new) && !log.contains(&old),
        "a token in the log"
    );
    let metrics = lab.metrics();
    assert!(
        metrics.contains("sluice_policy_changes_total{outcome=\"closed\"} 3"),
        "{metrics}"
    );
}

/// The status curl in the sandbox gets for a request with `args`.
fn code_of(lab: &Lab, args: &[&str]) -> String {
    let mut full = vec!["-sS", "-o", "/dev/null", "-w", "%{http_code}"];
    full.extend_from_slice(args);
    lab.curl(&full).stdout
}

/// Measured by curl: bytes per second of a download of `len` bytes.
fn speed(out: &str) -> f64 {
    out.split(' ')
        .nth(2)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn limits_hold_a_sandbox_to_its_rate_budget_and_counts() {
    if !netns::require_root("limits_hold_a_sandbox_to_its_rate_budget_and_counts") {
        return;
    }
    let mut lab = Lab::with_rules("lm", "--proxy-port 8443");
    let _server = start(&mut lab);
    let limited = mint(
        &lab,
        "slow-1",
        &["files.test"],
        serde_json::json!({"ingress_bytes_per_s": MIB, "egress_bytes_per_s": MIB}),
        600,
    );
    lab.register(&limited, "198.18.0.2");
    let free = mint(&lab, "free-1", &["files.test"], serde_json::json!({}), 600);
    lab.register(&free, "198.18.0.3");
    let budget = 2 * MIB;
    let daily = mint(
        &lab,
        "day-1",
        &["files.test"],
        serde_json::json!({"bytes_per_day": budget}),
        600,
    );
    lab.register(&daily, "198.18.0.4");

    // 1 MiB/s, measured by the client over 6 MiB, beside a sandbox
    // without limits downloading at once.
    let resolve = format!("files.test:80:{FILES}");
    let six = format!("http://files.test/big?n={}", 6 * MIB);
    let mut slow = curl_bg(
        &lab,
        &["--interface", "198.18.0.2", "--resolve", &resolve, &six],
    );
    let big = format!("http://files.test/big?n={}", 200 * MIB);
    let mut fast = curl_bg(
        &lab,
        &["--interface", "198.18.0.3", "--resolve", &resolve, &big],
    );
    let (_, fast_out) = ended(&mut fast, Duration::from_secs(30));
    let (_, slow_out) = ended(&mut slow, Duration::from_secs(30));
    let (s, f) = (speed(&slow_out), speed(&fast_out));
    eprintln!(
        "limited {:.3} MiB/s, unlimited {:.1} MiB/s",
        s / MIB as f64,
        f / MIB as f64
    );
    assert!(
        slow_out.starts_with(&format!("200 {} ", 6 * MIB)),
        "{slow_out}"
    );
    assert!(
        fast_out.starts_with(&format!("200 {} ", 200 * MIB)),
        "{fast_out}"
    );
    assert!(
        (0.9..=1.1).contains(&(s / MIB as f64)),
        "limited at {s} B/s"
    );
    assert!(
        f > 20.0 * MIB as f64,
        "the unlimited sandbox ran at {f} B/s"
    );

    // The daily budget cuts a download at its count, then refuses (429).
    let eight = format!("http://files.test/big?n={}", 8 * MIB);
    let r = lab.curl(&[
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        "--interface",
        "198.18.0.4",
        "--resolve",
        &resolve,
        &eight,
    ]);
    let got: usize = r
        .stdout
        .split(' ')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_ne!(r.code, 0, "the download was cut: {r:?}");
    assert!(
        got <= budget && got + 64 * 1024 >= budget,
        "{got} bytes of a {budget}-byte budget: {r:?}"
    );
    let r = lab.curl(&[
        "-sS",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--interface",
        "198.18.0.4",
        "--resolve",
        &resolve,
        "http://files.test/big?n=10",
    ]);
    assert!(r.stdout.starts_with("HTTP/1.1 429"), "{r:?}");
    assert!(r.stdout.contains("x-deny-reason: quota_exceeded"), "{r:?}");
    let view = lab.admin("GET", "/v1/sandboxes/day-1", &serde_json::Value::Null);
    assert_eq!(view["limits"]["bytes_per_day"], budget, "{view}");
    let used = view["usage"]["bytes_today"].as_u64().unwrap();
    assert!(
        used as usize <= budget && used as usize + 64 * 1024 >= budget,
        "{view}"
    );
    assert!(
        view["usage"]["resets_at"]
            .as_u64()
            .unwrap()
            .is_multiple_of(86_400),
        "{view}"
    );

    // Counts and rates, through the proxy door with a token of their own:
    // two live connections at most, then 429.
    let counted = mint(
        &lab,
        "count-1",
        &["files.test"],
        serde_json::json!({"max_connections": 2}),
        600,
    );
    let user = format!("container_count-1:jwt_{counted}");
    let slow_url = "http://files.test/slow?n=3000000";
    let mut open: Vec<Child> = (0..2)
        .map(|_| {
            curl_bg(
                &lab,
                &["-x", "http://198.18.0.1:8443", "-U", &user, slow_url],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let r = lab.curl(&[
        "-sS",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-x",
        "http://198.18.0.1:8443",
        "-U",
        &user,
        "http://files.test/big?n=10",
    ]);
    assert!(r.stdout.starts_with("HTTP/1.1 429"), "{r:?}");
    assert!(r.stdout.contains("quota_exceeded"), "{r:?}");
    for c in &mut open {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Two new connections a second: the third at once is refused.
    let rated = mint(
        &lab,
        "rate-1",
        &["files.test"],
        serde_json::json!({"new_connections_per_s": 2}),
        600,
    );
    let user = format!("container_rate-1:jwt_{rated}");
    let codes: Vec<String> = (0..4)
        .map(|_| {
            code_of(
                &lab,
                &[
                    "-x",
                    "http://198.18.0.1:8443",
                    "-U",
                    &user,
                    "http://files.test/big?n=10",
                ],
            )
        })
        .collect();
    assert_eq!(&codes[..2], ["200", "200"], "{codes:?}");
    assert!(codes[2..].iter().all(|c| c == "429"), "{codes:?}");

    let metrics = lab.metrics();
    for limit in [
        "ingress_bytes_per_s",
        "bytes_per_day",
        "max_connections",
        "new_connections_per_s",
    ] {
        let series = format!("sluice_limited_total{{limit=\"{limit}\"}}");
        assert!(
            support::metric(&metrics, &series) >= 1.0,
            "{series}: {metrics}"
        );
    }
    let log = lab.sluice_log();
    assert!(log.contains("reason=\"quota_exceeded\""), "{log}");
    assert!(log.contains("end=quota_exceeded"), "{log}");

    // Saved (every 5 s): a gateway killed and started again gives no
    // budget back.
    std::thread::sleep(Duration::from_millis(5500));
    lab.kill_sluice();
    lab.restart_sluice();
    assert_eq!(
        code_of(
            &lab,
            &[
                "--interface",
                "198.18.0.4",
                "--resolve",
                &resolve,
                "http://files.test/big?n=10"
            ]
        ),
        "429"
    );
}
