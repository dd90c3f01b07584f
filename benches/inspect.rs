//! Inspection, side by side with Squid's `ssl_bump` on the same path:
//! requests per second and p99 latency of HTTPS requests through each
//! proxy's CONNECT, TLS opened by the proxy (a leaf from its CA), the
//! credential header set by the proxy, to the same nginx upstream over
//! loopback. Two loads: keep-alive (one tunnel, many requests) and new
//! connections (a tunnel and a TLS handshake per request), each with
//! HTTP/1.1 and with a client that offers HTTP/2 (Squid 5 does not speak
//! it, so its client falls back to HTTP/1.1, and the table says so). Then
//! the memory an open inspected connection costs each proxy: RSS before
//! and after 256 idle keep-alive tunnels, each past one request.
//!
//! ```text
//! cargo bench --bench inspect -- --seconds 5 --rounds 3 --workers 16
//! cargo bench --bench inspect -- --only "new connections, HTTP/2"
//! ```
//!
//! Beside requests/s and p99, each proxy's own CPU time per request
//! (`/proc`, its helpers included), which a shared two-core machine
//! swings less; and where the machine's CPU went per request (the proxy,
//! nginx, this bench's client, the rest), since on shared cores the
//! client's and nginx's work, which differ with the protocol the proxy
//! speaks, bound requests/s beside the proxy's own.
//!
//! Under `cargo test --all-targets` (no `--bench`) it runs a short smoke
//! load, so the harness is checked on every CI run. Needs nginx and
//! squid-openssl (Squid is left out, and said so, without them).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "load/procfs.rs"]
#[allow(dead_code)] // the load bench uses the rest
mod procfs;

const SECRET: &str = "b3nch-S3CRET";
const HOST: &str = "api.bench.test";

struct Options {
    seconds: f64,
    rounds: usize,
    workers: usize,
    /// Only the loads whose name holds this (`new`, `HTTP/2`).
    only: Option<String>,
}

fn options() -> (Options, bool) {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let mut o = if bench {
        Options {
            seconds: 5.0,
            rounds: 3,
            workers: 16,
            only: None,
        }
    } else {
        Options {
            seconds: 0.5,
            rounds: 1,
            workers: 2,
            only: None,
        }
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--seconds" => o.seconds = val().parse().unwrap_or(o.seconds),
            "--rounds" => o.rounds = val().parse().unwrap_or(o.rounds),
            "--workers" => o.workers = val().parse().unwrap_or(o.workers),
            "--only" => o.only = Some(val()),
            _ => {}
        }
    }
    (o, bench)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn wait_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr}")
}

/// Children ended (by their ids) when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A test root and a leaf it signs for the upstream; a CA for Squid.
fn pki(dir: &Path) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca = |cn: &str| -> Result<(CertificateParams, KeyPair, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = p.self_signed(&key)?.pem();
        Ok((p, key, pem))
    };
    let (root_params, root_key, root_pem) = ca("bench root")?;
    std::fs::write(dir.join("root.pem"), &root_pem)?;
    let issuer = Issuer::new(root_params, root_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![HOST.to_owned(), "127.0.0.1".to_owned()])?;
    leaf.distinguished_name.push(DnType::CommonName, HOST);
    let cert = leaf.signed_by(&leaf_key, &issuer)?;
    std::fs::write(dir.join("up.pem"), cert.pem())?;
    std::fs::write(dir.join("up.key"), leaf_key.serialize_pem())?;
    let (_, squid_key, squid_pem) = ca("squid bump CA")?;
    std::fs::write(dir.join("bump.pem"), &squid_pem)?;
    std::fs::write(dir.join("bump.key"), squid_key.serialize_pem())?;
    std::fs::write(dir.join("secret"), SECRET)?;
    // Squid resolves the name itself, from this file.
    std::fs::write(dir.join("hosts"), format!("127.0.0.1 {HOST}\n"))?;
    Ok(())
}

