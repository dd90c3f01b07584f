//! The one listener primitive every TCP door uses: the transparent and
//! proxy doors, the DNS door's TCP, and the admin API (plain or TLS).
//! Owns accepting (backing off on `EMFILE` and friends instead of
//! spinning), admission (a place under a global cap and one under the
//! source's cap, taken before anything is read and given back when the
//! connection ends), and spawning into the set the drain waits for. A
//! source over its cap, or a door over its total, is closed at once: a
//! listener never waits for a place, so silent connections cannot hold up
//! the next client's accept.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::identity::{ConnectionCounts, CountGuard};
use crate::shutdown::Shutdown;

/// How long accepting pauses when the process is out of descriptors or
/// memory: live connections get a moment to finish.
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// The caps one listener admits under: a total, and one per source
/// address (counted from accept, before anything identifies the client).
#[derive(Clone)]
pub struct Limits {
    pub total: Arc<Semaphore>,
    pub per_source: Arc<ConnectionCounts<IpAddr>>,
    /// Replaceable while serving (SIGHUP).
    per_source_cap: Arc<AtomicUsize>,
}

impl Limits {
    pub fn new(total: usize, per_source_cap: usize) -> Limits {
        Limits {
            total: Arc::new(Semaphore::new(total)),
            per_source: Arc::default(),
            per_source_cap: Arc::new(AtomicUsize::new(per_source_cap)),
        }
    }

    /// A door that shares this total but counts its sources apart, under
    /// its own cap (the DNS door's TCP: a few connections per source).
    pub fn sharing_total(&self, per_source_cap: usize) -> Limits {
        Limits {
            total: Arc::clone(&self.total),
            per_source: Arc::default(),
            per_source_cap: Arc::new(AtomicUsize::new(per_source_cap)),
        }
    }

    /// Sets the per-source cap for connections from now on.
    pub fn set_per_source_cap(&self, cap: usize) {
        self.per_source_cap.store(cap, Ordering::Relaxed);
    }

    /// A place for a connection from `peer`, or `None` when its source or
    /// the total is full.
    pub fn admit(&self, peer: SocketAddr) -> Option<Admission> {
        let source = peer.ip().to_canonical();
        let cap = self.per_source_cap.load(Ordering::Relaxed);
        let per_source = self.per_source.try_acquire(&source, cap)?;
        let total = Arc::clone(&self.total).try_acquire_owned().ok()?;
        Some(Admission {
            _total: total,
            _per_source: per_source,
        })
    }
}

/// A connection's places under its listener's caps, held until it ends.
pub struct Admission {
    _total: OwnedSemaphorePermit,
    _per_source: CountGuard<IpAddr>,
}

impl Admission {
    pub fn new(total: OwnedSemaphorePermit, per_source: CountGuard<IpAddr>) -> Admission {
        Admission {
            _total: total,
            _per_source: per_source,
        }
    }
}

/// What the listener hands on.
pub enum Accepted {
    /// Admitted: serve it, holding the admission.
    Admitted(TcpStream, SocketAddr, Admission),
    /// Over a cap: the door may say so (or just drop it).
    Refused(TcpStream, SocketAddr),
}

/// The next connection on `listener`, or `None` once shutdown began.
pub async fn next(
    listener: &TcpListener,
    limits: &Limits,
    shutdown: &Shutdown,
) -> Option<Accepted> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.stopping() => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                return Some(match limits.admit(peer) {
                    Some(a) => Accepted::Admitted(stream, peer, a),
                    None => Accepted::Refused(stream, peer),
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(EXHAUSTED_PAUSE) => {}
                    _ = shutdown.stopping() => return None,
                }
            }
            Err(e) => tracing::debug!(error = %e, "accept failed"),
        }
    }
}

/// Accepts until shutdown; each admitted connection runs `serve` in the
/// set the drain waits for; a refused one is handed to `refuse`.
pub async fn serve<S, F>(
    listener: TcpListener,
    limits: Limits,
    shutdown: Shutdown,
    serve: S,
    refuse: impl Fn(TcpStream, SocketAddr),
) where
    S: Fn(TcpStream, SocketAddr, Admission) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    while let Some(accepted) = next(&listener, &limits, &shutdown).await {
        match accepted {
            Accepted::Admitted(stream, peer, admission) => {
                shutdown.spawn(serve(stream, peer, admission));
            }
            Accepted::Refused(stream, peer) => refuse(stream, peer),
        }
    }
}

/// A stream that holds its admission: given back when the connection
/// ends, however the server that owns it drops it.
pub struct AdmittedIo<S> {
    io: S,
    _admission: Admission,
}

impl<S> AdmittedIo<S> {
    pub fn new(io: S, admission: Admission) -> AdmittedIo<S> {
        AdmittedIo {
            io,
            _admission: admission,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AdmittedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AdmittedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A plain TCP listener for `axum::serve` through the primitive: each
/// connection admitted under `limits` (one over a cap is closed at once),
/// holding its place until it ends.
pub struct Admitting {
    listener: TcpListener,
    limits: Limits,
    shutdown: Shutdown,
}

impl Admitting {
    pub fn new(listener: TcpListener, limits: Limits, shutdown: Shutdown) -> Admitting {
        Admitting {
            listener,
            limits,
            shutdown,
        }
    }
}

impl axum::serve::Listener for Admitting {
    type Io = AdmittedIo<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match next(&self.listener, &self.limits, &self.shutdown).await {
                Some(Accepted::Admitted(stream, peer, admission)) => {
                    return (AdmittedIo::new(stream, admission), peer);
                }
                Some(Accepted::Refused(stream, peer)) => {
                    tracing::debug!(%peer, "admin connection over its cap; closed");
                    drop(stream);
                }
                // Shutting down: the server's graceful shutdown ends it.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn places_are_capped_per_source_and_in_total_and_given_back() {
        let limits = Limits::new(3, 2);
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "a third from one source");
        let _b1 = limits.admit(b).unwrap();
        assert!(limits.admit(b).is_none(), "over the total");
        drop(a1);
        assert!(limits.admit(b).is_some(), "a place given back");
    }
}
