//! The stream under the byte movers: a client's or an upstream's
//! connection as [`relay`](super::relay) and [`http`](super::http) see it.
//! A plain TCP socket stays one, so two of them are spliced in the kernel;
//! anything else (the TLS proxy door's stream, an inspected connection's
//! ends) is any async byte stream, copied. A connection is split once into
//! its halves, so the two directions of a relay each own the half they
//! read and the half they write.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Any byte stream a connection may run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection, before it is split.
pub enum Stream {
    Tcp(TcpStream),
    Other(Box<dyn Io>),
}

impl Stream {
    /// Any byte stream (a TCP socket is better given as [`Stream::Tcp`]).
    pub fn other(io: impl Io) -> Stream {
        Stream::Other(Box::new(io))
    }

    /// A stream that reads nothing and takes every write: what stands in
    /// for a connection handed elsewhere.
    pub fn closed() -> Stream {
        Stream::other(tokio::io::join(tokio::io::empty(), tokio::io::sink()))
    }

    /// Its two halves, each usable on its own.
    pub fn split(self) -> Split {
        match self {
            Stream::Tcp(s) => {
                let (read, write) = s.into_split();
                Split {
                    read: ReadHalf::Tcp(read),
                    write: WriteHalf::Tcp(write),
                }
            }
            Stream::Other(io) => {
                let (read, write) = tokio::io::split(io);
                Split {
                    read: ReadHalf::Other(read),
                    write: WriteHalf::Other(write),
                }
            }
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

/// A connection's two halves.
pub struct Split {
    pub read: ReadHalf,
    pub write: WriteHalf,
}

impl Split {
    /// The TCP socket underneath when the bytes on it are the
    /// connection's own (not TLS records): what splice may move.
    pub fn tcp(&self) -> Option<&TcpStream> {
        self.read.tcp()
    }

    /// Makes the close a reset: what the kernel still holds for the peer
    /// is dropped. For a connection cut short (revoked), whose queued
    /// bytes must not keep flowing after the decision.
    pub fn abort(&self) {
        if let Some(s) = self.tcp() {
            let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

/// The half a connection is read from.
pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    Other(tokio::io::ReadHalf<Box<dyn Io>>),
}

impl ReadHalf {
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            ReadHalf::Tcp(r) => Some(r.as_ref()),
            ReadHalf::Other(_) => None,
        }
    }

    /// Reads once into the spare room of `buf`, at most `max` bytes in all;
    /// 0 means EOF (or no room). Cancellation-safe: `buf` only ever grows
    /// by the bytes actually read.
    pub async fn read_some(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        match self {
            ReadHalf::Tcp(r) => crate::net::read_some(r.as_ref(), buf, max).await,
            ReadHalf::Other(r) => {
                let room = max.saturating_sub(buf.len()).min(16 * 1024);
                if room == 0 {
                    return Ok(0);
                }
                buf.reserve(room);
                r.read_buf(&mut (&mut *buf).limit(room)).await
            }
        }
    }
}

/// The half a connection is written to.
pub enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Other(tokio::io::WriteHalf<Box<dyn Io>>),
}

impl WriteHalf {
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            WriteHalf::Tcp(w) => Some(w.as_ref()),
            WriteHalf::Other(_) => None,
        }
    }

    /// Writes all of `bytes` (through to the socket: a TLS stream's
    /// records are flushed).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            WriteHalf::Tcp(w) => crate::net::write_all(w.as_ref(), bytes).await,
            WriteHalf::Other(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }

