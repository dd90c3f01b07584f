//! The control plane at scale: registrations through `POST /v1/sandboxes`
//! on the real binary, with 32 concurrent keep-alive clients and tokens
//! minted beforehand, until 100,000 are registered. Prints the rate of each
//! tenth, the RSS each registered sandbox costs beyond its token's bytes,
//! and, after a restart (SIGTERM, then `sluice serve` again), the time
//! until a registered sandbox is served: `GET /v1/explain` for the first
//! one answers `allow`, which needs its record restored and its token
//! verified.
//!
//!   cargo bench --bench admin                          # 100,000 × 32 clients
//!   cargo bench --bench admin -- --count 20000 --clients 8
//!
//! Bounded: `--max-seconds` (default 900) stops the registrations and
//! reports what was done. Under `cargo test` it runs a short check (2,000
//! registrations) that fails if any registration does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sluice::identity::token::{MintRequest, Signer};

struct Options {
    count: usize,
    clients: usize,
    max_seconds: u64,
    smoke: bool,
}

impl Options {
    fn parse() -> Result<Options> {
        let args: Vec<String> = std::env::args().collect();
        let smoke = !args.iter().any(|a| a == "--bench");
        let mut o = Options {
            count: if smoke { 2_000 } else { 100_000 },
            clients: if smoke { 8 } else { 32 },
            max_seconds: 900,
            smoke,
        };
        let mut it = args.iter().skip(1);
        while let Some(a) = it.next() {
            let mut val = || it.next().context(format!("{a} needs a value"));
            match a.as_str() {
                "--count" => o.count = val()?.parse()?,
                "--clients" => o.clients = val()?.parse()?,
                "--max-seconds" => o.max_seconds = val()?.parse()?,
                _ => {}
            }
        }
        if o.count < 10 || o.clients == 0 {
            bail!("--count must be at least 10 and --clients at least 1");
        }
        Ok(o)
    }
}

/// A free loopback port (bound, read, released).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `sluice serve`, ended (SIGKILL) on drop if still running.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(config: &Path) -> Result<Gateway> {
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting sluice")?;
    Ok(Gateway(child))
}

