//! When to drop the publishers of a session server that left the cluster.
//!
//! A session instance that owns publishers here but is absent from the live sessions (see
//! `Shared::live_sessions`: the committed membership, and sessions still attached here that it does
//! not list under a newer instance) for longer than `session_grace` has its publishers dropped. The
//! grace absorbs a session that is being replaced: its clients re-register through another session
//! meanwhile, which moves ownership, so subscribers see no flap. Time is passed in.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use roster_common::InstanceId;

/// Tracks since when each owner has been missing from the membership.
#[derive(Debug)]
pub struct OwnerSweep {
    grace: Duration,
    absent_since: HashMap<InstanceId, Instant>,
}

impl OwnerSweep {
    pub fn new(grace: Duration) -> Self {
        OwnerSweep {
            grace,
            absent_since: HashMap::new(),
        }
    }

    /// Given the live session instances and the instances owning publishers here, returns the
    /// owners to drop now.
    pub fn sweep(
        &mut self,
        live: &HashSet<InstanceId>,
        owners: impl IntoIterator<Item = InstanceId>,
        now: Instant,
    ) -> Vec<InstanceId> {
        let owners: HashSet<InstanceId> = owners.into_iter().collect();
        self.absent_since
            .retain(|instance, _| owners.contains(instance) && !live.contains(instance));
        let mut expired = Vec::new();
        for instance in owners.difference(live) {
            let since = *self.absent_since.entry(*instance).or_insert(now);
            if now.duration_since(since) >= self.grace {
                expired.push(*instance);
            }
        }
        for instance in &expired {
            self.absent_since.remove(instance);
        }
        expired.sort_unstable();
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_owners_are_dropped_after_the_grace_only() {
        let t0 = Instant::now();
        let mut sweep = OwnerSweep::new(Duration::from_secs(5));
        let live: HashSet<_> = [1].into();
        assert!(sweep.sweep(&live, [1, 2], t0).is_empty());
        assert!(
            sweep
                .sweep(&live, [1, 2], t0 + Duration::from_secs(4))
                .is_empty()
        );
        assert_eq!(
            sweep.sweep(&live, [1, 2], t0 + Duration::from_secs(5)),
            vec![2]
        );
    }

    #[test]
    fn an_owner_that_comes_back_starts_over() {
        let t0 = Instant::now();
        let mut sweep = OwnerSweep::new(Duration::from_secs(5));
        assert!(sweep.sweep(&HashSet::new(), [2], t0).is_empty());
        assert!(
            sweep
                .sweep(&[2].into(), [2], t0 + Duration::from_secs(3))
                .is_empty()
        );
        assert!(
            sweep
                .sweep(&HashSet::new(), [2], t0 + Duration::from_secs(6))
                .is_empty()
        );
        assert_eq!(
            sweep.sweep(&HashSet::new(), [2], t0 + Duration::from_secs(11)),
            vec![2]
        );
    }

    #[test]
    fn zero_grace_drops_at_once() {
        let mut sweep = OwnerSweep::new(Duration::ZERO);
        assert_eq!(sweep.sweep(&HashSet::new(), [3], Instant::now()), vec![3]);
    }
}
