//! The destination a client dialled before iptables `REDIRECT` sent it to
//! sluice: `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6.
//! sluice keeps only its port; the address it dials is its own resolution
//! of the name the client asked for.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};
use tokio::net::TcpStream;

/// Where original destinations come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrigDstSource {
    /// The socket options conntrack answers (production).
    Socket,
    /// A fixed destination, for tests without iptables.
    Fixed(SocketAddr),
}

impl OrigDstSource {
    /// The address the client dialled, if the connection was redirected;
    /// `None` for one made straight to the listener (its original
    /// destination is the listener's own address).
    pub fn redirected(&self, stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
        // One getsockname serves both the choice of socket option and the
        // comparison.
        let local = stream.local_addr()?;
        let orig = match self {
            OrigDstSource::Fixed(addr) => *addr,
            OrigDstSource::Socket => original_dst(stream, local)?,
        };
        Ok((orig != local).then_some(SocketAddr::new(orig.ip().to_canonical(), orig.port())))
    }
}

/// Reads the original destination of a redirected connection whose local
/// address is `local`.
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        let raw = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
        let addr = SockaddrIn::from(raw);
        Ok(SocketAddr::V4(SocketAddrV4::new(addr.ip(), addr.port())))
    } else {
        let raw = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let addr = SockaddrIn6::from(raw);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            addr.ip(),
            addr.port(),
            0,
            0,
        )))
    }
}
