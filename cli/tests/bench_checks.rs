//! `roster bench --checks` at a tiny scale over two data servers: every instance is probed by
//! exactly one of them, the probes spread over the HTTP servers, none fails, and after a full
//! restart a new subscriber sees every instance again with its health checked after the restart.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::run_within;

#[test]
fn health_checks_spread_and_every_instance_is_checked_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run_within(
        dir.path(),
        &[
            "bench",
            "--checks",
            "50",
            "--check-interval-ms",
            "200",
            "--duration",
            "2",
            "--cluster",
            "1/2/1",
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert!(ok, "bench --checks failed: {err}");
    let r: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(r["target"], "roster 1/2/1");

    let first = &r["first_checks"];
    assert_eq!(first["not_probed"], 0, "{r}");
    assert_eq!(first["health_seen"], 50, "{r}");

    let s = &r["steady"];
    assert_eq!(s["stray_requests"], 0, "{r}");
    assert_eq!(s["data_servers_scraped"], 2, "{r}");
    let per_server = s["per_http_server_per_second"].as_array().unwrap();
    assert_eq!(per_server.len(), 8);
    assert!(per_server.iter().all(|p| p.as_u64() > Some(0)), "{r}");
    assert_eq!(s["per_data_server_per_second"].as_array().unwrap().len(), 2);
    // Each instance every 200 ms for about 2 s: some 10 probes; twice that would mean two data
    // servers probing it.
    let i = &s["per_instance_probes"];
    let expected = i["expected"].as_f64().unwrap();
    assert_eq!(i["none"], 0, "{r}");
    assert!(
        (i["max"].as_f64().unwrap()) < 1.5 * expected,
        "an instance probed more often than its interval: {r}"
    );
    assert_eq!(s["probes_by_result"]["failure"].as_f64(), Some(0.0), "{r}");
    assert_eq!(s["unhealthy"], 0.0, "{r}");
    assert_eq!(s["unhealthy_seen_by_subscriber"], 0, "{r}");
    let (p50, p99) = (
        s["probe_latency_ms"]["p50"].as_f64().unwrap(),
        s["probe_latency_ms"]["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{r}");

    let restart = &r["restart"];
    assert_eq!(restart["served"], 50, "{r}");
    assert_eq!(restart["health_seen"], 50, "{r}");
    assert_eq!(restart["not_probed"], 0, "{r}");
    for key in [
        "ready_seconds",
        "all_served_seconds",
        "all_checked_seconds",
        "all_health_seen_seconds",
    ] {
        assert!(restart[key].as_f64().is_some_and(|t| t > 0.0), "{key}: {r}");
    }
}