    /// Ends what this side sends, so the peer sees EOF (a TLS stream says
    /// `close_notify` first); a peer already gone is not an error here.
    pub async fn shutdown(&mut self) {
        match self {
            WriteHalf::Tcp(w) => crate::net::shutdown_write(w.as_ref()),
            WriteHalf::Other(w) => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), w.shutdown()).await;
            }
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Other(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Other(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteHalf::Other(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Tcp(w) => w.is_write_vectored(),
            WriteHalf::Other(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Other(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Other(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// A client connection's halves joined again into one stream, the bytes
/// already read from it first, every byte counted into the connection's
/// traffic (and the time of the last one kept): what a TLS handshake that
/// starts from a ClientHello already read stands on.
pub struct Joined {
    prefix: Vec<u8>,
    at: usize,
    split: Split,
    traffic: std::sync::Arc<super::relay::Traffic>,
    /// Set when the connection is cut (revoked): the close then resets it,
    /// so bytes still queued for the client are dropped, not delivered.
    pub reset: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Joined {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Acquire) {
            self.split.abort();
        }
    }
}

impl Joined {
    pub fn new(
        prefix: Vec<u8>,
        split: Split,
        traffic: std::sync::Arc<super::relay::Traffic>,
    ) -> Self {
        Joined {
            prefix,
            at: 0,
            split,
            traffic,
            reset: Default::default(),
        }
    }

    /// A write's outcome, its bytes counted to the client.
    fn sent(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r {
            self.traffic
                .to_client
                .fetch_add(n as u64, Ordering::Relaxed);
            self.traffic.touch();
        }
        r
    }
}

impl AsyncRead for Joined {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.split.read).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.traffic
                .to_upstream
                .fetch_add(n as u64, Ordering::Relaxed);
            this.traffic.touch();
        }
        r
    }
}

impl AsyncWrite for Joined {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.split.write).poll_write(cx, buf);
        this.sent(r)
    }

    /// A TLS stream hands every record it has queued at once (a
    /// handshake's flight, tickets, HTTP/2 frames): one `writev`, not a
    /// `sendto` per record.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.split.write).poll_write_vectored(cx, bufs);
        this.sent(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.split.write.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().split.write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().split.write).poll_shutdown(cx)
    }
}

/// A stream whose bytes a limited sandbox's [`Meter`](crate::limits::Meter)
/// holds to its limits: reads are the sandbox's ingress, writes its
/// egress. What the byte movers that copy (HTTP, inspected TLS, a TLS
/// door's stream) run over when the sandbox is limited; a spliced pair
/// is metered in the relay itself.
pub struct Metered<S> {
    inner: S,
    /// `None`: unlimited, every call passed through.
    meter: Option<std::sync::Arc<crate::limits::Meter>>,
    read_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    write_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Where a read smaller than the caller's room lands first.
    scratch: Vec<u8>,
}

impl Metered<Box<dyn Io>> {
    /// `stream`, metered when `meter` is given (else as it is: an
    /// unlimited sandbox's TCP socket stays one, and is spliced).
    pub fn wrap(stream: Stream, meter: Option<std::sync::Arc<crate::limits::Meter>>) -> Stream {
        let Some(meter) = meter else {
            return stream;
        };
        let inner: Box<dyn Io> = match stream {
            Stream::Tcp(s) => Box::new(s),
            Stream::Other(io) => io,
        };
        Stream::other(Metered::new(inner, Some(meter)))
    }
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Option<std::sync::Arc<crate::limits::Meter>>) -> Metered<S> {
        Metered {
            inner,
            meter,
            read_wait: None,
            write_wait: None,
            scratch: Vec::new(),
        }
    }
}

/// Asks `meter` for up to `want` bytes `way`, waiting on `wait` as it says.
fn meter_allowance(
    cx: &mut Context<'_>,
    meter: &crate::limits::Meter,
    wait: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    way: crate::limits::Way,
    want: usize,
) -> Poll<io::Result<(usize, crate::limits::Taken)>> {
    use crate::limits::Grant;
    loop {
        if let Some(w) = wait {
            std::task::ready!(w.as_mut().poll(cx));
            *wait = None;
        }
        match meter.grant(way, want) {
            (Grant::Move(n), taken) => return Poll::Ready(Ok((n, taken))),
            (Grant::Wait(d), _) => *wait = Some(Box::pin(tokio::time::sleep(d))),
            (Grant::Spent(_), _) => {
                return Poll::Ready(Err(io::Error::other(super::relay::Spent)));
            }
        }
    }
}

