//! A session server out of the cluster view keeps its publishers while it is alive, with real
//! processes: its lease lapses while it is stopped (SIGSTOP), and the meta tier, stopped too, cannot
//! admit it again when it resumes. It still serves clients and is connected to the data tier, so
//! what a client publishes through it meanwhile must stay — the data server must not drop it as the
//! publishers of a departed session once its (here short) grace has passed.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use roster_client::{Client, ClientConfig, Snapshot};
use roster_tests::keys;
use support::{Cluster, wait_for};

const START: Duration = Duration::from_secs(60);
/// The data tier's grace for the publishers of a session outside the view.
const GRACE_MS: u64 = 300;
/// How long the publisher is watched while its session server is out of the view: the grace and
/// many sweeps (every 250 ms) over. The fault lasts this long; a duration, not a wait.
const OUT_OF_VIEW: Duration = Duration::from_secs(3);

#[test]
fn a_live_session_outside_the_view_keeps_its_publishers() {
    let cluster = Cluster::builder()
        .sessions(2)
        .data_args(&["--session-grace-ms", &GRACE_MS.to_string()])
        .start();
    cluster.wait_members(1, 2);
    let sessions = cluster.session_addrs();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let on = |addr: &str| {
        let mut config = ClientConfig::new(vec![addr.to_owned()], cluster.ca());
        config.refuse_empty = false;
        config
    };

    // A subscriber on session 1 records every snapshot of the service.
    let seen: Arc<Mutex<Vec<Snapshot>>> = Arc::default();
    let watcher = runtime.block_on(async {
        let watcher = Client::connect(on(&sessions[0])).await.unwrap();
        let mut stream = watcher.subscribe("outside/svc/a").await.unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(snapshot) = stream.next().await {
                seen.lock().unwrap().push(snapshot);
            }
        });
        watcher
    });

    // Session 2 stops until the meta tier drops it; then the meta tier stops, and session 2 goes
    // on, unable to join again.
    cluster.signal("session", 2, "STOP");
    cluster.wait_session_gone(2);
    cluster.signal("meta", 1, "STOP");
    cluster.signal("session", 2, "CONT");

    // A client publishes through session 2 (the publish lands at the data server: durable).
    let (publisher, publication) = runtime.block_on(async {
        let publisher = Client::connect(on(&sessions[1])).await.unwrap();
        let publication = publisher
            .publish("outside/svc/a", vec!["10.0.0.1:80".into()])
            .await
            .unwrap();
        (publisher, publication)
    });
    let key = (
        publisher.client_id().to_owned(),
        publication.register_id().to_owned(),
    );
    let has = |s: &Snapshot| keys(s).contains(&key);
    wait_for(START, "the subscriber sees the publisher", || {
        seen.lock().unwrap().iter().any(has).then_some(())
    });
    std::thread::sleep(OUT_OF_VIEW);
    assert!(
        publication.is_durable(),
        "the publish landed at the data server"
    );
    cluster.signal("meta", 1, "CONT");

    let seen = seen.lock().unwrap();
    let first = seen.iter().position(has).unwrap();
    if let Some(gone) = seen[first..].iter().find(|s| !has(s)) {
        panic!(
            "the publisher of a live session outside the view was dropped: version {} has {} \
             publishers",
            gone.version,
            gone.publishers.len(),
        );
    }
    drop(seen);
    runtime.block_on(async {
        drop(publication);
        publisher.close().await;
        watcher.close().await;
    });
}
