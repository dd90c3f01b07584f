//! The addresses of the gateway's own network namespace: what no sandbox
//! may reach, whatever `allow_destinations` exempts (an operator's
//! internal range usually holds the node's address, and behind it the
//! kubelet, node-exporter or the fleet's Redis). Read at start and again
//! whenever an address is added or removed (rtnetlink's address groups),
//! with a slow re-read as a backstop. Reading only; nothing here decides.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::io::unix::AsyncFd;

use crate::shutdown::Shutdown;

/// rtnetlink multicast groups: IPv4 and IPv6 address changes.
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
/// The backstop: read again this often even without a notification (a
/// lost netlink message, an overrun buffer).
const REREAD_EVERY: Duration = Duration::from_secs(5);

/// The namespace's addresses now.
#[derive(Debug, Default)]
pub struct LocalAddrs {
    addrs: RwLock<Arc<HashSet<IpAddr>>>,
}

impl LocalAddrs {
    /// Reads the addresses now.
    pub fn read() -> LocalAddrs {
        let l = LocalAddrs::default();
        l.refresh();
        l
    }

    /// A fixed set (tests).
    pub fn of(addrs: impl IntoIterator<Item = IpAddr>) -> LocalAddrs {
        LocalAddrs {
            addrs: RwLock::new(Arc::new(
                addrs.into_iter().map(|a| a.to_canonical()).collect(),
            )),
        }
    }

    /// Is `ip` one of this namespace's addresses (or unspecified, which
    /// reaches them all)?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_unspecified()
            || self
                .addrs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&ip)
    }

    /// Reads the interfaces' addresses again. On failure the last set
    /// stays (and the failure is logged).
    pub fn refresh(&self) {
        let addrs = match nix::ifaddrs::getifaddrs() {
            Ok(list) => list
                .filter_map(|i| i.address)
                .filter_map(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .map(|ip| ip.to_canonical())
                .collect::<HashSet<_>>(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the gateway's own addresses; keeping the last set");
                return;
            }
        };
        *self.addrs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(addrs);
    }

    /// Follows address changes until shutdown: a netlink notification,
    /// or the backstop timer, reads them again.
    pub async fn watch(self: Arc<Self>, shutdown: Shutdown) {
        let notifications = match subscribe() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "no address-change notifications; re-reading every {REREAD_EVERY:?}");
                None
            }
        };
        let mut tick = tokio::time::interval(REREAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                ready = readable(notifications.as_ref()) => {
                    if let Ok(mut guard) = ready {
                        // Drain whatever is queued; the content does not
                        // matter, only that something changed.
                        while let Ok(Ok(n)) = guard.try_io(|fd| {
                            recv(std::os::fd::AsRawFd::as_raw_fd(fd.get_ref()), &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
                                .map_err(std::io::Error::from)
                        }) {
                            if n == 0 {
                                break;
                            }
                        }
                    }
                }
                _ = shutdown.stopping() => return,
            }
            self.refresh();
        }
    }
}

async fn readable(
    fd: Option<&AsyncFd<OwnedFd>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match fd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}

/// A non-blocking rtnetlink socket in the address-change groups.
fn subscribe() -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
    )?;
    // `new` is deprecated for types that do not own their descriptor;
    // an `OwnedFd` does, so closing it while registered cannot happen.
    #[allow(deprecated)]
    AsyncFd::new(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_addresses_read() {
        let l = LocalAddrs::read();
        assert!(l.contains("127.0.0.1".parse().unwrap()));
        assert!(l.contains("0.0.0.0".parse().unwrap()));
        assert!(l.contains("::".parse().unwrap()));
        assert!(!l.contains("198.51.100.7".parse().unwrap()));
        let fixed = LocalAddrs::of(["10.1.2.3".parse().unwrap()]);
        assert!(fixed.contains("::ffff:10.1.2.3".parse().unwrap()));
    }
}
