//! The one caching resolver sluice uses for every name it resolves: the
//! names the data plane dials and the names the DNS door answers. Names
//! are always looked up as absolute names (never through a search list),
//! /etc/hosts first, then `dns.upstream` (or the nameservers of
//! /etc/resolv.conf), through `hickory-resolver`. Answers are cached for
//! their TTL (capped at `dns.max_ttl_s`), names that do not exist and
//! lookups that failed (a resolver that timed out) negatively for a short
//! while, and concurrent lookups of one name share one query. The answer a
//! sandbox is given for a name and the addresses sluice dials for it come
//! from the same cache entry.
//!
//! Lookups are a budget every sandbox shares fairly: each [`Asker`] that is
//! a sandbox (its DNS queries and the names its TLS and HTTP connections
//! make the gateway resolve alike) is held to `dns.queries_per_second` and
//! to `dns.max_inflight_per_sandbox` lookups in flight, within the
//! gateway-wide `dns.max_inflight`; so one sandbox asking for slow names
//! under its own wildcard cannot take every other sandbox's answers.
//!
//! `[gateway.resolve]` overrides are applied before this, by
//! [`Upstream`](crate::proxy::upstream::Upstream).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::Semaphore;

use crate::config::DnsConfig;
use crate::host::HostName;
use crate::identity::ConnectionCounts;
use crate::metrics as m;

/// How long a failed lookup is remembered.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Names cached at most.
const CACHE_ENTRIES: u64 = 100_000;

/// What a name resolved to, and until when that holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Empty: the name does not exist or has no address.
    pub addrs: Vec<IpAddr>,
    pub valid_until: Instant,
    /// The lookup failed (no answer, a resolver error): remembered as
    /// briefly as a missing name, so a name that times out is not asked
    /// again on every query.
    pub failed: bool,
}

/// Who a lookup is for, and so whose budget it spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// A DNS query from this source: its rate was counted when the query
    /// arrived; a lookup takes one of its places in flight.
    Query(IpAddr),
    /// A connection from this source made the gateway resolve a name: a
    /// lookup counts against its rate and takes a place in flight.
    Connection(IpAddr),
    /// The gateway's own (`sluice explain`, tests): no sandbox's budget.
    Gateway,
}

impl Resolved {
    /// The TTL left, in whole seconds (at least 1 while valid).
    pub fn ttl(&self, now: Instant) -> u32 {
        let left = self.valid_until.saturating_duration_since(now).as_secs();
        u32::try_from(left).unwrap_or(u32::MAX).max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("too many lookups in flight")]
    Busy,
    #[error("this sandbox's lookups are over its budget")]
    OverBudget,
    #[error("the resolver failed")]
    Failed,
    #[error("cannot build the resolver")]
    Setup,
}

pub struct Resolver {
    dns: TokioResolver,
    cache: moka::future::Cache<HostName, Arc<Resolved>>,
    inflight: Semaphore,
    max_ttl: Duration,
    /// Queries and lookups per second, per sandbox.
    rate: DefaultKeyedRateLimiter<IpAddr>,
    /// Lookups in flight, per sandbox.
    per_source: Arc<ConnectionCounts<IpAddr>>,
    per_source_cap: usize,
}

struct UntilValid;

impl moka::Expiry<HostName, Arc<Resolved>> for UntilValid {
    fn expire_after_create(
        &self,
        _key: &HostName,
        value: &Arc<Resolved>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.valid_until.saturating_duration_since(Instant::now()))
    }
}

