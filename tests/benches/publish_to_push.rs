//! Publish-to-push latency: one client updates a publication N times, one at a time; another client
//! subscribed to the service times each update from the publish call to the push that carries it.
//!
//!     cargo bench -p roster-tests --bench publish_to_push            # in-process cluster
//!     ROSTER_BENCH_CONFIG=.roster/client.toml cargo bench -p roster-tests --bench publish_to_push
//!                                                                     # against a running cluster
//!     ROSTER_BENCH_COUNT=5000 ...                                    # more publishes (default 1000)

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use roster_client::{Client, ClientConfig};
use roster_tests::Cluster;

#[tokio::main]
async fn main() {
    roster_common::install_crypto_provider();
    let count: usize = std::env::var("ROSTER_BENCH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (config, cluster) = match std::env::var("ROSTER_BENCH_CONFIG") {
        Ok(path) => (
            ClientConfig::load(path.as_ref()).expect("client config"),
            None,
        ),
        Err(_) => {
            let cluster = Cluster::start().await;
            (cluster.client_config(), Some(cluster))
        }
    };
    let target = if cluster.is_some() {
        "in-process cluster (1 meta, 1 data, 1 session)"
    } else {
        "external cluster"
    };

    let subscriber = Client::connect(config.clone())
        .await
        .expect("subscriber connects");
    let publisher = Client::connect(config).await.expect("publisher connects");
    let service = format!("bench-{}", std::process::id());
    let mut sub = subscriber.subscribe(&service).await.expect("subscribe");
    let mut publication = publisher
        .publish(&service, vec!["warm-up".into()])
        .await
        .expect("publish");
    wait_for(&mut sub, "warm-up").await;

    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let data = format!("10.0.{}.{}:8080", i / 250, i % 250);
        let t0 = Instant::now();
        publication
            .update(vec![data.clone().into()])
            .await
            .expect("publish");
        wait_for(&mut sub, &data).await;
        latencies.push(t0.elapsed());
    }
    let total = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    println!("publish-to-push latency, {count} sequential publishes, {target}");
    println!(
        "p50 {:?}  p90 {:?}  p99 {:?}  max {:?}  mean {:?}  ({:.0} publishes/s)",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        latencies[latencies.len() - 1],
        mean,
        count as f64 / total.as_secs_f64()
    );
    drop(publication);
    publisher.close().await;
    drop(sub);
    subscriber.close().await;
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
}

async fn wait_for(sub: &mut roster_client::Subscription, data: &str) {
    let deadline = Duration::from_secs(10);
    tokio::time::timeout(deadline, async {
        while let Some(snapshot) = sub.next().await {
            if snapshot
                .publishers
                .iter()
                .any(|p| p.data.iter().any(|d| d.as_ref() == data.as_bytes()))
            {
                return;
            }
        }
        panic!("subscription ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no push carrying {data} within {deadline:?}"));
}
