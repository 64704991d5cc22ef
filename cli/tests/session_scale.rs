//! One session server process holding many client connections, each with a subscriber, opened by
//! this test process over 32 endpoints: `ROSTER_TEST_SESSION_CONNECTIONS` of them (default 2,000;
//! run it with 10,000 and `--release` for figures). One change must reach every subscriber. Prints
//! the push latency (p50/p99/max) and the session server's resident memory.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use roster_client::{Client, ClientConfig};
use support::Cluster;

const ENDPOINTS: usize = 32;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn one_session_server_pushes_a_change_to_every_connection() {
    let connections: usize = std::env::var("ROSTER_TEST_SESSION_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let cluster = Cluster::builder().start();
    cluster.wait_members(1, 1);
    let addr = cluster.addr("session", 1);
    let session = cluster.proc("session", 1);
    let rss_idle = rss_kib(session.pid());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = ClientConfig::new(vec![addr.clone()], cluster.ca());
    config.refuse_empty = false;
    // Thousands of connections from one process: keep-alives at the session's own pace.
    config.keep_alive_ms = 1_000;
    config.dead_after_ms = 3_000;
    let started = Instant::now();
    let (clients, subscriptions) = runtime.block_on(async {
        let endpoints: Vec<_> = (0..ENDPOINTS)
            .map(|_| roster_common::quic::client_endpoint(addr.parse().unwrap()).unwrap())
            .collect();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(256));
        let mut handles = Vec::new();
        for i in 0..connections {
            let (endpoint, config, semaphore) = (
                endpoints[i % ENDPOINTS].clone(),
                config.clone(),
                semaphore.clone(),
            );
            handles.push(tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await.unwrap();
                let client = Client::connect_on(endpoint, config).await.expect("connect");
                let subscription = client.subscribe("fanout").await.expect("subscribe");
                (client, subscription)
            }));
        }
        let mut clients = Vec::new();
        let mut subscriptions = Vec::new();
        for handle in handles {
            let (client, subscription) = handle.await.unwrap();
            clients.push(client);
            subscriptions.push(subscription);
        }
        (clients, subscriptions)
    });
    println!(
        "{connections} connections, each with a subscriber, opened in {:?}",
        started.elapsed()
    );
    let rss_loaded = rss_kib(session.pid());

    // One change; every subscriber must see it.
    let publisher = runtime.block_on(Client::connect(config.clone())).unwrap();
    let subscriptions = Arc::new(subscriptions);
    let latencies = runtime.block_on(async {
        let start = Instant::now();
        let waits: Vec<_> = (0..subscriptions.len())
            .map(|i| {
                let subscriptions = subscriptions.clone();
                tokio::spawn(async move {
                    subscriptions[i]
                        .wait_for(|s| !s.publishers.is_empty(), Duration::from_secs(60))
                        .await
                        .expect("every subscriber sees the change");
                    start.elapsed()
                })
            })
            .collect();
        let _p = publisher
            .publish("fanout", vec!["10.0.0.1:80".into()])
            .await
            .unwrap();
        let mut latencies = Vec::with_capacity(waits.len());
        for wait in waits {
            latencies.push(wait.await.unwrap());
        }
        latencies
    });
    let mut sorted = latencies.clone();
    sorted.sort();
    let at = |p: f64| sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)];
    println!(
        "one change reached all {connections}: push latency p50 {:?} p99 {:?} max {:?}; session RSS {} MiB idle, {} MiB with {connections} connections ({:.1} KiB per connection)",
        at(0.5),
        at(0.99),
        sorted[sorted.len() - 1],
        rss_idle / 1024,
        rss_loaded / 1024,
        (rss_loaded.saturating_sub(rss_idle)) as f64 / connections as f64
    );
    assert_eq!(latencies.len(), connections);
    drop(clients);
}
