//! A subscriber that stops reading its pushes is disconnected once its queue is full, while a
//! hundred others keep receiving every change. Prints the others' push latency before and while
//! the slow one is being cut off.

use std::time::{Duration, Instant};

use roster_client::{Client, Subscription};
use roster_common::frame::{self, DEFAULT_MAX_FRAME};
use roster_common::proto::{
    ALPN_CLIENT, ClientRequest, ClientResponse, PROTOCOL_VERSION, Reply, Scope,
};
use roster_common::quic::{self, TransportSettings};
use roster_common::tls;
use roster_session::CLOSE_SLOW_CONSUMER;
use roster_tests::{Cluster, ClusterOptions, DEADLINE};

const SUBSCRIBERS: usize = 100;

fn small_queue(config: &mut roster_session::SessionConfig) {
    config.push_queue = 8;
    config.coalesce_window = Duration::ZERO;
}

async fn call(conn: &quinn::Connection, request: &ClientRequest) -> Reply<ClientResponse> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame::encode(request, DEFAULT_MAX_FRAME).unwrap())
        .await
        .unwrap();
    let _ = send.finish();
    frame::read_frame(&mut recv, DEFAULT_MAX_FRAME)
        .await
        .unwrap()
        .unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_cut_off_and_the_others_keep_up() {
    let cluster = Cluster::start_with(ClusterOptions {
        session: small_queue,
        ..ClusterOptions::default()
    })
    .await;
    // A service with a large snapshot, so a reader that stops fills its flow-control window fast.
    let publisher = Client::connect(cluster.client_config()).await.unwrap();
    let mut bulk = Vec::new();
    for i in 0..100 {
        bulk.push(
            publisher
                .publish("hot", vec![format!("{i:0>400}").into()])
                .await
                .unwrap(),
        );
    }
    let mut marker = publisher.publish("hot", vec!["m-0".into()]).await.unwrap();

    // A hundred subscribers that keep reading, sharing one endpoint.
    let endpoint = quic::client_endpoint(cluster.session_addrs[0]).unwrap();
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
    for n in 1..=5 {
        before.extend(round(&mut marker, &subs, &format!("m-{n}")).await);
    }

    // One that subscribes, then never reads its push stream.
    let roots = tls::roots_from(&cluster.identity.ca).unwrap();
    let config = quic::client_config(
        tls::client(roots, ALPN_CLIENT).unwrap(),
        &TransportSettings::default(),
        true,
    )
    .unwrap();
    let addr = cluster.session_addrs[0].to_string();
    let slow = quic::connect(&endpoint, &config, &addr, None, DEADLINE)
        .await
        .unwrap();
    let hello = ClientRequest::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: "slow".into(),
        client_name: String::new(),
        token: None,
    };
    assert!(matches!(
        call(&slow, &hello).await,
        Ok(ClientResponse::Welcome { .. })
    ));
    let subscribe = ClientRequest::Subscribe {
        register_id: "s".into(),
        service: "hot".parse().unwrap(),
        scope: Scope::Global,
    };
    assert!(matches!(
        call(&slow, &subscribe).await,
        Ok(ClientResponse::Done {})
    ));

    // Keep changing the service until the slow one is cut off; the others see every change.
    let mut during = Vec::new();
    let started = Instant::now();
    let mut n = 5;
    while slow.close_reason().is_none() {
        assert!(
            started.elapsed() < DEADLINE * 3,
            "the slow subscriber was never disconnected"
        );
        n += 1;
        during.extend(round(&mut marker, &subs, &format!("m-{n}")).await);
    }
    match slow.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, CLOSE_SLOW_CONSUMER)
        }
        other => panic!("expected a slow-consumer close, got {other:?}"),
    }
    // And afterwards.
    let mut after = Vec::new();
    for _ in 0..5 {
        n += 1;
        after.extend(round(&mut marker, &subs, &format!("m-{n}")).await);
    }
    let ((b50, b99), (d50, d99), (a50, a99)) =
        (percentiles(before), percentiles(during), percentiles(after));
    println!(
        "{SUBSCRIBERS} subscribers, push latency p50/p99: before {b50:?}/{b99:?}, while a slow one filled up ({} changes) {d50:?}/{d99:?}, after it was cut off {a50:?}/{a99:?}",
        n - 10
    );
    drop(bulk);
    drop(subs);
    cluster.stop().await;
}
