//! An unpublish acknowledged through another session server lands at once: a client whose session
//! server was just killed with SIGKILL unpublishes (the request fails over to the other session),
//! and every subscriber sees the instance go within a second of the acknowledgement — not when the
//! dead session's lease and grace run out.

mod support;

use std::time::{Duration, Instant};

use roster_client::{Client, ClientConfig};
use roster_tests::addresses;
use support::Cluster;

const START: Duration = Duration::from_secs(30);
/// The usual push latency is milliseconds; a second is the promise.
const LANDS_WITHIN: Duration = Duration::from_secs(1);

#[test]
fn an_unpublish_through_another_session_server_lands_at_once() {
    let cluster = Cluster::builder().sessions(2).start();
    let addrs = cluster.session_addrs();
    let ca = cluster.ca();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    runtime.block_on(async {
        let publisher = Client::connect(ClientConfig::new(addrs.clone(), ca.clone()))
            .await
            .unwrap();
        let doomed = publisher.session_id().expect("connected") as usize - 1;
        let survivor = 1 - doomed;
        let publication = publisher
            .publish("lands/svc/a", vec!["10.0.0.1:80".into()])
            .await
            .unwrap();
        // Two subscribers, each with its own connection to the session that survives.
        let mut subscriptions = Vec::new();
        let mut subscribers = Vec::new();
        for _ in 0..2 {
            let mut config = ClientConfig::new(vec![addrs[survivor].clone()], ca.clone());
            // The instance going is the point: do not withhold the empty snapshot.
            config.refuse_empty = false;
            let client = Client::connect(config).await.unwrap();
            let sub = client.subscribe("lands/svc/a").await.unwrap();
            sub.wait_for(|s| addresses(s) == ["10.0.0.1:80"], START)
                .await
                .unwrap();
            subscriptions.push(sub);
            subscribers.push(client);
        }

        cluster.signal("session", doomed as u64 + 1, "KILL");
        publication.unpublish().await.unwrap();
        let acked = Instant::now();
        for sub in &subscriptions {
            sub.wait_for(|s| s.publishers.is_empty(), Duration::from_secs(10))
                .await
                .unwrap();
        }
        let gone = acked.elapsed();
        println!("the unpublish reached every subscriber {gone:?} after its acknowledgement");
        assert!(
            gone < LANDS_WITHIN,
            "subscribers still saw the instance {gone:?} after the unpublish was acknowledged"
        );
        assert_eq!(
            publisher.session_id(),
            Some(survivor as u64 + 1),
            "the unpublish went through the surviving session"
        );
        publisher.close().await;
        for client in subscribers {
            client.close().await;
        }
    });
}
