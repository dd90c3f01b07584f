//! Shared by the in-process tests: a gateway on 127.0.0.1 port 0 with a
//! fixed original destination, a raw HTTP/1.1 admin client, and upstream
//! servers that record what reached them.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sluice::app::{Options, Running};
use sluice::config::Config;
use sluice::net::orig_dst::OrigDstSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub struct Gw {
    pub running: Running,
    pub dir: tempfile::TempDir,
}

/// A config for tests: everything on 127.0.0.1:0, loopback allowed as a
/// destination, `*.test` names resolved to 127.0.0.1, no leeway.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        state_dir: dir.to_path_buf(),
        ..Config::default()
    };
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    c.gateway.transparent_listen = any;
    c.gateway.proxy_listen = any;
    c.admin.listen = any;
    c.metrics.listen = any;
    c.dns.listen = any;
    // Names not in [gateway.resolve] go nowhere: never to the machine's
    // own resolver (the discard port on loopback answers nothing).
    c.dns.upstream = vec!["127.0.0.1:9".parse().unwrap()];
    c.gateway.allow_destinations = vec!["127.0.0.0/8".parse().unwrap()];
    // The test's upstreams listen on this host's loopback.
    c.gateway.allow_local_destinations = true;
    c.auth.leeway_s = 0;
    for name in [
        "api.test",
        "other.test",
        "secure.test",
        "api.example.test",
        "ssh.test",
    ] {
        c.gateway
            .resolve
            .insert(name.into(), vec!["127.0.0.1".parse().unwrap()]);
    }
    c
}

pub async fn start(orig: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Gw {
    start_in(tempfile::tempdir().unwrap(), orig, tweak).await
}

/// A gateway on an existing state directory (a restart).
pub async fn start_in(
    dir: tempfile::TempDir,
    orig: SocketAddr,
    tweak: impl FnOnce(&mut Config),
) -> Gw {
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let running = sluice::app::run(
        config,
        Options {
            orig_dst: OrigDstSource::Fixed(orig),
            launcher: None,
        },
    )
    .await
    .unwrap();
    Gw { running, dir }
}

impl Gw {
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = self.running.admin_token.clone();
        admin_request(self.running.admin_addr, method, path, body, Some(&token)).await
    }

    /// Mints a token for `container_id` and registers it for `source`.
    pub async fn register(
        &self,
        container_id: &str,
        source: &str,
        hosts: &[&str],
        ttl: u64,
    ) -> String {
        let (status, minted) = self
            .admin(
                "POST",
                "/v1/tokens",
                Some(json!({"container_id": container_id, "user_id": "tester", "allowed_hosts": hosts, "ttl_seconds": ttl})),
            )
            .await;
        assert_eq!(status, 201, "{minted}");
        let token = minted["token"].as_str().unwrap().to_owned();
        let (status, body) = self
            .admin(
                "POST",
                "/v1/sandboxes",
                Some(json!({"source_ip": source, "token": token})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        token
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = raw_http(
            self.running.metrics_addr,
            "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        body
    }

    /// Sends `bytes` to the transparent listener from `source` and reads
    /// the answer to EOF.
    pub async fn request_from(&self, source: &str, bytes: &[u8]) -> String {
        String::from_utf8_lossy(&self.request_from_bytes(source, bytes).await).into_owned()
    }

    /// As [`request_from`](Self::request_from), the answer as bytes. A
    /// write the gateway cuts short (it refused before reading it all) is
    /// not an error here.
    pub async fn request_from_bytes(&self, source: &str, bytes: &[u8]) -> Vec<u8> {
        let mut s = self.connect_from(source).await;
        let _ = s.write_all(bytes).await;
        read_all(&mut s).await
    }

    /// Connects to the transparent listener from `source` (a 127.x address).
    pub async fn connect_from(&self, source: &str) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(source.parse().unwrap(), 0))
            .unwrap();
        socket.connect(self.running.transparent_addr).await.unwrap()
    }
}

pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, text) = raw_http(addr, &req).await;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Sends a raw request, reads to EOF, returns the status and the body.
pub async fn raw_http(addr: SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    parse_response(&text)
}

