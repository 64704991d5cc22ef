//! Health checks as the wire carries them: what to probe and how often ([`CheckSpec`]), what the
//! last probes found ([`Health`]), and which publishers a healthy-only subscriber is shown
//! ([`healthy_view`]).
//!
//! A check is run by the data server that leads the instance's slot (`docs/ARCHITECTURE.md`,
//! *Persistent instances and health checks*); these types only describe it.

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Bounds on a check's settings, refused outside them with `InvalidArgument`.
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
pub const MIN_TIMEOUT_MS: u64 = 10;
pub const MAX_THRESHOLD: u32 = 100;
/// Longest check target accepted.
pub const MAX_TARGET_LEN: usize = 1024;
/// Longest failure reason carried in a [`Health`] (longer ones are cut).
pub const MAX_REASON_LEN: usize = 256;

/// The share of a service's instances that may be unhealthy before a healthy-only subscriber is
/// given all of them, marked (see [`healthy_view`]).
pub const DEFAULT_PROTECTION_THRESHOLD: f64 = 0.5;

/// How to check an instance.
///
/// `target` is one of:
/// - `tcp`: connect over TCP to the instance's first data item, which must be `HOST:PORT`;
/// - `tcp://HOST:PORT`: connect to that address;
/// - `http://HOST:PORT/PATH`: `GET` it; a 2xx or 3xx status is a success.
///
/// A probe that has not succeeded within `timeout_ms` has failed. After `fall` failures in a row a
/// healthy instance becomes unhealthy; after `rise` successes in a row an unhealthy one becomes
/// healthy again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckSpec {
    pub target: String,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval_ms() -> u64 {
    5_000
}
fn default_timeout_ms() -> u64 {
    1_000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl CheckSpec {
    /// A check of `target` with the default interval (5 s), timeout (1 s), rise (2) and fall (3).
    pub fn new(target: impl Into<String>) -> Self {
        CheckSpec {
            target: target.into(),
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }

    /// Refuses settings out of bounds and targets that are not one of the three forms. `data` is
    /// the instance's data, which a bare `tcp` target takes its address from.
    pub fn validate(&self, data: &[bytes::Bytes]) -> Result<(), Error> {
        let bad = |why: String| Error::InvalidArgument(format!("check: {why}"));
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(bad(format!(
                "interval {} ms is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS} ms",
                self.interval_ms
            )));
        }
        if self.timeout_ms < MIN_TIMEOUT_MS || self.timeout_ms > self.interval_ms {
            return Err(bad(format!(
                "timeout {} ms must be at least {MIN_TIMEOUT_MS} ms and at most the interval ({} ms)",
                self.timeout_ms, self.interval_ms
            )));
        }
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=MAX_THRESHOLD).contains(&value) {
                return Err(bad(format!(
                    "{name} {value} is outside 1..={MAX_THRESHOLD}"
                )));
            }
        }
        self.probe(data).map(|_| ())
    }

    /// What to probe, resolved against the instance's data.
    pub fn probe(&self, data: &[bytes::Bytes]) -> Result<Probe, Error> {
        let bad = |why: String| Error::InvalidArgument(format!("check {:?}: {why}", self.target));
        if self.target.len() > MAX_TARGET_LEN {
            return Err(bad(format!("longer than {MAX_TARGET_LEN} bytes")));
        }
        if self
            .target
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad("must not contain spaces or control characters".into()));
        }
        if self.target == "tcp" {
            let first = data
                .first()
                .ok_or_else(|| bad("a bare `tcp` check needs a data item HOST:PORT".into()))?;
            let addr = std::str::from_utf8(first)
                .map_err(|_| bad("the first data item is not text".into()))?;
            return host_port(addr)
                .map(|_| Probe::Tcp(addr.to_owned()))
                .map_err(|why| bad(format!("first data item {addr:?}: {why}")));
        }
        if let Some(addr) = self.target.strip_prefix("tcp://") {
            return host_port(addr)
                .map(|_| Probe::Tcp(addr.to_owned()))
                .map_err(bad);
        }
        if let Some(rest) = self.target.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(at) => (&rest[..at], &rest[at..]),
                None => (rest, "/"),
            };
            host_port(authority).map_err(&bad)?;
            return Ok(Probe::Http {
                authority: authority.to_owned(),
                path: path.to_owned(),
            });
        }
        Err(bad(
            "expected `tcp`, `tcp://HOST:PORT` or `http://HOST:PORT/PATH`".into(),
        ))
    }
}

/// Checks that `addr` is `HOST:PORT` with a non-empty host and a port number.
fn host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
    if host.is_empty() || host.contains('/') || host.contains('@') {
        return Err(format!("{addr:?} has no usable host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{addr:?} has no valid port")),
    }
}

/// A resolved check target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Connect to `HOST:PORT`.
    Tcp(String),
    /// `GET path` from `authority` (`HOST:PORT`).
    Http { authority: String, path: String },
}

/// What the checks of an instance have found so far.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    /// When the probe that settled the current verdict finished (Unix milliseconds): the first
    /// probe, or the one that changed the verdict; 0 before the first one. Probes that confirm
    /// the verdict are not recorded.
    #[serde(default)]
    pub checked_ms: u64,
    /// Why that probe failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl Health {
    /// The health of an instance whose check has not run yet: healthy until `fall` probes in a
    /// row say otherwise, so that registering or restarting never empties a service.
    pub fn unchecked() -> Self {
        Health {
            healthy: true,
            checked_ms: 0,
            failure: None,
        }
    }
}

