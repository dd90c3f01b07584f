//! Upstream: resolve an allowed host (static `[gateway.resolve]` entries
//! first, then the shared caching [`Resolver`]: /etc/hosts, then DNS for
//! the name as an absolute name, never through a search list), pass every
//! resolved address through
//! the private-destination guard, and connect to an address that passed,
//! with `SO_MARK` and `TCP_NODELAY`, under the connect timeout. The
//! address checked is the address dialled: there is no second lookup.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::GatewayConfig;
use crate::deny::Deny;
use crate::host::{Host, HostName};
use crate::metrics as m;
use crate::net::local_addrs::LocalAddrs;
use crate::resolver::{Asker, Resolver};

/// IPv4 ranges no sandbox may reach unless exempted by
/// `allow_destinations`.
static GUARDED_V4: LazyLock<Vec<Ipv4Net>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",        // "this network", unspecified
        "10.0.0.0/8",       // RFC 1918
        "100.64.0.0/10",    // CGNAT (holds 100.100.100.200, Alibaba metadata)
        "127.0.0.0/8",      // loopback
        "169.254.0.0/16",   // link-local (holds 169.254.169.254, cloud metadata)
        "172.16.0.0/12",    // RFC 1918
        "192.0.0.0/24",     // IETF protocol assignments
        "192.0.2.0/24",     // documentation
        "192.88.99.0/24",   // 6to4 relay anycast
        "192.168.0.0/16",   // RFC 1918
        "198.18.0.0/15",    // benchmarking
        "198.51.100.0/24",  // documentation
        "203.0.113.0/24",   // documentation
        "224.0.0.0/4",      // multicast
        "240.0.0.0/4",      // reserved, broadcast
        "168.63.129.16/32", // Azure wireserver
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
});

/// IPv6 ranges guarded outright (embedded IPv4 forms are checked apart).
static GUARDED_V6: LazyLock<Vec<Ipv6Net>> = LazyLock::new(|| {
    [
        "::/96",          // unspecified, loopback, IPv4-compatible
        "64:ff9b:1::/48", // local-use NAT64
        "100::/64",       // discard
        "2001::/32",      // Teredo
        "2001:2::/48",    // benchmarking
        "2001:10::/28",   // ORCHID
        "2001:20::/28",   // ORCHIDv2
        "2001:db8::/32",  // documentation
        "3fff::/20",      // documentation
        "fc00::/7",       // unique local (holds fd00:ec2::254, AWS metadata)
        "fe80::/10",      // link-local
        "fec0::/10",      // site-local (deprecated)
        "ff00::/8",       // multicast
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
});

/// Is this address one that a sandbox must not reach by default?
pub fn is_guarded(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => GUARDED_V4.iter().any(|n| n.contains(&v4)),
        IpAddr::V6(v6) => {
            if GUARDED_V6.iter().any(|n| n.contains(&v6)) {
                return true;
            }
            embedded_v4(v6).is_some_and(|v4| is_guarded(IpAddr::V4(v4)))
        }
    }
}

/// The IPv4 address inside a NAT64 (64:ff9b::/96) or 6to4 (2002::/16)
/// address.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let s = v6.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// The private-destination guard with its exemptions.
#[derive(Debug, Clone)]
pub struct Guard {
    deny_private: bool,
    allow: Vec<IpNet>,
    /// sluice's own listeners: never a destination (no loops).
    own: Vec<SocketAddr>,
    /// The gateway namespace's own addresses: never a destination,
    /// whatever `allow` says (`None` only with
    /// `gateway.allow_local_destinations`).
    local: Option<Arc<LocalAddrs>>,
}

impl Guard {
    pub fn new(deny_private: bool, allow: Vec<IpNet>, own: Vec<SocketAddr>) -> Guard {
        Guard {
            deny_private,
            allow,
            own,
            local: None,
        }
    }

    /// Refuses every address of the gateway's own namespace too.
    pub fn with_local(mut self, local: Option<Arc<LocalAddrs>>) -> Guard {
        self.local = local;
        self
    }

    pub fn permits(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        // The unspecified address is this host: always refused, whatever
        // `deny_private_destinations` says (it reaches sluice's own
        // listeners, whatever address they are bound to).
        if ip.is_unspecified() {
            return false;
        }
        let is_own = self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip().to_canonical() == ip || own.ip().is_unspecified())
        });
        if is_own {
            return false;
        }
        if self.local.as_ref().is_some_and(|l| l.contains(ip)) {
            return false;
        }
        if !self.deny_private || !is_guarded(ip) {
            return true;
        }
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// What is the gateway's own and never a destination: its listeners, and
/// every address of its namespace.
#[derive(Debug, Clone, Default)]
pub struct Own {
    pub listeners: Vec<SocketAddr>,
    pub addrs: Arc<LocalAddrs>,
}

