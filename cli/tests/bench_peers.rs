//! `roster bench --target etcd|zookeeper` (a build with the `peers` feature) at a tiny scale,
//! against servers started by bench/start-etcd.sh and bench/start-zookeeper.sh: every
//! notification arrives, a killed holder's instances go within the TTL, and the server's memory
//! is reported. They need Debian's etcd and ZooKeeper packages, so they are `#[ignore]`d:
//! `cargo test -p roster-cli --features peers --test bench_peers -- --ignored` runs them (`.ci/run`
//! does where the packages are installed), and they fail, saying what is missing, where not.

#![cfg(feature = "peers")]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::run_within;

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .join("bench")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A server from a bench/start-*.sh script, stopped on drop.
struct Server {
    endpoint: String,
    pidfile: PathBuf,
}

impl Server {
    fn start(script: &str) -> Server {
        let out = Command::new("bash")
            .arg(bench_dir().join(script))
            .output()
            .expect("run the start script");
        assert!(
            out.status.success(),
            "{script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("UTF-8");
        let (endpoint, pidfile) = stdout.trim().split_once(' ').expect("ENDPOINT PIDFILE");
        Server {
            endpoint: endpoint.to_owned(),
            pidfile: PathBuf::from(pidfile),
        }
    }

    fn pid(&self) -> String {
        std::fs::read_to_string(&self.pidfile)
            .expect("the pid file")
            .trim()
            .to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(bench_dir().join("stop.sh"))
            .arg(&self.pidfile)
            .status();
    }
}

fn bench(target: &str, server: &Server) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let pid = server.pid();
    let (ok, out, err) = run_within(
        dir.path(),
        &[
            "bench",
            "--target",
            target,
            "--json",
            "--endpoint",
            &server.endpoint,
            "--server-pid",
            &pid,
            "--ttl",
            "4",
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
    serde_json::from_str(out.trim()).expect("one JSON object")
}

fn check(r: &Value, target: &str, server: &str) {
    assert!(
        r["target"].as_str().unwrap().starts_with(target),
        "{}",
        r["target"]
    );
    assert_eq!(r["initial_load"]["instances"], 20);
    for phase in ["subscribe", "churn", "failure"] {
        let p = &r[phase];
        assert!(p["notifications_expected"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["notifications_seen"], p["notifications_expected"], "{p}");
    }
    assert_eq!(r["churn"]["errors"], 0);
    // A TTL of 4 s: the holder's instances go after at most that, plus the server's expiry
    // granularity.
    let detect = r["failure"]["detect_seconds"].as_f64().unwrap();
    assert!(detect > 1.0 && detect < 10.0, "{}", r["failure"]);
    let servers = r["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0]["name"], server);
    assert!(
        servers[0]["rss_kib"].as_u64().unwrap() > 1000,
        "{}",
        servers[0]
    );
}

#[test]
#[ignore = "needs Debian's etcd-server and etcd-client: run with --ignored"]
fn etcd_sees_every_notification() {
    assert!(
        on_path("etcd") && on_path("etcdctl"),
        "etcd is not installed (apt-get install etcd-server etcd-client)"
    );
    let server = Server::start("start-etcd.sh");
    let report = bench("etcd", &server);
    check(&report, "etcd", "etcd");
}

#[test]
#[ignore = "needs Debian's zookeeper: run with --ignored"]
fn zookeeper_sees_every_notification() {
    assert!(
        Path::new("/usr/share/java/zookeeper.jar").is_file() && on_path("java"),
        "ZooKeeper is not installed (apt-get install zookeeper)"
    );
    let server = Server::start("start-zookeeper.sh");
    let report = bench("zookeeper", &server);
    check(&report, "zookeeper", "zookeeper");
}
