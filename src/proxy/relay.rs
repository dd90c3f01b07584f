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

use crate::net::shutdown_write;

/// How a direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// This direction is finished; the other goes on until it finishes too.
    Half,
    /// The connection is over (its owner has said its last word to the
    /// client): the other direction is stopped.
    Whole,
}

/// How a relayed connection ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached EOF.
    Closed,
    /// Neither direction moved a byte for the idle timeout.
    Idle,
    /// The token was revoked (or the sandbox unregistered), or the gateway
    /// is shutting down.
    Cancelled,
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
    A: Future<Output = io::Result<Done>> + Send + 'static,
    B: Future<Output = io::Result<Done>> + Send + 'static,
{
    traffic.touch();
    // Aborted if the returned future is dropped unpolled or mid-way: no
    // direction outlives its connection.
    let up = AbortOnDropHandle::new(tokio::spawn(to_upstream));
    let down = AbortOnDropHandle::new(tokio::spawn(to_client));
    watch_pair(up, down, traffic, idle, closed, hard_stop)
}

type Direction = AbortOnDropHandle<io::Result<Done>>;

async fn watch_pair(
    mut up: Direction,
    mut down: Direction,
    traffic: &Traffic,
    idle: Duration,
    closed: &CancellationToken,
    hard_stop: &CancellationToken,
) -> RelayEnd {
    let (mut up_done, mut down_done) = (false, false);
    let end = loop {
        let idle_at = traffic.last() + idle;
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match flatten(r) {
                    Ok(Done::Half) if !down_done => {}
                    Ok(_) => break RelayEnd::Closed,
                    Err(e) => break RelayEnd::Error(e),
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match flatten(r) {
                    Ok(Done::Half) if !up_done => {}
                    Ok(_) => break RelayEnd::Closed,
                    Err(e) => break RelayEnd::Error(e),
                }
            }
            _ = closed.cancelled() => break RelayEnd::Cancelled,
            _ = hard_stop.cancelled() => break RelayEnd::Cancelled,
            _ = tokio::time::sleep_until(idle_at) => {
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

fn flatten(r: Result<io::Result<Done>, tokio::task::JoinError>) -> io::Result<Done> {
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
/// down `dst`'s write half: one direction of a raw relay.
pub async fn pipe(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<Done> {
    move_bytes(src, dst, None, counter, traffic).await?;
    shutdown_write(dst);
    Ok(Done::Half)
}

/// Moves bytes from `src` to `dst` until `src` reaches EOF, or until
/// `limit` bytes have moved if one is given; returns how many moved. Leaves
/// `dst` open. Splices when it can, copies when it cannot.
pub async fn move_bytes(
    src: &TcpStream,
    dst: &TcpStream,
    limit: Option<u64>,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut first = true;
    let mut moved = 0u64;
    // Held while bytes flow; given back (empty) when the source runs dry.
    let mut held: Option<Pipe> = None;
    loop {
        let want = match limit {
            Some(l) if moved >= l => break,
            Some(l) => usize::try_from(l - moved)
                .unwrap_or(PIPE_SIZE)
                .min(PIPE_SIZE),
            None => PIPE_SIZE,
        };
        src.readable().await?;
        let pipe = match held {
            Some(ref p) => p,
            None => match POOL.take() {
                Ok(p) => held.insert(p),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splice; copying");
                    return Box::pin(copy_bytes(src, dst, limit, moved, counter, traffic)).await;
                }
            },
        };
        let n = match src.try_io(Interest::READABLE, || {
            splice(src, None, &pipe.write, None, want, flags).map_err(io::Error::from)
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
                return Box::pin(copy_bytes(src, dst, limit, moved, counter, traffic)).await;
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
        moved += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        traffic.touch();
    }
    if let Some(p) = held.take() {
        POOL.give(p);
    }
    Ok(moved)
}

/// Writes `bytes` and counts them.
pub async fn send(
    dst: &TcpStream,
    bytes: &[u8],
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    crate::net::write_all(dst, bytes).await?;
    counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    traffic.touch();
    Ok(())
}

fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// The fallback: a read/write copy through a small buffer, continuing
/// after `moved` bytes.
async fn copy_bytes(
    src: &TcpStream,
    dst: &TcpStream,
    limit: Option<u64>,
    mut moved: u64,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let want = match limit {
            Some(l) if moved >= l => break,
            Some(l) => usize::try_from(l - moved)
                .unwrap_or(buf.len())
                .min(buf.len()),
            None => buf.len(),
        };
        src.readable().await?;
        let n = match src.try_read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        send(dst, &buf[..n], counter, traffic).await?;
        moved += n as u64;
    }
    Ok(moved)
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
            std::future::pending::<io::Result<Done>>().await
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
