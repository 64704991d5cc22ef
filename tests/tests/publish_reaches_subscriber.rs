//! The first complete path: publish through a session, ordered by the slot leader, pushed to every
//! subscriber; a closed connection takes its publishers with it.

use roster_client::Client;
use roster_tests::{Cluster, DEADLINE, addresses, assert_versions_increase, next_matching};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_subscriber_and_a_closed_connection_empties_the_service() {
    let cluster = Cluster::start().await;

    let subscriber = Client::connect(cluster.client_config()).await.unwrap();
    let mut sub = subscriber.subscribe("demo").await.unwrap();
    let (_, mut seen) = next_matching(&mut sub, DEADLINE, "the initial empty snapshot", |s| {
        s.publishers.is_empty()
    })
    .await;

    let publisher = Client::connect(cluster.client_config()).await.unwrap();
    let publication = publisher
        .publish("demo", vec!["10.0.0.1:8080".into()])
        .await
        .unwrap();
    assert!(
        publication.is_durable(),
        "the slot leader acknowledged the publish"
    );

    let (snapshot, more) = next_matching(&mut sub, DEADLINE, "the publisher", |s| {
        addresses(s) == ["10.0.0.1:8080"]
    })
    .await;
    seen.extend(more);
    assert_eq!(snapshot.service.as_str(), "default/DEFAULT/demo");
    assert_eq!(
        snapshot.publishers.iter().next().unwrap().client_id,
        publisher.client_id()
    );
    assert_eq!(
        sub.current().unwrap(),
        snapshot,
        "current() is the latest snapshot"
    );

    // A second subscriber arriving late gets the current snapshot at once.
    let late = Client::connect(cluster.client_config()).await.unwrap();
    let mut late_sub = late.subscribe("demo").await.unwrap();
    next_matching(&mut late_sub, DEADLINE, "the cached snapshot", |s| {
        addresses(s) == ["10.0.0.1:8080"]
    })
    .await;

    // Dropping the publisher's connection removes its publisher.
    publisher.close().await;
    let (_, more) = next_matching(&mut sub, DEADLINE, "the empty snapshot", |s| {
        s.publishers.is_empty()
    })
    .await;
    seen.extend(more);
    next_matching(&mut late_sub, DEADLINE, "the empty snapshot", |s| {
        s.publishers.is_empty()
    })
    .await;
    assert_versions_increase(&seen);
    drop(publication);

    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_update_and_list_services() {
    let cluster = Cluster::start().await;
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let mut sub = client.subscribe("prod/payments/api").await.unwrap();

    let mut a = client
        .publish("prod/payments/api", vec!["10.0.0.1:1".into()])
        .await
        .unwrap();
    let b = client
        .publish("prod/payments/api", vec!["10.0.0.2:1".into()])
        .await
        .unwrap();
    next_matching(&mut sub, DEADLINE, "two publishers", |s| {
        addresses(s) == ["10.0.0.1:1", "10.0.0.2:1"]
    })
    .await;

    let services = client.list_services().await.unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].service.as_str(), "prod/payments/api");
    assert_eq!(services[0].publishers, 2);

    a.update(vec!["10.0.0.3:1".into()]).await.unwrap();
    next_matching(&mut sub, DEADLINE, "the update", |s| {
        addresses(s) == ["10.0.0.2:1", "10.0.0.3:1"]
    })
    .await;

    b.unpublish().await.unwrap();
    next_matching(&mut sub, DEADLINE, "the unpublish", |s| {
        addresses(s) == ["10.0.0.3:1"]
    })
    .await;

    // Dropping a publication unpublishes it too.
    drop(a);
    next_matching(&mut sub, DEADLINE, "the drop", |s| s.publishers.is_empty()).await;
    assert!(client.list_services().await.unwrap().is_empty());

    cluster.stop().await;
}

/// An application may fire many requests at once; the SDK queues them so the session server's
/// per-connection request limit (64 by default) is never what fails them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_from_one_client_all_succeed() {
    let cluster = Cluster::start().await;
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let publishes = (0..300).map(|i| {
        let client = client.clone();
        async move {
            client
                .publish(
                    &format!("burst-{i}"),
                    vec![format!("10.0.0.{}:80", i % 250).into()],
                )
                .await
        }
    });
    let results = futures_util::future::join_all(publishes).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 300 publishes failed: {:?}",
        failed.len(),
        failed.first()
    );
    let services = client.list_services().await.unwrap();
    assert_eq!(
        services
            .iter()
            .filter(|s| s.service.as_str().contains("burst-"))
            .count(),
        300
    );
}

/// Publications dropped by the thousand are all removed, also when the client closes right after:
/// the removals travel side by side (never one round trip after another, holding up the client's
/// connection watchdog), and closing sends what is still queued within a second before the close
/// itself removes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_many_publications_removes_them_all() {
    let cluster = Cluster::start().await;
    let watcher = Client::connect(cluster.client_config()).await.unwrap();
    let mut fleet = watcher.subscribe("fleet").await.unwrap();
    let mut leaving = watcher.subscribe("leaving").await.unwrap();

    let client = Client::connect(cluster.client_config()).await.unwrap();
    let publish_many = |service: &'static str| {
        let client = client.clone();
        async move {
            let publishes = (0..1000).map(|i| {
                let client = client.clone();
                async move {
                    let address = format!("10.0.{}.{}:80", i / 250, i % 250);
                    client.publish(service, vec![address.into()]).await
                }
            });
            futures_util::future::join_all(publishes)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        }
    };
    let kept = publish_many("fleet").await;
    next_matching(&mut fleet, DEADLINE, "1,000 publishers", |s| {
        s.publishers.len() == 1000
    })
    .await;
    // Dropped while the client stays: removed in the background, and the client still answers.
    drop(kept);
    client.ping().await.unwrap();
    next_matching(&mut fleet, DEADLINE, "all 1,000 removed", |s| {
        s.publishers.is_empty()
    })
    .await;

    // Dropped just before closing.
    let dropped = publish_many("leaving").await;
    next_matching(&mut leaving, DEADLINE, "1,000 more", |s| {
        s.publishers.len() == 1000
    })
    .await;
    drop(dropped);
    client.close().await;
    next_matching(&mut leaving, DEADLINE, "all removed after the close", |s| {
        s.publishers.is_empty()
    })
    .await;

    watcher.close().await;
    cluster.stop().await;
}