use std::future::Future as _;

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use crate::limits::Way;
        let this = self.get_mut();
        let Some(meter) = &this.meter else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let (n, taken) = std::task::ready!(meter_allowance(
            cx,
            meter,
            &mut this.read_wait,
            Way::Ingress,
            buf.remaining()
        ))?;
        let before = buf.filled().len();
        let r = if n >= buf.remaining() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            this.scratch.resize(n, 0);
            let mut small = ReadBuf::new(&mut this.scratch[..n]);
            let r = Pin::new(&mut this.inner).poll_read(cx, &mut small);
            let got = small.filled().len();
            buf.put_slice(&this.scratch[..got]);
            r
        };
        let moved = buf.filled().len() - before;
        meter.moved(Way::Ingress, taken, moved);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        use crate::limits::Way;
        let this = self.get_mut();
        let Some(meter) = &this.meter else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        if buf.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let (n, taken) = std::task::ready!(meter_allowance(
            cx,
            meter,
            &mut this.write_wait,
            Way::Egress,
            buf.len()
        ))?;
        let r = Pin::new(&mut this.inner).poll_write(cx, &buf[..n]);
        let moved = match &r {
            Poll::Ready(Ok(m)) => *m,
            _ => 0,
        };
        meter.moved(Way::Egress, taken, moved);
        r
    }

    /// Unlimited, all at once; limited, the first slice within what the
    /// meter allows, as a plain write.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.meter.is_none() {
            return Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs);
        }
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.meter.is_none() && self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that is not TCP reads and writes, and says EOF when its
    /// peer shuts down its side.
    #[tokio::test]
    async fn any_stream_reads_writes_and_ends() {
        let (a, b) = tokio::io::duplex(64);
        let mut a = Stream::other(a).split();
        let mut b = Stream::other(b).split();
        assert!(a.tcp().is_none());
        a.write.write_all(b"hello").await.unwrap();
        let mut buf = Vec::new();
        let n = b.read.read_some(&mut buf, 3).await.unwrap();
        assert_eq!((n, &buf[..]), (3, &b"hel"[..]));
        // No room left under the cap: 0, and nothing is read.
        assert_eq!(b.read.read_some(&mut buf, 3).await.unwrap(), 0);
        a.write.shutdown().await;
        let mut rest = Vec::new();
        while b.read.read_some(&mut rest, 64).await.unwrap() > 0 {}
        assert_eq!(rest, b"lo");
    }

    #[tokio::test]
    async fn tcp_stays_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let split = Stream::from(c).split();
        assert!(split.tcp().is_some() && split.write.tcp().is_some());
    }

    /// A TLS stream hands every record it has queued in one vectored
    /// write (a handshake's flight): the client's joined stream and an
    /// unlimited upstream pass it to the socket whole, one `writev`, and
    /// the joined stream counts it; a limited upstream writes what its
    /// meter allows of the first slice.
    #[tokio::test]
    async fn vectored_writes_reach_the_socket_whole_unless_metered() {
        use std::future::poll_fn;
        use std::io::IoSlice;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let slices = [
            IoSlice::new(b"server hello,"),
            IoSlice::new(b""),
            IoSlice::new(b" change cipher spec,"),
            IoSlice::new(b" finished"),
        ];
        let all: usize = slices.iter().map(|s| s.len()).sum();
        let read_all = |mut peer: TcpStream, n: usize| async move {
            let mut got = vec![0; n];
            peer.read_exact(&mut got).await.unwrap();
            got
        };

        let client = TcpStream::connect(at).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        let traffic = std::sync::Arc::new(super::super::relay::Traffic::default());
        let mut joined = Joined::new(
            Vec::new(),
            Stream::from(peer).split(),
            std::sync::Arc::clone(&traffic),
        );
        assert!(joined.is_write_vectored());
        let n = poll_fn(|cx| Pin::new(&mut joined).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        assert_eq!(n, all);
        assert_eq!(traffic.to_client.load(Ordering::Relaxed), all as u64);
        assert_eq!(
            read_all(client, all).await,
            b"server hello, change cipher spec, finished"
        );

        let up = TcpStream::connect(at).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        let mut unlimited = Metered::new(up, None);
        assert!(unlimited.is_write_vectored());
        let n = poll_fn(|cx| Pin::new(&mut unlimited).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        assert_eq!(n, all);
        assert_eq!(
            read_all(peer, all).await,
            b"server hello, change cipher spec, finished"
        );

        let limits = crate::limits::Limits {
            egress_bytes_per_s: Some(1 << 20),
            ..Default::default()
        };
        let meter = crate::limits::Meter::new(&limits, None, None).map(std::sync::Arc::new);
        let up = TcpStream::connect(at).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        let mut limited = Metered::new(up, meter);
        assert!(!limited.is_write_vectored());
        let n = poll_fn(|cx| Pin::new(&mut limited).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        assert_eq!(n, slices[0].len());
        assert_eq!(read_all(peer, n).await, b"server hello,");
    }
}
