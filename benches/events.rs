//! The cost of exporting events: the same bounded load (new connections
//! through the transparent door, one event each) with the OTLP collector
//! up, stalled (it accepts and never answers) and gone (nothing listens),
//! side by side in one run, rounds alternating. The data path must not
//! wait for the collector: p99 within noise of each other, drops counted.
//!
//! ```text
//! cargo bench --bench events -- --bench --connections 3000 --rounds 3
//! ```
//!
//! Under `cargo test --all-targets` (no `--bench`) it runs a short smoke
//! load, so the harness is checked on every CI run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sluice::app::{Options, run};
use sluice::config::Config;
use sluice::net::orig_dst::OrigDstSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug)]
enum Collector {
    Up,
    Stalled,
    Gone,
}

impl Collector {
    fn name(self) -> &'static str {
        match self {
            Collector::Up => "collector up",
            Collector::Stalled => "collector stalled",
            Collector::Gone => "collector gone",
        }
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads one HTTP message (head and a `content-length` body) from `s`.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let msg: Vec<u8> = buf.drain(..end + 4 + len).collect();
                return Ok(msg);
            }
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An upstream (or a collector that is up): answers every request 200.
async fn answering(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while read_message(&mut s, &mut buf).await.is_ok() {
                let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A collector that accepts and never reads nor answers.
async fn stalled(listener: TcpListener) {
    let mut held = Vec::new();
    while let Ok((s, _)) = listener.accept().await {
        held.push(s);
    }
}

async fn admin(addr: SocketAddr, token: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let msg = read_message(&mut s, &mut buf).await?;
    let text = String::from_utf8_lossy(&msg).into_owned();
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(json).with_context(|| text.clone())
}

/// `sluice_audit_events_dropped_total` now.
async fn dropped(metrics: SocketAddr) -> Result<f64> {
    let mut m = TcpStream::connect(metrics).await?;
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .await?;
    let mut page = String::new();
    m.read_to_string(&mut page).await?;
    Ok(page
        .lines()
        .find_map(|l| l.strip_prefix("sluice_audit_events_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

struct Result1 {
    p50_us: u64,
    p99_us: u64,
    per_s: f64,
    dropped: f64,
}

async fn round(mode: Collector, connections: usize, workers: usize) -> Result<Result1> {
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = upstream.local_addr()?;
    let up_task = tokio::spawn(answering(upstream));
    let collector = TcpListener::bind("127.0.0.1:0").await?;
    let collector_addr = collector.local_addr()?;
    let collector_task = match mode {
        Collector::Up => Some(tokio::spawn(answering(collector))),
        Collector::Stalled => Some(tokio::spawn(stalled(collector))),
        Collector::Gone => {
            drop(collector);
            None
        }
    };
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        state_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    config.gateway.transparent_listen = any;
    config.gateway.proxy_listen = any;
    config.admin.listen = any;
    config.metrics.listen = any;
    config.dns.listen = any;
    config.dns.upstream = vec!["127.0.0.1:9".parse()?];
    config.gateway.allow_destinations = vec!["127.0.0.0/8".parse()?];
    config.gateway.allow_local_destinations = true;
    config.gateway.max_connections_per_sandbox = 100_000;
    config
        .gateway
        .resolve
        .insert("api.test".into(), vec!["127.0.0.1".parse()?]);
    config.audit.otlp_endpoint = format!("http://{collector_addr}/v1/logs");
    config.audit.queue = 1000;
    let running = run(
        config,
        Options {
            orig_dst: OrigDstSource::Fixed(up_addr),
            launcher: None,
        },
    )
    .await?;
    let token = running.admin_token.clone();
    let minted = admin(
        running.admin_addr,
        &token,
        "/v1/tokens",
        &format!(
            r#"{{"container_id":"bench","user_id":"b","allowed_hosts":["api.test:{}"]}}"#,
            up_addr.port()
        ),
    )
    .await?;
    let jwt = minted["token"].as_str().context("no token")?;
    admin(
        running.admin_addr,
        &token,
        "/v1/sandboxes",
        &format!(r#"{{"source_ip":"127.0.0.1","token":"{jwt}"}}"#),
    )
    .await?;
    let door = running.transparent_addr;
    // The metrics recorder is the process's: the drops of this round are
    // the difference.
    let dropped_before = dropped(running.metrics_addr).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let n = connections / workers;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let mut s = TcpStream::connect(door).await?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
                    .await?;
                let mut buf = Vec::new();
                let msg = read_message(&mut s, &mut buf).await?;
                if !msg.starts_with(b"HTTP/1.1 200") {
                    bail!("{}", String::from_utf8_lossy(&msg));
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let pick = |q: f64| all[((all.len() - 1) as f64 * q) as usize];
    // Let the exporter give up on what it holds, then read the drops.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let dropped = dropped(running.metrics_addr).await? - dropped_before;
    let out = Result1 {
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        per_s: all.len() as f64 / elapsed.as_secs_f64(),
        dropped,
    };
    running.shutdown().await;
    up_task.abort();
    if let Some(t) = collector_task {
        t.abort();
    }
    Ok(out)
}

fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let connections = arg("--connections", if bench { 3000 } else { 60 });
    let rounds = arg("--rounds", if bench { 3 } else { 1 });
    let workers = arg("--workers", 8).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "events export: {connections} new connections per round, {workers} workers, {rounds} round(s)"
    );
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>10}",
        "", "p50 (µs)", "p99 (µs)", "conn/s", "dropped"
    );
    for r in 0..rounds {
        for mode in [Collector::Up, Collector::Stalled, Collector::Gone] {
            let res = rt.block_on(round(mode, connections, workers))?;
            println!(
                "{:<20} {:>10} {:>10} {:>12.0} {:>10}   (round {})",
                mode.name(),
                res.p50_us,
                res.p99_us,
                res.per_s,
                res.dropped,
                r + 1
            );
        }
    }
    Ok(())
}