fn nginx(dir: &Path, port: u16, procs: &mut Procs) -> Result<()> {
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/nb; proxy_temp_path {d}/np; fastcgi_temp_path {d}/nf;
  uwsgi_temp_path {d}/nu; scgi_temp_path {d}/ns;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {d}/up.pem; ssl_certificate_key {d}/up.key;
    location / {{ if ($http_authorization != 'Bearer {SECRET}') {{ return 401; }} return 200 'ok'; }}
  }}
}}
"
        ),
    )?;
    procs.0.push(
        Command::new("nginx")
            .args([
                "-c",
                conf.to_str().unwrap_or_default(),
                "-e",
                &format!("{d}/nginx.err"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(([127, 0, 0, 1], port).into())
}

/// sluice with its proxy door, the credential for the bench host; returns
/// (proxy address, the Proxy-Authorization value, the placeholder, the
/// sandbox CA PEM).
fn sluice(dir: &Path, up: u16, procs: &mut Procs) -> Result<(SocketAddr, String, String, String)> {
    let (px, admin, metrics, dns, tp) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let d = dir.display();
    let conf = dir.join("sluice.toml");
    std::fs::write(
        &conf,
        format!(
            r#"state_dir = "{d}/state"
[gateway]
transparent_listen = "127.0.0.1:{tp}"
proxy_listen = "127.0.0.1:{px}"
allow_destinations = ["127.0.0.0/8"]
allow_local_destinations = true
[gateway.resolve]
"{HOST}" = ["127.0.0.1"]
[admin]
listen = "127.0.0.1:{admin}"
[metrics]
listen = "127.0.0.1:{metrics}"
[dns]
listen = "127.0.0.1:{dns}"
[inspect]
upstream_ca_file = "{d}/root.pem"
[credentials.bench]
hosts = ["{HOST}"]
secret_file = "{d}/secret"
header = "authorization"
format = "Bearer {{secret}}"
"#
        ),
    )?;
    // SLUICE_BENCH_BIN runs another build (an earlier commit's) in the
    // same harness, for a side-by-side run.
    let exe = std::env::var_os("SLUICE_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")));
    let log = std::fs::File::create(dir.join("sluice.log"))?;
    procs.0.push(
        Command::new(exe)
            .args(["serve", "--config", conf.to_str().unwrap_or_default()])
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    wait_port(([127, 0, 0, 1], admin).into())?;
    let token = std::fs::read_to_string(dir.join("state/admin-token"))?;
    let api = |method: &str, path: &str, body: &str| -> Result<String> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-X",
                method,
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
            ])
            .args(["-H", "Content-Type: application/json", "-d", body])
            .arg(format!("http://127.0.0.1:{admin}{path}"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let minted: serde_json::Value = serde_json::from_str(&api(
        "POST",
        "/v1/tokens",
        &format!(
            r#"{{"container_id":"bench","user_id":"b","allowed_hosts":["{HOST}:{up}"],"credentials":["bench"],"ttl_seconds":3600}}"#
        ),
    )?)?;
    let jwt = minted["token"].as_str().context("no token")?.to_owned();
    let reg: serde_json::Value = serde_json::from_str(&api(
        "POST",
        "/v1/sandboxes",
        &format!(r#"{{"source_ip":"127.0.0.77","token":"{jwt}"}}"#),
    )?)?;
    let placeholder = reg["credentials"]["bench"]
        .as_str()
        .context("no placeholder")?
        .to_owned();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
        ])
        .arg(format!(
            "http://127.0.0.1:{admin}/v1/sandboxes/bench/ca.pem"
        ))
        .output()?;
    let ca = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok((
        ([127, 0, 0, 1], px).into(),
        format!("Bearer {jwt}"),
        placeholder,
        ca,
    ))
}

/// Squid with `ssl_bump`; its address and its process's id.
fn squid(dir: &Path, procs: &mut Procs) -> Result<(SocketAddr, u32)> {
    let port = free_port();
    let d = dir.display();
    let db = dir.join("ssl_db");
    let _ = std::fs::remove_dir_all(&db);
    let ok = Command::new("/usr/lib/squid/security_file_certgen")
        .args(["-c", "-s", db.to_str().unwrap_or_default(), "-M", "16MB"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("security_file_certgen -c failed");
    }
    // Squid's own user reads its files and writes its certificate db.
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir)
        .status()?;
    Command::new("chown")
        .args(["-R", "proxy"])
        .arg(&db)
        .status()?;
    let log = dir.join("squid-cache.log");
    std::fs::write(&log, "")?;
    Command::new("chown").arg("proxy").arg(&log).status()?;
    let conf = dir.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            r#"http_port 127.0.0.1:{port} ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=16MB tls-cert={d}/bump.pem tls-key={d}/bump.key
sslcrtd_program /usr/lib/squid/security_file_certgen -s {d}/ssl_db -M 16MB
sslcrtd_children 4 startup=2 idle=1
ssl_bump bump all
tls_outgoing_options cafile={d}/root.pem
hosts_file {d}/hosts
request_header_access Authorization deny all
request_header_add Authorization "Bearer {SECRET}" all
http_access allow all
cache deny all
access_log none
cache_log {d}/squid-cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
cache_effective_user proxy
shutdown_lifetime 1 seconds
"#
        ),
    )?;
    procs.0.push(
        Command::new("squid")
            .args(["-N", "-f", conf.to_str().unwrap_or_default()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = procs.0.last().map(Child::id).context("no squid")?;
    wait_port(([127, 0, 0, 1], port).into())?;
    Ok((([127, 0, 0, 1], port).into(), pid))
}

/// One proxy under load: where it listens, what the CONNECT carries, the
/// header the request carries, and the roots its leaves verify against.
#[derive(Clone)]
struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    /// What the CONNECT names (the TLS inside always says `HOST`).
    connect_host: &'static str,
    proxy_auth: Option<String>,
    authorization: String,
    tls: Arc<rustls::ClientConfig>,
    /// The same roots, offering `h2` before `http/1.1`.
    tls_h2: Arc<rustls::ClientConfig>,
    /// The proxy's process, for its RSS.
    pid: u32,
}

async fn tunnel(
    p: &Proxy,
    up: u16,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut s = TcpStream::connect(p.addr).await?;
    s.set_nodelay(true)?;
    let auth = p
        .proxy_auth
        .as_ref()
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let c = p.connect_host;
    s.write_all(format!("CONNECT {c}:{up} HTTP/1.1\r\nHost: {c}:{up}\r\n{auth}\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 || head.len() > 4096 {
            bail!("{}: CONNECT: {}", p.name, String::from_utf8_lossy(&head));
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        bail!("{}: CONNECT: {}", p.name, String::from_utf8_lossy(&head));
    }
    let name = ServerName::try_from(HOST)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, s)
        .await?)
}

