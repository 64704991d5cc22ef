//! How often one service is pushed to one connection.
//!
//! Every push costs the subscriber a wake-up, a packet and a copy of the path it changes however
//! few publishers it carries, so a service changing hundreds of times a second (a rollout) is
//! cheaper for everyone as fewer, larger pushes. [`Pacing`] allows `burst` pushes at once and then
//! one per window: a quiet service, or one changing a few times in a row (a put, then its health),
//! is pushed at once; a busy one at most once per window, each push carrying everything that
//! changed since the last, none waiting longer than the window.
//!
//! The window follows the client: [`LATENESS`] times how late it answers — its smoothed QUIC
//! round trip above the shortest one seen on the connection, less [`JITTER`] — never more than
//! `window`. A client that keeps up answers about as fast as ever, its window is nothing and
//! pacing costs it nothing, however often its services change; a client whose process is
//! saturated (decoding a rollout, say) acknowledges milliseconds late, and its pushes merge: the
//! further behind it falls, the fewer it gets, down to one per `window`.
//!
//! It is a token bucket kept as one instant per connection and service (the generic cell rate
//! algorithm): the moment the bucket would be full again.

use std::time::{Duration, Instant};

/// A paced window is this many times how late the client answers.
pub const LATENESS: u32 = 20;

/// How much later than its best a client may answer and still count as keeping up: round trips
/// vary this much on a busy host or a LAN without anyone falling behind.
pub const JITTER: Duration = Duration::from_millis(1);

/// Pushes of one service to one connection: up to `burst` at once, then one per window —
/// [`LATENESS`] times how late the client answers, at most `window`. A zero window pushes whenever
/// the connection's writer is free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    pub window: Duration,
    pub burst: u32,
}

impl Pacing {
    /// No pacing: every change is pushed as soon as the writer is free.
    pub const NONE: Pacing = Pacing {
        window: Duration::ZERO,
        burst: 1,
    };

    /// The pacing of a client that answers `late`: its smoothed round trip less its shortest.
    pub fn for_client_late_by(&self, late: Duration) -> Pacing {
        let behind = late.saturating_sub(JITTER);
        Pacing {
            window: self.window.min(behind.saturating_mul(LATENESS)),
            burst: self.burst,
        }
    }

    /// When a push may go, given the bucket's state `full_at` (`None`: never pushed); `None` if
    /// it may go `now`.
    pub fn held_until(&self, full_at: Option<Instant>, now: Instant) -> Option<Instant> {
        if self.window.is_zero() {
            return None;
        }
        let full_at = full_at?;
        // The bucket has room once it is no more than `burst - 1` windows from full.
        let slack = self.window * self.burst.saturating_sub(1);
        let free_at = full_at.checked_sub(slack).unwrap_or(now);
        (now < free_at).then_some(free_at)
    }

    /// The bucket's state after a push at `now`.
    pub fn pushed(&self, full_at: Option<Instant>, now: Instant) -> Option<Instant> {
        if self.window.is_zero() {
            return None;
        }
        Some(full_at.map_or(now, |f| f.max(now)) + self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Pushes `at` each offset (ms) as soon as the pacing allows; returns when each went out.
    fn run(pacing: Pacing, offsets: &[u64]) -> Vec<u64> {
        let start = Instant::now();
        let mut full_at = None;
        offsets
            .iter()
            .map(|ms| {
                let asked = start + MS * *ms as u32;
                let at = pacing.held_until(full_at, asked).unwrap_or(asked);
                full_at = pacing.pushed(full_at, at);
                (at - start).as_millis() as u64
            })
            .collect()
    }

    #[test]
    fn without_a_window_nothing_waits() {
        assert_eq!(run(Pacing::NONE, &[0, 0, 0, 1]), [0, 0, 0, 1]);
        assert_eq!(Pacing::NONE.pushed(None, Instant::now()), None);
    }

    #[test]
    fn a_burst_goes_at_once_and_then_one_per_window() {
        let pacing = Pacing {
            window: 50 * MS,
            burst: 2,
        };
        // Two at once, then the third waits for a window to pass since the first.
        assert_eq!(run(pacing, &[0, 1, 2]), [0, 1, 50]);
        // Sustained changes: one per window.
        assert_eq!(run(pacing, &[0, 0, 0, 0, 0]), [0, 0, 50, 100, 150]);
    }

    #[test]
    fn a_quiet_service_refills_its_burst() {
        let pacing = Pacing {
            window: 50 * MS,
            burst: 2,
        };
        assert_eq!(run(pacing, &[0, 1, 500, 501, 502]), [0, 1, 500, 501, 550]);
        // Changes spaced a window apart never wait, however long they go on.
        let spaced: Vec<u64> = (0..20).map(|i| i * 50).collect();
        assert_eq!(run(pacing, &spaced), spaced);
    }

    #[test]
    fn the_window_grows_with_how_late_the_client_answers_up_to_the_limit() {
        let pacing = Pacing {
            window: 100 * MS,
            burst: 2,
        };
        assert_eq!(
            pacing.for_client_late_by(Duration::ZERO).window,
            Duration::ZERO
        );
        let keeping_up = pacing.for_client_late_by(JITTER);
        assert_eq!(keeping_up.window, Duration::ZERO);
        assert_eq!(run(keeping_up, &[0, 0, 0, 0]), [0, 0, 0, 0]);
        // A client that has caught up is not held by what its lateness cost it before.
        let now = Instant::now();
        assert_eq!(keeping_up.held_until(Some(now + 80 * MS), now), None);
        let behind = pacing.for_client_late_by(JITTER + 2 * MS);
        assert_eq!((behind.window, behind.burst), (40 * MS, 2));
        assert_eq!(run(behind, &[0, 0, 0, 0]), [0, 0, 40, 80]);
        let far_behind = pacing.for_client_late_by(Duration::from_secs(1));
        assert_eq!(far_behind.window, 100 * MS);
        assert_eq!(Pacing::NONE.for_client_late_by(MS), Pacing::NONE);
    }

    #[test]
    fn a_burst_of_one_is_a_least_time_between_pushes() {
        let pacing = Pacing {
            window: 50 * MS,
            burst: 1,
        };
        assert_eq!(run(pacing, &[0, 10, 60, 200]), [0, 50, 100, 200]);
    }
}
