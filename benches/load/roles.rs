//! The two ends of the load: the upstream server (in the upstream
//! namespace) and the client (in the client namespace). Both are this same
//! binary, started by the orchestrator with `--role server|client`.
//!
//! Every connection opens with a TLS ClientHello whose SNI says what the
//! upstream does with it, so every gateway under test (sluice, HAProxy,
//! nginx) decides on the same bytes:
//!
//! - `bulk.bench.test`: the upstream sends without pause until the client
//!   closes (throughput);
//! - `rate.bench.test`: the upstream answers 64 bytes, and the client closes
//!   as soon as it has them (new connections per second, latency);
//! - `idle.bench.test`: the upstream answers 8 bytes and both sides then
//!   keep the connection open without a byte (memory per connection).
//!
//! By default both ends of a bulk stream move bytes without copying them
//! through user space: the upstream `sendfile`s from a file of 4 MiB held
//! in the page cache, the client `splice`s from its socket into a pipe and
//! on into `/dev/null`. So on a 2-core machine the endpoints take as little
//! CPU from the gateway as the kernel allows, and a gateway's own cost
//! shows. `--copying` (the orchestrator's flag) makes both ends copy
//! through 256 KiB buffers instead, as a program reading into memory does.
//!
//! The client reports on stdout, one `key=value` line per event, which the
//! orchestrator reads: `start` when the measured window opens, `end ...`
//! with the figures when it closes.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sluice::proxy::sniff::{Parsed, parse_client_hello};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const RATE_ANSWER: usize = 64;
pub const IDLE_ANSWER: usize = 8;

/// A ClientHello of a browser's size (512 bytes, padded like curl's)
/// naming `sni`, in one record.
pub fn client_hello(sni: &str) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let name = sni.as_bytes();
    let mut exts = Vec::new();
    let mut sn = Vec::new();
    sn.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sn.push(0);
    sn.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sn.extend_from_slice(name);
    ext(&mut exts, 0x0000, &sn);
    ext(&mut exts, 0x000a, &[0, 4, 0, 0x1d, 0, 0x17]);
    ext(&mut exts, 0x000d, &[0, 6, 4, 3, 8, 4, 4, 1]);
    ext(&mut exts, 0x0010, &[0, 3, 2, b'h', b'2']);
    ext(&mut exts, 0x002b, &[4, 3, 4, 3, 3]);
    let mut ks = vec![0, 36, 0, 0x1d, 0, 32];
    ks.extend_from_slice(&[0x42; 32]);
    ext(&mut exts, 0x0033, &ks);

    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x17; 32]); // random
    body.push(32);
    body.extend_from_slice(&[0x29; 32]); // session id
    body.extend_from_slice(&[0, 8, 0x13, 1, 0x13, 2, 0x13, 3, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]); // compression: null
    // Pad the whole record to 512 bytes (RFC 7685), as curl does.
    let fixed = 5 + 4 + body.len() + 2 + exts.len() + 4;
    let pad = 512usize.saturating_sub(fixed);
    ext(&mut exts, 0x0015, &vec![0; pad]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);

    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Soft descriptor limit up to the hard one: the idle test holds one
/// descriptor per connection on each end.
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .with_context(|| format!("missing {name}"))
}

fn num<T: std::str::FromStr>(args: &[String], name: &str) -> Result<T> {
    flag(args, name)?
        .parse()
        .map_err(|_| anyhow::anyhow!("bad {name}"))
}

/// How the ends of a bulk stream move their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// `sendfile` at the upstream, `splice` into `/dev/null` at the client.
    ZeroCopy,
    /// `write` from and `read` into 256 KiB buffers.
    Copying,
}

impl Endpoints {
    pub fn flag(self) -> &'static str {
        match self {
            Endpoints::ZeroCopy => "zero-copy",
            Endpoints::Copying => "copying",
        }
    }

    fn parse(s: &str) -> Result<Endpoints> {
        match s {
            "zero-copy" => Ok(Endpoints::ZeroCopy),
            "copying" => Ok(Endpoints::Copying),
            other => bail!("unknown endpoints {other:?}"),
        }
    }
}

/// `--role server --listen ADDR --endpoints E` or `--role client MODE ...`.
pub fn run(args: &[String]) -> Result<()> {
    raise_nofile();
    match args.first().map(String::as_str) {
        Some("server") => runtime()?.block_on(server(
            flag(args, "--listen")?.parse()?,
            Endpoints::parse(flag(args, "--endpoints")?)?,
        )),
        Some("client") => client(&args[1..]),
        other => bail!("unknown role {other:?}"),
    }
}

