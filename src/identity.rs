//! Identity: which sandbox a connection belongs to. Owns the registry
//! (source IP → [`Sandbox`]), each sandbox holding its token and the grant
//! verified from it. The concurrent maps are private: callers get
//! `Arc<Sandbox>` through [`Registry::bind`], [`Registry::get`] and
//! [`Registry::unbind`], so no map guard is ever held across an `.await`.

pub mod jwks_remote;
pub mod store;
pub mod token;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::deny::Deny;
use crate::host::{Host, HostName};
use crate::metrics as m;
use token::{Grant, Verifier};

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

/// A link-layer (Ethernet) address, as `--bind IP=MAC` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<MacAddr, String> {
        let mut out = [0u8; 6];
        let mut parts = s.trim().split(':');
        for byte in &mut out {
            let part = parts.next().unwrap_or("");
            if part.len() != 2 {
                return Err(format!(
                    "{s:?} is not a MAC address (six hex pairs, a:b:c:d:e:f)"
                ));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| format!("{s:?} is not a MAC address (six hex pairs)"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address (six hex pairs)"));
        }
        if out[0] & 1 == 1 || out == [0; 6] {
            return Err(format!("{s:?} is not a unicast MAC address"));
        }
        Ok(MacAddr(out))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One registered sandbox.
#[derive(Debug)]
pub struct Sandbox {
    pub container_id: String,
    pub source_ip: IpAddr,
    /// The MAC its address is bound to on a shared bridge, if any.
    pub mac: Option<MacAddr>,
    pub origin: Origin,
    /// Its token and the grant from it: verified at registration, or only
    /// decoded when restored after a restart (then verified on first
    /// use); swapped whole by a token replacement.
    held: std::sync::RwLock<Held>,
    /// 1 + the verifier's key-set generation `grant` was verified under; 0
    /// when not verified yet. A changed key set means verifying again.
    verified: std::sync::atomic::AtomicU64,
    pub registered_at: u64,
    /// Addresses the DNS door answered, each with the names it was the
    /// answer for and until when (the answer's TTL).
    answered: Mutex<std::collections::HashMap<IpAddr, Vec<(HostName, Instant)>>>,
}

/// A sandbox's token and its grant, swapped together.
#[derive(Debug, Clone)]
struct Held {
    token: Arc<str>,
    grant: Arc<Grant>,
}

/// Answered addresses remembered per sandbox at most: past that the
/// expired ones go, then the one whose answers run out first.
const MAX_ANSWERED: usize = 4096;
/// Names remembered per answered address (a shared CDN address answers
/// for many): past that the expired ones go, then the one that runs out
/// first. They only name connections that carry no name, so losing one
/// costs a server-first protocol its name, never an allowed host.
const MAX_NAMES_PER_ADDRESS: usize = 16;

impl Sandbox {
    pub fn new(source_ip: IpAddr, token: String, grant: Arc<Grant>, origin: Origin) -> Sandbox {
        Sandbox {
            container_id: grant.claims.container_id.clone(),
            source_ip: source_ip.to_canonical(),
            mac: None,
            origin,
            held: std::sync::RwLock::new(Held {
                token: Arc::from(token),
                grant,
            }),
            verified: std::sync::atomic::AtomicU64::new(0),
            registered_at: token::now_s(),
            answered: Mutex::default(),
        }
    }

    fn held(&self) -> Held {
        self.held.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its token.
    pub fn token(&self) -> Arc<str> {
        self.held().token
    }

    /// Its grant as held (see [`current_grant`](Self::current_grant) for
    /// one checked now).
    pub fn grant(&self) -> Arc<Grant> {
        self.held().grant
    }

    /// Its token replaced by `token`, whose grant was verified in full
    /// under key-set `generation`; the DNS door's answers for names the
    /// new grant does not admit are forgotten.
    pub fn replace(&self, token: &str, grant: Arc<Grant>, generation: u64) {
        {
            let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
            *held = Held {
                token: Arc::from(token),
                grant: Arc::clone(&grant),
            };
            self.verified
                .store(generation + 1, std::sync::atomic::Ordering::Release);
        }
        let mut map = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, names| {
            names.retain(|(name, _)| grant.allowlist.admits_name(&Host::Name(name.clone())));
            !names.is_empty()
        });
    }

    /// Remembers that the DNS door answered `ip` for `name` until `until`.
    /// Bounded per sandbox and per address; pruned as it fills.
    pub fn remember(&self, ip: IpAddr, name: &HostName, until: Instant) {
        let ip = ip.to_canonical();
        let now = Instant::now();
        let mut map = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ANSWERED && !map.contains_key(&ip) {
            map.retain(|_, names| {
                names.retain(|(_, u)| *u > now);
                !names.is_empty()
            });
            if map.len() >= MAX_ANSWERED {
                let first_out = map
                    .iter()
                    .min_by_key(|(_, names)| names.iter().map(|(_, u)| *u).max())
                    .map(|(ip, _)| *ip);
                if let Some(gone) = first_out {
                    map.remove(&gone);
                }
            }
        }
        let names = map.entry(ip).or_default();
        if let Some(entry) = names.iter_mut().find(|(n, _)| n == name) {
            entry.1 = entry.1.max(until);
            return;
        }
        if names.len() >= MAX_NAMES_PER_ADDRESS {
            names.retain(|(_, u)| *u > now);
        }
        if names.len() >= MAX_NAMES_PER_ADDRESS
            && let Some(first_out) = names
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(i, _)| i)
        {
            names.swap_remove(first_out);
        }
        names.push((name.clone(), until));
    }

    /// How many addresses and names are remembered (for tests and the
    /// admin view).
    pub fn answered_len(&self) -> (usize, usize) {
        let map = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        (map.len(), map.values().map(Vec::len).sum())
    }

    /// The names `ip` was answered for, whose answers still hold.
    pub fn names_for(&self, ip: IpAddr) -> Vec<HostName> {
        let map = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.get(&ip.to_canonical())
            .map(|names| {
                names
                    .iter()
                    .filter(|(_, u)| *u > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Its grant was verified in full under key-set `generation` (read
    /// before verifying).
    pub fn verified_under(self, generation: u64) -> Sandbox {
        self.verified
            .store(generation + 1, std::sync::atomic::Ordering::Release);
        self
    }

    /// The MAC its address is bound to.
    pub fn with_mac(mut self, mac: Option<MacAddr>) -> Sandbox {
        self.mac = mac;
        self
    }

    /// The sandbox's current grant: expired → `token_expired`, revoked →
    /// `token_revoked`; verified in full (ES256) only when it has not been
    /// under the current key set (a restored sandbox's first use, or after
    /// a JWKS change), else the one kept here. The sandbox is its own
    /// claims cache, so a registration costs no cache entry; hits and
    /// misses count as the cache's.
    pub fn current_grant(&self, verifier: &Verifier) -> Result<Arc<Grant>, Deny> {
        use std::sync::atomic::Ordering;
        let held = self.held();
        if held.grant.expired_at(token::now_s(), verifier.leeway()) {
            return Err(Deny::TokenExpired);
        }
        let generation = verifier.generation();
        if self.verified.load(Ordering::Acquire) == generation + 1 {
            ::metrics::counter!(crate::metrics::CLAIMS_CACHE_HITS).increment(1);
            if verifier.is_revoked(&held.grant.claims.jti) {
                return Err(Deny::TokenRevoked);
            }
        } else {
            ::metrics::counter!(crate::metrics::CLAIMS_CACHE_MISSES).increment(1);
            verifier.verify_fresh(&held.token).map_err(|e| e.deny())?;
            self.verified.store(generation + 1, Ordering::Release);
        }
        Ok(held.grant)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("address {0} is already registered")]
    AddressTaken(IpAddr),
    #[error("container {0} is already registered")]
    ContainerTaken(String),
}

/// Source IP → sandbox, and container id → source IP; and the live
/// connections of every container, whichever door they came through.
#[derive(Default)]
pub struct Registry {
    by_ip: DashMap<IpAddr, Arc<Sandbox>>,
    by_id: DashMap<String, IpAddr>,
    connections: Arc<ConnectionCounts>,
    /// What each container has flowing and has taken (its limits).
    tenants: crate::live::Tenants,
    /// Container ids in order, for paging; its lock also serialises
    /// writers so the maps always agree.
    ordered: Mutex<std::collections::BTreeSet<String>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bind(&self, sandbox: Sandbox) -> Result<Arc<Sandbox>, BindError> {
        let mut ordered = self.ordered.lock().unwrap_or_else(|p| p.into_inner());
        if self.by_ip.contains_key(&sandbox.source_ip) {
            return Err(BindError::AddressTaken(sandbox.source_ip));
        }
        if self.by_id.contains_key(&sandbox.container_id) {
            return Err(BindError::ContainerTaken(sandbox.container_id));
        }
        let sandbox = Arc::new(sandbox);
        ordered.insert(sandbox.container_id.clone());
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

    /// Removes a sandbox from the table. Its connections are closed by
    /// revoking its token (the control plane does both), which also closes
    /// them on the proxy door.
    pub fn unbind(&self, container_id: &str) -> Option<Arc<Sandbox>> {
        let mut ordered = self.ordered.lock().unwrap_or_else(|p| p.into_inner());
        let (_, ip) = self.by_id.remove(container_id)?;
        ordered.remove(container_id);
        let (_, sandbox) = self.by_ip.remove(&ip)?;
        ::metrics::gauge!(m::REGISTERED_SANDBOXES).set(self.by_ip.len() as f64);
        Some(sandbox)
    }

    /// Live connections per container, from both doors.
    pub fn connections(&self) -> &Arc<ConnectionCounts> {
        &self.connections
    }

    /// Each container's live connections and limits' state.
    pub fn tenants(&self) -> &crate::live::Tenants {
        &self.tenants
    }

    /// The reaper's pass: removes the sandboxes whose token expired more
    /// than `retention` seconds ago (their connections were closed when the
    /// verifier's watch of the token ended at its expiry). Returns the
    /// removed sandboxes.
    pub fn reap(&self, now: u64, leeway: u64, retention: u64) -> Vec<Arc<Sandbox>> {
        let mut removed = Vec::new();
        for s in self.list() {
            let exp = s.grant().claims.exp.saturating_add(leeway);
            if now <= exp {
                continue;
            }
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

    /// Up to `limit` sandboxes in container-id order, after `after`; and
    /// the id to ask after next, if there are more.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Arc<Sandbox>>, Option<String>) {
        use std::ops::Bound;
        let ids: Vec<String> = {
            let ordered = self.ordered.lock().unwrap_or_else(|p| p.into_inner());
            let start = match after {
                Some(a) => Bound::Excluded(a.to_owned()),
                None => Bound::Unbounded,
            };
            ordered
                .range((start, Bound::Unbounded))
                .take(limit.saturating_add(1))
                .cloned()
                .collect()
        };
        let more = ids.len() > limit;
        let page: Vec<Arc<Sandbox>> = ids
            .iter()
            .take(limit)
            .filter_map(|id| self.get_by_id(id))
            .collect();
        let next = more
            .then(|| page.last().map(|s| s.container_id.clone()))
            .flatten();
        (page, next)
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// Live connections per key, capped: one counter per container, shared by
/// both doors (a launched sandbox that also uses the proxy has one budget),
/// and one per source address from accept on.
pub struct ConnectionCounts<K = Arc<str>> {
    counts: DashMap<K, usize>,
}

impl<K: std::hash::Hash + Eq + Clone> Default for ConnectionCounts<K> {
    fn default() -> Self {
        ConnectionCounts {
            counts: DashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> ConnectionCounts<K> {
    /// A slot for `key`, unless it holds `cap` already.
    pub fn try_acquire(self: &Arc<Self>, key: &K, cap: usize) -> Option<CountGuard<K>> {
        let mut entry = self.counts.entry(key.clone()).or_insert(0);
        if *entry >= cap {
            return None;
        }
        *entry += 1;
        drop(entry);
        Some(CountGuard {
            counts: Arc::clone(self),
            key: key.clone(),
        })
    }

    /// How many slots `key` holds.
    pub fn live<Q>(&self, key: &Q) -> usize
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.counts.get(key).map(|n| *n).unwrap_or(0)
    }
}

/// Gives its slot back on drop.
pub struct CountGuard<K: std::hash::Hash + Eq + Clone = Arc<str>> {
    counts: Arc<ConnectionCounts<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for CountGuard<K> {
    fn drop(&mut self) {
        self.counts.counts.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A verified-looking grant of container `c1` for `hosts`.
    fn grant(jti: &str, hosts: &[&str]) -> Arc<token::Grant> {
        let claims = token::Claims {
            iss: "i".into(),
            aud: serde_json::json!("a"),
            iat: 0,
            nbf: None,
            exp: u64::MAX,
            jti: jti.into(),
            container_id: "c1".into(),
            user_id: None,
            organization_uuid: None,
            allowed_hosts: token::HostList(hosts.iter().map(|h| h.to_string()).collect()),
            credentials: Default::default(),
            enforce_container_binding: token::Flag(false),
            enforce: Default::default(),
            limits: Default::default(),
            use_egress_gateway: token::Flag(true),
        };
        Arc::new(token::Grant {
            allowlist: token::compile_hosts(
                &claims.allowed_hosts.0,
                &crate::presets::Presets::default(),
            )
            .unwrap(),
            container: Arc::from("c1"),
            claims,
            placeholders: Default::default(),
        })
    }

    #[test]
    fn answered_names_stay_bounded_per_address_and_per_sandbox() {
        let grant = grant("j1", &["*.cdn.test"]);
        let s = Sandbox::new(
            "10.0.0.2".parse().unwrap(),
            String::new(),
            grant,
            Origin::Registered,
        );
        let shared: IpAddr = "198.18.1.10".parse().unwrap();
        let later = Instant::now() + std::time::Duration::from_secs(60);
        for i in 0..1000u32 {
            let name = HostName::parse(&format!("n{i}.cdn.test")).unwrap();
            s.remember(
                shared,
                &name,
                later + std::time::Duration::from_millis(u64::from(i)),
            );
        }
        let (addrs, names) = s.answered_len();
        assert_eq!((addrs, names), (1, MAX_NAMES_PER_ADDRESS));
        // The newest answers are the ones kept.
        let kept = s.names_for(shared);
        assert!(kept.contains(&HostName::parse("n999.cdn.test").unwrap()));
        assert!(!kept.contains(&HostName::parse("n0.cdn.test").unwrap()));
        let name = HostName::parse("a.cdn.test").unwrap();
        for i in 0..(MAX_ANSWERED as u32 + 500) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            s.remember(ip, &name, later);
        }
        assert!(s.answered_len().0 <= MAX_ANSWERED);
    }

    #[test]
    fn a_replaced_token_forgets_the_answers_it_no_longer_admits() {
        let s = Sandbox::new(
            "10.0.0.2".parse().unwrap(),
            "old".into(),
            grant("j-2", &["a.test", "*.b.test"]),
            Origin::Registered,
        );
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        let other: IpAddr = "198.18.1.11".parse().unwrap();
        for name in ["a.test", "x.b.test"] {
            s.remember(ip, &HostName::parse(name).unwrap(), later);
        }
        s.remember(other, &HostName::parse("y.b.test").unwrap(), later);
        s.replace("new", grant("j-1", &["a.test"]), 0);
        assert_eq!(&*s.token(), "new");
        assert_eq!(s.grant().claims.jti, "j-1");
        assert_eq!(s.names_for(ip), vec![HostName::parse("a.test").unwrap()]);
        assert!(s.names_for(other).is_empty());
        assert_eq!(s.answered_len(), (1, 1));
    }

    #[test]
    fn mac_addresses_parse_unicast_only() {
        let m: MacAddr = "02:53:4C:00:00:0a".parse().unwrap();
        assert_eq!(m.to_string(), "02:53:4c:00:00:0a");
        for bad in [
            "",
            "02:53:4c:00:00",
            "02:53:4c:00:00:0a:0b",
            "0g:00:00:00:00:01",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "2:53:4c:0:0:a",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
    }
}
