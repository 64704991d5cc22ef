//! The SDK's on-disk snapshot cache: an application that restarts while no session server answers
//! still gets the addresses it last saw; without a cache it gets a clear error.

use roster_client::{Client, ConnectionState};
use roster_tests::{Cluster, DEADLINE, addresses, bind_loopback, next_matching};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_the_registry_is_unreachable_serves_cached_snapshots() {
    let cluster = Cluster::start().await;
    let cache = tempfile::tempdir().unwrap();

    // First life: subscribe with a cache and see the publisher.
    let publisher = Client::connect(cluster.client_config()).await.unwrap();
    let _p = publisher
        .publish("cached", vec!["10.0.0.7:80".into()])
        .await
        .unwrap();
    let mut config = cluster.client_config();
    config.cache_dir = Some(cache.path().to_owned());
    let app = Client::connect(config.clone()).await.unwrap();
    let mut sub = app.subscribe("cached").await.unwrap();
    next_matching(&mut sub, DEADLINE, "the publisher", |s| {
        addresses(s) == ["10.0.0.7:80"]
    })
    .await;
    drop(sub);
    // Closing writes what the periodic flush has not written yet.
    app.close().await;
    assert!(
        std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "snapshot")),
        "a snapshot file was written"
    );

    // Second life: the only session address answers nothing.
    let silent = bind_loopback();
    let mut offline = config.clone();
    offline.sessions = vec![silent.local_addr().unwrap().to_string()];
    offline.connect_timeout_ms = 300;

    let mut uncached = offline.clone();
    uncached.cache_dir = None;
    assert!(
        Client::connect(uncached).await.is_err(),
        "without a cache, connecting to nothing fails"
    );

    let app = Client::connect(offline).await.unwrap();
    assert!(!matches!(
        *app.connection_state().borrow(),
        ConnectionState::Connected { .. }
    ));
    let sub = app.subscribe("cached").await.unwrap();
    let cached = sub.current().expect("the cached snapshot, at once");
    assert_eq!(addresses(&cached), ["10.0.0.7:80"]);
    assert_eq!(cached.service.as_str(), "default/DEFAULT/cached");

    // A service never seen before has nothing cached.
    let other = app.subscribe("never-seen").await.unwrap();
    assert!(other.current().is_none());

    // A corrupt cache file is ignored, not trusted and not fatal.
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not a snapshot").unwrap();
    }
    drop(sub);
    drop(other);
    app.close().await;
    let mut offline = config;
    offline.sessions = vec![silent.local_addr().unwrap().to_string()];
    offline.connect_timeout_ms = 300;
    let app = Client::connect(offline).await.unwrap();
    let sub = app.subscribe("cached").await.unwrap();
    assert!(sub.current().is_none(), "a corrupt file gives no snapshot");
    drop(sub);
    app.close().await;

    publisher.close().await;
    cluster.stop().await;
}
