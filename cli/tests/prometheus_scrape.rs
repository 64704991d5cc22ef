//! A real Prometheus (Debian's `prometheus` package) scrapes a `roster dev --metas 3 --datas 3
//! --sessions 2` cluster through the targets file `roster dev` writes; every target is up, and
//! after a publish the publisher and push-latency series have values, read through Prometheus'
//! own HTTP API.

mod support;

use std::time::Duration;

use support::{http_get, roster, spawn_program, wait_for};

const START: Duration = Duration::from_secs(60);

fn prometheus_binary() -> String {
    let path = std::env::var("ROSTER_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let found = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs Prometheus: `apt-get install prometheus` (Debian), or point \
         ROSTER_TEST_PROMETHEUS at the binary"
    );
    path
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The value of a PromQL instant query that returns one sample, if it has one.
fn query(prometheus: &str, promql: &str) -> Option<f64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(&format!("{prometheus}/api/v1/query?query={encoded}"))?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_every_server_and_sees_publishers_and_push_latency() {
    let binary = prometheus_binary();
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let dev = roster(
        "roster dev",
        cwd,
        &["dev", "--metas", "3", "--datas", "3", "--sessions", "2"],
    );
    dev.line_matching(START, "ready", |l| l.contains("roster dev ready"));
    let targets_file = cwd.join(".roster/targets.json");
    assert!(targets_file.exists());

    let port = free_tcp_port();
    let prometheus = format!("127.0.0.1:{port}");
    std::fs::write(
        cwd.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: roster\n    file_sd_configs:\n      - files: [\"{}\"]\n",
            targets_file.display()
        ),
    )
    .unwrap();
    let _prometheus = spawn_program(
        &binary,
        "prometheus",
        cwd,
        &[
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=prometheus-data",
            &format!("--web.listen-address={prometheus}"),
            "--log.level=warn",
        ],
    );
    wait_for(START, "Prometheus ready", || {
        (http_get(&format!("{prometheus}/-/ready"))?.0 == 200).then_some(())
    });

    // Every server is a target, and every target is up.
    wait_for(START, "8 targets up", || {
        let (_, body) = http_get(&format!("{prometheus}/api/v1/targets?state=active"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let targets = v["data"]["activeTargets"].as_array()?;
        let up = targets.iter().filter(|t| t["health"] == "up").count();
        (targets.len() == 8 && up == 8).then_some(())
    });
    for (role, n) in [("meta", 3.0), ("data", 3.0), ("session", 2.0)] {
        let promql = format!("count(up{{job=\"roster\",role=\"{role}\"}} == 1)");
        wait_for(START, &format!("{role} targets up"), || {
            (query(&prometheus, &promql)? == n).then_some(())
        });
    }

    // A subscriber, a publish, and a second one that reaches the subscriber as a change (its
    // push is timed): the registry's series show them.
    let sub = roster("roster subscribe", cwd, &["subscribe", "demo"]);
    let _publisher = roster("roster publish", cwd, &["publish", "demo", "10.0.0.1:8080"]);
    sub.line_matching(START, "the published address", |l| {
        l.contains("10.0.0.1:8080")
    });
    let _second = roster("roster publish", cwd, &["publish", "demo", "10.0.0.2:8080"]);
    sub.line_matching(START, "the second address", |l| l.contains("10.0.0.2:8080"));
    wait_for(START, "publishers in Prometheus", || {
        let data = query(&prometheus, "sum(roster_data_publishers)")?;
        let session = query(&prometheus, "sum(roster_session_publishers)")?;
        (data == 2.0 && session == 2.0).then_some(())
    });
    wait_for(START, "push latency in Prometheus", || {
        let pushes = query(&prometheus, "sum(roster_session_push_seconds_count)")?;
        let buckets = query(
            &prometheus,
            "sum(roster_session_push_seconds_bucket{le=\"+Inf\"})",
        )?;
        (pushes >= 1.0 && buckets >= 1.0).then_some(())
    });
    let leaders = wait_for(START, "one Raft leader", || {
        query(&prometheus, "sum(roster_raft_is_leader)")
    });
    assert_eq!(leaders, 1.0, "exactly one meta node leads");
}