/// An open inspected connection: HTTP/1.1 on the TLS stream, or an
/// HTTP/2 connection (driven by a task of its own).
enum Open {
    H1(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>),
}

/// A tunnel, TLS, and HTTP/2 when `h2` is asked and the proxy chose it.
async fn open(p: &Proxy, up: u16, h2: bool) -> Result<Open> {
    let s = tunnel(p, up, if h2 { &p.tls_h2 } else { &p.tls }).await?;
    if s.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Ok(Open::H1(Box::new(s)));
    }
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await?;
    tokio::spawn(conn);
    Ok(Open::H2(sender))
}

/// One request on an open connection; whether it went as HTTP/2.
async fn exchange(c: &mut Open, p: &Proxy, up: u16, buf: &mut Vec<u8>) -> Result<bool> {
    match c {
        Open::H1(s) => request(s, p, up, buf).await.map(|()| false),
        Open::H2(sender) => {
            use http_body_util::BodyExt;
            sender.ready().await?;
            let req = hyper::Request::get(format!("https://{HOST}:{up}/"))
                .header("authorization", &p.authorization)
                .body(http_body_util::Empty::new())?;
            let res = sender.send_request(req).await?;
            let status = res.status();
            res.into_body().collect().await?;
            if status != 200 {
                bail!("{}: HTTP/2 {status}", p.name);
            }
            Ok(true)
        }
    }
}

