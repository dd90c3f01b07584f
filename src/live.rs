//! Live: what each sandbox has flowing now and what it has taken, across
//! every door. Owns, per container, the table of its live connections
//! (each with the grant it runs under, what it carries and a close that
//! says why), and its limits' state: the byte [`Meter`] its relays ask,
//! the new-connection and DNS rates, and the connection count. A token
//! replacement re-checks the container's connections here, in one step
//! under the container's lock, and a spent daily budget closes them here.
//!
//! Every connection is admitted under that lock too, after its grant was
//! read: so a connection is either in the table when a replacement
//! re-checks it, or admitted after it, when its old token is already
//! refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::deny::Deny;
use crate::host::Host;
use crate::identity::token::{Grant, Verifier};
use crate::limits::org::{OrgBudget, OrgBudgets};
use crate::limits::{Bucket, DayBudget, Limit, Limits, Meter, day_end, day_of};

/// What a live connection carries, for a re-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    /// Decided, its relay not begun (a tunnel's or an answered name's
    /// first bytes awaited).
    Opening,
    /// Bytes relayed unread (TLS not opened, or a protocol that is not HTTP).
    Raw,
    /// Plain HTTP, each request judged.
    Judged,
    /// TLS opened: each request judged, these credentials added.
    Inspected(Vec<Arc<str>>),
}

/// One live connection (or one of the proxy door's sessions).
#[derive(Debug)]
pub struct LiveConn {
    id: u64,
    /// Cancelled when its token is revoked or expires (a child of the
    /// verifier's watch), when the gateway stops hard, or when it alone is
    /// closed ([`LiveConn::close`]).
    pub closed: CancellationToken,
    reason: OnceLock<Deny>,
    grant: RwLock<Arc<Grant>>,
    target: (Host, u16),
    carried: Mutex<Carried>,
    /// Its sandbox's meter, when its bytes are limited.
    pub meter: Option<Arc<Meter>>,
    tenant: Arc<Tenant>,
}

