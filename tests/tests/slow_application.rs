//! An application too busy to run its own tasks keeps its connection: a separate process whose
//! only runtime thread spins in its subscription's consumer for 5 s while 1,000 publishers are
//! registered. Its SDK keeps the connection alive on its own threads, so the session server never
//! takes it for dead (another subscriber sees none of its publishers removed) and it never takes
//! the healthy server for dead (zero reconnects). It then catches up on all 1,000.

use std::process::Stdio;
use std::time::{Duration, Instant};

use roster_client::Client;
use roster_tests::{Cluster, DEADLINE, SnapshotLog};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const OWN: usize = 20;
const LOAD: usize = 1_000;
const BUSY: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_application_keeps_its_connection_and_its_publishers() {
    let cluster = Cluster::start().await;
    let config_path = cluster.dir.path().join("client.toml");
    std::fs::write(&config_path, cluster.client_config().to_toml()).unwrap();

    let mut app = Command::new(env!("CARGO_BIN_EXE_roster-slow-app"))
        .arg(&config_path)
        .args(["slow-app", &OWN.to_string(), "load"])
        .arg(BUSY.as_millis().to_string())
        .arg(LOAD.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the slow application");
    let mut lines = BufReader::new(app.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the application starts in time")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));

    // Another subscriber watches the slow application's publishers the whole time.
    let watcher = Client::connect(cluster.client_config()).await.unwrap();
    let log = SnapshotLog::start(watcher.subscribe("slow-app").await.unwrap());
    log.wait_for("the application's publishers", |s| {
        s.publishers.len() == OWN
    })
    .await;

    // One publisher sends the application into its busy loop; the rest are registered meanwhile.
    let loader = Client::connect(cluster.client_config()).await.unwrap();
    let mut load = Vec::with_capacity(LOAD);
    let started = Instant::now();
    load.push(
        loader
            .publish("load", vec!["10.8.0.0:80".into()])
            .await
            .unwrap(),
    );
    for i in 1..LOAD {
        load.push(
            loader
                .publish(
                    "load",
                    vec![format!("10.8.{}.{}:80", i / 250, i % 250).into()],
                )
                .await
                .unwrap(),
        );
    }
    let registered = started.elapsed();

    let stats = tokio::time::timeout(BUSY + DEADLINE * 2, lines.next_line())
        .await
        .expect("the application catches up in time")
        .unwrap()
        .expect("the application prints its statistics");
    let status = tokio::time::timeout(DEADLINE, app.wait())
        .await
        .expect("the application exits")
        .unwrap();
    assert!(status.success(), "the application failed: {status}");
    let field = |name: &str| -> u64 {
        stats
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing from {stats:?}"))
            .parse()
            .unwrap()
    };
    println!(
        "{LOAD} publishers registered in {registered:?} while the application was busy; {stats}"
    );
    assert!(
        field("busy_ms") >= BUSY.as_millis() as u64,
        "the application was busy"
    );
    assert_eq!(
        field("reconnects"),
        0,
        "a busy client must not leave a healthy server"
    );
    assert_eq!(field("silent"), 0);
    assert_eq!(field("lost"), 0, "the server must not drop a busy client");
    assert_eq!(field("cut_off_slow"), 0);

    // The application has closed; until then its publishers never left the watcher's view.
    let seen = log.finish();
    let full = seen
        .iter()
        .position(|s| s.publishers.len() == OWN)
        .expect("the watcher saw every publisher");
    let last_full = seen
        .iter()
        .rposition(|s| s.publishers.len() == OWN)
        .unwrap();
    if let Some(dip) = seen[full..last_full]
        .iter()
        .find(|s| s.publishers.len() < OWN)
    {
        panic!(
            "the watcher saw the busy application's publishers drop to {} at version {}",
            dip.publishers.len(),
            dip.version
        );
    }
    drop(load);
    loader.close().await;
    watcher.close().await;
    cluster.stop().await;
}
