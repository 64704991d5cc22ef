//! The metrics catalogue is true: every metric in `METRICS` is exported by a running server of its
//! role, documented in docs/OPERATIONS.md, and the Grafana dashboard in deploy/ parses and names
//! only metrics the servers export.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use roster_common::admin::{METRICS, MetricKind};
use support::{http_get, roster, wait_for};

const START: Duration = Duration::from_secs(60);

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Metric names in Prometheus text, histogram series folded into their metric.
fn names_in(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_owned()
        })
        .collect()
}

/// Every `roster_*` metric named in the PromQL expressions of a Grafana dashboard.
fn dashboard_metrics(dashboard: &serde_json::Value, out: &mut BTreeSet<String>) {
    match dashboard {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                if key == "expr"
                    && let Some(expr) = value.as_str()
                {
                    let mut rest = expr;
                    while let Some(at) = rest.find("roster_") {
                        let tail = &rest[at..];
                        let end = tail
                            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .unwrap_or(tail.len());
                        let name = &tail[..end];
                        let name = ["_bucket", "_sum", "_count"]
                            .iter()
                            .find_map(|s| name.strip_suffix(s))
                            .unwrap_or(name);
                        out.insert(name.to_owned());
                        rest = &tail[end..];
                    }
                } else {
                    dashboard_metrics(value, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_metrics(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_is_exported_documented_and_the_dashboard_names_only_real_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let dev = roster("roster dev", cwd, &["dev"]);
    let mut admin: BTreeMap<String, String> = BTreeMap::new();
    let mut dns = None;
    loop {
        let line = dev.line_matching(START, "servers and ready", |l| l.starts_with("roster dev"));
        if line.contains("ready") {
            break;
        }
        // "roster dev: ROLE ID quic=… http=…"
        let role = line.split_whitespace().nth(2).unwrap().to_owned();
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .unwrap();
        admin.insert(role, http.to_owned());
        dns = dns.or(support::dns_addr(&line));
    }
    assert_eq!(admin.len(), 3, "{admin:?}");

    // A subscriber and two publishes, the second reaching it as a change, so the push path has
    // recorded something.
    let sub = roster("roster subscribe", cwd, &["subscribe", "demo"]);
    let _publisher = roster("roster publish", cwd, &["publish", "demo", "10.0.0.1:80"]);
    sub.line_matching(START, "the published address", |l| {
        l.contains("10.0.0.1:80")
    });
    let _second = roster("roster publish", cwd, &["publish", "demo", "10.0.0.2:80"]);
    sub.line_matching(START, "the second address", |l| l.contains("10.0.0.2:80"));
    // A persistent instance whose check probes the data server's own admin port, so the
    // health-check metrics have something to count and time.
    let (ok, _, err) = support::run(
        cwd,
        &[
            "register",
            "checked",
            &admin["data"],
            "--check",
            "tcp",
            "--interval",
            "200ms",
        ],
    );
    assert!(ok, "roster register: {err}");

    // A DNS query, so the DNS metrics have recorded something.
    let dns = dns.expect("roster dev serves DNS");
    let (code, answers) = support::dns_query(&dns, "demo.roster.", "SRV");
    assert_eq!((code.as_str(), answers), ("No Error", 2), "{dns}");

    let exported: BTreeMap<String, BTreeSet<String>> = admin
        .iter()
        .map(|(role, http)| {
            let text = wait_for(START, "metrics with every series", || {
                let (status, text) = http_get(&format!("{http}/metrics"))?;
                let names = names_in(&text);
                let complete = METRICS
                    .iter()
                    .filter(|m| m.role == role || m.role == "all")
                    .all(|m| names.contains(m.name));
                (status == 200 && complete).then_some(text)
            });
            (role.clone(), names_in(&text))
        })
        .collect();
    let all: BTreeSet<String> = exported.values().flatten().cloned().collect();
    for m in METRICS {
        if m.kind == MetricKind::Histogram {
            assert!(
                m.name.ends_with("_seconds"),
                "{} has its unit in its name",
                m.name
            );
        }
        if m.kind == MetricKind::Counter {
            assert!(m.name.ends_with("_total"), "{} ends in _total", m.name);
        }
    }
    assert!(
        all.iter().all(|n| METRICS.iter().any(|m| m.name == n)),
        "every exported roster metric is in the catalogue: {:?}",
        all.iter()
            .filter(|n| !METRICS.iter().any(|m| m.name == *n))
            .collect::<Vec<_>>()
    );

    let operations = std::fs::read_to_string(repo_file("docs/OPERATIONS.md")).unwrap();
    for m in METRICS {
        assert!(
            operations.contains(&format!("`{}`", m.name)),
            "docs/OPERATIONS.md documents {}",
            m.name
        );
    }

    let dashboards: Vec<_> = std::fs::read_dir(repo_file("deploy/grafana"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert!(!dashboards.is_empty(), "deploy/grafana holds a dashboard");
    for path in dashboards {
        let text = std::fs::read_to_string(&path).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        assert!(
            dashboard["panels"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        );
        let mut used = BTreeSet::new();
        dashboard_metrics(&dashboard, &mut used);
        assert!(used.len() >= 10, "{} uses {used:?}", path.display());
        let unknown: Vec<_> = used.iter().filter(|n| !all.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{} names metrics no server exports: {unknown:?}",
            path.display()
        );
    }
}