async fn request(
    s: &mut tokio_rustls::client::TlsStream<TcpStream>,
    p: &Proxy,
    up: u16,
    buf: &mut Vec<u8>,
) -> Result<()> {
    s.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: {HOST}:{up}\r\nAuthorization: {}\r\n\r\n",
            p.authorization
        )
        .as_bytes(),
    )
    .await?;
    buf.clear();
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("{}: closed mid-answer", p.name);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                let text = String::from_utf8_lossy(buf);
                let code = text
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .find(|w| w.starts_with("ERR_"))
                    .unwrap_or("");
                bail!("{}: {} {code}", p.name, head.lines().next().unwrap_or(""));
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return Ok(());
            }
        }
    }
}

/// Runs `workers` clients for `seconds`; `(requests/s, p99 µs, how many
/// went as HTTP/2)`.
async fn load(
    p: &Proxy,
    up: u16,
    keepalive: bool,
    h2: bool,
    o: &Options,
) -> Result<(f64, f64, usize)> {
    let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
    let mut tasks = Vec::new();
    for _ in 0..o.workers {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut as_h2 = 0;
            let mut buf = Vec::with_capacity(4096);
            let mut conn = None;
            // Bounded in time, and in count.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                if conn.is_none() || !keepalive {
                    conn = Some(open(&p, up, h2).await?);
                }
                if let Some(c) = conn.as_mut() {
                    as_h2 += usize::from(exchange(c, &p, up, &mut buf).await?);
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok((lat, as_h2))
        }));
    }
    let mut all = Vec::new();
    let mut as_h2 = 0;
    for t in tasks {
        let (lat, n) = t.await??;
        all.extend(lat);
        as_h2 += n;
    }
    all.sort_unstable();
    let p99 = all.get(all.len() * 99 / 100).copied().unwrap_or(0) as f64;
    Ok((all.len() as f64 / o.seconds, p99, as_h2))
}

/// How many idle inspected connections the memory figure holds open.
const IDLE: usize = 256;

/// KiB of the proxy's RSS per open inspected connection: `n` tunnels
/// opened, one request each, held while the RSS is read, then closed.
async fn memory(p: &Proxy, up: u16, n: usize) -> Result<f64> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = procfs::status_kib(p.pid, "VmRSS:") as f64;
    let mut held = Vec::with_capacity(n);
    let mut buf = Vec::new();
    for _ in 0..n {
        let mut c = open(p, up, false).await?;
        exchange(&mut c, p, up, &mut buf).await?;
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = procfs::status_kib(p.pid, "VmRSS:") as f64;
    drop(held);
    Ok((after - before) / n as f64)
}

/// One proxy under one load, over the rounds.
struct Row {
    load: String,
    proxy: &'static str,
    rps: Vec<f64>,
    p99: Vec<f64>,
    /// Requests that went as HTTP/2, and all of them.
    as_h2: usize,
    all: f64,
    /// CPU µs per request, each round.
    cpu: Vec<Cpu>,
}

impl Row {
    fn new(load: String, proxy: &'static str) -> Row {
        Row {
            load,
            proxy,
            rps: Vec::new(),
            p99: Vec::new(),
            as_h2: 0,
            all: 0.0,
            cpu: Vec::new(),
        }
    }
}

/// CPU seconds so far (or µs per request, once divided): the proxy (its
/// helpers included), nginx (its workers included), this bench's own
/// process (the client), the whole machine.
#[derive(Clone, Copy, Default)]
struct Cpu {
    proxy: f64,
    nginx: f64,
    client: f64,
    machine: f64,
}