pub fn parse_response(text: &str) -> (u16, String) {
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Reads one HTTP response with a Content-Length body.
pub async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            return String::from_utf8_lossy(&buf).into_owned();
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads to EOF (bounded in time).
pub async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// An upstream that records every connection and every byte.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub received: Arc<Mutex<Vec<u8>>>,
}

impl Upstream {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

/// An HTTP/1.1 upstream that answers every request (keep-alive) with
/// `upstream <method> <path> host=<Host>`; request bodies are read by
/// Content-Length or chunked framing.
pub async fn http_upstream() -> Upstream {
    http_upstream_on("127.0.0.1:0".parse().unwrap()).await
}

/// [`http_upstream`] on a given address.
pub async fn http_upstream_on(addr: SocketAddr) -> Upstream {
    let listener = TcpListener::bind(addr).await.unwrap();
    let up = Upstream {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::default(),
        received: Arc::default(),
    };
    let u = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            u.accepted.fetch_add(1, Ordering::SeqCst);
            let received = Arc::clone(&u.received);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 65536];
                loop {
                    let Some(end) = find(&buf, b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                received.lock().unwrap().extend_from_slice(&chunk[..n]);
                                buf.extend_from_slice(&chunk[..n]);
                                continue;
                            }
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let mut lines = head.lines();
                    let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
                    let mut host = String::new();
                    let mut len = 0usize;
                    let mut chunked = false;
                    for l in lines {
                        let lower = l.to_lowercase();
                        if let Some(v) = lower.strip_prefix("host:") {
                            host = v.trim().to_owned();
                        }
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                            chunked = true;
                        }
                    }
                    buf.drain(..end + 4);
                    let body_end = loop {
                        let done = if chunked {
                            find(&buf, b"0\r\n\r\n").map(|i| i + 5)
                        } else {
                            (buf.len() >= len).then_some(len)
                        };
                        if let Some(e) = done {
                            break e;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                received.lock().unwrap().extend_from_slice(&chunk[..n]);
                                buf.extend_from_slice(&chunk[..n]);
                            }
                        }
                    };
                    let body_len = body_end;
                    buf.drain(..body_end);
                    let reply = format!(
                        "upstream {} {} host={host} body={body_len}",
                        first.first().unwrap_or(&""),
                        first.get(1).unwrap_or(&"")
                    );
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    up
}

/// A raw upstream: records bytes, writes `greeting` once it has received
/// `after` bytes, and closes when the client does.
pub async fn raw_upstream(greeting: &'static [u8], after: usize) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Upstream {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::default(),
        received: Arc::default(),
    };
    let u = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            u.accepted.fetch_add(1, Ordering::SeqCst);
            let received = Arc::clone(&u.received);
            tokio::spawn(async move {
                let mut chunk = vec![0u8; 65536];
                let mut total = 0;
                let mut greeted = false;
                loop {
                    if !greeted && total >= after {
                        greeted = true;
                        if s.write_all(greeting).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            total += n;
                            received.lock().unwrap().extend_from_slice(&chunk[..n]);
                        }
                    }
                }
            });
        }
    });
    up
}

pub fn capture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The value of one series in a Prometheus text page (0 when absent).
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A deterministic byte stream (xorshift), for transfers checked by digest.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// An upstream that answers one upgrade request with `101 Switching
/// Protocols` and then echoes every byte (a websocket stand-in).
pub async fn upgrade_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Upstream {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::default(),
        received: Arc::default(),
    };
    let u = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            u.accepted.fetch_add(1, Ordering::SeqCst);
            let received = Arc::clone(&u.received);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    if let Some(i) = find(&buf, b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                received.lock().unwrap().extend_from_slice(&buf[..end]);
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let _ = s.write_all(&buf[end..]).await;
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    up
}

/// How a refused connection must be refused.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// An HTTP answer with this status and `x-deny-reason`.
    Http(u16),
    /// The TLS alert `access_denied`.
    TlsAlert,
    /// A close without a byte.
    Closed,
}

