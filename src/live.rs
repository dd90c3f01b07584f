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
            (Some(l), None) => Some(Arc::new(DayBudget::new(l))),
            (None, _) => None,
        };
        self.meter = Meter::new(&limits, self.org.clone()).map(|mut m| {
            m.day = self.day.clone();
            Arc::new(m)
        });
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
            if still(c, grant) {
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

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
