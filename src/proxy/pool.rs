//! Pool: idle upstream connections of inspected hosts, TLS verified and
//! HTTP (1.1 or 2) established, kept for the same sandbox's next
//! inspected connection to the same host and port. A client that opens a
//! connection per request (most SDKs, `curl` in a loop) then costs one
//! TLS handshake, its own, instead of two and a dial.
//!
//! Never shared between sandboxes: the key is the container, the host,
//! the port and the sandbox's byte meter (a connection metered for one
//! meter is never used under another). Every request on a pooled
//! connection is judged and given its credential as on a new one; what
//! the pool saves is only the dial and the upstream's handshake. An entry
//! waits [`IDLE`] at most, a key keeps [`PER_KEY`], the pool [`MAX`]; the
//! pool goes with the credentials it served (replaced on SIGHUP).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use tokio::time::Instant;

use crate::host::HostName;

/// How long an idle upstream connection is kept.
pub const IDLE: Duration = Duration::from_secs(15);

/// Idle connections kept per sandbox, host and port.
pub const PER_KEY: usize = 16;

/// Idle connections kept in all.
pub const MAX: usize = 1024;

/// Whose idle connections these are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub container: Arc<str>,
    pub host: HostName,
    pub port: u16,
    /// The meter the connection's bytes go to (its address), 0 for none.
    pub meter: usize,
}

/// An upstream's HTTP connection, driven by a task of its own.
#[derive(Debug)]
pub enum Sender {
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

impl Sender {
    /// Can it carry a new request now?
    fn usable(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    /// The protocol it speaks, as ALPN names it.
    pub fn alpn(&self) -> &'static [u8] {
        match self {
            Sender::H1(_) => b"http/1.1",
            Sender::H2(_) => b"h2",
        }
    }
}

/// An upstream connection out of the pool, or to be put in it.
#[derive(Debug)]
pub struct Pooled {
    pub sender: Sender,
    /// The address it was dialled at.
    pub addr: SocketAddr,
}

/// The idle connections.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Idle>,
    /// A sweep is scheduled.
    sweeping: AtomicBool,
}

#[derive(Debug, Default)]
struct Idle {
    by_key: HashMap<Key, Vec<(Pooled, Instant)>>,
    count: usize,
}

impl Idle {
    /// Drops what waited too long or can no longer be used.
    fn sweep(&mut self, now: Instant) {
        let mut count = 0;
        self.by_key.retain(|_, v| {
            v.retain(|(p, at)| now.duration_since(*at) < IDLE && p.sender.usable());
            count += v.len();
            !v.is_empty()
        });
        self.count = count;
    }
}

impl Pool {
    /// Is any connection of `container` waiting? (A cheap look before
    /// building a key.)
    pub fn is_empty(&self) -> bool {
        self.lock().count == 0
    }

    /// Is a connection waiting for `key`? (Looked at before a dial;
    /// taken once the client's protocol is known.)
    pub fn has(&self, key: &Key) -> bool {
        self.lock().by_key.contains_key(key)
    }

    /// The newest usable idle connection for `key` that speaks `alpn`,
    /// taken out; stale and closed ones on the way are dropped.
    pub fn take(&self, key: &Key, alpn: &[u8]) -> Option<Pooled> {
        let now = Instant::now();
        let mut idle = self.lock();
        let v = idle.by_key.get_mut(key)?;
        v.retain(|(p, at)| now.duration_since(*at) < IDLE && p.sender.usable());
        let found = v
            .iter()
            .rposition(|(p, _)| p.sender.alpn() == alpn)
            .map(|i| v.remove(i).0);
        if v.is_empty() {
            idle.by_key.remove(key);
        }
        idle.count = idle.by_key.values().map(Vec::len).sum();
        found
    }

