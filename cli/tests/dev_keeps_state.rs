//! `roster dev` restarted with the same `--dir` resumes its cluster: persistent instances, the
//! tokens of client.toml and the certificates are still there, after a clean stop and after the
//! dev process itself was killed with SIGKILL. A cluster of another shape is refused, and
//! `--fresh` starts over.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Proc, START, roster, run, run_within};

/// Starts `roster dev --dir d EXTRA...` in `cwd`, waits until it is ready and checks that it says
/// it resumed the cluster in d (`resumed`) or created a new one.
fn dev(cwd: &Path, extra: &[&str], resumed: bool) -> Proc {
    let mut args = vec!["dev", "--dir", "d"];
    args.extend(extra);
    let dev = roster("roster dev", cwd, &args);
    dev.line_matching(START, "roster dev ready", |l| {
        l.contains("roster dev ready")
    });
    let said = if resumed {
        "resumed the cluster in"
    } else {
        "created a new cluster in"
    };
    dev.line_matching(START, said, |l| l.contains(said));
    dev
}

/// `roster ls --json` through d/client.toml: each service's name and publisher count.
fn services(cwd: &Path) -> Vec<(String, u64)> {
    let (ok, out, err) = run(cwd, &["ls", "--json", "--config", "d/client.toml"]);
    assert!(ok, "roster ls: {err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap().to_owned(),
                r["publishers"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Stops `dev` with `signal` and waits until it has exited: cleanly after SIGTERM (its servers
/// stopped first); after SIGKILL its servers stop on their parent's death.
fn stop(mut dev: Proc, signal: &str) {
    dev.signal(signal);
    let clean = dev.wait_exit(Duration::from_secs(30));
    assert!(
        clean || signal == "KILL",
        "roster dev stopped cleanly on SIG{signal}"
    );
}

#[test]
fn roster_dev_resumes_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let first = dev(cwd, &[], false);
    for args in [
        &["register", "svc-a", "127.0.0.1:1", "--id", "a1"][..],
        &[
            "register",
            "svc-b",
            "127.0.0.1:2",
            "--id",
            "b1",
            "--attr",
            "zone=z1",
        ][..],
    ] {
        let mut args = args.to_vec();
        args.extend(["--config", "d/client.toml"]);
        let (ok, _, err) = run(cwd, &args);
        assert!(ok, "roster {args:?}: {err}");
    }
    let ca = std::fs::read(cwd.join("d/ca.pem")).unwrap();
    let want = vec![
        ("default/DEFAULT/svc-a".to_owned(), 1),
        ("default/DEFAULT/svc-b".to_owned(), 1),
    ];
    assert_eq!(services(cwd), want);
    stop(first, "TERM");

    // Started again: the same CA, the instances back, the client token still good.
    let second = dev(cwd, &[], true);
    assert_eq!(std::fs::read(cwd.join("d/ca.pem")).unwrap(), ca);
    support::wait_for(START, "both instances back", || {
        (services(cwd) == want).then_some(())
    });
    let sub = roster(
        "roster subscribe",
        cwd,
        &["subscribe", "svc-b", "--config", "d/client.toml"],
    );
    let line = sub.line_matching(START, "svc-b's instance", |l| l.contains("b1"));
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    let b1 = &json["publishers"][0];
    assert_eq!(b1["persistent"], true, "{line}");
    assert_eq!(b1["attributes"]["zone"], "z1", "{line}");
    drop(sub);

    // kill -9 of roster dev itself: its servers stop with it, and the state stays.
    stop(second, "KILL");
    let third = dev(cwd, &[], true);
    support::wait_for(START, "both instances back after kill -9", || {
        (services(cwd) == want).then_some(())
    });
    stop(third, "TERM");

    // The meta node's recorded address taken by another process: refused, saying what to do.
    let cluster_toml = std::fs::read_to_string(cwd.join("d/cluster.toml")).unwrap();
    let meta_addr = cluster_toml
        .split('"')
        .find(|s| s.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no meta address in {cluster_toml}"));
    let squatter = std::net::UdpSocket::bind(meta_addr).unwrap();
    let (ok, _, err) = run_within(cwd, &["dev", "--dir", "d"], START);
    assert!(!ok);
    assert!(
        err.contains(meta_addr) && err.contains("--fresh") && err.contains("free that port"),
        "{err}"
    );
    drop(squatter);

    // Another shape is refused, saying what to do; --fresh starts over.
    let (ok, _, err) = run(cwd, &["dev", "--dir", "d", "--metas", "3"]);
    assert!(!ok);
    assert!(
        err.contains("1 meta node") && err.contains("--fresh"),
        "{err}"
    );
    let (ok, _, err) = run(cwd, &["dev", "--dir", "d", "--insecure-no-auth"]);
    assert!(!ok);
    assert!(
        err.contains("with authentication") && err.contains("--fresh"),
        "{err}"
    );
    let fresh = dev(cwd, &["--fresh"], false);
    assert_ne!(
        std::fs::read(cwd.join("d/ca.pem")).unwrap(),
        ca,
        "new certificates"
    );
    assert_eq!(services(cwd), vec![], "a new cluster is empty");
    stop(fresh, "TERM");
}
