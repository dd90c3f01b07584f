//! Relay: moves bytes between a client and its upstream until both sides
//! are done. Each direction runs as its own task, so a saturated one never
//! starves the other; in the common case it is `splice(2)` through a pipe
//! (socket → pipe → socket, no copy into user space), with a plain copy
//! where the kernel refuses splice. EOF on one side shuts down the other
//! side's write half and the reverse direction keeps flowing. Byte counts
//! live in atomics so they survive every ending: EOF, reset, idle timeout,
//! cancellation.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::net::shutdown_write;
use crate::policy::Deny;

/// Bytes moved per splice call: the default pipe capacity.
const CHUNK: usize = 64 * 1024;

/// How a direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The source closed; the destination's write half was shut down.
    Eof,
    /// A request on the connection was refused; the caller answers it.
    Denied(Deny),
}

/// How a relayed connection ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached EOF.
    Closed,
    /// Neither direction moved a byte for the idle timeout.
    Idle,
    /// The sandbox was unregistered or the gateway is shutting down.
    Cancelled,
    /// A later request was refused (HTTP).
    Denied(Deny),
    /// A reset or another I/O error ended it.
    Error(io::Error),
}

impl RelayEnd {
    /// The audit log's `end` field.
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::Idle => "idle_timeout",
            RelayEnd::Cancelled => "cancelled",
            RelayEnd::Denied(_) => "denied",
            RelayEnd::Error(_) => "reset",
        }
    }
}

/// Byte counters and the time of the last byte, shared by both directions
/// and the connection that owns them.
#[derive(Debug, Default)]
pub struct Traffic {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
    last_ms: AtomicU64,
    /// A later request was refused: the responses already asked for still
    /// reach the client, whose write half stays open for the refusal.
    deny_pending: std::sync::atomic::AtomicBool,
}

static EPOCH: LazyLock<tokio::time::Instant> = LazyLock::new(tokio::time::Instant::now);

impl Traffic {
    pub fn touch(&self) {
        let ms = EPOCH.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the last byte moved (either way).
    pub fn last(&self) -> tokio::time::Instant {
        *EPOCH + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Marks a refusal pending (see `deny_pending`).
    pub fn hold_for_refusal(&self) {
        self.deny_pending.store(true, Ordering::Release);
    }

    fn refusal_pending(&self) -> bool {
        self.deny_pending.load(Ordering::Acquire)
    }

    pub fn totals(&self) -> (u64, u64) {
        (
            self.to_upstream.load(Ordering::Relaxed),
            self.to_client.load(Ordering::Relaxed),
        )
    }
}

/// Runs the two directions of a connection, each as its own task, until
/// both end, one fails or is denied, the pair is idle for `idle`, or one of
/// the tokens is cancelled. Tasks are stopped and awaited before this
/// returns, so no descriptor outlives it except the caller's own.
pub async fn run_pair<A, B>(
    to_upstream: A,
    to_client: B,
    traffic: &Traffic,
    idle: Duration,
    closed: &CancellationToken,
    hard_stop: &CancellationToken,
) -> RelayEnd
where
    A: Future<Output = io::Result<Flow>> + Send + 'static,
    B: Future<Output = io::Result<Flow>> + Send + 'static,
{
    traffic.touch();
    let mut up = tokio::spawn(to_upstream);
    let mut down = tokio::spawn(to_client);
    let (mut up_done, mut down_done) = (false, false);
    // A refused later request: the answers to earlier ones may still be on
    // their way; they get this long to finish before the refusal is sent.
    let mut refused: Option<(Deny, tokio::time::Instant)> = None;
    let grace = idle.min(Duration::from_secs(5));
    let end = loop {
        let idle_at = match refused {
            Some((_, until)) => until,
            None => traffic.last() + idle,
        };
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match flatten(r) {
                    Ok(Flow::Eof) if down_done => break RelayEnd::Closed,
                    Ok(Flow::Eof) => {}
                    Ok(Flow::Denied(d)) if down_done => break RelayEnd::Denied(d),
                    Ok(Flow::Denied(d)) => refused = Some((d, tokio::time::Instant::now() + grace)),
                    Err(e) => break RelayEnd::Error(e),
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match (flatten(r), refused) {
                    (Ok(_), Some((d, _))) => break RelayEnd::Denied(d),
                    (Ok(Flow::Eof), None) if up_done => break RelayEnd::Closed,
                    (Ok(Flow::Eof), None) => {}
                    (Ok(Flow::Denied(d)), None) => break RelayEnd::Denied(d),
                    (Err(e), _) => break RelayEnd::Error(e),
                }
            }
            _ = closed.cancelled() => break RelayEnd::Cancelled,
            _ = hard_stop.cancelled() => break RelayEnd::Cancelled,
            _ = tokio::time::sleep_until(idle_at) => {
                if let Some((d, _)) = refused {
                    break RelayEnd::Denied(d);
                }
                if traffic.last() + idle <= tokio::time::Instant::now() {
                    break RelayEnd::Idle;
                }
            }
        }
    };
    // Stop what still runs and wait until it has let go of its sockets.
    for (task, done) in [(up, up_done), (down, down_done)] {
        if !done {
            task.abort();
            let _ = task.await;
        }
    }
    end
}

fn flatten(r: Result<io::Result<Flow>, tokio::task::JoinError>) -> io::Result<Flow> {
    r.unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// A pipe for splicing, closed on drop (whatever it still holds is
/// discarded with it).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        Ok(Pipe { read, write })
    }
}

/// Moves bytes from `src` to `dst` until `src` reaches EOF, then shuts
/// down `dst`'s write half. Splices when it can, copies when it cannot.
pub async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<Flow> {
    // The pipe is made when the first bytes are ready, not per connection.
    src.readable().await?;
    let pipe = match Pipe::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "no pipe for splice; copying");
            return copy_one_way(src, dst, counter, traffic).await;
        }
    };
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut first = true;
    loop {
        src.readable().await?;
        let n = match src.try_io(Interest::READABLE, || {
            splice(src, None, &pipe.write, None, CHUNK, flags).map_err(io::Error::from)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if first && splice_unsupported(&e) => {
                return copy_one_way(src, dst, counter, traffic).await;
            }
            Err(e) => return Err(e),
        };
        first = false;
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        traffic.touch();
    }
    finish(dst, traffic);
    Ok(Flow::Eof)
}

/// Passes EOF on, unless a refusal is still to be written to `dst`.
fn finish(dst: &TcpStream, traffic: &Traffic) {
    if !traffic.refusal_pending() {
        shutdown_write(dst);
    }
}

fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// The fallback: a read/write copy through a small buffer.
pub async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<Flow> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        src.readable().await?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        crate::net::write_all(dst, &buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        traffic.touch();
    }
    finish(dst, traffic);
    Ok(Flow::Eof)
}