/// Cuts a failure reason to [`MAX_REASON_LEN`] bytes at a character boundary.
pub fn short_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_LEN {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Which of a service's publishers a healthy-only subscriber is shown, given each one's health
/// (`None`: not checked, which counts as healthy). When more than `threshold` (a share, 0.0–1.0)
/// of them are unhealthy every publisher is shown, marked, rather than the few healthy ones that
/// would then take all the traffic: a checker cut off from the network must not empty a service.
/// Returns whether the protection applies, and the indices shown.
pub fn healthy_view<'a>(
    health: impl ExactSizeIterator<Item = Option<&'a Health>> + Clone,
    threshold: f64,
) -> (bool, Vec<usize>) {
    let total = health.len();
    let unhealthy = health
        .clone()
        .filter(|h| h.is_some_and(|h| !h.healthy))
        .count();
    if total > 0 && unhealthy as f64 > threshold * total as f64 {
        return (true, (0..total).collect());
    }
    let shown = health
        .enumerate()
        .filter(|(_, h)| h.is_none_or(|h| h.healthy))
        .map(|(i, _)| i)
        .collect();
    (false, shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn healthy(yes: bool) -> Health {
        Health {
            healthy: yes,
            checked_ms: 1,
            failure: (!yes).then(|| "refused".into()),
        }
    }

    #[test]
    fn targets_resolve_against_the_data() {
        let data = [Bytes::from_static(b"10.0.0.1:8080")];
        assert_eq!(
            CheckSpec::new("tcp").probe(&data).unwrap(),
            Probe::Tcp("10.0.0.1:8080".into())
        );
        assert_eq!(
            CheckSpec::new("tcp://db:5432").probe(&[]).unwrap(),
            Probe::Tcp("db:5432".into())
        );
        assert_eq!(
            CheckSpec::new("http://127.0.0.1:9/health?x=1")
                .probe(&[])
                .unwrap(),
            Probe::Http {
                authority: "127.0.0.1:9".into(),
                path: "/health?x=1".into()
            }
        );
        assert_eq!(
            CheckSpec::new("http://[::1]:80").probe(&[]).unwrap(),
            Probe::Http {
                authority: "[::1]:80".into(),
                path: "/".into()
            }
        );
    }

    #[test]
    fn bad_checks_are_refused_with_a_reason() {
        let data = [Bytes::from_static(b"not-an-address")];
        for (spec, why) in [
            (CheckSpec::new("tcp"), "HOST:PORT"),
            (CheckSpec::new("udp://x:1"), "expected"),
            (CheckSpec::new("http://:80/"), "no usable host"),
            (CheckSpec::new("tcp://x:0"), "no valid port"),
            (CheckSpec::new("http://a b:1/"), "spaces"),
            (
                CheckSpec {
                    interval_ms: 10,
                    ..CheckSpec::new("tcp://x:1")
                },
                "interval",
            ),
            (
                CheckSpec {
                    timeout_ms: 6_000,
                    ..CheckSpec::new("tcp://x:1")
                },
                "timeout",
            ),
            (
                CheckSpec {
                    fall: 0,
                    ..CheckSpec::new("tcp://x:1")
                },
                "fall",
            ),
        ] {
            let err = spec.validate(&data).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(why), "{err} should say {why}");
        }
        assert!(CheckSpec::new("tcp").validate(&[]).is_err());
    }

    #[test]
    fn healthy_only_hides_the_unhealthy_until_too_many_are() {
        let all: Vec<Option<Health>> = vec![
            Some(healthy(true)),
            Some(healthy(false)),
            None,
            Some(healthy(true)),
        ];
        let (protected, shown) = healthy_view(all.iter().map(Option::as_ref), 0.5);
        assert!(!protected);
        assert_eq!(shown, [0, 2, 3]);

        // 8 of 10 unhealthy: above half, so all 10 are shown.
        let many: Vec<Option<Health>> = (0..10).map(|i| Some(healthy(i < 2))).collect();
        let (protected, shown) = healthy_view(many.iter().map(Option::as_ref), 0.5);
        assert!(protected);
        assert_eq!(shown.len(), 10);

        // Exactly half is not more than half.
        let half: Vec<Option<Health>> = (0..4).map(|i| Some(healthy(i < 2))).collect();
        let (protected, shown) = healthy_view(half.iter().map(Option::as_ref), 0.5);
        assert!(!protected);
        assert_eq!(shown, [0, 1]);

        let (protected, shown) = healthy_view(std::iter::empty::<Option<&Health>>(), 0.5);
        assert!(!protected && shown.is_empty());
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(300);
        let cut = short_reason(&long);
        assert!(cut.len() <= MAX_REASON_LEN);
        assert!(long.starts_with(&cut));
    }

    #[test]
    fn a_check_from_another_client_fills_in_defaults() {
        let minimal =
            rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("target", "tcp")]))
                .unwrap();
        let spec: CheckSpec = rmp_serde::from_slice(&minimal).unwrap();
        assert_eq!(spec, CheckSpec::new("tcp"));
    }
}
