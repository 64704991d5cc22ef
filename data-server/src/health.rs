//! Health checks, the bookkeeping: how probe results turn into an instance's health.
//!
//! The leader of a slot checks every record in it that carries a check (persistent instances, and
//! ephemeral ones published with `Publish.check`): it probes each one every `interval_ms`
//! (`crate::probe` does the I/O, `crate::checker` the scheduling), and feeds each result to the
//! record's [`Tracker`]. The tracker applies the check's hysteresis: a healthy instance becomes
//! unhealthy after `fall` failures in a row, an unhealthy one healthy again after `rise`
//! successes in a row. It reports a new [`Health`] only on such a transition, and once for the
//! first result, so the record's `checked_ms` says it has been looked at; the leader writes only
//! those, as ordinary changes of the record, and every probe in between costs no write, no
//! replication and no push.
//!
//! A tracker starts from the health the record carries: a new record's is
//! [`Health::unchecked`] (healthy), so registering or restarting never empties a service, and a
//! new slot leader carries on from what the previous one recorded rather than from scratch.
//!
//! Caveats: the counts of a streak are not kept across leaders, so a takeover restarts a streak
//! (an instance failing 2 of `fall` = 3 when its slot moves needs 3 more failures); `checked_ms`
//! is the time of the last written result, not of the last probe.

use roster_common::health::{CheckSpec, Health, short_reason};

/// Why a probe failed, as `roster_health_check_failures_total` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The address answered with a refusal (nothing listens there).
    Refused,
    /// No answer within the check's `timeout_ms`.
    Timeout,
    /// An HTTP check got a status other than 2xx or 3xx.
    HttpStatus,
    /// The host name resolved to no address.
    Resolve,
    /// Anything else: unreachable network, a reset, a malformed response.
    Other,
}

impl FailureKind {
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Refused,
        FailureKind::Timeout,
        FailureKind::HttpStatus,
        FailureKind::Resolve,
        FailureKind::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Timeout => "timeout",
            FailureKind::HttpStatus => "http_status",
            FailureKind::Resolve => "resolve",
            FailureKind::Other => "other",
        }
    }
}

/// A failed probe: its kind, and the reason an operator reads in the record's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeFailure {
    pub kind: FailureKind,
    pub reason: String,
}

impl ProbeFailure {
    pub fn new(kind: FailureKind, reason: impl AsRef<str>) -> Self {
        ProbeFailure {
            kind,
            reason: short_reason(reason.as_ref()),
        }
    }
}

/// The rise/fall bookkeeping of one checked record. No I/O, no clock: results come in with the
/// wall-clock time they finished at, which only goes into the reported health.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    healthy: bool,
    /// Successes, or failures, in a row (the other is 0).
    successes: u32,
    failures: u32,
    /// Whether the record already carries a checked health (`checked_ms` set).
    reported: bool,
}

impl Tracker {
    /// A tracker for `check`, starting from the health the record carries (`None`: unchecked).
    pub fn new(check: &CheckSpec, recorded: Option<&Health>) -> Self {
        let recorded = recorded.cloned().unwrap_or_else(Health::unchecked);
        Tracker {
            rise: check.rise.max(1),
            fall: check.fall.max(1),
            healthy: recorded.healthy,
            successes: 0,
            failures: 0,
            reported: recorded.checked_ms != 0,
        }
    }

    /// Whether the instance counts as healthy now.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Takes one probe result (`reason` says why a failed one failed) finished at `now_ms` (Unix
    /// milliseconds). Returns the health to record when it changed, or when this is the first
    /// result the record gets; `None` otherwise.
    pub fn on_result(&mut self, ok: bool, reason: Option<String>, now_ms: u64) -> Option<Health> {
        let was = self.healthy;
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.healthy && self.successes >= self.rise {
                self.healthy = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.healthy && self.failures >= self.fall {
                self.healthy = false;
            }
        }
        if self.healthy == was && self.reported {
            return None;
        }
        self.reported = true;
        let failure = match ok {
            true => None,
            false => Some(short_reason(reason.as_deref().unwrap_or("probe failed"))),
        };
        Some(Health {
            healthy: self.healthy,
            checked_ms: now_ms,
            failure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rise: u32, fall: u32) -> CheckSpec {
        CheckSpec {
            rise,
            fall,
            ..CheckSpec::new("tcp://127.0.0.1:1")
        }
    }

    fn fail(t: &mut Tracker, now_ms: u64) -> Option<Health> {
        t.on_result(false, Some("connection refused".into()), now_ms)
    }

    #[test]
    fn the_first_result_is_reported_even_without_a_transition() {
        let mut t = Tracker::new(&check(2, 3), None);
        assert_eq!(
            t.on_result(true, None, 10),
            Some(Health {
                healthy: true,
                checked_ms: 10,
                failure: None
            })
        );
        assert_eq!(t.on_result(true, None, 20), None, "nothing changed");

        // A first result that fails, below `fall`: still healthy, and says why it failed.
        let mut t = Tracker::new(&check(2, 3), Some(&Health::unchecked()));
        let first = fail(&mut t, 10).unwrap();
        assert!(first.healthy);
        assert_eq!(first.failure.as_deref(), Some("connection refused"));
    }

    #[test]
    fn falls_after_fall_failures_in_a_row_and_rises_after_rise_successes() {
        let mut t = Tracker::new(&check(2, 3), None);
        assert!(t.on_result(true, None, 1).is_some());
        assert_eq!(fail(&mut t, 2), None);
        assert_eq!(fail(&mut t, 3), None);
        // A success in between starts the count of failures over.
        assert_eq!(t.on_result(true, None, 4), None);
        assert_eq!(fail(&mut t, 5), None);
        assert_eq!(fail(&mut t, 6), None);
        assert_eq!(
            fail(&mut t, 7),
            Some(Health {
                healthy: false,
                checked_ms: 7,
                failure: Some("connection refused".into())
            })
        );
        assert!(!t.healthy());
        assert_eq!(fail(&mut t, 8), None, "still down: nothing to write");
        assert_eq!(t.on_result(true, None, 9), None, "one success of two");
        assert_eq!(fail(&mut t, 10), None);
        assert_eq!(t.on_result(true, None, 11), None);
        assert_eq!(
            t.on_result(true, None, 12),
            Some(Health {
                healthy: true,
                checked_ms: 12,
                failure: None
            })
        );
    }

    #[test]
    fn a_tracker_carries_on_from_the_recorded_health() {
        let down = Health {
            healthy: false,
            checked_ms: 5,
            failure: Some("HTTP 500".into()),
        };
        let mut t = Tracker::new(&check(1, 1), Some(&down));
        assert!(!t.healthy());
        assert_eq!(
            t.on_result(false, Some("HTTP 503".into()), 6),
            None,
            "already reported unhealthy: no write"
        );
        let up = t.on_result(true, None, 7).unwrap();
        assert!(up.healthy && up.failure.is_none());
        let down = t.on_result(false, None, 8).unwrap();
        assert_eq!(down.failure.as_deref(), Some("probe failed"));
    }

    #[test]
    fn reasons_are_cut_short() {
        let mut t = Tracker::new(&check(1, 1), None);
        let health = t.on_result(false, Some("x".repeat(1000)), 1).unwrap();
        assert_eq!(
            health.failure.unwrap().len(),
            roster_common::health::MAX_REASON_LEN
        );
        let failure = ProbeFailure::new(FailureKind::Other, "y".repeat(1000));
        assert_eq!(failure.reason.len(), roster_common::health::MAX_REASON_LEN);
    }
}
