//! Identity: which sandbox a connection belongs to. Owns the registry
//! (source IP → [`Sandbox`]), each sandbox holding its token and the grant
//! verified from it. The concurrent maps are private: callers get
//! `Arc<Sandbox>` through [`Registry::bind`], [`Registry::get`] and
//! [`Registry::unbind`], so no map guard is ever held across an `.await`.

pub mod store;
pub mod token;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::deny::Deny;
use crate::metrics as m;
use token::{Grant, Verifier, token_key};

/// How a sandbox came to be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `POST /v1/sandboxes`: started elsewhere, registered here.
    Registered,
    /// `POST /v1/sandboxes/launch`: started by sluice.
    Launched,
}

/// Where a launched sandbox's pieces are, so they can be found again
/// (after a restart too) and removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRecord {
    pub netns: String,
    pub host_veth: String,
    pub bundle: std::path::PathBuf,
    pub gateway_ip: std::net::Ipv4Addr,
}

/// One registered sandbox.
#[derive(Debug)]
pub struct Sandbox {
    pub container_id: String,
    pub source_ip: IpAddr,
    pub origin: Origin,
    /// Set for sandboxes sluice launched.
    pub launch: Option<LaunchRecord>,
    pub token: String,
    token_key: [u8; 32],
    /// The grant verified at registration; connections re-check it through
    /// the verifier's cache.
    pub grant: Arc<Grant>,
    pub registered_at: u64,
    live: AtomicUsize,
    /// Cancelled when the sandbox is unregistered: its connections close.
    closed: CancellationToken,
}

impl Sandbox {
    pub fn new(source_ip: IpAddr, token: String, grant: Arc<Grant>, origin: Origin) -> Sandbox {
        Sandbox {
            container_id: grant.claims.container_id.clone(),
            source_ip: source_ip.to_canonical(),
            origin,
            launch: None,
            token_key: token_key(&token),
            token,
            grant,
            registered_at: token::now_s(),
            live: AtomicUsize::new(0),
            closed: CancellationToken::new(),
        }
    }

    /// A launched sandbox, with where its pieces are.
    pub fn launched(mut self, record: LaunchRecord) -> Sandbox {
        self.origin = Origin::Launched;
        self.launch = Some(record);
        self
    }

    /// The sandbox's current grant: its token verified again (from the
    /// cache in the common case). Expired → `token_expired`.
    pub fn current_grant(&self, verifier: &Verifier) -> Result<Arc<Grant>, Deny> {
        // Checked before the cache: once an expired token's cache entry is
        // gone, every connection would otherwise pay a full ES256 verify.
        if self.grant.expired_at(token::now_s(), verifier.leeway()) {
            return Err(Deny::TokenExpired);
        }
        verifier
            .verify_keyed(&self.token, &self.token_key)
            .map_err(|e| e.deny())
    }

    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Resolves when the sandbox is unregistered.
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Counts a connection as live until the guard drops, unless `cap`
    /// are live already.
    pub fn try_track(self: &Arc<Self>, cap: usize) -> Option<LiveGuard> {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(LiveGuard(Arc::clone(self)))
    }
}

pub struct LiveGuard(Arc<Sandbox>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("address {0} is already registered")]
    AddressTaken(IpAddr),
    #[error("container {0} is already registered")]
    ContainerTaken(String),
}

/// Source IP → sandbox, and container id → source IP.
#[derive(Default)]
pub struct Registry {
    by_ip: DashMap<IpAddr, Arc<Sandbox>>,
    by_id: DashMap<String, IpAddr>,
    /// Serialises writers so the two maps always agree.
    write: Mutex<()>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bind(&self, sandbox: Sandbox) -> Result<Arc<Sandbox>, BindError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if self.by_ip.contains_key(&sandbox.source_ip) {
            return Err(BindError::AddressTaken(sandbox.source_ip));
        }
        if self.by_id.contains_key(&sandbox.container_id) {
            return Err(BindError::ContainerTaken(sandbox.container_id));
        }
        let sandbox = Arc::new(sandbox);
        self.by_id
            .insert(sandbox.container_id.clone(), sandbox.source_ip);
        self.by_ip.insert(sandbox.source_ip, Arc::clone(&sandbox));
        ::metrics::gauge!(m::REGISTERED_SANDBOXES).set(self.by_ip.len() as f64);
        Ok(sandbox)
    }

    pub fn get(&self, ip: IpAddr) -> Option<Arc<Sandbox>> {
        self.by_ip.get(&ip.to_canonical()).map(|s| Arc::clone(&s))
    }

    pub fn get_by_id(&self, container_id: &str) -> Option<Arc<Sandbox>> {
        let ip = *self.by_id.get(container_id)?;
        self.get(ip)
    }

    /// Removes a sandbox and closes its live connections.
    pub fn unbind(&self, container_id: &str) -> Option<Arc<Sandbox>> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (_, ip) = self.by_id.remove(container_id)?;
        let (_, sandbox) = self.by_ip.remove(&ip)?;
        ::metrics::gauge!(m::REGISTERED_SANDBOXES).set(self.by_ip.len() as f64);
        drop(_w);
        sandbox.closed.cancel();
        Some(sandbox)
    }

    /// Closes the live connections of every sandbox holding the token with
    /// this `jti` (revoked: new ones are refused by the verifier). Returns
    /// how many sandboxes hold it.
    pub fn close_token(&self, jti: &str) -> usize {
        let mut n = 0;
        for s in self.by_ip.iter().filter(|s| s.grant.claims.jti == jti) {
            s.closed.cancel();
            n += 1;
        }
        n
    }

    /// The reaper's pass: closes the live connections of every sandbox
    /// whose token has expired (new ones are denied `token_expired`), and
    /// removes those expired for longer than `retention` seconds. Returns
    /// the removed sandboxes.
    pub fn reap(&self, now: u64, leeway: u64, retention: u64) -> Vec<Arc<Sandbox>> {
        let mut removed = Vec::new();
        for s in self.list() {
            let exp = s.grant.claims.exp.saturating_add(leeway);
            if now <= exp {
                continue;
            }
            s.closed.cancel();
            if now > exp.saturating_add(retention)
                && let Some(gone) = self.unbind(&s.container_id)
            {
                removed.push(gone);
            }
        }
        removed
    }

    pub fn list(&self) -> Vec<Arc<Sandbox>> {
        let mut all: Vec<_> = self.by_ip.iter().map(|e| Arc::clone(e.value())).collect();
        all.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        all
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// Live connections per container, for clients that are not registered
/// (the explicit proxy): capped like a registered sandbox's.
#[derive(Default)]
pub struct ConnectionCounts {
    counts: DashMap<String, usize>,
}

impl ConnectionCounts {
    /// A slot for `container`, unless it holds `cap` already.
    pub fn try_acquire(self: &Arc<Self>, container: &str, cap: usize) -> Option<CountGuard> {
        let mut entry = self.counts.entry(container.to_owned()).or_insert(0);
        if *entry >= cap {
            return None;
        }
        *entry += 1;
        drop(entry);
        Some(CountGuard {
            counts: Arc::clone(self),
            container: container.to_owned(),
        })
    }
}

/// Gives its slot back on drop.
pub struct CountGuard {
    counts: Arc<ConnectionCounts>,
    container: String,
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.counts.counts.remove_if_mut(&self.container, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}