/// One hostile input and how it must be refused.
pub struct Case {
    pub name: &'static str,
    pub source: &'static str,
    pub send: Vec<u8>,
    pub refusal: Refusal,
    pub protocol: &'static str,
    pub reason: &'static str,
}

/// This process's descriptors, less the empty pipes the relay keeps
/// pooled for reuse (bounded by `relay::POOL_MAX`): what is left must
/// return to its baseline, or something leaked.
pub fn open_fds() -> usize {
    let all = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    all.saturating_sub(2 * sluice::proxy::relay::pooled_pipes())
}

/// Runs each case on its own connection to the transparent listener and
/// checks, for each: the form of the refusal, the reason (in the answer
/// where the protocol carries one, and in the counters always), that no
/// upstream saw a connection, and that the process's descriptors are back
/// at their baseline. Call it from the only test in its binary: counters
/// and descriptors are process-wide.
pub async fn run_cases(gw: &Gw, upstreams: &[&Upstream], cases: Vec<Case>) {
    const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];
    let accepted = |ups: &[&Upstream]| ups.iter().map(|u| u.accepted()).sum::<usize>();
    let before_all = accepted(upstreams);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = open_fds();
    for case in cases {
        let series = format!(
            r#"sluice_connections_total{{mode="transparent",protocol="{}",decision="deny",reason="{}"}}"#,
            case.protocol, case.reason
        );
        let counted_before = metric(&gw.metrics().await, &series);
        let answer = gw.request_from_bytes(case.source, &case.send).await;
        let text = String::from_utf8_lossy(&answer);
        match case.refusal {
            Refusal::Http(status) => {
                assert!(
                    text.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{}: {text}",
                    case.name
                );
                assert!(
                    text.contains(&format!("\r\nx-deny-reason: {}\r\n", case.reason)),
                    "{}: {text}",
                    case.name
                );
            }
            Refusal::TlsAlert => assert_eq!(answer, ALERT, "{}", case.name),
            Refusal::Closed => assert!(answer.is_empty(), "{}: {text}", case.name),
        }
        let counted = metric(&gw.metrics().await, &series);
        assert_eq!(
            counted,
            counted_before + 1.0,
            "{}: {series} did not count it",
            case.name
        );
        assert_eq!(
            accepted(upstreams),
            before_all,
            "{}: an upstream saw a connection",
            case.name
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut now = open_fds();
        while now > baseline && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            now = open_fds();
        }
        assert!(
            now <= baseline,
            "{}: descriptors {baseline} before, {now} after",
            case.name
        );
    }
}

/// Whether `program` runs here (`program probe` exits 0). When it does
/// not, the test named `test` is skipped with that reason printed, except
/// with `CI=true`, where a missing tool fails it.
pub fn have_tool(program: &str, probe: &str, test: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg(probe)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "CI=true: {program} is not installed ({test})");
        eprintln!("SKIPPED {test}: {program} is not installed");
    }
    found
}

/// A PEP 503 index with one pure wheel, `demo` 1.0, under `root`:
/// `root/demo-1.0-py3-none-any.whl` and `root/simple/demo/index.html`
/// (what `pip download demo` from `<url>/simple/` fetches).
#[allow(dead_code)]
pub fn pep503_index(root: &std::path::Path) {
    let simple = root.join("simple/demo");
    std::fs::create_dir_all(&simple).unwrap();
    let wheel = "demo-1.0-py3-none-any.whl";
    let script = format!(
        r#"
import zipfile, hashlib, base64
files = {{
    "demo/__init__.py": b"VALUE = 1\n",
    "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
    "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: sluice-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = ""
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record += f"{{name}},sha256={{digest}},{{len(data)}}\n"
record += "demo-1.0.dist-info/RECORD,,\n"
with zipfile.ZipFile("{}", "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
    z.writestr("demo-1.0.dist-info/RECORD", record)
"#,
        root.join(wheel).display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(
        simple.join("index.html"),
        format!("<!DOCTYPE html><html><body><a href=\"/{wheel}\">{wheel}</a></body></html>\n"),
    )
    .unwrap();
}

/// A free loopback port (bound, read, released), for a process that binds
/// it itself.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