impl LiveConn {
    /// The grant it runs under now (a replacement swaps it).
    pub fn grant(&self) -> Arc<Grant> {
        Arc::clone(&self.grant.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn target(&self) -> &(Host, u16) {
        &self.target
    }

    pub fn set_carried(&self, carried: Carried) {
        *self.carried.lock().unwrap_or_else(|p| p.into_inner()) = carried;
    }

    pub fn carried(&self) -> Carried {
        self.carried
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Closes it, saying why (the first reason given stays).
    pub fn close(&self, why: Deny) {
        let _ = self.reason.set(why);
        self.closed.cancel();
    }

    /// Why it was closed on its own, if it was.
    pub fn reason(&self) -> Option<Deny> {
        self.reason.get().copied()
    }
}

/// One container's live state.
#[derive(Debug)]
pub struct Tenant {
    pub container: Arc<str>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The token whose limits apply (the last one admitted or swapped in).
    jti: String,
    limits: Limits,
    /// Used today, kept across replacements.
    day: Option<Arc<DayBudget>>,
    org: Option<Arc<OrgBudget>>,
    meter: Option<Arc<Meter>>,
    conn_rate: Option<Bucket>,
    dns_rate: Option<Bucket>,
    live: HashMap<u64, Arc<LiveConn>>,
    next: u64,
    /// The latest expiry of a token it was admitted under: past it (and
    /// with nothing live), the state is dropped.
    exp: u64,
    /// Today's count saved before a restart: where its daily budget
    /// starts when one is first made.
    resumed: Option<(u64, u64)>,
}

impl Inner {
    fn set_limits(&mut self, grant: &Grant, orgs: &OrgBudgets) {
        let limits = grant.claims.limits;
        self.jti.clone_from(&grant.claims.jti);
        self.exp = self.exp.max(grant.claims.exp);
        let org = grant
            .claims
            .organization_uuid
            .as_deref()
            .and_then(|uuid| orgs.get(uuid));
        let same_org = match (&org, &self.org) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.org = org;
        if limits == self.limits && same_org {
            return;
        }
        let old = std::mem::replace(&mut self.limits, limits);
        self.day = match (limits.bytes_per_day, self.day.take()) {
            (Some(l), Some(d)) => {
                d.set_limit(l);
                Some(d)
            }
            (Some(l), None) => Some(Arc::new(match self.resumed.take() {
                Some((day, used)) => DayBudget::resumed(l, day, used),
                None => DayBudget::new(l),
            })),
            (None, _) => None,
        };
        // The connections that hold the meter follow the new limits; new
        // connections get none when nothing is limited any more.
        if let Some(m) = &self.meter {
            m.set(&limits, self.day.clone(), self.org.clone());
        }
        if !limits.meters_bytes() && self.org.is_none() {
            self.meter = None;
        } else if self.meter.is_none() {
            self.meter = Meter::new(&limits, self.day.clone(), self.org.clone()).map(Arc::new);
        }
        if old.new_connections_per_s != limits.new_connections_per_s {
            self.conn_rate = limits.new_connections_per_s.map(Bucket::events);
        }
        if old.dns_queries_per_s != limits.dns_queries_per_s {
            self.dns_rate = limits.dns_queries_per_s.map(Bucket::events);
        }
    }
}

/// What an admitted connection holds: its entry among its sandbox's
/// live connections, removed on drop.
#[derive(Debug)]
pub struct Admitted {
    pub conn: Arc<LiveConn>,
}

impl Admitted {
    /// Closes every live connection of its sandbox (a spent budget).
    pub fn close_all(&self, why: Deny) {
        self.conn.tenant.close_all(why);
    }

    /// Its sandbox's meter, when its bytes are limited.
    pub fn meter(&self) -> Option<&Arc<Meter>> {
        self.conn.meter.as_ref()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut inner = self.conn.tenant.lock();
        inner.live.remove(&self.conn.id);
    }
}

impl Tenant {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn close_all(&self, why: Deny) {
        let inner = self.lock();
        for c in inner.live.values() {
            c.close(why);
        }
    }
}

/// What a sandbox has used, for the admin API.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Usage {
    /// Live connections, both doors.
    pub connections: usize,
    /// Bytes both ways today (UTC), against `limits.bytes_per_day`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_today: Option<u64>,
    /// When today's count starts again (seconds since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<u64>,
    /// Bytes its organisation moved today through this gateway, and the
    /// organisation's budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_bytes_today: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_bytes_per_day: Option<u64>,
}

/// Every container's live state.
#[derive(Debug, Default)]
pub struct Tenants {
    map: DashMap<Arc<str>, Arc<Tenant>>,
    orgs: RwLock<Arc<OrgBudgets>>,
    /// Today's counts read at start, for containers not seen yet.
    resumed: Mutex<HashMap<String, (u64, u64)>>,
}

/// Where today's daily counts are kept across a restart, in `state_dir`.
pub const COUNTS_FILE: &str = "limits.json";

/// What [`COUNTS_FILE`] holds: the UTC day and each container's bytes in it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedCounts {
    day: u64,
    bytes_today: std::collections::BTreeMap<String, u64>,
    /// Organisation budgets counted on this gateway alone.
    #[serde(default)]
    organizations_today: std::collections::BTreeMap<String, u64>,
}

impl Tenants {
    /// The organisation budgets (`[limits.organizations]`), set at start.
    pub fn set_orgs(&self, orgs: Arc<OrgBudgets>) {
        *self.orgs.write().unwrap_or_else(|p| p.into_inner()) = orgs;
    }