// ---------------------------------------------------------------- server

/// What the zero-copy upstream sends from, round and round.
const BULK_FILE: usize = 4 << 20;

fn bulk_file() -> Result<Arc<std::fs::File>> {
    let mut f = tempfile::tempfile().context("the bulk file")?;
    f.write_all(&vec![0x5a; BULK_FILE])?;
    Ok(Arc::new(f))
}

async fn server(listen: SocketAddr, endpoints: Endpoints) -> Result<()> {
    let file = match endpoints {
        Endpoints::ZeroCopy => Some(bulk_file()?),
        Endpoints::Copying => None,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let file = file.clone();
        tokio::spawn(async move {
            let _ = serve(stream, file).await;
        });
    }
}

async fn serve(mut stream: tokio::net::TcpStream, file: Option<Arc<std::fs::File>>) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let sni = loop {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_client_hello(&buf, 16 * 1024) {
            Parsed::Found(h) => break h.sni.to_string(),
            Parsed::NeedMore => continue,
            Parsed::Invalid(d) => bail!("bad hello: {d:?}"),
        }
    };
    let mut sink = [0u8; 64];
    match sni.split('.').next() {
        // Until the client closes; it bounds the run.
        Some("bulk") => match file {
            Some(file) => send_file(&stream, &file).await,
            None => {
                let data = vec![0x5a; 256 * 1024];
                while stream.write_all(&data).await.is_ok() {}
            }
        },
        Some("idle") => {
            stream.write_all(&[0x16; IDLE_ANSWER]).await?;
            while stream.read(&mut sink).await? > 0 {}
        }
        // `rate`, and any other name: the upstream answers whatever
        // reaches it, so a gateway's refusal is the only thing that can
        // keep a name off the allowlist from an answer.
        _ => {
            stream.write_all(&[0x16; RATE_ANSWER]).await?;
            while stream.read(&mut sink).await? > 0 {}
        }
    }
    Ok(())
}

