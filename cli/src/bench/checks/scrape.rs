//! What the data servers report about their probes: scraped from /metrics, and the quantiles
//! drawn from it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::dev::LocalCluster;
use crate::files::TARGETS_FILE;

use super::listeners::GAP_BUCKET_MS;

/// The data servers' admin addresses, from the cluster's targets.json.
pub(super) fn data_admins(cluster: &LocalCluster) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(cluster.dir.join(TARGETS_FILE))?;
    let targets: Value = serde_json::from_str(&text)?;
    Ok(targets
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["labels"]["role"] == "data")
        .filter_map(|t| t["targets"][0].as_str().map(str::to_owned))
        .collect())
}

/// What the data servers' /metrics say, summed over them.
#[derive(Default)]
pub(super) struct Scrape {
    /// The probe-duration histogram's cumulative bucket counts, by upper bound in microseconds
    /// (`u64::MAX`: `+Inf`).
    pub(super) buckets: BTreeMap<u64, f64>,
    pub(super) duration_sum: f64,
    pub(super) duration_count: f64,
    /// Probes by result (`success`, `failure`).
    pub(super) checks: BTreeMap<String, f64>,
    /// Failed probes by reason.
    pub(super) failures: BTreeMap<String, f64>,
    pub(super) unhealthy: f64,
    pub(super) persistent: f64,
    /// Probes run by each data server, in the order asked (`None`: it did not answer).
    pub(super) per_server: Vec<Option<f64>>,
    /// Slots each data server leads, in the order asked.
    pub(super) led: Vec<Option<f64>>,
    /// Data servers that answered.
    pub(super) answered: usize,
}

/// The value of label `name` in `labels` (what is between a series' braces).
pub(super) fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels
        .split(&format!("{name}=\""))
        .nth(1)
        .and_then(|l| l.split('"').next())
}

pub(super) async fn scrape(admins: &[String]) -> Scrape {
    let mut s = Scrape::default();
    for admin in admins {
        let url = format!("http://{admin}/metrics");
        let Ok(Ok(text)) = tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
        })
        .await
        else {
            s.per_server.push(None);
            s.led.push(None);
            continue;
        };
        s.answered += 1;
        let (mut probed, mut led) = (0.0, 0.0);
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            match name {
                "roster_health_check_duration_seconds_bucket" => {
                    let Some(le) = label(labels, "le") else {
                        continue;
                    };
                    let bound = le
                        .parse::<f64>()
                        .map_or(u64::MAX, |s| (s * 1e6).round() as u64);
                    *s.buckets.entry(bound).or_default() += value;
                }
                "roster_health_check_duration_seconds_sum" => s.duration_sum += value,
                "roster_health_check_duration_seconds_count" => s.duration_count += value,
                "roster_health_checks_total" => {
                    let result = label(labels, "result").unwrap_or("?").to_owned();
                    *s.checks.entry(result).or_default() += value;
                    probed += value;
                }
                "roster_health_check_failures_total" => {
                    let reason = label(labels, "reason").unwrap_or("?").to_owned();
                    *s.failures.entry(reason).or_default() += value;
                }
                "roster_data_checked_instances" if label(labels, "health") == Some("unhealthy") => {
                    s.unhealthy += value
                }
                "roster_data_persistent_instances" => s.persistent += value,
                "roster_data_slots" if label(labels, "state") == Some("leading") => led += value,
                _ => {}
            }
        }
        s.per_server.push(Some(probed));
        s.led.push(Some(led));
    }
    s
}

/// `after - before`, key by key.
pub(super) fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// The `q` quantile, in milliseconds, of what was observed between two scrapes of a cumulative
/// histogram, interpolated linearly inside the bucket it falls in (`None`: nothing observed).
pub(super) fn quantile_ms(
    before: &BTreeMap<u64, f64>,
    after: &BTreeMap<u64, f64>,
    q: f64,
) -> Option<f64> {
    let delta: Vec<(u64, f64)> = after
        .iter()
        .map(|(le, n)| (*le, n - before.get(le).copied().unwrap_or(0.0)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0u64, 0.0);
    for (le, cumulative) in delta {
        if cumulative >= rank && cumulative > below {
            if le == u64::MAX {
                // Beyond the last bound: all that is known is that it is above it.
                return Some(lower as f64 / 1000.0);
            }
            let within = (rank - below) / (cumulative - below);
            return Some((lower as f64 + (le - lower) as f64 * within) / 1000.0);
        }
        (lower, below) = (le, cumulative);
    }
    None
}

/// The `q` quantile of the gaps counted between two tallies, in milliseconds (the upper bound of
/// its [`GAP_BUCKET_MS`] bucket), and the longest.
pub(super) fn gap_quantiles(
    before: &[u64],
    after: &[u64],
    qs: &[f64],
) -> (Vec<Option<u64>>, Option<u64>) {
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = delta.iter().sum();
    let bound = |i: usize| (i as u64 + 1) * GAP_BUCKET_MS;
    let longest = delta.iter().rposition(|n| *n > 0).map(bound);
    let quantiles = qs
        .iter()
        .map(|q| {
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            delta.iter().position(|n| {
                seen += n;
                total > 0 && seen >= rank
            })
        })
        .map(|i| i.map(bound))
        .collect();
    (quantiles, longest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::checks::round3;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let before = BTreeMap::from([(100, 0.0), (250, 0.0), (500, 0.0), (u64::MAX, 0.0)]);
        // 50 observations up to 100 µs, 50 more between 100 and 250 µs.
        let after = BTreeMap::from([(100, 50.0), (250, 100.0), (500, 100.0), (u64::MAX, 100.0)]);
        let q = |q| quantile_ms(&before, &after, q).map(round3);
        assert_eq!(q(0.5), Some(0.1));
        assert_eq!(q(0.75), Some(0.175));
        assert_eq!(q(0.99), Some(0.247));
        assert_eq!(quantile_ms(&after, &after, 0.5), None);
    }

    #[test]
    fn gaps_by_bucket() {
        let before = vec![0; 10];
        let mut after = vec![0; 10];
        after[4] = 99;
        after[7] = 1;
        let (q, max) = gap_quantiles(&before, &after, &[0.5, 0.99, 1.0]);
        assert_eq!(q, vec![Some(50), Some(50), Some(80)]);
        assert_eq!(max, Some(80));
        assert_eq!(gap_quantiles(&before, &before, &[0.5]), (vec![None], None));
    }
}
