//! Organisation budgets (`[limits.organizations]`): bytes per UTC day for
//! every sandbox whose token names the `organization_uuid`, together.
//!
//! On a gateway alone the whole budget is counted here. In a fleet
//! (`[store] backend = "redis"`) the budget is counted in Redis, by
//! leases: a gateway takes a slice (`INCRBY` on the day's key) and spends
//! it locally, asking for the next slice in the background when less than
//! half of one is left, so Redis is never asked per splice. At the edges:
//! - the fleet never moves more than the budget (a slice is taken before
//!   its bytes move; the last slice is cut to what is left);
//! - it may move up to one slice per gateway less than the budget: a
//!   slice taken and not spent by the day's end is lost;
//! - while Redis is away a gateway spends only the slices it holds; when
//!   they are gone, the organisation's flows wait (no bytes move, the idle
//!   timeout still applies) until Redis answers again and grants more, or
//!   says the budget is spent; then they close (`quota_exceeded`) and new
//!   ones are refused until the day ends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::day_of;

/// What a flow may take of its organisation's budget now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Got(usize),
    /// No slice is held: one is being asked for.
    Wait(Duration),
    Spent,
}

/// How long a flow waits for a slice before asking again.
const SLICE_WAIT: Duration = Duration::from_millis(50);

/// One organisation's budget on this gateway.
#[derive(Debug)]
pub struct OrgBudget {
    pub uuid: String,
    pub limit: u64,
    /// Counted in Redis by leases (else here, whole).
    leased: bool,
    state: Mutex<State>,
    /// Wakes the lease task.
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct State {
    day: u64,
    /// Bytes granted to this gateway for `day` (the whole budget when
    /// not leased).
    granted: u64,
    used: u64,
    /// The fleet says nothing more is left today.
    spent: bool,
}

impl OrgBudget {
    /// The slice a gateway takes at a time: a sixteenth of the budget,
    /// between 64 KiB and 64 MiB.
    pub fn slice(&self) -> u64 {
        (self.limit / 16).clamp(64 * 1024, 64 << 20).min(self.limit)
    }

    fn state(&self, day: u64) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.day != day {
            *s = State {
                day,
                granted: if self.leased { 0 } else { self.limit },
                used: 0,
                spent: false,
            };
        }
        s
    }

    /// Takes up to `want` bytes of `day`'s budget.
    pub fn take(&self, want: usize, day: u64) -> Take {
        let mut s = self.state(day);
        let left = s.granted.saturating_sub(s.used);
        if left == 0 {
            if s.spent || !self.leased {
                return Take::Spent;
            }
            drop(s);
            self.wake.notify_one();
            return Take::Wait(SLICE_WAIT);
        }
        let n = (want as u64).min(left);
        s.used += n;
        let low = self.leased && !s.spent && left - n < self.slice() / 2;
        drop(s);
        if low {
            self.wake.notify_one();
        }
        Take::Got(n as usize)
    }

    pub fn give_back(&self, n: usize, day: u64) {
        let mut s = self.state(day);
        s.used = s.used.saturating_sub(n as u64);
    }

    /// Is `day`'s budget spent (this gateway's share gone, and the fleet
    /// has no more)?
    pub fn spent(&self, day: u64) -> bool {
        let s = self.state(day);
        s.used >= s.granted && (s.spent || !self.leased)
    }

    /// Bytes used through this gateway today.
    pub fn used(&self, day: u64) -> u64 {
        self.state(day).used
    }

    /// Counted here (not leased from a fleet): what a restart must keep.
    pub fn is_local(&self) -> bool {
        !self.leased
    }

    /// `day` already counts `used` bytes here (saved before a restart);
    /// only for a budget counted here: a fleet's count is in Redis.
    pub fn resume(&self, day: u64, used: u64) {
        if self.leased {
            return;
        }
        let mut s = self.state(day);
        s.used = s.used.max(used);
    }

