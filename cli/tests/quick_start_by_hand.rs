//! The README's by-hand walk-through, with real processes: `roster dev`, `roster subscribe demo`,
//! `roster publish demo 10.0.0.1:8080`; Ctrl-C the publisher, then `kill -9` another one.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::roster;

const START: Duration = Duration::from_secs(30);

fn addresses(line: &str) -> Vec<String> {
    let snapshot: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
    assert_eq!(snapshot["service"], "default/DEFAULT/demo", "{line}");
    assert!(snapshot["version"].is_u64(), "{line}");
    let mut out: Vec<String> = snapshot["publishers"]
        .as_array()
        .expect("publishers array")
        .iter()
        .flat_map(|p| {
            p["data"]
                .as_array()
                .expect("data array")
                .iter()
                .map(|d| d.as_str().expect("UTF-8 data").to_owned())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn publish_subscribe_ctrl_c_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();

    let dev = roster("roster dev", cwd, &["dev"]);
    let ready = dev.line_matching(START, "ready", |l| l.contains("ready"));
    assert!(
        ready.contains("127.0.0.1:"),
        "says where clients connect: {ready}"
    );
    assert!(cwd.join(".roster/client.toml").exists() && cwd.join(".roster/ca.pem").exists());
    // The cluster checks tokens: client.toml carries one, and both it and the admin token are the
    // owner's alone.
    let client_toml = std::fs::read_to_string(cwd.join(".roster/client.toml")).unwrap();
    assert!(client_toml.contains("token = \"rst_"), "{client_toml}");
    for secret in [".roster/client.toml", ".roster/admin.token"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cwd.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} is readable by others: {mode:o}");
    }

    let sub = roster("roster subscribe", cwd, &["subscribe", "demo"]);
    sub.line_matching(START, "the initial empty snapshot", |l| {
        addresses(l).is_empty()
    });

    let mut publisher = roster("roster publish", cwd, &["publish", "demo", "10.0.0.1:8080"]);
    sub.line_matching(START, "the published address", |l| {
        addresses(l) == ["10.0.0.1:8080"]
    });

    // Ctrl-C: the publisher unpublishes and exits cleanly; the subscriber sees it gone within 2 s.
    let start = Instant::now();
    publisher.signal("INT");
    sub.line_matching(
        Duration::from_secs(2),
        "the empty snapshot after Ctrl-C",
        |l| addresses(l).is_empty(),
    );
    println!("empty snapshot {:?} after Ctrl-C", start.elapsed());
    assert!(
        publisher.wait_exit(Duration::from_secs(5)),
        "publish exits 0 on Ctrl-C"
    );

    // kill -9: no goodbye; the session notices within its idle timeout (3 s by default).
    let killed = roster("roster publish", cwd, &["publish", "demo", "10.0.0.2:9090"]);
    sub.line_matching(START, "the second address", |l| {
        addresses(l) == ["10.0.0.2:9090"]
    });
    let start = Instant::now();
    killed.signal("KILL");
    sub.line_matching(
        Duration::from_secs(6),
        "the empty snapshot after kill -9",
        |l| addresses(l).is_empty(),
    );
    let detected = start.elapsed();
    println!("empty snapshot {detected:?} after kill -9");
    assert!(
        detected >= Duration::from_secs(2),
        "a killed client is only noticed by its silence ({detected:?})"
    );

    // The dev cluster stops cleanly on Ctrl-C.
    let mut dev = dev;
    dev.signal("INT");
    assert!(
        dev.wait_exit(Duration::from_secs(10)),
        "roster dev exits 0 on Ctrl-C"
    );
    drop(sub);
}

#[test]
fn ls_lists_services_with_their_publisher_counts() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let dev = roster(
        "roster dev",
        cwd,
        &["dev", "--datas", "2", "--sessions", "2"],
    );
    dev.line_matching(START, "ready", |l| l.contains("ready"));
    let sub = roster("roster subscribe", cwd, &["subscribe", "prod/web/api"]);
    sub.line_matching(START, "the initial snapshot", |_| true);
    let _a = roster(
        "publish a",
        cwd,
        &["publish", "prod/web/api", "10.0.0.1:80"],
    );
    let _b = roster(
        "publish b",
        cwd,
        &["publish", "prod/web/api", "10.0.0.2:80"],
    );
    let _c = roster("publish c", cwd, &["publish", "other", "10.0.0.3:80"]);
    sub.line_matching(START, "both web publishers", |l| {
        let v: Value = serde_json::from_str(l).unwrap();
        v["publishers"].as_array().unwrap().len() == 2
    });
    // `other` may land on another data server; wait until ls sees all three publishers.
    let want = [
        ("default/DEFAULT/other".to_owned(), 1),
        ("prod/web/api".to_owned(), 2),
    ];
    support::wait_for(START, "ls to show both services", || {
        let (ok, out, err) = support::run(cwd, &["ls", "--json"]);
        assert!(ok, "roster ls failed: {err}");
        let rows: Value = serde_json::from_str(&out).unwrap();
        let counts: Vec<(String, u64)> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["service"].as_str().unwrap().to_owned(),
                    r["publishers"].as_u64().unwrap(),
                )
            })
            .collect();
        (counts == want).then_some(())
    });
    let (ok, table, _) = support::run(cwd, &["ls"]);
    assert!(ok);
    assert!(table.starts_with("SERVICE"), "{table}");
    // SERVICE, PUBLISHERS, HEALTHY (`-`: none of its publishers is checked).
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["prod/web/api", "2", "-"]),
        "{table}"
    );
}
