//! Lease clocks: when each member last renewed, and who has lapsed; and self-preservation, which
//! decides whether lapsed session servers may be expired.
//!
//! Leases live in memory on the meta leader; only their outcome (a removal) is a command. A new
//! leader starts every lease afresh. Time is passed in, so the logic is tested without sleeping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use roster_common::InstanceId;
use roster_common::proto::{MemberKey, Role};

/// A slot-table epoch, and when it was first seen.
#[derive(Clone, Copy, Debug)]
struct EpochSeen {
    epoch: u64,
    at: Instant,
}

/// The leader's lease clocks and what it learns from renewals. Empty, and unused, while not
/// leading.
#[derive(Debug)]
pub struct LeaseBook {
    /// The term this book was started for; `None` while not leading.
    pub leader_term: Option<u64>,
    pub leases: Leases,
    pub preservation: Preservation,
    /// The last load each session server reported with its renewal.
    loads: BTreeMap<MemberKey, u64>,
    /// The last subscription count each session server reported beside its load.
    subscribers: BTreeMap<MemberKey, u64>,
    /// The table epoch last seen and since when, to rebalance once it has settled.
    table_since: EpochSeen,
}

impl LeaseBook {
    pub fn new(lease_timeout: Duration, preservation: Preservation, now: Instant) -> Self {
        LeaseBook {
            leader_term: None,
            leases: Leases::new(lease_timeout),
            preservation,
            loads: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            table_since: EpochSeen { epoch: 0, at: now },
        }
    }

    /// Records the connection count a session server reported, and its subscription count.
    pub fn report_load(&mut self, key: MemberKey, load: u64, subscribers: Option<u64>) {
        self.loads.insert(key, load);
        match subscribers {
            Some(n) => self.subscribers.insert(key, n),
            None => self.subscribers.remove(&key),
        };
    }

    /// What `key` last reported: its connections and subscriptions.
    pub fn reported(&self, key: &MemberKey) -> (Option<u64>, Option<u64>) {
        (
            self.loads.get(key).copied(),
            self.subscribers.get(key).copied(),
        )
    }

    /// Forgets a member that left or expired.
    pub fn forget(&mut self, key: &MemberKey) {
        self.leases.remove(key);
        self.loads.remove(key);
        self.subscribers.remove(key);
    }

    /// The mean load of the session servers that hold a lease at `now` and reported one.
    pub fn mean_session_load(&self, now: Instant) -> Option<u64> {
        let loads: Vec<u64> = self
            .loads
            .iter()
            .filter(|(key, _)| {
                key.role == Role::Session && self.leases.remaining(key, now).is_some()
            })
            .map(|(_, load)| *load)
            .collect();
        (!loads.is_empty()).then(|| loads.iter().sum::<u64>() / loads.len() as u64)
    }

    /// Whether the table at `epoch` has stood for `delay` at `now` (a new epoch starts the clock).
    pub fn table_settled(&mut self, epoch: u64, now: Instant, delay: Duration) -> bool {
        if self.table_since.epoch != epoch {
            self.table_since = EpochSeen { epoch, at: now };
        }
        now.duration_since(self.table_since.at) >= delay
    }
}

/// The lease deadline of every live member.
#[derive(Debug)]
pub struct Leases {
    timeout: Duration,
    deadlines: HashMap<MemberKey, (InstanceId, Instant)>,
}

impl Leases {
    pub fn new(timeout: Duration) -> Self {
        Leases {
            timeout,
            deadlines: HashMap::new(),
        }
    }

    /// Starts (or restarts) the lease of `key` as `instance`.
    pub fn grant(&mut self, key: MemberKey, instance: InstanceId, now: Instant) {
        self.deadlines.insert(key, (instance, now + self.timeout));
    }

    /// Extends the lease of `key`; false if there is none for this instance.
    pub fn renew(&mut self, key: MemberKey, instance: InstanceId, now: Instant) -> bool {
        match self.deadlines.get_mut(&key) {
            Some((held, deadline)) if *held == instance => {
                *deadline = now + self.timeout;
                true
            }
            _ => false,
        }
    }

    pub fn remove(&mut self, key: &MemberKey) {
        self.deadlines.remove(key);
    }

    /// Time left on the lease of `key` (zero once lapsed), if it has one.
    pub fn remaining(&self, key: &MemberKey, now: Instant) -> Option<Duration> {
        self.deadlines
            .get(key)
            .map(|(_, deadline)| deadline.saturating_duration_since(now))
    }

    /// Members whose deadline has passed, ordered by key. They stay listed until removed.
    pub fn lapsed(&self, now: Instant) -> Vec<(MemberKey, InstanceId)> {
        let mut lapsed: Vec<_> = self
            .deadlines
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(key, (instance, _))| (*key, *instance))
            .collect();
        lapsed.sort();
        lapsed
    }
}

/// Self-preservation: expiring a session server deletes its clients' publishers, so when lapsed
/// sessions plus those expired within the last `window` exceed `share` of the session tier, the
/// leader stops expiring sessions and waits for their leases to come back (a network fault must not
/// empty the registry). The rule engages only when the tier has at least [`MIN_TIER`] sessions: in
/// a smaller tier one failure is already half of it.
#[derive(Debug)]
pub struct Preservation {
    share: f64,
    window: Duration,
    recent: VecDeque<Instant>,
}

/// The smallest session tier self-preservation guards.
pub const MIN_TIER: usize = 3;

/// What to do with the sessions whose leases lapsed.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Expire them now.
    pub expire: bool,
    /// Turn self-preservation on or off (a command to commit), when it changes.
    pub switch: Option<bool>,
}

