//! Relay: moves bytes between a client and its upstream until both sides
//! are done. Each direction runs as its own task, so a saturated one never
//! starves the other; in the common case it is `splice(2)` through a pipe
//! (socket → pipe → socket, no copy into user space), with a plain copy
//! where the kernel refuses splice. Pipes come from a pool and are held
//! only while bytes are in flight, so an idle connection holds none. EOF
//! on one side shuts down the other side's write half and the reverse
//! direction keeps flowing. Byte counts live in atomics so they survive
//! every ending: EOF, reset, idle timeout, cancellation.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::deny::Deny;
use crate::net::shutdown_write;

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
///
/// The two tasks are spawned when this is called, so the future returned
/// holds their handles rather than the directions' own state: it is what an
/// idle connection keeps.
pub fn run_pair<'a, A, B>(
    to_upstream: A,
    to_client: B,
    traffic: &'a Traffic,
    idle: Duration,
    closed: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
) -> impl Future<Output = RelayEnd> + Send + 'a
where
    A: Future<Output = io::Result<Flow>> + Send + 'static,
    B: Future<Output = io::Result<Flow>> + Send + 'static,
{
    traffic.touch();
    // Aborted if the returned future is dropped unpolled or mid-way: no
    // direction outlives its connection.
    let up = AbortOnDropHandle::new(tokio::spawn(to_upstream));
    let down = AbortOnDropHandle::new(tokio::spawn(to_client));
    watch_pair(up, down, traffic, idle, closed, hard_stop)
}

type Direction = AbortOnDropHandle<io::Result<Flow>>;

async fn watch_pair(
    mut up: Direction,
    mut down: Direction,
    traffic: &Traffic,
    idle: Duration,
    closed: &CancellationToken,
    hard_stop: &CancellationToken,
) -> RelayEnd {
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
        // Larger than the default 64 KiB, so one splice moves more of a
        // fast stream. The kernel may refuse (a user over its pipe pages
        // limit); the default size then serves.
        let _ = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { read, write })
    }
}

/// The pipe capacity asked for, and the most one splice call moves.
const PIPE_SIZE: usize = 256 * 1024;

/// Empty pipes kept for reuse. A direction holds a pipe only while bytes
/// are in flight through it and gives it back once the source has nothing
/// more to read and the pipe is drained, so idle connections hold none
/// (two descriptors saved per direction) and a new burst does not pay for
/// `pipe2` and `F_SETPIPE_SZ`.
struct PipePool {
    free: Mutex<Vec<Pipe>>,
}

/// Pipes kept beyond that are closed; a busy gateway makes new ones.
pub const POOL_MAX: usize = 256;

/// Empty pipes waiting in the pool (two descriptors each): what a
/// descriptor count should leave out when it looks for leaks.
pub fn pooled_pipes() -> usize {
    POOL.free.lock().map(|v| v.len()).unwrap_or(0)
}

static POOL: PipePool = PipePool {
    free: Mutex::new(Vec::new()),
};

impl PipePool {
    fn take(&self) -> io::Result<Pipe> {
        let reused = self.free.lock().ok().and_then(|mut v| v.pop());
        match reused {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Takes back a pipe known to be empty.
    fn give(&self, pipe: Pipe) {
        if let Ok(mut v) = self.free.lock()
            && v.len() < POOL_MAX
        {
            v.push(pipe);
        }
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
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut first = true;
    // Held while bytes flow; given back (empty) when the source runs dry.
    let mut held: Option<Pipe> = None;
    loop {
        src.readable().await?;
        let pipe = match held {
            Some(ref p) => p,
            None => match POOL.take() {
                Ok(p) => held.insert(p),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splice; copying");
                    return Box::pin(copy_one_way(src, dst, counter, traffic)).await;
                }
            },
        };
        let n = match src.try_io(Interest::READABLE, || {
            splice(src, None, &pipe.write, None, PIPE_SIZE, flags).map_err(io::Error::from)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(p) = held.take() {
                    POOL.give(p);
                }
                continue;
            }
            Err(e) if first && splice_unsupported(&e) => {
                return Box::pin(copy_one_way(src, dst, counter, traffic)).await;
            }
            // The pipe is empty here; but an error ends the connection.
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
                // Dropped with what it holds, not pooled.
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        traffic.touch();
    }
    if let Some(p) = held.take() {
        POOL.give(p);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A connection whose relay future is dropped (its task cancelled)
    /// leaves no direction running with its sockets.
    #[tokio::test]
    async fn dropping_the_pair_stops_both_directions() {
        let held = Arc::new(());
        let direction = |h: Arc<()>| async move {
            let _h = h;
            std::future::pending::<io::Result<Flow>>().await
        };
        let traffic = Traffic::default();
        let token = CancellationToken::new();
        let pair = run_pair(
            direction(Arc::clone(&held)),
            direction(Arc::clone(&held)),
            &traffic,
            Duration::from_secs(60),
            &token,
            &token,
        );
        tokio::task::yield_now().await;
        assert_eq!(Arc::strong_count(&held), 3, "both directions started");
        drop(pair);
        for _ in 0..100 {
            if Arc::strong_count(&held) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(Arc::strong_count(&held), 1, "a direction outlived its pair");
    }
}
