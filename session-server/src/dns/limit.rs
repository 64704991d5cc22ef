//! Queries per second per source address: a token bucket per address, holding one second's
//! worth of queries, so a short burst up to the rate passes and a steady flood is held to it.
//!
//! Plain data, time passed in. The table is bounded ([`MAX_SOURCES`]): when it is full, the
//! buckets that have refilled (their sources quiet for a second or more) are forgotten; if every
//! source is still busy, a new one is let through untracked rather than refused, so a flood of
//! spoofed addresses cannot lock real clients out, only go unlimited — the global bound is the
//! server's own capacity.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Source addresses tracked at most.
pub const MAX_SOURCES: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The per-source limit of one DNS server.
#[derive(Debug)]
pub struct Limiter {
    /// Queries per second per source; 0 is no limit.
    rate: u32,
    sources: HashMap<IpAddr, Bucket>,
}

impl Limiter {
    pub fn new(rate: u32) -> Self {
        Limiter {
            rate,
            sources: HashMap::new(),
        }
    }

    /// Whether a query from `source` at `now` is within its limit (and counts it if so).
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let rate = f64::from(self.rate);
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_SOURCES {
            self.forget_refilled(now);
            if self.sources.len() >= MAX_SOURCES {
                return true;
            }
        }
        let bucket = self.sources.entry(source).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets the sources whose buckets are full again.
    fn forget_refilled(&mut self, now: Instant) {
        let rate = f64::from(self.rate);
        self.sources.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < rate
        });
    }

    /// Sources tracked.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn a_source_gets_its_rate_and_others_are_not_held_back() {
        let mut limiter = Limiter::new(100);
        let t0 = Instant::now();
        let passed = (0..150).filter(|_| limiter.allow(ip(1), t0)).count();
        assert_eq!(passed, 100, "a burst of one second's worth");
        assert!(
            limiter.allow(ip(2), t0),
            "another source has its own bucket"
        );
        // Half a second refills half the bucket.
        let t1 = t0 + Duration::from_millis(500);
        let passed = (0..150).filter(|_| limiter.allow(ip(1), t1)).count();
        assert_eq!(passed, 50);
        // A steady 200/s from one source is held to 100/s.
        let mut passed = 0;
        for i in 0..2_000u64 {
            let at = t1 + Duration::from_micros(5_000 * i);
            passed += usize::from(limiter.allow(ip(1), at));
        }
        assert!(
            (995..=1_001).contains(&passed),
            "{passed} of 2,000 over 10 s"
        );
    }

    #[test]
    fn zero_is_no_limit() {
        let mut limiter = Limiter::new(0);
        let now = Instant::now();
        assert!((0..100_000).all(|_| limiter.allow(ip(1), now)));
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut limiter = Limiter::new(10);
        let t0 = Instant::now();
        for n in 0..MAX_SOURCES as u32 {
            assert!(limiter.allow(ip(n), t0));
        }
        // Full of busy sources: a new one passes untracked.
        assert!(limiter.allow(ip(u32::MAX), t0));
        assert_eq!(limiter.tracked(), MAX_SOURCES);
        // A second later every bucket has refilled and is forgotten to make room.
        let t1 = t0 + Duration::from_secs(1);
        assert!(limiter.allow(ip(u32::MAX), t1));
        assert_eq!(limiter.tracked(), 1);
    }
}