impl Preservation {
    pub fn new(share: f64, window: Duration) -> Self {
        Preservation {
            share,
            window,
            recent: VecDeque::new(),
        }
    }

    /// Decides for `lapsed` lapsed sessions out of `live` session members (lapsed ones included),
    /// given whether self-preservation is `active` now.
    pub fn decide(&mut self, lapsed: usize, live: usize, active: bool, now: Instant) -> Verdict {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        let lost = self.recent.len() + lapsed;
        let tier = live + self.recent.len();
        let too_many = tier >= MIN_TIER && lost as f64 > self.share * tier as f64;
        if lapsed > 0 && too_many {
            return Verdict {
                expire: false,
                switch: (!active).then_some(true),
            };
        }
        Verdict {
            expire: lapsed > 0,
            switch: active.then_some(false),
        }
    }

    /// Records that a session was expired at `now`.
    pub fn expired(&mut self, now: Instant) {
        self.recent.push_back(now);
    }
}

#[cfg(test)]
mod tests {
    use roster_common::proto::Role;

    use super::*;

    #[test]
    fn one_session_in_a_large_tier_expires() {
        let now = Instant::now();
        let mut p = Preservation::new(0.5, Duration::from_secs(10));
        assert_eq!(
            p.decide(1, 10, false, now),
            Verdict {
                expire: true,
                switch: None
            }
        );
    }

    #[test]
    fn losing_more_than_half_holds_expiry_until_leases_return() {
        let now = Instant::now();
        let mut p = Preservation::new(0.5, Duration::from_secs(10));
        assert_eq!(
            p.decide(6, 10, false, now),
            Verdict {
                expire: false,
                switch: Some(true)
            }
        );
        assert_eq!(
            p.decide(6, 10, true, now),
            Verdict {
                expire: false,
                switch: None
            }
        );
        // The leases came back.
        assert_eq!(
            p.decide(0, 10, true, now),
            Verdict {
                expire: false,
                switch: Some(false)
            }
        );
    }

    #[test]
    fn expiries_within_the_window_count_against_the_share() {
        let t0 = Instant::now();
        let mut p = Preservation::new(0.5, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(p.decide(1, 4, false, t0).expire);
            p.expired(t0);
        }
        // Two of an original four are gone; a third would be more than half.
        assert!(!p.decide(1, 2, false, t0 + Duration::from_secs(1)).expire);
        // Long after, the earlier expiries no longer count.
        assert!(p.decide(1, 2, false, t0 + Duration::from_secs(30)).expire);
    }

    #[test]
    fn small_tiers_are_not_guarded() {
        let now = Instant::now();
        let mut p = Preservation::new(0.5, Duration::from_secs(10));
        assert!(p.decide(1, 2, false, now).expire);
        assert!(p.decide(1, 1, false, now).expire);
    }

    #[test]
    fn leases_lapse_only_without_renewal() {
        let t0 = Instant::now();
        let a = MemberKey {
            role: Role::Data,
            id: 1,
        };
        let b = MemberKey {
            role: Role::Session,
            id: 1,
        };
        let mut leases = Leases::new(Duration::from_secs(3));
        leases.grant(a, 10, t0);
        leases.grant(b, 20, t0);
        assert!(leases.renew(a, 10, t0 + Duration::from_secs(2)));
        assert!(
            !leases.renew(a, 11, t0 + Duration::from_secs(2)),
            "another instance cannot renew"
        );
        assert!(leases.lapsed(t0 + Duration::from_millis(2999)).is_empty());
        assert_eq!(leases.lapsed(t0 + Duration::from_secs(3)), vec![(b, 20)]);
        assert_eq!(
            leases.lapsed(t0 + Duration::from_secs(5)),
            vec![(a, 10), (b, 20)]
        );
        leases.remove(&b);
        assert_eq!(leases.lapsed(t0 + Duration::from_secs(5)), vec![(a, 10)]);
    }

    #[test]
    fn the_mean_load_counts_session_servers_holding_a_lease() {
        let now = Instant::now();
        let mut book = LeaseBook::new(
            Duration::from_secs(3),
            Preservation::new(0.5, Duration::from_secs(10)),
            now,
        );
        let session = |id| MemberKey {
            role: Role::Session,
            id,
        };
        assert_eq!(book.mean_session_load(now), None);
        for (id, load) in [(1, 10), (2, 30)] {
            book.leases.grant(session(id), 1, now);
            book.report_load(session(id), load, None);
        }
        let data = MemberKey {
            role: Role::Data,
            id: 1,
        };
        book.leases.grant(data, 1, now);
        book.report_load(data, 1_000, None);
        assert_eq!(
            book.mean_session_load(now),
            Some(20),
            "data servers do not count"
        );
        book.forget(&session(2));
        assert_eq!(book.mean_session_load(now), Some(10));
        book.report_load(session(3), 99, None);
        assert_eq!(
            book.mean_session_load(now),
            Some(10),
            "a load without a lease does not count"
        );
    }

    #[test]
    fn a_table_settles_after_it_stood_for_the_delay() {
        let start = Instant::now();
        let delay = Duration::from_secs(5);
        let mut book = LeaseBook::new(
            Duration::from_secs(3),
            Preservation::new(0.5, Duration::from_secs(10)),
            start,
        );
        assert!(
            !book.table_settled(1, start, delay),
            "a new epoch starts the clock"
        );
        assert!(!book.table_settled(1, start + Duration::from_secs(4), delay));
        assert!(book.table_settled(1, start + delay, delay));
        assert!(
            !book.table_settled(2, start + delay, delay),
            "another epoch starts it again"
        );
    }
}
