//! Sockets: binding listeners with the options sluice wants, and reading
//! what iptables did to a connection ([`orig_dst`]). Nothing here decides
//! anything.

pub mod local_addrs;
pub mod orig_dst;

use std::io;
use std::net::SocketAddr;

use bytes::BufMut;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Backlog for the listeners: bursts of new connections from many
/// sandboxes queue in the kernel rather than being refused.
const BACKLOG: i32 = 4096;

/// Binds a TCP listener with `SO_REUSEADDR`, non-blocking, for tokio.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Writes all of `buf` to a shared stream (no `&mut` needed).
pub async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads once into the spare room of `buf`, at most `max` bytes in all;
/// 0 means EOF (or no room). Cancellation-safe: `buf` only ever grows by
/// the bytes actually read, even if the future is dropped mid-wait.
pub async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let room = max.saturating_sub(buf.len()).min(16 * 1024);
    if room == 0 {
        return Ok(0);
    }
    // Into spare capacity, never zero-filled: a buffer with a little room
    // (the sniff's 2 KiB covers nearly every ClientHello) reads into that;
    // one without grows by `room`. Untouched capacity costs no memory.
    let spare = buf.capacity() - buf.len();
    let want = if spare >= 2048 {
        spare.min(room)
    } else {
        buf.reserve(room);
        room
    };
    loop {
        stream.readable().await?;
        match stream.try_read_buf(&mut (&mut *buf).limit(want)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Closes the write half so the peer sees EOF; a socket already gone is
/// not an error here.
pub fn shutdown_write(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}
