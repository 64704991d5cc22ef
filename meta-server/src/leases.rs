//! Lease clocks: when each member last renewed, and who has lapsed.
//!
//! Leases live in memory on the node that serves them; only their outcome (a removal) is a command.
//! Time is passed in, so the logic is tested without sleeping.

use std::collections::HashMap;
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

#[cfg(test)]
mod tests {
    use roster_common::proto::Role;

    use super::*;

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
