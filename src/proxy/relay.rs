//! Relay: moves bytes between a client and its upstream until both sides
//! are done, in the connection's own task. A raw connection (the common
//! case) is [`raw_pair`]: one hand-written state machine that drives both
//! directions by `splice(2)` through a pipe (socket → pipe → socket, no copy
//! into user space), with a plain copy where the kernel refuses splice. An
//! HTTP exchange's two directions are futures polled together by
//! [`run_pair`], also without a task of their own. Pipes come from a pool
//! and are held only while bytes are in flight, so an idle connection holds
//! none; a pipe starts at the kernel's default size and grows (up to 1 MiB)
//! while a direction keeps filling it. EOF on one side shuts down the other
//! side's write half while the reverse direction goes on; the last
//! direction to end leaves the FIN to the close. Byte counts live in
//! atomics so they survive every ending: EOF, reset, idle timeout,
//! cancellation.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::stream::{ReadHalf, Split, Stream, WriteHalf};
use crate::limits::{Grant, Meter, Taken, Way};
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
    /// A daily byte budget (the sandbox's or its organisation's) is spent.
    Quota,
}

impl RelayEnd {
    /// The audit log's `end` field.
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::Idle => "idle_timeout",
            RelayEnd::Cancelled => "cancelled",
            RelayEnd::Error(_) => "reset",
            RelayEnd::Quota => "quota_exceeded",
        }
    }

    /// An error's ending: [`RelayEnd::Quota`] for a spent budget.
    pub fn of_error(e: io::Error) -> RelayEnd {
        if e.get_ref().is_some_and(|inner| inner.is::<Spent>()) {
            RelayEnd::Quota
        } else {
            RelayEnd::Error(e)
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
    /// When the first byte was relayed (either way), plus one; 0 until.
    first_ms: AtomicU64,
}

static EPOCH: LazyLock<tokio::time::Instant> = LazyLock::new(tokio::time::Instant::now);

impl Traffic {
    pub fn touch(&self) {
        let ms = EPOCH.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
        if self.first_ms.load(Ordering::Relaxed) == 0 {
            self.first_ms.store(ms + 1, Ordering::Relaxed);
        }
    }

    /// Milliseconds from `started` to the first byte relayed, if one was.
    pub fn first_byte_ms(&self, started: std::time::Instant) -> Option<u64> {
        let first = self.first_ms.load(Ordering::Relaxed).checked_sub(1)?;
        let at = EPOCH.into_std() + Duration::from_millis(first);
        Some(at.saturating_duration_since(started).as_millis() as u64)
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

/// Runs the two directions of an exchange, polled together in the
/// caller's task, until both end, one ends the whole connection or fails,
/// the pair is idle for `idle`, or `closed` is cancelled (the gateway's
/// hard stop is the pipeline's, around the whole connection). Dropping the
/// future drops both directions (and whatever they hold).
pub async fn run_pair<A, B>(
    to_upstream: A,
    to_client: B,
    traffic: &Traffic,
    idle: Duration,
    closed: &CancellationToken,
) -> RelayEnd
where
    A: Future<Output = io::Result<Done>>,
    B: Future<Output = io::Result<Done>>,
{
    traffic.touch();
    let mut up = pin!(to_upstream);
    let mut down = pin!(to_client);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let idle_at = traffic.last() + idle;
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    Ok(Done::Half) if !down_done => {}
                    Ok(_) => return RelayEnd::Closed,
                    Err(e) => return RelayEnd::of_error(e),
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match r {
                    Ok(Done::Half) if !up_done => {}
                    Ok(_) => return RelayEnd::Closed,
                    Err(e) => return RelayEnd::of_error(e),
                }
            }
            _ = closed.cancelled() => return RelayEnd::Cancelled,
            _ = tokio::time::sleep_until(idle_at) => {
                if traffic.last() + idle <= tokio::time::Instant::now() {
                    return RelayEnd::Idle;
                }
            }
        }
    }
}