/// `sendfile`s `file` to `stream` from its start to its end, again and
/// again, until the peer goes away.
async fn send_file(stream: &tokio::net::TcpStream, file: &std::fs::File) {
    use tokio::io::Interest;
    let mut offset: libc::off_t = 0;
    loop {
        if stream.writable().await.is_err() {
            return;
        }
        let left = BULK_FILE - offset as usize;
        let sent = stream.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile(stream, file, Some(&mut offset), left)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(0) => return,
            Ok(_) => {
                if offset as usize >= BULK_FILE {
                    offset = 0;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------- client

fn client(args: &[String]) -> Result<()> {
    let to: SocketAddr = flag(args, "--to")?.parse()?;
    let mode = args.first().map(String::as_str).unwrap_or("");
    match mode {
        "bulk" => bulk(
            to,
            Endpoints::parse(flag(args, "--endpoints")?)?,
            num(args, "--streams")?,
            Duration::from_secs_f64(num(args, "--warmup")?),
            Duration::from_secs_f64(num(args, "--seconds")?),
        ),
        "rate" => runtime()?.block_on(rate(
            to,
            num(args, "--concurrency")?,
            Duration::from_secs_f64(num(args, "--warmup")?),
            Duration::from_secs_f64(num(args, "--seconds")?),
            num(args, "--max")?,
        )),
        "idle" => runtime()?.block_on(idle(to, num(args, "--count")?)),
        other => bail!("unknown client mode {other:?}"),
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `streams` connections reading as fast as they can; bytes counted in the
/// window after `warmup`.
fn bulk(
    to: SocketAddr,
    endpoints: Endpoints,
    streams: usize,
    warmup: Duration,
    window: Duration,
) -> Result<()> {
    let hello = client_hello("bulk.bench.test");
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..streams {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .context("bulk connect")?;
        s.write_all(&hello)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (total, stop) = (Arc::clone(&total), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut sink = Sink::new(endpoints)?;
            while !stop.load(Ordering::Relaxed) {
                let n = sink.take(&mut s)?;
                if n == 0 {
                    bail!("upstream closed mid-run");
                }
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    std::thread::sleep(warmup);
    let (b0, t0) = (total.load(Ordering::Relaxed), Instant::now());
    say("start");
    std::thread::sleep(window);
    let (b1, secs) = (total.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    say(&format!("end bytes={} secs={secs:.6}", b1 - b0));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => bail!("a bulk stream panicked"),
        }
    }
    Ok(())
}

/// Where a bulk client's bytes go: a buffer, or a pipe to `/dev/null`.
enum Sink {
    Buffer(Vec<u8>),
    Null {
        read: std::os::fd::OwnedFd,
        write: std::os::fd::OwnedFd,
        null: std::fs::File,
    },
}

/// The most one splice takes, and the client's pipe size.
const CLIENT_PIPE: usize = 1 << 20;

impl Sink {
    fn new(endpoints: Endpoints) -> Result<Sink> {
        Ok(match endpoints {
            Endpoints::Copying => Sink::Buffer(vec![0u8; 256 * 1024]),
            Endpoints::ZeroCopy => {
                let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                let _ = nix::fcntl::fcntl(
                    &write,
                    nix::fcntl::FcntlArg::F_SETPIPE_SZ(CLIENT_PIPE as i32),
                );
                let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
                Sink::Null { read, write, null }
            }
        })
    }

    /// Takes what `s` has (blocking), and returns how much; 0 at EOF.
    fn take(&mut self, s: &mut std::net::TcpStream) -> Result<usize> {
        use nix::fcntl::{SpliceFFlags, splice};
        match self {
            Sink::Buffer(buf) => Ok(s.read(buf)?),
            Sink::Null { read, write, null } => {
                let n = splice(
                    &*s,
                    None,
                    &*write,
                    None,
                    CLIENT_PIPE,
                    SpliceFFlags::SPLICE_F_MOVE,
                )
                .context("splice from the socket")?;
                let mut left = n;
                while left > 0 {
                    left -= splice(
                        &*read,
                        None,
                        &*null,
                        None,
                        left,
                        SpliceFFlags::SPLICE_F_MOVE,
                    )
                    .context("splice into /dev/null")?;
                }
                Ok(n)
            }
        }
    }
}

/// One connection: connect, hello, the upstream's first bytes, close.
async fn one_connection(to: SocketAddr, hello: &[u8]) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    s.write_all(hello).await?;
    let mut answer = [0u8; RATE_ANSWER];
    s.read_exact(&mut answer).await?;
    Ok(())
}

/// `concurrency` workers opening connections back to back, for `window`
/// after `warmup`, at most `max` connections in all.
async fn rate(
    to: SocketAddr,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    max: u64,
) -> Result<()> {
    let hello: Arc<[u8]> = client_hello("rate.bench.test").into();
    let begin = Instant::now();
    let measure_from = begin + warmup;
    let end = measure_from + window;
    let started = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (hello, started) = (Arc::clone(&hello), Arc::clone(&started));
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end || started.fetch_add(1, Ordering::Relaxed) >= max {
                    break;
                }
                let r =
                    tokio::time::timeout(Duration::from_secs(5), one_connection(to, &hello)).await;
                let ok = matches!(r, Ok(Ok(())));
                if t0 >= measure_from {
                    if ok {
                        latencies.push(t0.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
                if !ok {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    say("start");
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        all.extend(l);
        errors += e;
    }
    let secs = measure_from.elapsed().as_secs_f64();
    say("stop");
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.is_empty() {
            return 0;
        }
        all[((all.len() - 1) as f64 * p).round() as usize]
    };
    say(&format!(
        "end conns={} secs={secs:.6} p50_us={} p99_us={} errors={errors}",
        all.len(),
        pct(0.50),
        pct(0.99)
    ));
    Ok(())
}

/// Opens `count` connections, each past its hello and the upstream's
/// first bytes, holds them until stdin says `close` (or closes), then
/// closes them all.
async fn idle(to: SocketAddr, count: usize) -> Result<()> {
    let hello: Arc<[u8]> = client_hello("idle.bench.test").into();
    let permits = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let (hello, permits) = (Arc::clone(&hello), Arc::clone(&permits));
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            let open = async {
                let mut s = tokio::net::TcpStream::connect(to).await?;
                s.write_all(&hello).await?;
                let mut answer = [0u8; IDLE_ANSWER];
                s.read_exact(&mut answer).await?;
                Ok::<_, std::io::Error>(s)
            };
            tokio::time::timeout(Duration::from_secs(10), open)
                .await
                .ok()?
                .ok()
        }));
    }
    let mut held = Vec::with_capacity(count);
    for t in tasks {
        if let Some(s) = t.await? {
            held.push(s);
        }
    }
    say(&format!(
        "end established={} errors={}",
        held.len(),
        count - held.len()
    ));
    // Wait for the orchestrator's word (or its end).
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    })
    .await?;
    drop(held);
    Ok(())
}
