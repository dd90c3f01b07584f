//! Exhaustion: 5,000 idle relayed connections from one sandbox plus a
//! slow-drip client do not stop another sandbox's allowed request from
//! being served promptly, and the gateway's descriptors return to their
//! baseline afterwards. The gateway is the real binary in its own process
//! (about 10,000 descriptors there, 10,000 here: each under the usual
//! 20,000 limit). Bounded: 5,000 connections, 120 s.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::AsyncWriteExt;

const IDLE: usize = 5000;

/// The gateway's descriptors other than pipes, and its pipes' descriptors.
/// The relay keeps empty pipes pooled for reuse, so pipes are counted
/// apart: they may stay, a few, after the connections are gone.
fn fds_of(pid: u32) -> (usize, usize) {
    let mut kinds = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        match std::fs::read_link(entry.path()) {
            Ok(t) if t.to_string_lossy().starts_with("pipe:") => kinds.1 += 1,
            _ => kinds.0 += 1,
        }
    }
    kinds
}

/// Pipe descriptors the pool may still hold when this test is done: the
/// few directions that were mid-transfer at once.
const POOLED_PIPE_FDS: usize = 8;

/// Kills the gateway process when the test ends, however it ends.
struct Gateway(std::process::Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_hordes_and_slow_drips_do_not_starve_other_sandboxes() {
    let deadline = Instant::now() + Duration::from_secs(120);
    // An upstream that holds connections and never answers, and a normal
    // one for the well-behaved sandbox.
    let silent = raw_upstream(b"", usize::MAX).await;
    let http = http_upstream().await;

    let dir = tempfile::tempdir().unwrap();
    let (transparent, admin) = (free_port(), free_port());
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"state_dir = "{}"
[gateway]
transparent_listen = "127.0.0.1:{transparent}"
proxy_listen = "127.0.0.1:{}"
allow_destinations = ["127.0.0.0/8"]
allow_local_destinations = true
peek_timeout_ms = 3000
max_connections = 20000
max_connections_per_sandbox = 10000
max_connections_per_source = 10000
[gateway.resolve]
"horde.test" = ["127.0.0.1"]
"web.test" = ["127.0.0.1"]
[auth]
leeway_s = 0
[admin]
listen = "127.0.0.1:{admin}"
[metrics]
listen = "127.0.0.1:{}"
[dns]
listen = "127.0.0.1:0"
upstream = ["127.0.0.1:9"]
"#,
            dir.path().join("state").display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let gateway = Gateway(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = gateway.0.id();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    while std::net::TcpStream::connect(admin_addr).is_err() {
        assert!(Instant::now() < deadline, "sluice did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = std::fs::read_to_string(dir.path().join("state/admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let register = |id: &str, source: &str, host: String| {
        let (id, source, token) = (id.to_owned(), source.to_owned(), token.clone());
        async move {
            let (s, minted) = admin_request(
                admin_addr,
                "POST",
                "/v1/tokens",
                Some(json!({"container_id": id, "user_id": "u", "allowed_hosts": [host]})),
                Some(&token),
            )
            .await;
            assert_eq!(s, 201);
            let (s, _) = admin_request(
                admin_addr,
                "POST",
                "/v1/sandboxes",
                Some(json!({"source_ip": source, "token": minted["token"]})),
                Some(&token),
            )
            .await;
            assert_eq!(s, 201);
        }
    };
    let horde_host = format!("horde.test:{}", silent.addr.port());
    let web_host = format!("web.test:{}", http.addr.port());
    register("horde", "127.0.0.1", horde_host.clone()).await;
    register("good", "127.0.0.2", web_host.clone()).await;
    let gw_addr: std::net::SocketAddr = format!("127.0.0.1:{transparent}").parse().unwrap();
    let connect_from = move |source: &'static str| async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{source}:0").parse().unwrap()).unwrap();
        s.connect(gw_addr).await.unwrap()
    };
    // Warm up, then the baseline of the gateway's descriptors.
    let mut s = connect_from("127.0.0.2").await;
    s.write_all(format!("GET /warm HTTP/1.1\r\nHost: {web_host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = fds_of(pid);

    // The horde: 5,000 allowed requests whose upstream never answers.
    let request = format!("GET /idle HTTP/1.1\r\nHost: {horde_host}\r\n\r\n");
    let mut idle = Vec::with_capacity(IDLE);
    while idle.len() < IDLE {
        assert!(
            Instant::now() < deadline,
            "opening the horde took too long ({} open)",
            idle.len()
        );
        let batch: Vec<_> = (0..250.min(IDLE - idle.len()))
            .map(|_| {
                let request = request.clone();
                tokio::spawn(async move {
                    let mut s = connect_from("127.0.0.1").await;
                    s.write_all(request.as_bytes()).await.unwrap();
                    s
                })
            })
            .collect();
        for t in batch {
            idle.push(t.await.unwrap());
        }
    }
    while silent.accepted() < IDLE {
        assert!(
            Instant::now() < deadline,
            "only {} of {IDLE} relayed",
            silent.accepted()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = fds_of(pid);
    assert!(
        held.0 >= baseline.0 + 2 * IDLE,
        "the gateway holds {held:?} descriptors for {IDLE} pairs"
    );
    // Idle connections hold no pipe.
    assert!(
        held.1 <= baseline.1 + POOLED_PIPE_FDS,
        "the gateway holds {} pipe descriptors for {IDLE} idle pairs",
        held.1
    );

    // A slow drip, a byte every 200 ms, from a third address.
    let drip = tokio::spawn(async move {
        let mut s = connect_from("127.0.0.3").await;
        for b in b"GET / HTTP/1.1\r\nHost: web.test\r\n".iter() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The good sandbox is served, promptly.
    let started = Instant::now();
    let mut s = connect_from("127.0.0.2").await;
    s.write_all(format!("GET /served HTTP/1.1\r\nHost: {web_host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    let took = started.elapsed();
    assert!(
        resp.ends_with(&format!("upstream GET /served host={web_host} body=0")),
        "{resp}"
    );
    assert!(
        took < Duration::from_secs(2),
        "served after {took:?} with {IDLE} idle connections"
    );
    eprintln!(
        "served in {took:?} beside {IDLE} idle pairs ({held:?} gateway descriptors, baseline {baseline:?})"
    );
    drop(s);

    // Everything goes; the gateway's descriptors return to the baseline.
    drop(idle);
    drip.abort();
    let settle = Instant::now() + Duration::from_secs(30);
    let back = |now: (usize, usize)| now.0 <= baseline.0 && now.1 <= baseline.1 + POOLED_PIPE_FDS;
    let mut now = fds_of(pid);
    while !back(now) && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = fds_of(pid);
    }
    assert!(
        back(now),
        "gateway descriptors (other, pipes): {baseline:?} before, {now:?} after"
    );
    drop(gateway);
}