/// A pipe for splicing, closed on drop (whatever it still holds is
/// discarded with it).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity: the most one splice into it moves (at most
    /// [`MAX_PIPE`]; 32 bits keep a connection's state small).
    cap: u32,
    /// Whether asking for more room may still be granted.
    can_grow: bool,
}

/// The largest a pipe grows to.
pub const MAX_PIPE: usize = 1 << 20;

impl Pipe {
    /// A pipe of the kernel's default size (64 KiB with 4 KiB pages): a
    /// short or slow connection needs no more, and a fast one grows it.
    fn new() -> io::Result<Pipe> {
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let cap = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .map_or(64 * 1024, |n| n as u32);
        Ok(Pipe {
            read,
            write,
            cap,
            can_grow: (cap as usize) < MAX_PIPE,
        })
    }

    /// A splice filled the pipe: the stream is faster than one pipe's
    /// worth per wake-up, so ask for four times the room (up to
    /// [`MAX_PIPE`]). The kernel may refuse (a user over its pipe pages
    /// limit); the pipe then keeps its size and is not asked again.
    fn grow(&mut self) {
        if !self.can_grow {
            return;
        }
        let want = (self.cap() * 4).min(MAX_PIPE);
        match nix::fcntl::fcntl(&self.write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(want as i32)) {
            Ok(n) => self.cap = n as u32,
            Err(_) => self.can_grow = false,
        }
        self.can_grow &= self.cap() < MAX_PIPE;
    }