impl Cpu {
    fn now(proxy: u32, nginx: u32) -> Cpu {
        Cpu {
            proxy: procfs::tree_cpu_seconds(proxy),
            nginx: procfs::tree_cpu_seconds(nginx),
            client: procfs::cpu_seconds(std::process::id()),
            machine: procfs::machine_cpu_seconds(),
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            proxy: self.proxy - before.proxy,
            nginx: self.nginx - before.nginx,
            client: self.client - before.client,
            machine: self.machine - before.machine,
        }
    }

    fn per_request(&self, requests: f64) -> Cpu {
        let per = |s: f64| s * 1e6 / requests.max(1.0);
        Cpu {
            proxy: per(self.proxy),
            nginx: per(self.nginx),
            client: per(self.client),
            machine: per(self.machine),
        }
    }

    /// Each figure's median over the rounds.
    fn median(rounds: &[Cpu]) -> Cpu {
        let of = |f: fn(&Cpu) -> f64| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
        Cpu {
            proxy: of(|c| c.proxy),
            nginx: of(|c| c.nginx),
            client: of(|c| c.client),
            machine: of(|c| c.machine),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let (o, bench) = options();
    let _ = rustls::crypto::ring::default_provider().install_default();
    for tool in ["nginx", "curl"] {
        if !have(tool) {
            if std::env::var("CI").is_ok() {
                bail!("the inspection bench needs {tool}");
            }
            println!("inspection bench skipped: no {tool}");
            return Ok(());
        }
    }
    let with_squid = have("squid") && Path::new("/usr/lib/squid/security_file_certgen").exists();
    let dir = tempfile::tempdir()?;
    pki(dir.path())?;
    let mut procs = Procs(Vec::new());
    let up = free_port();
    nginx(dir.path(), up, &mut procs)?;
    let nginx_pid = procs.0.last().map(Child::id).context("no nginx")?;
    let (px, proxy_auth, placeholder, sandbox_ca) = sluice(dir.path(), up, &mut procs)?;
    let sluice_pid = procs.0.last().map(Child::id).context("no sluice")?;
    let roots = |pems: &[&str]| -> Result<(Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>)> {
        use rustls::pki_types::pem::PemObject;
        let mut store = rustls::RootCertStore::empty();
        for pem in pems {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                store.add(c?)?;
            }
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(store)
            .with_no_client_auth();
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok((Arc::new(config), Arc::new(h2)))
    };
    let (tls, tls_h2) = roots(&[&sandbox_ca])?;
    let mut proxies = vec![Proxy {
        name: "sluice",
        addr: px,
        connect_host: HOST,
        proxy_auth: Some(proxy_auth),
        authorization: format!("Bearer {placeholder}"),
        tls,
        tls_h2,
        pid: sluice_pid,
    }];
    if with_squid {
        let (sq, squid_pid) = squid(dir.path(), &mut procs)?;
        let bump = std::fs::read_to_string(dir.path().join("bump.pem"))?;
        let (tls, tls_h2) = roots(&[&bump])?;
        proxies.push(Proxy {
            name: "squid-ssl-bump",
            addr: sq,
            // Squid is given the address: it is not asked to resolve.
            connect_host: "127.0.0.1",
            proxy_auth: None,
            authorization: "Bearer placeholder".into(),
            tls,
            tls_h2,
            pid: squid_pid,
        });
    } else {
        if bench && std::env::var("CI").is_ok() {
            bail!("the inspection bench needs squid-openssl");
        }
        println!("squid-openssl is missing: sluice alone");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut table: Vec<Row> = Vec::new();
    for (keepalive, h2) in [(true, false), (true, true), (false, false), (false, true)] {
        let load_name = format!(
            "{}, {}",
            if keepalive {
                "keep-alive"
            } else {
                "new connections"
            },
            if h2 { "HTTP/2 offered" } else { "HTTP/1.1" }
        );
        if o.only
            .as_ref()
            .is_some_and(|only| !load_name.contains(only))
        {
            continue;
        }
        for p in &proxies {
            table.push(Row::new(load_name.clone(), p.name));
        }
        for _ in 0..o.rounds {
            for (i, p) in proxies.iter().enumerate() {
                let before = Cpu::now(p.pid, nginx_pid);
                let (rps, p99, as_h2) = match rt.block_on(load(p, up, keepalive, h2, &o)) {
                    Ok(r) => r,
                    Err(e) => {
                        let log = |f: &str| {
                            std::fs::read_to_string(dir.path().join(f)).unwrap_or_default()
                        };
                        eprintln!(
                            "squid:\n{}\nsluice:\n{}",
                            log("squid-cache.log"),
                            log("sluice.log")
                        );
                        return Err(e.context(format!("{} {load_name}", p.name)));
                    }
                };
                let used = Cpu::now(p.pid, nginx_pid).since(&before);
                let at = table.len() - proxies.len() + i;
                let row = &mut table[at];
                row.rps.push(rps);
                row.p99.push(p99);
                row.as_h2 += as_h2;
                row.all += rps * o.seconds;
                row.cpu.push(used.per_request(rps * o.seconds));
            }
        }
    }
    let mut kib = Vec::new();
    for p in &proxies {
        let m = rt
            .block_on(memory(p, up, if bench { IDLE } else { 8 }))
            .with_context(|| format!("{} memory", p.name))?;
        kib.push((p.name, m));
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "inspection: HTTPS through CONNECT, TLS opened by the proxy, the credential set by it;"
    )?;
    writeln!(
        out,
        "{} workers, {} s × {} rounds, medians, nginx upstream on loopback\n",
        o.workers, o.seconds, o.rounds
    )?;
    writeln!(
        out,
        "| load | proxy | spoken | requests/s | p99 (µs) | CPU µs per request | requests/s vs Squid | p99 vs Squid | CPU vs Squid |"
    )?;
    writeln!(out, "|---|---|---|---:|---:|---:|---:|---:|---:|")?;
    let rows: Vec<(String, &str, &str, f64, f64, Cpu)> = table
        .iter_mut()
        .map(|row| {
            let spoken = if row.as_h2 as f64 >= row.all * 0.99 && row.all > 0.0 {
                "HTTP/2"
            } else if row.as_h2 == 0 {
                "HTTP/1.1"
            } else {
                "mixed"
            };
            (
                row.load.clone(),
                row.proxy,
                spoken,
                median(&mut row.rps),
                median(&mut row.p99),
                Cpu::median(&row.cpu),
            )
        })
        .collect();
    for (l, n, spoken, r, p, c) in &rows {
        let squid = rows
            .iter()
            .find(|x| x.0 == *l && x.1 == "squid-ssl-bump")
            .map(|x| (x.3, x.4, x.5.proxy));
        let (ratio, p99, cpu) = squid
            .map(|(sr, sp, sc)| {
                (
                    format!("{:.2}×", r / sr),
                    format!("{:.2}×", p / sp),
                    format!("{:.2}×", c.proxy / sc),
                )
            })
            .unwrap_or_default();
        writeln!(
            out,
            "| {l} | {n} | {spoken} | {r:.0} | {p:.0} | {:.0} | {ratio} | {p99} | {cpu} |",
            c.proxy
        )?;
    }
    // Where the machine's CPU went per request: on two shared cores the
    // client's and nginx's work (which differ with what the proxy speaks)
    // bound the proxy's requests/s beside its own.
    writeln!(
        out,
        "\n| load | proxy | machine CPU µs per request | the proxy | nginx | the client (this bench) | the rest (kernel, others) |"
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|")?;
    for (l, n, _, _, _, c) in &rows {
        writeln!(
            out,
            "| {l} | {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            c.machine,
            c.proxy,
            c.nginx,
            c.client,
            (c.machine - c.proxy - c.nginx - c.client).max(0.0)
        )?;
    }
    writeln!(out, "\n| memory per open inspected connection | KiB |")?;
    writeln!(out, "|---|---:|")?;
    for (n, m) in &kib {
        writeln!(out, "| {n} | {m:.1} |")?;
    }
    // The secret reached nginx each time (it answers 401 otherwise), and
    // the client only ever held the placeholder.
    drop(procs);
    Ok(())
}