/// One keep-alive HTTP/1.1 connection to the admin API.
struct Client {
    stream: TcpStream,
    token: String,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr, token: &str) -> Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            token: token.to_owned(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// The status and body of one request.
    fn call(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.token,
            body.len()
        );
        self.stream.write_all(req.as_bytes())?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .context("no status")?;
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut chunk)?;
                    if n == 0 {
                        bail!("connection closed mid-answer");
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).into_owned();
                return Ok((status, body));
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn wait_healthy(addr: SocketAddr, token: &str, deadline: Duration) -> Result<Instant> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Ok(mut c) = Client::connect(addr, token)
            && let Ok((200, _)) = c.call("GET", "/healthz", "")
        {
            return Ok(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("the gateway did not come up within {deadline:?}")
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// The n-th sandbox's source address: 10.0.0.0/8 and beyond, unique.
fn source_ip(n: usize) -> String {
    let n = n as u32 + 256;
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

fn main() -> Result<()> {
    let o = Options::parse()?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let (admin, transparent, proxy, metrics, dns) = (
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    );
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[gateway]\ntransparent_listen = \"127.0.0.1:{transparent}\"\n\
             proxy_listen = \"127.0.0.1:{proxy}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[dns]\nlisten = \"127.0.0.1:{dns}\"\n\
             upstream = [\"127.0.0.1:9\"]\n",
            state.display()
        ),
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse()?;
    let gw = serve(&config)?;
    // The admin token and the signing key appear on the first start.
    let token_file = state.join("admin-token");
    let started = Instant::now();
    while !token_file.exists() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let admin_token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    wait_healthy(addr, &admin_token, Duration::from_secs(30))?;

    // Tokens minted beforehand, on every core.
    let signer = Arc::new(Signer::load(
        &state.join("keys/private-key.pem"),
        "sluice-1",
        "secure-egress-control",
        "egress-proxy",
    )?);
    let minting = Instant::now();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let tokens: Vec<String> = std::thread::scope(|s| {
        let per = o.count.div_ceil(cores);
        let handles: Vec<_> = (0..cores)
            .map(|c| {
                let signer = Arc::clone(&signer);
                s.spawn(move || {
                    (c * per..((c + 1) * per).min(o.count))
                        .map(|i| {
                            signer
                                .mint(&MintRequest {
                                    limits: Default::default(),
                                    organization_uuid: None,
                                    enforce: Default::default(),
                                    credentials: Vec::new(),
                                    container_id: format!("sb-{i:06}"),
                                    user_id: "bench".into(),
                                    allowed_hosts: vec!["a.test".into()],
                                    ttl: Duration::from_secs(4 * 3600),
                                })
                                .map(|m| m.token)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a minting thread panicked"))
            })
            .collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?
    .into_iter()
    .flatten()
    .collect();
    let token_bytes = tokens.iter().map(String::len).sum::<usize>() as f64 / tokens.len() as f64;
    eprintln!(
        "minted {} tokens in {:.1} s ({token_bytes:.0} B each)",
        tokens.len(),
        minting.elapsed().as_secs_f64()
    );

    let pid = gw.0.id();
    let rss_before = rss_kib(pid)?;
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(o.max_seconds);
    let tenth = o.count / 10;
    let began = Instant::now();
    let marks: Vec<Duration> = std::thread::scope(|s| -> Result<Vec<Duration>> {
        for _ in 0..o.clients {
            let (tokens, next, done, failed) = (
                Arc::clone(&tokens),
                Arc::clone(&next),
                Arc::clone(&done),
                Arc::clone(&failed),
            );
            let admin_token = admin_token.clone();
            s.spawn(move || -> Result<()> {
                let mut c = Client::connect(addr, &admin_token)?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= tokens.len() || Instant::now() > deadline {
                        return Ok(());
                    }
                    let body = format!(
                        "{{\"source_ip\":\"{}\",\"token\":\"{}\"}}",
                        source_ip(i),
                        tokens[i]
                    );
                    match c.call("POST", "/v1/sandboxes", &body) {
                        Ok((201, _)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, body)) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("registration {i}: {status} {body}");
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("registration {i}: {e}");
                            c = Client::connect(addr, &admin_token)?;
                        }
                    }
                }
            });
        }
        // The time at which each tenth was complete.
        let mut marks = Vec::new();
        while marks.len() < 10 {
            let d = done.load(Ordering::Relaxed);
            while marks.len() < 10 && d >= tenth * (marks.len() + 1) {
                marks.push(began.elapsed());
            }
            if Instant::now() > deadline
                || d + failed.load(Ordering::Relaxed) >= tokens.len() && marks.len() < 10
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(marks)
    })?;
    let registered = done.load(Ordering::Relaxed);
    let failures = failed.load(Ordering::Relaxed);
    let rss_after = rss_kib(pid)?;

    println!(
        "\nregistrations: {registered} of {} with {} clients, {failures} failed\n",
        o.count, o.clients
    );
    println!("| tenth | registered | per second |");
    println!("|---:|---:|---:|");
    let mut prev = Duration::ZERO;
    let mut rates = Vec::new();
    for (k, m) in marks.iter().enumerate() {
        let rate = tenth as f64 / (*m - prev).as_secs_f64().max(1e-9);
        rates.push(rate);
        println!("| {} | {} | {rate:.0} |", k + 1, tenth * (k + 1));
        prev = *m;
    }
    let per_sandbox =
        (rss_after.saturating_sub(rss_before) * 1024) as f64 / registered.max(1) as f64;
    println!(
        "\nRSS: {rss_before} KiB before, {rss_after} KiB after: {per_sandbox:.0} B per sandbox, \
         {:.0} B beyond its token ({token_bytes:.0} B)",
        per_sandbox - token_bytes
    );

    // A restart: stop, start, and time until the first sandbox is served.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let mut gw = gw;
    let _ = gw.0.wait();
    let restarting = Instant::now();
    let gw2 = serve(&config)?;
    let served = loop {
        if restarting.elapsed() > Duration::from_secs(120) {
            bail!("the restarted gateway served nothing within 120 s");
        }
        if let Ok(mut c) = Client::connect(addr, &admin_token)
            && let Ok((200, body)) = c.call(
                "GET",
                "/v1/explain?container_id=sb-000000&host=a.test&port=443",
                "",
            )
        {
            if !body.contains("\"allow\"") {
                bail!("the restored sandbox is not allowed: {body}");
            }
            break restarting.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    println!(
        "restart with {registered} registered: serving the first sandbox after {:.2} s",
        served.as_secs_f64()
    );
    drop(gw2);

    if rates.len() == 10 {
        let ratio = rates[9] / rates[0];
        println!(
            "last tenth / first tenth: {ratio:.2}; mean {:.0}/s",
            registered as f64 / marks[9].as_secs_f64()
        );
    }
    if failures > 0 {
        bail!("{failures} registrations failed");
    }
    if o.smoke && registered != o.count {
        bail!("only {registered} of {} registered", o.count);
    }
    Ok(())
}
