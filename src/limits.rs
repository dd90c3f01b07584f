//! Limits: what one sandbox may take, from its token's `limits` claim,
//! and the meters that hold it to them. Owns the claim's type
//! ([`Limits`]), the token bucket every rate uses ([`Bucket`]), the daily
//! byte budget ([`DayBudget`]) and a sandbox's set of them ([`Meter`]),
//! which every byte mover of a limited sandbox asks before it moves bytes
//! (a sandbox without byte limits has no meter, and its relay is the
//! unmetered one). Organisation budgets, shared by a fleet, are
//! [`org`]'s.

pub mod org;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The `limits` claim: every key optional, a missing key no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Bytes per second the sandbox may send, all its connections together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_bytes_per_s: Option<u64>,
    /// Bytes per second the sandbox may receive, all its connections together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_bytes_per_s: Option<u64>,
    /// Bytes both ways per UTC day; crossing it closes the sandbox's
    /// connections and refuses new ones until the day ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_day: Option<u64>,
    /// Live connections at once, both doors together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// New connections per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections_per_s: Option<u64>,
    /// DNS queries per second (in place of `dns.queries_per_second`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_queries_per_s: Option<u64>,
}

/// The largest value a limit may take: beyond it a limit means nothing,
/// and arithmetic on it stays far from overflow.
pub const MAX_LIMIT: u64 = 1 << 50;

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Each key given is between 1 and [`MAX_LIMIT`]: a zero would refuse
    /// everything, which is what not granting the host is for.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in self.keys() {
            if let Some(v) = value
                && !(1..=MAX_LIMIT).contains(&v)
            {
                return Err(format!("limits.{key} must be between 1 and {MAX_LIMIT}"));
            }
        }
        Ok(())
    }

    /// Each key and its value.
    pub fn keys(&self) -> [(Limit, Option<u64>); 6] {
        [
            (Limit::EgressBytesPerS, self.egress_bytes_per_s),
            (Limit::IngressBytesPerS, self.ingress_bytes_per_s),
            (Limit::BytesPerDay, self.bytes_per_day),
            (Limit::MaxConnections, self.max_connections),
            (Limit::NewConnectionsPerS, self.new_connections_per_s),
            (Limit::DnsQueriesPerS, self.dns_queries_per_s),
        ]
    }

    /// Does a byte mover need a meter for these?
    pub fn meters_bytes(&self) -> bool {
        self.egress_bytes_per_s.is_some()
            || self.ingress_bytes_per_s.is_some()
            || self.bytes_per_day.is_some()
    }
}

/// One `limits` key: the `limit` label of `sluice_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    EgressBytesPerS,
    IngressBytesPerS,
    BytesPerDay,
    MaxConnections,
    NewConnectionsPerS,
    DnsQueriesPerS,
    /// An organisation's `bytes_per_day` (`[limits.organizations]`).
    OrganizationBytesPerDay,
}

