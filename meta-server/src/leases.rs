//! Lease clocks: when each member last renewed, and who has lapsed; and self-preservation, which
//! decides whether lapsed session servers may be expired.
//!
//! Leases live in memory on the meta leader; only their outcome (a removal) is a command. A new
//! leader starts every lease afresh. Time is passed in, so the logic is tested without sleeping.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use roster_common::InstanceId;
use roster_common::proto::MemberKey;

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
}