    /// Does this gateway want another slice for `day`?
    pub fn wants_slice(&self, day: u64) -> bool {
        let s = self.state(day);
        self.leased && !s.spent && s.granted.saturating_sub(s.used) < self.slice() / 2
    }

    /// The fleet's answer to a lease of `asked` bytes for `day`: `total`
    /// is the fleet's count after it. Grants what fits under the budget.
    pub fn leased(&self, day: u64, asked: u64, total: u64) {
        let mut s = self.state(day);
        let before = total.saturating_sub(asked);
        let fits = self.limit.saturating_sub(before).min(asked);
        s.granted += fits;
        if total >= self.limit {
            s.spent = true;
        }
    }
}

/// Every organisation budget of this gateway's config.
#[derive(Debug, Default)]
pub struct OrgBudgets {
    by_uuid: BTreeMap<String, Arc<OrgBudget>>,
    wake: Arc<tokio::sync::Notify>,
}

impl OrgBudgets {
    /// From `[limits.organizations]`: `leased` when a fleet shares them.
    pub fn new(budgets: &BTreeMap<String, u64>, leased: bool) -> OrgBudgets {
        let wake = Arc::new(tokio::sync::Notify::new());
        let today = day_of(crate::identity::token::now_s());
        let by_uuid = budgets
            .iter()
            .map(|(uuid, limit)| {
                let b = OrgBudget {
                    uuid: uuid.clone(),
                    limit: *limit,
                    leased,
                    state: Mutex::new(State::default()),
                    wake: Arc::clone(&wake),
                };
                drop(b.state(today));
                (uuid.clone(), Arc::new(b))
            })
            .collect();
        OrgBudgets { by_uuid, wake }
    }

    pub fn get(&self, uuid: &str) -> Option<Arc<OrgBudget>> {
        self.by_uuid.get(uuid).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<OrgBudget>> {
        self.by_uuid.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uuid.is_empty()
    }

    /// Woken when a budget wants a slice.
    pub fn woken(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.wake)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(limit: u64, leased: bool) -> OrgBudgets {
        OrgBudgets::new(&BTreeMap::from([("org-1".to_owned(), limit)]), leased)
    }

    #[test]
    fn alone_the_whole_budget_is_counted_here() {
        let b = budgets(1000, false);
        let o = b.get("org-1").unwrap();
        assert_eq!(o.take(600, 7), Take::Got(600));
        assert_eq!(o.take(600, 7), Take::Got(400));
        assert_eq!(o.take(1, 7), Take::Spent);
        assert!(o.spent(7));
        assert!(!o.wants_slice(7));
        assert_eq!(o.take(1, 8), Take::Got(1));
        // Started again: the day's count saved before goes on.
        let again = budgets(1000, false);
        let o = again.get("org-1").unwrap();
        o.resume(8, 900);
        assert_eq!(o.take(600, 8), Take::Got(100));
        // A fleet's count is Redis's: nothing resumed here.
        let fleet = budgets(1000, true);
        fleet.get("org-1").unwrap().resume(8, 900);
        assert_eq!(fleet.get("org-1").unwrap().used(8), 0);
    }

    #[test]
    fn in_a_fleet_only_leased_slices_are_spent_and_the_last_is_cut() {
        let b = budgets(1 << 20, true);
        let o = b.get("org-1").unwrap();
        let slice = o.slice();
        assert_eq!(slice, 64 * 1024);
        assert!(matches!(o.take(10, 7), Take::Wait(_)));
        assert!(o.wants_slice(7));
        // Another gateway took all but 1000 bytes already.
        o.leased(7, slice, (1 << 20) - 1000 + slice);
        assert_eq!(o.take(5000, 7), Take::Got(1000));
        assert_eq!(o.take(1, 7), Take::Spent);
        assert!(o.spent(7));
        // A new day: nothing granted, nothing spent.
        assert!(matches!(o.take(1, 8), Take::Wait(_)));
        o.leased(8, slice, slice);
        assert_eq!(o.take(1 << 20, 8), Take::Got(slice as usize));
        assert!(!o.spent(8));
    }
}
