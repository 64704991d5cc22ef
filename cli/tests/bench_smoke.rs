//! `roster bench --target roster --json` at a tiny scale: one JSON object on stdout with every
//! parameter and figure, and sane figures — every notification expected was seen.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::run_within;

#[test]
fn bench_prints_every_figure_and_sees_every_notification() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run_within(
        dir.path(),
        &[
            "bench",
            "--target",
            "roster",
            "--json",
            "--services",
            "4",
            "--instances-per-service",
            "5",
            "--connections",
            "2",
            "--subscribers",
            "3",
            "--watch-services",
            "2",
            "--rate",
            "40",
            "--duration",
            "1",
            "--failure-instances",
            "3",
        ],
        Duration::from_secs(120),
    );
    assert!(ok, "bench failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints one line: {out}");
    let r: Value = serde_json::from_str(lines[0]).expect("one JSON object");

    assert_eq!(r["target"], "roster 1/1/1");
    let p = &r["parameters"];
    for (key, value) in [
        ("services", 4),
        ("instances_per_service", 5),
        ("instances", 20),
        ("connections", 2),
        ("subscribers", 3),
        ("watch_services", 2),
        ("rate", 40),
        ("duration_seconds", 1),
        ("failure_instances", 3),
    ] {
        assert_eq!(p[key], value, "parameter {key}");
    }

    assert_eq!(r["initial_load"]["instances"], 20);
    assert!(r["initial_load"]["per_second"].as_f64().unwrap() > 0.0);

    let s = &r["subscribe"];
    assert_eq!(s["notifications_expected"], 6);
    assert_eq!(s["notifications_seen"], s["notifications_expected"]);
    assert!(s["convergence_seconds"].as_f64().unwrap() > 0.0);

    let c = &r["churn"];
    assert_eq!(c["changes"], 40);
    assert_eq!(c["errors"], 0);
    // Each service is watched by the subscribers whose window covers it: 3 × 2 of 4 services.
    assert_eq!(c["notifications_expected"], 40 * 3 * 2 / 4);
    assert_eq!(c["notifications_seen"], c["notifications_expected"]);
    let (p50, p99, max) = (
        c["latency_ms"]["p50"].as_f64().unwrap(),
        c["latency_ms"]["p99"].as_f64().unwrap(),
        c["latency_ms"]["max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{c}");
    assert!(
        max < 10_000.0,
        "a change reached its subscribers within 10 s: {c}"
    );

    let f = &r["failure"];
    assert_eq!(f["instances"], 3);
    assert_eq!(f["notifications_seen"], f["notifications_expected"]);
    let detect = f["detect_seconds"].as_f64().unwrap();
    assert!(detect > 0.0 && detect < 30.0, "{f}");

    let servers = r["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 3, "meta, data, session");
    for server in servers {
        assert!(server["rss_kib"].as_u64().unwrap() > 1000, "{server}");
        assert!(server["cpu_seconds"].as_f64().unwrap() > 0.0, "{server}");
    }
    assert!(r["server_bytes_per_instance"].as_f64().unwrap() > 0.0);
}