    /// Its capacity, in bytes.
    fn cap(&self) -> usize {
        self.cap as usize
    }
}

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
/// down `dst`'s write half: one direction of a relay.
pub async fn pipe(
    src: &mut ReadHalf,
    dst: &mut WriteHalf,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<Done> {
    move_bytes(src, dst, None, counter, traffic).await?;
    dst.shutdown().await;
    Ok(Done::Half)
}

/// Moves bytes from `src` to `dst` until `src` reaches EOF, or until
/// `limit` bytes have moved if one is given; returns how many moved. Leaves
/// `dst` open. Splices between two TCP sockets, copies otherwise.
pub async fn move_bytes(
    src: &mut ReadHalf,
    dst: &mut WriteHalf,
    limit: Option<u64>,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<u64> {
    if let (Some(s), Some(d)) = (src.tcp(), dst.tcp()) {
        return splice_bytes(s, d, limit, counter, traffic).await;
    }
    let mut buf = Vec::with_capacity(COPY_BUF);
    let mut moved = 0u64;
    loop {
        let want = match limit {
            Some(l) if moved >= l => break,
            Some(l) => usize::try_from(l - moved).unwrap_or(COPY_BUF).min(COPY_BUF),
            None => COPY_BUF,
        };
        buf.clear();
        let n = src.read_some(&mut buf, want).await?;
        if n == 0 {
            break;
        }
        send(dst, &buf, counter, traffic).await?;
        moved += n as u64;
    }
    Ok(moved)
}

/// [`move_bytes`] between two TCP sockets: spliced when the kernel lets
/// it, copied when it does not.
async fn splice_bytes(
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
        if limit.is_some_and(|l| moved >= l) {
            break;
        }
        src.readable().await?;
        let pipe = match held {
            Some(ref mut p) => p,
            None => match POOL.take() {
                Ok(p) => held.insert(p),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splice; copying");
                    return Box::pin(copy_bytes(src, dst, limit, moved, counter, traffic)).await;
                }
            },
        };
        let want = match limit {
            Some(l) => usize::try_from(l - moved)
                .unwrap_or(pipe.cap())
                .min(pipe.cap()),
            None => pipe.cap(),
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
        if n >= pipe.cap() {
            pipe.grow();
        }
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

/// Relays a raw connection in both directions until both reach EOF, one
/// fails, the pair is idle for `idle`, or `closed` is cancelled; `head`
/// (bytes already read from the client) goes upstream first. For a pair
/// that is not two TCP sockets (those go through [`raw_pair`], spliced):
/// both directions copied.
pub async fn copy_pair(
    client: &mut Split,
    upstream: Stream,
    head: Vec<u8>,
    traffic: &Traffic,
    idle: Duration,
    closed: &CancellationToken,
) -> RelayEnd {
    let mut up = upstream.split();
    let to_upstream = async {
        send(&mut up.write, &head, &traffic.to_upstream, traffic).await?;
        pipe(
            &mut client.read,
            &mut up.write,
            &traffic.to_upstream,
            traffic,
        )
        .await
    };
    let to_client = pipe(&mut up.read, &mut client.write, &traffic.to_client, traffic);
    run_pair(to_upstream, to_client, traffic, idle, closed).await
}

/// Relays two TCP sockets raw, both directions spliced; otherwise as
/// [`copy_pair`].
///
/// One state machine in the connection's own task drives both
/// directions, so a connection costs one task, and an idle one keeps only
/// this future's state (no pipe). The directions take turns at who is
/// polled first, and tokio's cooperative budget makes a saturated one
/// yield, so neither starves the other.
///
/// With a `meter` (a limited sandbox), each splice (and each write of the
/// first bytes) moves at most what it grants that way, and waits when it
/// grants nothing yet; a spent daily budget ends the connection
/// ([`RelayEnd::Quota`]). Still zero-copy: the meter only caps how much
/// each `splice(2)` moves. Without one, nothing is asked.
pub async fn raw_pair(
    client: &TcpStream,
    upstream: &TcpStream,
    head: Vec<u8>,
    traffic: &Traffic,
    idle: Duration,
    closed: &CancellationToken,
    meter: Option<&Meter>,
) -> RelayEnd {
    traffic.touch();
    let mut up = Flow::new(head);
    let mut down = Flow::new(Vec::new());
    let mut closed = pin!(closed.cancelled());
    let mut timer = pin!(tokio::time::sleep_until(traffic.last() + idle));
    let mut up_first = false;
    std::future::poll_fn(|cx| {
        if closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(RelayEnd::Cancelled);
        }
        up_first = !up_first;
        for turn in [up_first, !up_first] {
            let r = if turn {
                let ends = Ends {
                    src: client,
                    dst: upstream,
                    counter: &traffic.to_upstream,
                    traffic,
                    meter: meter.map(|m| (m, Way::Egress)),
                    fin_follows: !down.done,
                };
                step(cx, &mut up, down.done, &ends)
            } else {
                let ends = Ends {
                    src: upstream,
                    dst: client,
                    counter: &traffic.to_client,
                    traffic,
                    meter: meter.map(|m| (m, Way::Ingress)),
                    fin_follows: !up.done,
                };
                step(cx, &mut down, up.done, &ends)
            };
            if let Err(e) = r {
                return Poll::Ready(RelayEnd::of_error(e));
            }
        }
        if up.done && down.done {
            return Poll::Ready(RelayEnd::Closed);
        }
        // The idle deadline moves with the last byte; the timer is reset
        // only when it fires.
        while timer.as_mut().poll(cx).is_ready() {
            let at = traffic.last() + idle;
            if at <= tokio::time::Instant::now() {
                return Poll::Ready(RelayEnd::Idle);
            }
            timer.as_mut().reset(at);
        }
        Poll::Pending
    })
    .await
}

/// Polls one direction; when it ends, shuts down `dst`'s write half if
/// the other direction still runs (the last one leaves its FIN to the
/// close, one system call fewer).
fn step(
    cx: &mut Context<'_>,
    flow: &mut Flow,
    other_done: bool,
    ends: &Ends<'_>,
) -> io::Result<()> {
    if flow.done {
        return Ok(());
    }
    if let Poll::Ready(r) = flow.poll(cx, ends) {
        r?;
        flow.done = true;
        if !other_done {
            shutdown_write(ends.dst);
        }
    }
    Ok(())
}

/// One direction's two sockets, its counter, and its meter (and which
/// way it meters) when the sandbox is limited.
struct Ends<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    counter: &'a AtomicU64,
    traffic: &'a Traffic,
    meter: Option<(&'a Meter, Way)>,
    /// The other direction still runs, so this one's end is followed at
    /// once by a `shutdown` of `dst` (a FIN that can ride on the last
    /// bytes).
    fin_follows: bool,
}

/// The error a byte mover ends with when a daily budget is spent.
#[derive(Debug, thiserror::Error)]
#[error("a daily byte budget is spent")]
pub struct Spent;

fn spent() -> io::Error {
    io::Error::other(Spent)
}

impl Flow {
    /// How much the meter lets this direction move now (all of `want`
    /// when unlimited); `Pending` while it makes the direction wait.
    fn allowance(
        &mut self,
        cx: &mut Context<'_>,
        ends: &Ends<'_>,
        want: usize,
    ) -> Poll<io::Result<(usize, Option<Taken>)>> {
        let Some((meter, way)) = ends.meter else {
            return Poll::Ready(Ok((want, None)));
        };
        loop {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            match meter.grant(way, want) {
                (Grant::Move(n), taken) => return Poll::Ready(Ok((n, Some(taken)))),
                (Grant::Wait(d), _) => self.wait = Some(Box::pin(tokio::time::sleep(d))),
                (Grant::Spent(_), _) => return Poll::Ready(Err(spent())),
            }
        }
    }

    /// What was granted and what moved: the rest goes back to the meter.
    fn settle(ends: &Ends<'_>, taken: Option<Taken>, moved: usize) {
        if let (Some((meter, way)), Some(taken)) = (ends.meter, taken) {
            meter.moved(way, taken, moved);
        }
    }
}

/// One direction of a raw relay: its bytes in flight and how far it got.
struct Flow {
    /// Bytes read before the relay began, written before any other.
    head: Vec<u8>,
    head_sent: usize,
    /// The pipe, held while bytes are in it.
    pipe: Option<Pipe>,
    /// The copy fallback's buffer, where the kernel refuses splice.
    copy: Option<Box<[u8]>>,
    /// Bytes in the pipe (or the copy buffer, from `copy_at`), not yet
    /// written to the destination.
    queued: usize,
    copy_at: usize,
    /// A splice has worked here, so a later refusal is an error, not a
    /// reason to copy.
    spliced: bool,
    /// The source reached EOF.
    eof: bool,
    /// EOF, and every byte delivered.
    done: bool,
    /// A limited sandbox's meter made it wait until then.
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Still copying through the worker's scratch buffer: a direction
    /// starts so, and splices once it moves bulk.
    short: bool,
    /// Bytes copied so (at most [`SHORT_MAX`]).
    copied: u32,
}

const SPLICE: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// The copy fallback's buffer.
const COPY_BUF: usize = 16 * 1024;

impl Flow {
    fn new(head: Vec<u8>) -> Flow {
        Flow {
            head,
            head_sent: 0,
            pipe: None,
            copy: None,
            queued: 0,
            copy_at: 0,
            spliced: false,
            eof: false,
            done: false,
            wait: None,
            short: true,
            copied: 0,
        }
    }

    fn copy_instead(&mut self) {
        if let Some(p) = self.pipe.take() {
            POOL.give(p);
        }
        self.copy = Some(vec![0u8; COPY_BUF].into_boxed_slice());
    }

    /// Moves what can move now; `Ready(Ok)` once the source is at EOF and
    /// everything read is delivered.
    fn poll(&mut self, cx: &mut Context<'_>, ends: &Ends<'_>) -> Poll<io::Result<()>> {
        let (src, dst, counter, traffic) = (ends.src, ends.dst, ends.counter, ends.traffic);
        loop {
            // What the client sent before the relay began.
            if self.head_sent < self.head.len() {
                ready!(dst.poll_write_ready(cx))?;
                let (allowed, taken) =
                    ready!(self.allowance(cx, ends, self.head.len() - self.head_sent))?;
                let end = self.head_sent + allowed;
                let wrote = dst.try_write(&self.head[self.head_sent..end]);
                Flow::settle(ends, taken, *wrote.as_ref().unwrap_or(&0));
                match wrote {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.head_sent += n;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        traffic.touch();
                        if self.head_sent == self.head.len() {
                            // Not held for the life of the connection.
                            self.head = Vec::new();
                            self.head_sent = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            // Deliver what is in flight.
            if self.queued > 0 {
                ready!(dst.poll_write_ready(cx))?;
                let wrote = match (&self.copy, &self.pipe) {
                    (Some(buf), _) => dst.try_write(&buf[self.copy_at..self.copy_at + self.queued]),
                    (None, Some(pipe)) => dst.try_io(Interest::WRITABLE, || {
                        splice(&pipe.read, None, dst, None, self.queued, SPLICE)
                            .map_err(io::Error::from)
                    }),
                    (None, None) => Err(io::Error::other("bytes queued without a pipe")),
                };
                match wrote {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.queued -= n;
                        self.copy_at += n;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        traffic.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A pipe dropped with bytes in it is closed, not pooled.
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.eof {
                if let Some(p) = self.pipe.take() {
                    POOL.give(p);
                }
                return Poll::Ready(Ok(()));
            }
            // Take what the source has.
            ready!(src.poll_read_ready(cx))?;
            if self.short && self.copy.is_none() && ends.meter.is_none() {
                self.copy_short(ends)?;
                continue;
            }
            if self.copy.is_some() {
                let (allowed, taken) = ready!(self.allowance(cx, ends, COPY_BUF))?;
                let Some(buf) = &mut self.copy else { continue };
                let read = src.try_read(&mut buf[..allowed]);
                Flow::settle(ends, taken, *read.as_ref().unwrap_or(&0));
                match read {
                    Ok(0) => self.eof = true,
                    Ok(n) => (self.queued, self.copy_at) = (n, 0),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.pipe.is_none() {
                match POOL.take() {
                    Ok(p) => self.pipe = Some(p),
                    Err(e) => {
                        tracing::debug!(error = %e, "no pipe for splice; copying");
                        self.copy_instead();
                        continue;
                    }
                }
            }
            let cap = self.pipe.as_ref().map_or(0, Pipe::cap);
            let (want, taken) = match ends.meter {
                None => (cap, None),
                Some(_) => ready!(self.allowance(cx, ends, cap))?,
            };
            let Some(pipe) = &mut self.pipe else {
                Flow::settle(ends, taken, 0);
                continue;
            };
            let spliced = src.try_io(Interest::READABLE, || {
                splice(src, None, &pipe.write, None, want, SPLICE).map_err(io::Error::from)
            });
            Flow::settle(ends, taken, *spliced.as_ref().unwrap_or(&0));
            match spliced {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.spliced = true;
                    self.queued = n;
                    if n >= cap && want == cap {
                        pipe.grow();
                    }
                }
                // Dry: the (empty) pipe goes back, so an idle direction
                // holds none.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(p) = self.pipe.take() {
                        POOL.give(p);
                    }
                }
                Err(e) if !self.spliced && splice_unsupported(&e) => self.copy_instead(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// The scratch buffer a short exchange is copied through: one per worker
/// thread, held only within one poll, so a connection holds none.
const SCRATCH: usize = 16 * 1024;

/// A direction moves this much by copying at most before it splices.
const SHORT_MAX: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

impl Flow {
    /// The first bytes of a direction, and short exchanges: read into the
    /// worker's scratch buffer until the source is dry (or at EOF) and
    /// written on at once, what the destination does not take kept to be
    /// written first (as the head is). For a few hundred bytes a `read`
    /// and a `write` cost less than two splices and a pipe, which pay only
    /// for bulk (HAProxy's `splice-auto`); a direction that fills the
    /// buffer, or has copied [`SHORT_MAX`], splices from then on. When the
    /// source's EOF came with its last bytes and a `shutdown` follows, they
    /// are sent with `MSG_MORE` so the FIN rides on their segment.
    /// Unmetered directions only: a meter's grants are taken per splice.
    fn copy_short(&mut self, ends: &Ends<'_>) -> io::Result<()> {
        SCRATCH_BUF.with_borrow_mut(|buf| {
            let mut got = 0;
            while got < buf.len() {
                match ends.src.try_read(&mut buf[got..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            self.copied = self.copied.saturating_add(got as u32);
            if got == buf.len() || self.copied as usize >= SHORT_MAX {
                self.short = false;
            }
            if got == 0 {
                return Ok(());
            }
            let flags = if self.eof && ends.fin_follows {
                libc::MSG_MORE
            } else {
                0
            };
            let dst = socket2::SockRef::from(ends.dst);
            let wrote = match ends.dst.try_io(Interest::WRITABLE, || {
                dst.send_with_flags(&buf[..got], flags)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            if wrote > 0 {
                ends.counter.fetch_add(wrote as u64, Ordering::Relaxed);
                ends.traffic.touch();
            }
            if wrote < got {
                self.head = buf[wrote..got].to_vec();
                self.head_sent = 0;
            }
            Ok(())
        })
    }
}

/// Writes `bytes` and counts them.
pub async fn send(
    dst: &mut WriteHalf,
    bytes: &[u8],
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    dst.write_all(bytes).await?;
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
        crate::net::write_all(dst, &buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        traffic.touch();
        moved += n as u64;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A pipe starts at the kernel's default and grows by four up to
    /// 1 MiB, then is not asked again.
    #[test]
    fn a_pipe_grows_to_a_mebibyte_and_no_further() {
        let mut p = Pipe::new().unwrap();
        let start = p.cap();
        assert!(start < MAX_PIPE, "a new pipe is {start} B");
        let mut sizes = vec![start];
        while p.can_grow {
            p.grow();
            sizes.push(p.cap());
        }
        assert_eq!(p.cap(), MAX_PIPE, "grew {sizes:?}");
        assert!(sizes.windows(2).all(|w| w[1] > w[0]), "grew {sizes:?}");
        let real = nix::fcntl::fcntl(&p.write, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap();
        assert_eq!(real as usize, MAX_PIPE);
        p.grow();
        assert_eq!(p.cap(), MAX_PIPE);
    }

    /// Two connected sockets on loopback: (ours, theirs).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Every byte arrives in order, whichever way it moves: short writes
    /// copied (some while the client is not reading, so what its socket
    /// does not take waits in the direction), then bulk that fills the
    /// scratch buffer and is spliced; EOF follows each way. The counters
    /// match.
    #[tokio::test]
    async fn short_then_bulk_bytes_arrive_in_order_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, client_side) = pair().await;
        let (upstream_side, upstream) = pair().await;
        // A small send buffer, so the copy meets a full socket.
        socket2::SockRef::from(&client_side)
            .set_send_buffer_size(4096)
            .unwrap();
        let traffic = Arc::new(Traffic::default());
        let token = CancellationToken::new();
        let relay = {
            let traffic = Arc::clone(&traffic);
            tokio::spawn(async move {
                let end = raw_pair(
                    &client_side,
                    &upstream_side,
                    b"hello ".to_vec(),
                    &traffic,
                    Duration::from_secs(30),
                    &token,
                    None,
                )
                .await;
                // The last FIN is the close's.
                drop((client_side, upstream_side));
                end
            })
        };
        // Down: many short writes while the client reads nothing, then
        // 2 MiB in big writes.
        let down: Vec<u8> = (0..2_400_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let down = down.clone();
            tokio::spawn(async move {
                let mut upstream = upstream;
                for chunk in down[..300_000].chunks(700) {
                    upstream.write_all(chunk).await.unwrap();
                }
                upstream.write_all(&down[300_000..]).await.unwrap();
                upstream.shutdown().await.unwrap();
                let mut got = Vec::new();
                upstream.read_to_end(&mut got).await.unwrap();
                got
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), down.len());
        assert!(got == down, "the bytes changed on the way down");
        // Up: a short write, then EOF.
        client.write_all(b"world").await.unwrap();
        client.shutdown().await.unwrap();
        let up = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(up, b"hello world");
        let end = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(end, RelayEnd::Closed), "{end:?}");
        assert_eq!(traffic.totals(), (11, down.len() as u64));
    }

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
