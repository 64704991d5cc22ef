//! Telling a dead session server from a busy client.
//!
//! A session server killed outright sends nothing more; QUIC's idle timeout would notice after
//! seconds. The SDK notices sooner: keep-alives go out every `keep_alive_ms` and the server
//! acknowledges them, so a connection that has received no datagram for `dead_after_ms` is taken
//! for dead and the client moves to another server.
//!
//! Silence only counts while this process was there to hear it. [`Liveness`] is told, at each of
//! its ticks, how many datagrams the connection has received so far; a tick that comes late (the
//! process, or the machine, was too busy to run the check) restarts the clock instead of counting
//! the gap as the server's silence. So a busy client never leaves a healthy server, and a dead
//! server is still noticed `dead_after_ms` after the client is running normally again.

use std::time::{Duration, Instant};

/// The watchdog of one connection. Plain data: time is passed in.
#[derive(Debug)]
pub(crate) struct Liveness {
    dead_after: Duration,
    /// The interval at which [`Liveness::observe`] is meant to be called.
    tick: Duration,
    /// The datagram count last seen to change, and since when it has stood still.
    heard: Option<(u64, Instant)>,
    last_tick: Option<Instant>,
}

impl Liveness {
    pub fn new(dead_after: Duration, tick: Duration) -> Self {
        Liveness {
            dead_after,
            tick,
            heard: None,
            last_tick: None,
        }
    }

    /// Whether this tick is more than a few intervals after the previous one.
    fn late(&self, now: Instant) -> bool {
        self.last_tick
            .is_some_and(|t| now.saturating_duration_since(t) > self.tick * 3)
    }

    /// One tick: `received` is the connection's datagram count now. True when the server has been
    /// silent for `dead_after` of this process's own running time.
    pub fn observe(&mut self, now: Instant, received: u64) -> bool {
        let late = self.late(now);
        self.last_tick = Some(now);
        match self.heard {
            Some((count, since)) if count == received && !late => {
                now.saturating_duration_since(since) >= self.dead_after
            }
            _ => {
                self.heard = Some((received, now));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn run(liveness: &mut Liveness, start: Instant, ticks: &[(u64, u64)]) -> Vec<bool> {
        ticks
            .iter()
            .map(|(ms, count)| liveness.observe(start + Duration::from_millis(*ms), *count))
            .collect()
    }

    #[test]
    fn a_silent_server_is_dead_after_the_limit() {
        let start = Instant::now();
        let mut l = Liveness::new(Duration::from_millis(300), TICK);
        let verdicts = run(
            &mut l,
            start,
            &[(0, 5), (100, 6), (200, 6), (300, 6), (400, 6), (500, 6)],
        );
        assert_eq!(verdicts, [false, false, false, false, true, true]);
    }

    #[test]
    fn anything_heard_restarts_the_clock() {
        let start = Instant::now();
        let mut l = Liveness::new(Duration::from_millis(300), TICK);
        let verdicts = run(
            &mut l,
            start,
            &[
                (0, 1),
                (100, 1),
                (200, 1),
                (300, 2),
                (400, 2),
                (500, 2),
                (600, 2),
            ],
        );
        assert_eq!(verdicts, [false, false, false, false, false, false, true]);
    }

    #[test]
    fn a_busy_process_does_not_blame_the_server() {
        let start = Instant::now();
        let mut l = Liveness::new(Duration::from_millis(300), TICK);
        // The process did not run the check for 5 s: the datagrams of that time were not even
        // read. That is not the server's silence.
        let verdicts = run(&mut l, start, &[(0, 1), (100, 1), (5100, 1), (5200, 1)]);
        assert_eq!(verdicts, [false, false, false, false]);
        // But once it runs normally again, a server that stays silent is found dead in time.
        let verdicts = run(&mut l, start, &[(5300, 1), (5400, 1)]);
        assert_eq!(verdicts, [false, true]);
    }
}