/// Resolves, guards and connects.
pub struct Upstream {
    overrides: HashMap<HostName, Vec<IpAddr>>,
    resolver: Arc<Resolver>,
    guard: Guard,
    connect_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &GatewayConfig, own: &Own, resolver: Arc<Resolver>) -> Upstream {
        let overrides = config
            .resolve
            .iter()
            .filter_map(|(name, addrs)| Some((HostName::parse(name).ok()?, addrs.clone())))
            .collect();
        Upstream {
            overrides,
            resolver,
            guard: Guard::new(
                config.deny_private_destinations,
                config.allow_destinations.clone(),
                own.listeners.clone(),
            )
            .with_local((!config.allow_local_destinations).then(|| Arc::clone(&own.addrs))),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        }
    }

    /// The addresses for `host`, every one of them permitted by the guard.
    /// A name with any guarded address is refused whole: a resolver that
    /// mixes in a private address is not trusted for the others either.
    pub async fn resolve(
        &self,
        host: &Host,
        port: u16,
        asker: Asker,
    ) -> Result<Vec<SocketAddr>, Deny> {
        let addrs: Vec<SocketAddr> = match host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
            Host::Name(name) => self
                .resolve_name(name, asker)
                .await?
                .0
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect(),
        };
        let addrs: Vec<SocketAddr> = addrs
            .into_iter()
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            .collect();
        if addrs.is_empty() {
            return Err(Deny::UpstreamUnreachable);
        }
        if addrs.iter().any(|a| !self.guard.permits(*a)) {
            return Err(Deny::PrivateDestination);
        }
        Ok(addrs)
    }

    /// The addresses of a name and how long they hold: `[gateway.resolve]`
    /// (for the longest TTL allowed), else the shared resolver's cache
    /// entry. Not yet guarded.
    pub async fn resolve_name(
        &self,
        name: &HostName,
        asker: Asker,
    ) -> Result<(Vec<IpAddr>, u32), Deny> {
        if let Some(ips) = self.overrides.get(name) {
            return Ok((ips.clone(), self.resolver.max_ttl_s()));
        }
        let resolved = self
            .resolver
            .resolve(name, asker)
            .await
            .map_err(|_| Deny::UpstreamUnreachable)?;
        Ok((
            resolved.addrs.clone(),
            resolved.ttl(std::time::Instant::now()),
        ))
    }

    /// Would the guard let a sandbox reach this address (on any port that
    /// is not one of sluice's own)?
    pub fn guard_permits_ip(&self, ip: IpAddr) -> bool {
        self.guard.permits(SocketAddr::new(ip, 0))
    }

    /// Connects to the first address that answers, all within the
    /// connect timeout.
    pub async fn connect(&self, addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr), Deny> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let mut timed_out = false;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, self.connect_one(*addr)).await {
                Ok(Ok(stream)) => {
                    ::metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    return Ok((stream, *addr));
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "upstream connect failed"),
                Err(_) => {
                    timed_out = true;
                    break;
                }
            }
        }
        Err(if timed_out {
            Deny::UpstreamTimeout
        } else {
            Deny::UpstreamUnreachable
        })
    }

    async fn connect_one(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_nodelay(true)?;
        socket.connect(addr).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_guard_covers_every_private_form() {
        for s in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "168.63.129.16",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.170",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:0a00:0001::1",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
            "100::1",
            "fec0::1",
        ] {
            assert!(is_guarded(ip(s)), "{s} should be guarded");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "172.32.0.1",
            "100.128.0.1",
        ] {
            assert!(!is_guarded(ip(s)), "{s} should be public");
        }
    }

    #[test]
    fn exemptions_and_own_listeners() {
        let g = Guard::new(
            true,
            vec!["198.18.0.0/15".parse().unwrap()],
            vec![
                "0.0.0.0:15001".parse().unwrap(),
                "127.0.0.1:9080".parse().unwrap(),
            ],
        );
        assert!(g.permits("198.18.1.10:443".parse().unwrap()));
        assert!(g.permits("[::ffff:198.18.1.10]:443".parse().unwrap()));
        assert!(!g.permits("10.0.0.1:443".parse().unwrap()));
        assert!(
            !g.permits("198.18.1.10:15001".parse().unwrap()),
            "a loop through our own listener"
        );
        assert!(!g.permits("127.0.0.1:9080".parse().unwrap()));
        let open = Guard::new(false, vec![], vec![]);
        assert!(open.permits("10.0.0.1:443".parse().unwrap()));
        // With the guard off and no listener named, the unspecified
        // address (this host) is still refused, in both spellings.
        let own = Guard::new(
            false,
            vec!["0.0.0.0/0".parse().unwrap()],
            vec!["127.0.0.1:15001".parse().unwrap()],
        );
        for unspecified in [
            "0.0.0.0:15001",
            "[::ffff:0.0.0.0]:15001",
            "[::]:15001",
            "0.0.0.0:80",
        ] {
            assert!(!own.permits(unspecified.parse().unwrap()), "{unspecified}");
        }
    }

    #[tokio::test]
    async fn resolution_uses_overrides_and_refuses_mixed_answers() {
        let mut config = GatewayConfig {
            allow_destinations: vec!["198.18.0.0/15".parse().unwrap()],
            ..Default::default()
        };
        config
            .resolve
            .insert("api.test".into(), vec![ip("198.18.1.10")]);
        config
            .resolve
            .insert("mixed.test".into(), vec![ip("198.18.1.10"), ip("10.0.0.1")]);
        config
            .resolve
            .insert("mapped.test".into(), vec![ip("::ffff:127.0.0.1")]);
        let dns = crate::config::DnsConfig {
            upstream: vec!["127.0.0.1:9".parse().unwrap()],
            ..Default::default()
        };
        let u = Upstream::new(
            &config,
            &Own::default(),
            Arc::new(Resolver::new(&dns).unwrap()),
        );
        let name = |s: &str| Host::Name(HostName::parse(s).unwrap());
        assert_eq!(
            u.resolve(&name("API.test."), 443, Asker::Gateway).await,
            Ok(vec!["198.18.1.10:443".parse().unwrap()])
        );
        assert_eq!(
            u.resolve(&name("mixed.test"), 443, Asker::Gateway).await,
            Err(Deny::PrivateDestination)
        );
        assert_eq!(
            u.resolve(&name("mapped.test"), 443, Asker::Gateway).await,
            Err(Deny::PrivateDestination)
        );
        assert_eq!(
            u.resolve(&Host::Ip(ip("169.254.169.254")), 80, Asker::Gateway)
                .await,
            Err(Deny::PrivateDestination)
        );
    }
}