impl Limit {
    pub const ALL: [Limit; 7] = [
        Limit::EgressBytesPerS,
        Limit::IngressBytesPerS,
        Limit::BytesPerDay,
        Limit::MaxConnections,
        Limit::NewConnectionsPerS,
        Limit::DnsQueriesPerS,
        Limit::OrganizationBytesPerDay,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::EgressBytesPerS => "egress_bytes_per_s",
            Limit::IngressBytesPerS => "ingress_bytes_per_s",
            Limit::BytesPerDay => "bytes_per_day",
            Limit::MaxConnections => "max_connections",
            Limit::NewConnectionsPerS => "new_connections_per_s",
            Limit::DnsQueriesPerS => "dns_queries_per_s",
            Limit::OrganizationBytesPerDay => "organization_bytes_per_day",
        }
    }

    /// Counts one flow slowed or refused by this limit.
    pub fn count(self) {
        ::metrics::counter!(crate::metrics::LIMITED_TOTAL, "limit" => self.as_str()).increment(1);
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` held.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens held, and when they were last counted.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// Starts full.
    pub fn new(rate: u64, burst: u64) -> Bucket {
        let burst = burst.max(1) as f64;
        Bucket {
            rate: rate.max(1) as f64,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// A bucket for bytes: a burst of an eighth of a second's worth (at
    /// least 16 KiB), so a measured rate is the rate within a few percent
    /// after a second or two.
    pub fn bytes(rate: u64) -> Bucket {
        Bucket::new(rate, (rate / 8).max(16 * 1024))
    }

    /// A bucket for events (connections, queries): a second's worth.
    pub fn events(rate: u64) -> Bucket {
        Bucket::new(rate, rate)
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    fn refill(&self, state: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.rate).min(self.burst);
        state.1 = now.max(state.1);
    }

    /// Takes up to `want` tokens now: how many (at least one), or how
    /// long until a worthwhile amount (`want`, or a fiftieth of a second's
    /// worth if less) is there.
    pub fn take(&self, want: usize, now: Instant) -> Result<usize, Duration> {
        let want = want.max(1) as f64;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state, now);
        if state.0 >= 1.0 {
            let n = state.0.min(want).floor();
            state.0 -= n;
            return Ok(n as usize);
        }
        let worth = want.min((self.rate / 50.0).max(1.0)).min(self.burst);
        let wait = (worth - state.0) / self.rate;
        Err(Duration::from_secs_f64(wait.clamp(0.0005, 1.0)))
    }

    /// Takes one token, if one is there.
    pub fn take_one(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state, now);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back tokens taken and not used (a splice that moved less).
    pub fn give_back(&self, n: usize) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = (state.0 + n as f64).min(self.burst);
    }
}

/// The UTC day `now_s` falls in (days since the epoch).
pub fn day_of(now_s: u64) -> u64 {
    now_s / 86_400
}

/// When the UTC day after `day` starts (seconds since the epoch).
pub fn day_end(day: u64) -> u64 {
    day.saturating_add(1).saturating_mul(86_400)
}

/// Bytes allowed per UTC day; the count starts again when the day ends.
#[derive(Debug)]
pub struct DayBudget {
    limit: std::sync::atomic::AtomicU64,
    /// The day counted, and the bytes taken in it.
    state: Mutex<(u64, u64)>,
}

impl DayBudget {
    pub fn new(limit: u64) -> DayBudget {
        DayBudget {
            limit: limit.into(),
            state: Mutex::new((day_of(crate::identity::token::now_s()), 0)),
        }
    }

    /// A budget whose `day` already counts `used` bytes (as saved before
    /// a restart).
    pub fn resumed(limit: u64, day: u64, used: u64) -> DayBudget {
        DayBudget {
            limit: limit.into(),
            state: Mutex::new((day, used)),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A replacement token's limit; what was used today stays used.
    pub fn set_limit(&self, limit: u64) {
        self.limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes up to `want` bytes of `day`'s budget: how many, or `None`
    /// when it is spent.
    pub fn take(&self, want: usize, day: u64) -> Option<usize> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != day {
            *state = (day, 0);
        }
        let left = self.limit().saturating_sub(state.1);
        if left == 0 {
            return None;
        }
        let n = (want as u64).min(left);
        state.1 += n;
        Some(n as usize)
    }

    /// Gives back bytes taken in `day` and not moved.
    pub fn give_back(&self, n: usize, day: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 == day {
            state.1 = state.1.saturating_sub(n as u64);
        }
    }

    /// Bytes taken in `day`.
    pub fn used(&self, day: u64) -> u64 {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 == day { state.1 } else { 0 }
    }

    /// Is `day`'s budget spent?
    pub fn spent(&self, day: u64) -> bool {
        self.used(day) >= self.limit()
    }
}

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the sandbox to its upstream.
    Egress,
    /// From the upstream to the sandbox.
    Ingress,
}

/// What a byte mover may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Move at most this many bytes, then [`Meter::moved`] with how many
    /// were.
    Move(usize),
    /// Wait this long and ask again.
    Wait(Duration),
    /// A daily budget is spent: the connection ends (`quota_exceeded`).
    Spent(Limit),
}

/// A limited sandbox's byte meters, shared by all its connections: the
/// rate buckets each way, its daily budget, and its organisation's. A
/// replacement token's limits are set in place ([`Meter::set`]), so the
/// connections it keeps are held to them from their next splice on.
#[derive(Debug, Default)]
pub struct Meter {
    rules: std::sync::RwLock<Rules>,
}

/// What a meter holds the bytes to now.
#[derive(Debug, Default)]
struct Rules {
    egress: Option<Bucket>,
    ingress: Option<Bucket>,
    day: Option<std::sync::Arc<DayBudget>>,
    org: Option<std::sync::Arc<org::OrgBudget>>,
}

/// What one grant took from each meter, to give back what was not moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taken {
    pub n: usize,
    pub day: u64,
}

impl Meter {
    /// A meter for `limits`' byte keys, the sandbox's daily budget `day`
    /// (kept by its owner across replacements) and the organisation's
    /// budget; `None` when none limits anything (the relay stays
    /// unmetered).
    pub fn new(
        limits: &Limits,
        day: Option<std::sync::Arc<DayBudget>>,
        org: Option<std::sync::Arc<org::OrgBudget>>,
    ) -> Option<Meter> {
        if !limits.meters_bytes() && org.is_none() {
            return None;
        }
        let meter = Meter::default();
        meter.set(limits, day, org);
        Some(meter)
    }

    /// Holds the bytes to these from now on: a rate that did not change
    /// keeps its bucket (and what it holds), one that did starts full.
    pub fn set(
        &self,
        limits: &Limits,
        day: Option<std::sync::Arc<DayBudget>>,
        org: Option<std::sync::Arc<org::OrgBudget>>,
    ) {
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        let keep = |old: Option<Bucket>, rate: Option<u64>| match (old, rate) {
            (Some(b), Some(r)) if b.rate() == r => Some(b),
            (_, r) => r.map(Bucket::bytes),
        };
        let old = std::mem::take(&mut *rules);
        *rules = Rules {
            egress: keep(old.egress, limits.egress_bytes_per_s),
            ingress: keep(old.ingress, limits.ingress_bytes_per_s),
            day: limits.bytes_per_day.and(day),
            org,
        };
    }

    fn rules(&self) -> std::sync::RwLockReadGuard<'_, Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks to move up to `want` bytes `way` now.
    pub fn grant(&self, way: Way, want: usize) -> (Grant, Taken) {
        self.rules().grant(way, want)
    }

    /// After a [`Grant::Move`]: `moved` of the `taken` bytes moved; the
    /// rest goes back.
    pub fn moved(&self, way: Way, taken: Taken, moved: usize) {
        self.rules().moved(way, taken, moved);
    }

    /// Is a daily budget (the sandbox's or its organisation's) spent now?
    pub fn spent(&self) -> Option<Limit> {
        self.rules().spent()
    }
}

impl Rules {
    fn bucket(&self, way: Way) -> Option<(&Bucket, Limit)> {
        match way {
            Way::Egress => self.egress.as_ref().map(|b| (b, Limit::EgressBytesPerS)),
            Way::Ingress => self.ingress.as_ref().map(|b| (b, Limit::IngressBytesPerS)),
        }
    }

    fn grant(&self, way: Way, want: usize) -> (Grant, Taken) {
        let now_s = crate::identity::token::now_s();
        let day = day_of(now_s);
        let mut n = want.max(1);
        let mut took_rate = None;
        if let Some((bucket, limit)) = self.bucket(way) {
            match bucket.take(n, Instant::now()) {
                Ok(got) => {
                    if got < n {
                        limit.count_slowed();
                    }
                    n = got;
                    took_rate = Some(bucket);
                }
                Err(wait) => {
                    limit.count_slowed();
                    return (Grant::Wait(wait), Taken::default());
                }
            }
        }
        if let Some(budget) = &self.day {
            match budget.take(n, day) {
                Some(got) => {
                    if let Some(b) = took_rate {
                        b.give_back(n - got);
                    }
                    n = got;
                }
                None => {
                    if let Some(b) = took_rate {
                        b.give_back(n);
                    }
                    return (Grant::Spent(Limit::BytesPerDay), Taken::default());
                }
            }
        }
        if let Some(org) = &self.org {
            match org.take(n, day) {
                org::Take::Got(got) => {
                    let unused = n - got;
                    if let Some(b) = took_rate {
                        b.give_back(unused);
                    }
                    if let Some(budget) = &self.day {
                        budget.give_back(unused, day);
                    }
                    n = got;
                }
                other => {
                    if let Some(b) = took_rate {
                        b.give_back(n);
                    }
                    if let Some(budget) = &self.day {
                        budget.give_back(n, day);
                    }
                    return match other {
                        org::Take::Wait(w) => (Grant::Wait(w), Taken::default()),
                        _ => (
                            Grant::Spent(Limit::OrganizationBytesPerDay),
                            Taken::default(),
                        ),
                    };
                }
            }
        }
        (Grant::Move(n), Taken { n, day })
    }

    fn moved(&self, way: Way, taken: Taken, moved: usize) {
        let unused = taken.n.saturating_sub(moved);
        if unused == 0 {
            return;
        }
        if let Some((b, _)) = self.bucket(way) {
            b.give_back(unused);
        }
        if let Some(budget) = &self.day {
            budget.give_back(unused, taken.day);
        }
        if let Some(org) = &self.org {
            org.give_back(unused, taken.day);
        }
    }

    fn spent(&self) -> Option<Limit> {
        let day = day_of(crate::identity::token::now_s());
        if self.day.as_ref().is_some_and(|b| b.spent(day)) {
            return Some(Limit::BytesPerDay);
        }
        if self.org.as_ref().is_some_and(|o| o.spent(day)) {
            return Some(Limit::OrganizationBytesPerDay);
        }
        None
    }
}

impl Limit {
    /// A rate limit slowed a flow: counted, at most once a second per
    /// key, so a waiting splice loop does not count each of its waits.
    fn count_slowed(self) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static LAST: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
        let i = Limit::ALL.iter().position(|l| *l == self).unwrap_or(0);
        let now = crate::identity::token::now_s();
        if LAST[i].swap(now, Ordering::Relaxed) != now {
            self.count();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_reads_every_key_and_refuses_unknown_ones_and_zeros() {
        let l: Limits = serde_json::from_str(
            r#"{"egress_bytes_per_s":1048576,"ingress_bytes_per_s":10485760,"bytes_per_day":10737418240,
                "max_connections":64,"new_connections_per_s":20,"dns_queries_per_s":50}"#,
        )
        .unwrap();
        assert_eq!(l.max_connections, Some(64));
        assert!(l.validate().is_ok());
        assert!(serde_json::from_str::<Limits>(r#"{"egress":1}"#).is_err());
        assert!(serde_json::from_str::<Limits>(r#"{"max_connections":-1}"#).is_err());
        let zero: Limits = serde_json::from_str(r#"{"max_connections":0}"#).unwrap();
        assert!(zero.validate().unwrap_err().contains("max_connections"));
        let huge = Limits {
            bytes_per_day: Some(u64::MAX),
            ..Limits::default()
        };
        assert!(huge.validate().is_err());
        assert!(Limits::default().is_empty());
        assert_eq!(serde_json::to_string(&Limits::default()).unwrap(), "{}");
    }

    #[test]
    fn a_bucket_gives_its_rate_over_time_and_says_how_long_to_wait() {
        let b = Bucket::new(1000, 100);
        let t0 = Instant::now();
        assert_eq!(b.take(500, t0), Ok(100));
        let wait = b.take(10, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(21), "{wait:?}");
        // Half a second later, the burst is back (not 500: it holds 100).
        assert_eq!(b.take(500, t0 + Duration::from_millis(500)), Ok(100));
        assert_eq!(b.take(5, t0 + Duration::from_millis(510)), Ok(5));
        b.give_back(3);
        assert_eq!(b.take(100, t0 + Duration::from_millis(510)), Ok(8));
        // Over 10 s of steady asking, 10,000 tokens and the burst.
        let b = Bucket::new(1000, 100);
        let mut got = 0;
        for ms in 0..10_000u64 {
            if let Ok(n) = b.take(1 << 20, t0 + Duration::from_millis(ms)) {
                got += n;
            }
        }
        assert!((9_900..=10_100).contains(&got), "{got}");
    }

    #[test]
    fn a_day_budget_is_cut_at_its_count_and_starts_again_the_next_day() {
        let d = DayBudget::new(1000);
        assert_eq!(d.take(600, 5), Some(600));
        assert_eq!(d.take(600, 5), Some(400));
        assert_eq!(d.take(1, 5), None);
        assert!(d.spent(5));
        d.give_back(100, 5);
        assert_eq!(d.used(5), 900);
        assert_eq!(d.take(600, 6), Some(600));
        assert_eq!(d.used(5), 0);
        d.give_back(10, 5);
        assert_eq!(d.used(6), 600);
        assert_eq!(day_end(day_of(86_400 * 3 + 5)), 86_400 * 4);
    }

    #[test]
    fn a_meter_takes_from_each_limit_and_gives_back_what_did_not_move() {
        let limits = Limits {
            egress_bytes_per_s: Some(1 << 20),
            bytes_per_day: Some(200_000),
            ..Limits::default()
        };
        let day_budget = std::sync::Arc::new(DayBudget::new(200_000));
        let m = Meter::new(&limits, Some(std::sync::Arc::clone(&day_budget)), None).unwrap();
        let (g, t) = m.grant(Way::Egress, 1 << 20);
        // The burst: an eighth of a second's worth.
        assert_eq!(g, Grant::Move(128 * 1024));
        m.moved(Way::Egress, t, 1000);
        let day = t.day;
        assert_eq!(day_budget.used(day), 1000);
        // Ingress is not rate-limited; the day budget still counts it.
        let (g, t) = m.grant(Way::Ingress, 1 << 20);
        assert_eq!(g, Grant::Move(199_000));
        m.moved(Way::Ingress, t, 199_000);
        assert_eq!(
            m.grant(Way::Ingress, 10).0,
            Grant::Spent(Limit::BytesPerDay)
        );
        assert_eq!(m.spent(), Some(Limit::BytesPerDay));
        assert!(Meter::new(&Limits::default(), None, None).is_none());
        let only_conns = Limits {
            max_connections: Some(3),
            ..Limits::default()
        };
        assert!(Meter::new(&only_conns, None, None).is_none());
        // Set in place: the budget gone, a slower rate from the next grant.
        m.set(
            &Limits {
                egress_bytes_per_s: Some(64 * 1024),
                ..Limits::default()
            },
            None,
            None,
        );
        assert_eq!(m.spent(), None);
        assert_eq!(m.grant(Way::Ingress, 1 << 20).0, Grant::Move(1 << 20));
        assert_eq!(m.grant(Way::Egress, 1 << 20).0, Grant::Move(16 * 1024));
    }
}