    /// Keeps `p` for `key`'s next connection, if it can carry a request
    /// and the pool has room (else it is dropped, and its connection
    /// closed). A key holds at most `PER_KEY`: past that, its longest
    /// idle connection is dropped for `p`.
    pub fn put(self: &Arc<Self>, key: Key, p: Pooled) {
        if !p.sender.usable() {
            return;
        }
        {
            let mut idle = self.lock();
            if idle.count >= MAX {
                idle.sweep(Instant::now());
            }
            if idle.count >= MAX {
                return;
            }
            let now = Instant::now();
            let v = idle.by_key.entry(key).or_default();
            if v.len() >= PER_KEY {
                v.retain(|(p, at)| now.duration_since(*at) < IDLE && p.sender.usable());
            }
            if v.len() >= PER_KEY {
                // The longest idle goes (put in order, it is the first):
                // a key full of one protocol's connections, left by an
                // earlier burst, must not keep the other's from being
                // reused until they lapse.
                v.remove(0);
            }
            v.push((p, now));
            idle.count = idle.by_key.values().map(Vec::len).sum();
        }
        // One sweeper at a time, until the pool is empty: an idle
        // connection is closed within two IDLEs even if no one asks.
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(IDLE).await;
                    let Some(pool) = pool.upgrade() else { return };
                    let mut idle = pool.lock();
                    idle.sweep(Instant::now());
                    if idle.count == 0 {
                        pool.sweeping.store(false, Ordering::Release);
                        return;
                    }
                }
            });
        }
    }

    /// Drops every idle connection of `container` (its token replaced).
    /// A revoked sandbox's wait out IDLE: none is used without a new
    /// connection of the sandbox's, allowed by its token.
    pub fn forget(&self, container: &str) {
        let mut idle = self.lock();
        idle.by_key.retain(|k, _| &*k.container != container);
        idle.count = idle.by_key.values().map(Vec::len).sum();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A decided connection that waits for the pool: its key had an idle
/// connection when it was decided, so it was not dialled; one is taken
/// (or the target dialled) once the client's protocol is known.
#[derive(Debug)]
pub struct Deferred {
    pub pool: Arc<Pool>,
    pub key: Key,
}

#[cfg(test)]
mod tests {
    use hyper_util::rt::TokioIo;

    use super::*;

    const H1: &[u8] = b"http/1.1";

    /// An HTTP/1.1 sender over an in-memory pipe, its connection driven,
    /// ready for a request.
    async fn sender() -> Sender {
        let (ours, _theirs) = tokio::io::duplex(1024);
        let (mut s, conn) = http1::handshake::<_, Incoming>(TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _theirs = _theirs;
            let _ = conn.await;
        });
        s.ready().await.unwrap();
        Sender::H1(s)
    }

    /// An HTTP/2 sender over an in-memory pipe (no server answers: it
    /// is ready for its first streams all the same).
    async fn h2_sender() -> Sender {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (s, conn) = http2::handshake::<_, _, Incoming>(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(ours),
        )
        .await
        .unwrap();
        tokio::spawn(async move {
            let _theirs = theirs;
            let _ = conn.await;
        });
        Sender::H2(s)
    }

    fn key(container: &str, port: u16) -> Key {
        Key {
            container: Arc::from(container),
            host: HostName::parse("api.pool.test").unwrap(),
            port,
            meter: 0,
        }
    }

    fn pooled(sender: Sender) -> Pooled {
        Pooled {
            sender,
            addr: ([198, 18, 1, 10], 443).into(),
        }
    }

    /// A connection goes back only to its own sandbox, host and port, once.
    #[tokio::test]
    async fn a_connection_serves_only_its_own_key_once() {
        let pool = Arc::new(Pool::default());
        assert!(pool.is_empty());
        pool.put(key("c1", 443), pooled(sender().await));
        assert!(!pool.is_empty());
        assert!(pool.has(&key("c1", 443)));
        assert!(!pool.has(&key("c2", 443)));
        assert!(
            pool.take(&key("c2", 443), H1).is_none(),
            "another sandbox's"
        );
        assert!(pool.take(&key("c1", 8443), H1).is_none(), "another port's");
        assert!(
            pool.take(&key("c1", 443), b"h2").is_none(),
            "another protocol's"
        );
        let metered = Key {
            meter: 1,
            ..key("c1", 443)
        };
        assert!(pool.take(&metered, H1).is_none(), "under another meter");
        assert!(pool.take(&key("c1", 443), H1).is_some());
        assert!(pool.take(&key("c1", 443), H1).is_none(), "taken twice");
        assert!(pool.is_empty());
    }

    /// What waited too long, or whose connection closed, is not handed
    /// out; the sweeper empties the pool without being asked; a key keeps
    /// at most PER_KEY.
    #[tokio::test(start_paused = true)]
    async fn stale_closed_and_surplus_connections_are_dropped() {
        let pool = Arc::new(Pool::default());
        pool.put(key("c1", 443), pooled(sender().await));
        tokio::time::advance(IDLE + Duration::from_secs(1)).await;
        assert!(pool.take(&key("c1", 443), H1).is_none(), "stale");

        // A sender whose connection is gone cannot be kept.
        let (ours, theirs) = tokio::io::duplex(1024);
        let (s, conn) = http1::handshake::<_, Incoming>(TokioIo::new(ours))
            .await
            .unwrap();
        drop(theirs);
        let _ = conn.await;
        pool.put(key("c1", 443), pooled(Sender::H1(s)));
        assert!(pool.is_empty(), "a closed connection was kept");

        for _ in 0..PER_KEY + 3 {
            pool.put(key("c1", 443), pooled(sender().await));
        }
        assert_eq!(pool.lock().count, PER_KEY);
        // Full of HTTP/1.1: an HTTP/2 connection takes the longest idle's
        // place, and is there for the next HTTP/2 client.
        pool.put(key("c1", 443), pooled(h2_sender().await));
        assert_eq!(pool.lock().count, PER_KEY);
        assert!(pool.take(&key("c1", 443), b"h2").is_some(), "not kept");
        assert_eq!(pool.lock().count, PER_KEY - 1);
        // Nobody asks: the sweeper closes them within two IDLEs.
        for _ in 0..4 {
            tokio::time::sleep(IDLE).await;
            tokio::task::yield_now().await;
        }
        assert!(pool.is_empty(), "idle connections outlived the sweeper");
        assert!(!pool.sweeping.load(Ordering::Acquire));
    }

    /// A sandbox's idle connections go when it is forgotten; others stay.
    #[tokio::test]
    async fn forgetting_a_sandbox_drops_only_its_connections() {
        let pool = Arc::new(Pool::default());
        pool.put(key("c1", 443), pooled(sender().await));
        pool.put(key("c2", 443), pooled(sender().await));
        pool.forget("c1");
        assert!(pool.take(&key("c1", 443), H1).is_none());
        assert!(pool.take(&key("c2", 443), H1).is_some());
    }
}