    pub fn orgs(&self) -> Arc<OrgBudgets> {
        Arc::clone(&self.orgs.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn tenant(&self, container: &Arc<str>) -> Arc<Tenant> {
        if let Some(t) = self.map.get(container) {
            return Arc::clone(&t);
        }
        Arc::clone(&self.map.entry(Arc::clone(container)).or_insert_with(|| {
            Arc::new(Tenant {
                container: Arc::clone(container),
                inner: Mutex::new(Inner {
                    jti: String::new(),
                    limits: Limits::default(),
                    day: None,
                    org: None,
                    meter: None,
                    conn_rate: None,
                    dns_rate: None,
                    live: HashMap::new(),
                    next: 0,
                    exp: 0,
                    resumed: self
                        .resumed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&**container),
                }),
            })
        }))
    }

    /// Admits one connection under `grant` to `target`: refused
    /// `token_revoked` when its token was revoked (or replaced) since the
    /// grant was read, `quota_exceeded` when a daily budget is spent, the
    /// new-connection rate is reached or `max_connections` are live.
    pub fn admit(
        &self,
        grant: &Arc<Grant>,
        target: (Host, u16),
        verifier: &Verifier,
    ) -> Result<Admitted, Deny> {
        let tenant = self.tenant(&grant.container);
        let mut inner = tenant.lock();
        if verifier.is_revoked(&grant.claims.jti) {
            return Err(Deny::TokenRevoked);
        }
        if inner.jti != grant.claims.jti {
            inner.set_limits(grant, &self.orgs());
        }
        if let Some(limit) = inner.meter.as_ref().and_then(|m| m.spent()) {
            limit.count();
            return Err(Deny::QuotaExceeded);
        }
        if let Some(max) = inner.limits.max_connections
            && inner.live.len() as u64 >= max
        {
            Limit::MaxConnections.count();
            return Err(Deny::QuotaExceeded);
        }
        if let Some(rate) = &inner.conn_rate
            && !rate.take_one(Instant::now())
        {
            Limit::NewConnectionsPerS.count();
            return Err(Deny::QuotaExceeded);
        }
        inner.next += 1;
        let conn = Arc::new(LiveConn {
            id: inner.next,
            closed: verifier.watch(grant).child_token(),
            reason: OnceLock::new(),
            grant: RwLock::new(Arc::clone(grant)),
            target,
            carried: Mutex::new(Carried::Opening),
            meter: inner.meter.clone(),
            tenant: Arc::clone(&tenant),
        });
        inner.live.insert(conn.id, Arc::clone(&conn));
        drop(inner);
        Ok(Admitted { conn })
    }

    /// May the sandbox ask one more DNS query? `None` when its token sets
    /// no `dns_queries_per_s` (the gateway-wide rate applies).
    pub fn admit_query(&self, grant: &Arc<Grant>) -> Option<bool> {
        grant.claims.limits.dns_queries_per_s?;
        let tenant = self.tenant(&grant.container);
        let mut inner = tenant.lock();
        if inner.jti != grant.claims.jti {
            inner.set_limits(grant, &self.orgs());
        }
        let ok = inner
            .dns_rate
            .as_ref()
            .is_none_or(|r| r.take_one(Instant::now()));
        if !ok {
            Limit::DnsQueriesPerS.count();
        }
        Some(ok)
    }

    /// The token `old_jti` of `grant`'s container is replaced by `grant`:
    /// in one step under the container's lock, its limits become the new
    /// token's, every live connection under the old token that `still`
    /// allows runs under the new grant from now on (its watch moved to the
    /// new token), every other one is closed `policy_changed`, and the old
    /// token is revoked (until `old_exp`). Returns how many were kept and
    /// closed.
    pub fn replace(
        &self,
        old_jti: &str,
        old_exp: u64,
        grant: &Arc<Grant>,
        verifier: &Verifier,
        still: impl Fn(&LiveConn, &Grant) -> bool,
    ) -> (usize, usize) {
        let tenant = self.tenant(&grant.container);
        let mut inner = tenant.lock();
        inner.set_limits(grant, &self.orgs());
        let (mut kept, mut closed) = (0, 0);
        for c in inner.live.values() {
            if c.grant().claims.jti != old_jti {
                continue;
            }
            // A connection relayed unmetered cannot be metered mid-flight:
            // newly limited, it closes.
            let meterable = c.meter.is_some() || inner.meter.is_none();
            if meterable && still(c, grant) {
                *c.grant.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(grant);
                kept += 1;
            } else {
                c.close(Deny::PolicyChanged);
                closed += 1;
            }
        }
        // The kept ones' watch is the old token's: it moves to the new one
        // before the old one is revoked, which closes what still watches it.
        verifier.rekey(old_jti, grant);
        verifier.revoke(old_jti, old_exp);
        drop(inner);
        (kept, closed)
    }

    /// What `container` uses now.
    pub fn usage(&self, container: &str) -> Usage {
        let Some(t) = self.map.get(container).map(|t| Arc::clone(&t)) else {
            return Usage::default();
        };
        let inner = t.lock();
        let day = day_of(crate::identity::token::now_s());
        let counted = inner.day.is_some() || inner.org.is_some();
        Usage {
            connections: inner.live.len(),
            bytes_today: inner.day.as_ref().map(|d| d.used(day)),
            resets_at: counted.then(|| day_end(day)),
            organization_bytes_today: inner.org.as_ref().map(|o| o.used(day)),
            organization_bytes_per_day: inner.org.as_ref().map(|o| o.limit),
        }
    }

    /// Live connections of `container`.
    pub fn live(&self, container: &str) -> Vec<Arc<LiveConn>> {
        self.map
            .get(container)
            .map(|t| t.lock().live.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Drops the state of containers with nothing live whose every token
    /// has expired (a new token for one starts it again, with today's
    /// count lost: an expired sandbox's budget is not carried over).
    pub fn tidy(&self, now: u64) {
        self.map.retain(|_, t| {
            let inner = t.lock();
            !inner.live.is_empty() || inner.exp >= now
        });
    }

    /// Saves today's daily counts to `path` (atomically: a temporary file
    /// renamed), so a restart does not give a sandbox its budget again.
    pub fn save_counts(&self, path: &std::path::Path) -> std::io::Result<()> {
        let day = day_of(crate::identity::token::now_s());
        let mut saved = SavedCounts {
            day,
            bytes_today: Default::default(),
            organizations_today: self
                .orgs()
                .all()
                .filter(|o| o.is_local() && o.used(day) > 0)
                .map(|o| (o.uuid.clone(), o.used(day)))
                .collect(),
        };
        for t in self.map.iter() {
            let inner = t.lock();
            let used = inner.day.as_ref().map_or(0, |d| d.used(day));
            if used > 0 {
                saved.bytes_today.insert(t.container.to_string(), used);
            }
        }
        for (c, (d, used)) in self
            .resumed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if *d == day {
                saved.bytes_today.entry(c.clone()).or_insert(*used);
            }
        }
        if saved.bytes_today.is_empty() && saved.organizations_today.is_empty() && !path.exists() {
            return Ok(());
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let body = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)
    }

    /// Reads the counts saved at `path`: today's are where each
    /// container's daily budget starts. A missing file, or one of another
    /// day, is a fresh start; a damaged one is logged and ignored.
    pub fn load_counts(&self, path: &std::path::Path) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "daily counts not read");
                return;
            }
        };
        let saved: SavedCounts = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "daily counts file damaged; counting from zero");
                return;
            }
        };
        if saved.day != day_of(crate::identity::token::now_s()) {
            return;
        }
        let orgs = self.orgs();
        for (uuid, used) in &saved.organizations_today {
            if let Some(o) = orgs.get(uuid) {
                o.resume(saved.day, *used);
            }
        }
        let mut resumed = self.resumed.lock().unwrap_or_else(|p| p.into_inner());
        for (c, used) in saved.bytes_today {
            resumed.insert(c, (saved.day, used));
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::token::{Jwks, KeyPair, MintRequest, Signer};

    struct Fixture {
        signer: Signer,
        verifier: Verifier,
    }

    fn fixture() -> Fixture {
        let pair = KeyPair::generate("k1").unwrap();
        Fixture {
            signer: Signer::from_pem(pair.private_pem.as_bytes(), "k1", "i", "a").unwrap(),
            verifier: Verifier::new(Jwks::parse(&pair.jwks().to_string()).unwrap(), "i", "a", 0),
        }
    }

    fn grant(f: &Fixture, hosts: &[&str], limits: Limits) -> Arc<Grant> {
        let minted = f
            .signer
            .mint(&MintRequest {
                container_id: "c1".into(),
                user_id: "u".into(),
                allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
                credentials: Vec::new(),
                ttl: std::time::Duration::from_secs(600),
                enforce: Default::default(),
                limits,
                organization_uuid: None,
            })
            .unwrap();
        f.verifier.verify(&minted.token).unwrap()
    }

    fn to(host: &str) -> (Host, u16) {
        (Host::parse(host).unwrap(), 443)
    }

    #[test]
    fn a_replacement_keeps_what_the_new_grant_allows_and_closes_the_rest() {
        let f = fixture();
        let tenants = Tenants::default();
        let old = grant(&f, &["a.test", "b.test"], Limits::default());
        let a = tenants.admit(&old, to("a.test"), &f.verifier).unwrap();
        let b = tenants.admit(&old, to("b.test"), &f.verifier).unwrap();
        let new = grant(&f, &["b.test"], Limits::default());
        let (kept, closed) = tenants.replace(
            &old.claims.jti,
            old.claims.exp,
            &new,
            &f.verifier,
            |c, g| g.allowlist.admits_name(&c.target().0),
        );
        assert_eq!((kept, closed), (1, 1));
        assert_eq!(a.conn.reason(), Some(Deny::PolicyChanged));
        assert!(a.conn.closed.is_cancelled());
        assert!(
            !b.conn.closed.is_cancelled(),
            "kept through the old token's revocation"
        );
        assert_eq!(b.conn.grant().claims.jti, new.claims.jti);
        // The old token admits nothing more; the new one does.
        assert_eq!(
            tenants.admit(&old, to("b.test"), &f.verifier).unwrap_err(),
            Deny::TokenRevoked
        );
        assert!(tenants.admit(&new, to("b.test"), &f.verifier).is_ok());
        f.verifier.revoke(&new.claims.jti, new.claims.exp);
        assert!(b.conn.closed.is_cancelled());
        drop((a, b));
        assert_eq!(tenants.usage("c1").connections, 0);
    }

    #[test]
    fn a_replacement_s_limits_hold_the_connections_it_keeps() {
        let f = fixture();
        let tenants = Tenants::default();
        let rate = |r| Limits {
            egress_bytes_per_s: Some(r),
            ..Limits::default()
        };
        let fast = grant(&f, &["a.test"], rate(1 << 20));
        let metered = tenants.admit(&fast, to("a.test"), &f.verifier).unwrap();
        let slow = grant(&f, &["a.test"], rate(64 * 1024));
        let all = |_: &LiveConn, _: &Grant| true;
        let (kept, closed) =
            tenants.replace(&fast.claims.jti, fast.claims.exp, &slow, &f.verifier, all);
        assert_eq!((kept, closed), (1, 0));
        let meter = metered.meter().unwrap();
        let (g, _) = meter.grant(crate::limits::Way::Egress, 1 << 20);
        assert_eq!(
            g,
            crate::limits::Grant::Move(16 * 1024),
            "the new rate's burst"
        );

        // An unlimited sandbox's connection is relayed unmetered: newly
        // limited, it cannot be held to it, so it closes.
        let tenants = Tenants::default();
        let free = grant(&f, &["a.test"], Limits::default());
        let unmetered = tenants.admit(&free, to("a.test"), &f.verifier).unwrap();
        assert!(unmetered.meter().is_none());
        let (kept, closed) =
            tenants.replace(&free.claims.jti, free.claims.exp, &slow, &f.verifier, all);
        assert_eq!((kept, closed), (0, 1));
        assert_eq!(unmetered.conn.reason(), Some(Deny::PolicyChanged));
    }

    #[test]
    fn counts_rates_and_a_spent_budget_refuse_new_connections() {
        let f = fixture();
        let tenants = Tenants::default();
        let limits = Limits {
            max_connections: Some(2),
            new_connections_per_s: Some(3),
            bytes_per_day: Some(1000),
            ..Limits::default()
        };
        let g = grant(&f, &["a.test"], limits);
        let one = tenants.admit(&g, to("a.test"), &f.verifier).unwrap();
        let two = tenants.admit(&g, to("a.test"), &f.verifier).unwrap();
        assert_eq!(
            tenants.admit(&g, to("a.test"), &f.verifier).unwrap_err(),
            Deny::QuotaExceeded,
            "max_connections"
        );
        drop(two);
        let three = tenants.admit(&g, to("a.test"), &f.verifier).unwrap();
        drop(three);
        assert_eq!(
            tenants.admit(&g, to("a.test"), &f.verifier).unwrap_err(),
            Deny::QuotaExceeded,
            "new_connections_per_s"
        );
        // The budget, spent through one connection, refuses the next and
        // closes the others when asked.
        let meter = one.meter().unwrap();
        let (crate::limits::Grant::Move(n), taken) = meter.grant(crate::limits::Way::Ingress, 5000)
        else {
            panic!("no grant");
        };
        meter.moved(crate::limits::Way::Ingress, taken, n);
        assert_eq!(meter.spent(), Some(Limit::BytesPerDay));
        one.close_all(Deny::QuotaExceeded);
        assert_eq!(one.conn.reason(), Some(Deny::QuotaExceeded));
        assert_eq!(
            tenants.admit(&g, to("a.test"), &f.verifier).unwrap_err(),
            Deny::QuotaExceeded
        );
        let usage = tenants.usage("c1");
        assert_eq!(usage.bytes_today, Some(1000));
        // A replacement with a higher budget keeps what was used today.
        drop(one);
        let more = grant(
            &f,
            &["a.test"],
            Limits {
                bytes_per_day: Some(3000),
                ..Limits::default()
            },
        );
        tenants.replace(&g.claims.jti, g.claims.exp, &more, &f.verifier, |_, _| true);
        assert_eq!(tenants.usage("c1").bytes_today, Some(1000));
        assert!(tenants.admit(&more, to("a.test"), &f.verifier).is_ok());

        // Saved and read by a gateway started again: today's count holds.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COUNTS_FILE);
        tenants.save_counts(&path).unwrap();
        let again = Tenants::default();
        again.load_counts(&path);
        assert!(again.admit(&more, to("a.test"), &f.verifier).is_ok());
        assert_eq!(again.usage("c1").bytes_today, Some(1000));
        std::fs::write(&path, "{not json").unwrap();
        Tenants::default().load_counts(&path);
    }
}