impl Resolver {
    /// Builds the resolver from `[dns]`. Without upstreams it reads
    /// /etc/resolv.conf (its nameservers and timeouts; never its search
    /// list, as every name is looked up absolute).
    pub fn new(config: &DnsConfig) -> Result<Resolver, ResolveError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.upstream.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read /etc/resolv.conf: names resolve only through [gateway.resolve] and /etc/hosts");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        provider,
                    )
                }
            }
        } else {
            let servers = config
                .upstream
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        opts.use_hosts_file = ResolveHosts::Always;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.ndots = 0;
        opts.positive_max_ttl = Some(Duration::from_secs(config.max_ttl_s.into()));
        opts.negative_max_ttl = Some(NEGATIVE_TTL);
        let dns = builder.build().map_err(|e| {
            tracing::error!(error = %e, "cannot build the resolver");
            ResolveError::Setup
        })?;
        let rate = NonZeroU32::new(config.queries_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        Ok(Resolver {
            rate: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            per_source: Arc::default(),
            per_source_cap: config.max_inflight_per_sandbox.max(1),
            dns,
            cache: moka::future::Cache::builder()
                .max_capacity(CACHE_ENTRIES)
                .expire_after(UntilValid)
                .build(),
            inflight: Semaphore::new(config.max_inflight),
            max_ttl: Duration::from_secs(config.max_ttl_s.into()),
        })
    }

    /// The longest TTL an answer is given or kept for.
    pub fn max_ttl_s(&self) -> u32 {
        u32::try_from(self.max_ttl.as_secs()).unwrap_or(u32::MAX)
    }

    /// Counts one DNS query from `source` against its rate; `false` when
    /// it is over it.
    pub fn admit_query(&self, source: IpAddr) -> bool {
        self.rate.check_key(&source).is_ok()
    }

    /// Forgets the rate state of sources that have been quiet.
    pub fn tidy(&self) {
        self.rate.retain_recent();
    }

    /// The addresses of `name`, from the cache while its TTL lasts. A name
    /// that does not resolve is an empty answer (cached briefly); a lookup
    /// that failed is an error (cached as briefly); a miss for a sandbox
    /// past its budget is `OverBudget`.
    pub async fn resolve(
        &self,
        name: &HostName,
        asker: Asker,
    ) -> Result<Arc<Resolved>, ResolveError> {
        if let Some(hit) = self.cache.get(name).await {
            ::metrics::counter!(m::DNS_CACHE_HITS).increment(1);
            return answer(hit);
        }
        ::metrics::counter!(m::DNS_CACHE_MISSES).increment(1);
        // The asker's place, held while its lookup (or the one it shares)
        // is under way.
        let _place = match asker {
            Asker::Gateway => None,
            Asker::Query(ip) | Asker::Connection(ip) => {
                if matches!(asker, Asker::Connection(_)) && !self.admit_query(ip) {
                    return Err(ResolveError::OverBudget);
                }
                Some(
                    self.per_source
                        .try_acquire(&ip, self.per_source_cap)
                        .ok_or(ResolveError::OverBudget)?,
                )
            }
        };
        // Concurrent misses for one name share one lookup.
        let resolved = self
            .cache
            .try_get_with(name.clone(), self.lookup(name))
            .await
            .map_err(|e| *e)?;
        answer(resolved)
    }

    async fn lookup(&self, name: &HostName) -> Result<Arc<Resolved>, ResolveError> {
        let _slot = self
            .inflight
            .try_acquire()
            .map_err(|_| ResolveError::Busy)?;
        let absolute = format!("{name}.");
        let now = Instant::now();
        match self.dns.lookup_ip(absolute.as_str()).await {
            Ok(answer) => {
                let mut addrs: Vec<IpAddr> = Vec::new();
                for ip in answer.iter() {
                    let ip = ip.to_canonical();
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
                let until = answer.valid_until().min(now + self.max_ttl);
                Ok(Arc::new(Resolved {
                    addrs,
                    valid_until: until.max(now + Duration::from_secs(1)),
                    failed: false,
                }))
            }
            Err(e) => {
                let failed = !(e.is_no_records_found() || e.is_nx_domain());
                if failed {
                    tracing::debug!(%name, error = %e, "lookup failed");
                }
                Ok(Arc::new(Resolved {
                    addrs: Vec::new(),
                    valid_until: now + NEGATIVE_TTL,
                    failed,
                }))
            }
        }
    }
}

/// A cache entry as an answer: a remembered failure is an error.
fn answer(resolved: Arc<Resolved>) -> Result<Arc<Resolved>, ResolveError> {
    if resolved.failed {
        Err(ResolveError::Failed)
    } else {
        Ok(resolved)
    }
}
