//! A subscriber that reads slowly is not cut off: while it does not read, what is due to it merges,
//! and when it reads again it catches up in a few pushes with exactly what changed. One that reads
//! nothing at all is disconnected once its push stream has made no progress for the stall timeout.
//! A hundred other subscribers receive every change throughout; their push latency is printed
//! before, while the slow ones hold back, and after.

use std::time::{Duration, Instant};

use roster_client::{Client, Subscription};
use roster_common::proto::{CAPABILITY_DELTA, Push};
use roster_session::CLOSE_SLOW_CONSUMER;
use roster_tests::{Cluster, ClusterOptions, DEADLINE, RawClient, Replica};

const SUBSCRIBERS: usize = 100;
const STALL: Duration = Duration::from_secs(3);
/// A push-stream window a few marker changes fill.
const SMALL_WINDOW: u32 = 16 << 10;

fn short_stall(config: &mut roster_session::SessionConfig) {
    config.push_stall_timeout = STALL;
}

/// A marker value of about 2 KiB, so a handful of changes fill a small flow-control window.
fn marker(n: usize) -> String {
    format!("m-{n}-{}", "x".repeat(2048))
}

/// Updates the marker publication to `value` and returns how long each subscriber took to see it.
async fn round(
    marker: &mut roster_client::Publication,
    subs: &[Subscription],
    value: &str,
) -> Vec<Duration> {
    let start = Instant::now();
    marker.update(vec![value.to_owned().into()]).await.unwrap();
    let mut latencies = Vec::with_capacity(subs.len());
    for sub in subs {
        sub.wait_for(
            |s| {
                s.publishers
                    .iter()
                    .any(|p| p.data.iter().any(|d| d.as_ref() == value.as_bytes()))
            },
            DEADLINE,
        )
        .await
        .expect("every fast subscriber sees every change");
        latencies.push(start.elapsed());
    }
    latencies
}

fn percentiles(mut all: Vec<Duration>) -> (Duration, Duration) {
    all.sort();
    let at = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    (at(0.5), at(0.99))
}

/// Reads pushes into `replica` until it holds `value` among its addresses.
async fn read_until(raw: &mut RawClient, replica: &mut Replica, value: &str) -> usize {
    let mut pushes = 0;
    let deadline = Instant::now() + DEADLINE;
    while !replica.addresses().iter().any(|a| a == value) {
        assert!(Instant::now() < deadline, "the slow reader never caught up");
        let push = raw
            .next_push(DEADLINE)
            .await
            .expect("pushes keep coming to a reader that reads");
        replica.apply(push).expect("every push applies");
        pushes += 1;
    }
    pushes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_get_merged_pushes_and_only_a_stalled_one_is_cut_off() {
    let cluster = Cluster::start_with(ClusterOptions {
        session: short_stall,
        ..ClusterOptions::default()
    })
    .await;
    let addr = cluster.session_addrs[0];
    let publisher = Client::connect(cluster.client_config()).await.unwrap();
    let mut bulk = Vec::new();
    for i in 0..20 {
        bulk.push(
            publisher
                .publish("hot", vec![format!("{i:0>400}").into()])
                .await
                .unwrap(),
        );
    }
    let mut n = 0;
    let mut marker_pub = publisher
        .publish("hot", vec![marker(n).into()])
        .await
        .unwrap();

    // A hundred subscribers that keep reading, sharing one endpoint.
    let endpoint = roster_client::endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let client = Client::connect_on(endpoint.clone(), cluster.client_config())
            .await
            .unwrap();
        subs.push(client.subscribe("hot").await.unwrap());
        clients.push(client);
    }
    let mut before = Vec::new();
    for _ in 0..5 {
        n += 1;
        before.extend(round(&mut marker_pub, &subs, &marker(n)).await);
    }

    // A slow reader and a reader that stops, both with a small window; each reads its first
    // snapshot, then stops reading.
    let mut slow = RawClient::connect(&cluster, addr, Some(SMALL_WINDOW)).await;
    assert_eq!(
        slow.hello("slow", &[CAPABILITY_DELTA]).await,
        [CAPABILITY_DELTA]
    );
    slow.subscribe("s", "hot").await;
    let mut stuck = RawClient::connect(&cluster, addr, Some(SMALL_WINDOW)).await;
    stuck.hello("stuck", &[CAPABILITY_DELTA]).await;
    stuck.subscribe("s", "hot").await;
    let mut replica = Replica::default();
    read_until(&mut slow, &mut replica, &marker(n)).await;
    assert!(matches!(
        stuck.next_push(DEADLINE).await,
        Some(Push::Snapshot(_))
    ));
    let stuck_since = Instant::now();

    // Twenty changes while neither reads: far more than their windows hold.
    let mut during = Vec::new();
    let paused_at = n;
    for _ in 0..20 {
        n += 1;
        during.extend(round(&mut marker_pub, &subs, &marker(n)).await);
    }
    // The slow one reads again before the stall timeout: it catches up in fewer pushes than there
    // were changes, each a delta on the version it holds, ending at the latest state.
    let pushes = read_until(&mut slow, &mut replica, &marker(n)).await;
    let changes = n - paused_at;
    assert!(
        pushes < changes,
        "{pushes} pushes for {changes} changes: what was due while it did not read was not merged"
    );
    assert_eq!(
        replica.publishers.len(),
        21,
        "the 20 bulk publishers and the marker"
    );
    assert!(
        slow.conn.close_reason().is_none(),
        "a slow reader is not cut off"
    );

    // The stuck one never reads again: once its stream has made no progress for the stall
    // timeout, it is disconnected with the slow-consumer code; the others keep up meanwhile.
    while stuck.conn.close_reason().is_none() {
        assert!(
            stuck_since.elapsed() < STALL + DEADLINE,
            "the stuck reader was never disconnected"
        );
        n += 1;
        during.extend(round(&mut marker_pub, &subs, &marker(n)).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match stuck.conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, CLOSE_SLOW_CONSUMER)
        }
        other => panic!("expected a slow-consumer close, got {other:?}"),
    }
    assert!(
        stuck_since.elapsed() >= STALL,
        "cut off {:?} after it stopped reading, before the stall timeout could pass",
        stuck_since.elapsed()
    );
    let mut after = Vec::new();
    for _ in 0..5 {
        n += 1;
        after.extend(round(&mut marker_pub, &subs, &marker(n)).await);
    }
    // The slow reader, reading all along now, is still there and current.
    read_until(&mut slow, &mut replica, &marker(n)).await;
    assert!(slow.conn.close_reason().is_none());

    let ((b50, b99), (d50, d99), (a50, a99)) =
        (percentiles(before), percentiles(during), percentiles(after));
    println!(
        "{SUBSCRIBERS} subscribers, push latency p50/p99: before {b50:?}/{b99:?}, while two readers held back {d50:?}/{d99:?}, after {a50:?}/{a99:?}; the slow reader caught up on {changes} changes in {pushes} pushes"
    );
    drop(bulk);
    drop(subs);
    for client in clients {
        client.close().await;
    }
    cluster.stop().await;
}
