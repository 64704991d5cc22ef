//! Balancing: a session server holding well more than the mean connection count asks some clients
//! to move (`GoAway`); they move to the less loaded server without any subscriber seeing their
//! publishers disappear. A client that closes a connection to go on from another keeps its
//! publishers there for the client grace; one that leaves loses them at once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use roster_client::Client;
use roster_common::proto::{CLOSE_MOVED, ClientRequest, ClientResponse};
use roster_session::{SessionConfig, SessionServer};
use roster_tests::{
    Cluster, ClusterOptions, DEADLINE, PublisherKey, RawClient, SnapshotLog, addresses,
    bind_loopback, check_history, eventually, keys,
};
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_session_moves_clients_to_a_new_one_without_flap() {
    let cluster = Cluster::start().await;
    // The second session server's address is known from the start, so clients list both, but
    // nothing answers there yet: every client lands on the first.
    let second_socket = bind_loopback();
    let second_addr = second_socket.local_addr().unwrap();
    let mut config = cluster.client_config();
    config.sessions.push(second_addr.to_string());
    config.connect_timeout_ms = 1000;

    let mut clients = Vec::new();
    let mut publications = Vec::new();
    for i in 0..CLIENTS {
        let client = Client::connect(config.clone()).await.unwrap();
        assert_eq!(client.session_addr(), Some(cluster.session_addrs[0]));
        publications.push(
            client
                .publish("balanced", vec![format!("10.0.0.{i}:80").into()])
                .await
                .unwrap(),
        );
        clients.push(client);
    }
    let stable: BTreeSet<PublisherKey> = clients
        .iter()
        .zip(&publications)
        .map(|(c, p)| (c.client_id().to_owned(), p.register_id().to_owned()))
        .collect();

    // A watcher on the first session records every snapshot while clients move.
    let mut watcher_config = cluster.client_config();
    watcher_config.connect_timeout_ms = 1000;
    let watcher = Client::connect(watcher_config).await.unwrap();
    let sub = watcher.subscribe("balanced").await.unwrap();
    let log = SnapshotLog::start(sub);
    log.wait_for("every publisher seen", |s| keys(s) == stable)
        .await;

    // Start the second session server on the reserved socket.
    let stop_second = CancellationToken::new();
    let second = SessionServer::new(
        SessionConfig::new(2, vec![cluster.meta_addr.to_string()]),
        cluster.identity.clone(),
    )
    .unwrap();
    let mut ready = second.ready();
    let second_task = tokio::spawn(second.run(second_socket, stop_second.clone()));
    tokio::time::timeout(DEADLINE, ready.wait_for(|r| *r))
        .await
        .expect("second session ready")
        .unwrap();

    // Balancing runs every 5 s and needs the meta tier's mean of both loads (renewed every 1 s).
    let moved = eventually(Duration::from_secs(30), "some clients moved", || async {
        let moved = clients
            .iter()
            .filter(|c| c.session_addr() == Some(second_addr))
            .count();
        (moved >= 5).then_some(moved)
    })
    .await;
    // The first server asks half its excess over the mean to move, and stops once within 25 %
    // (plus 10 connections) of it: far from all of them move.
    assert!(moved < CLIENTS, "{moved} of {CLIENTS} moved");

    // Every client, moved or not, still publishes: a change made through the first session
    // after the move reaches the watcher, and nobody saw a publisher disappear on the way.
    for client in &clients {
        assert!(client.ping().await.is_ok(), "every client connected");
    }
    let _marker = watcher
        .publish("balanced", vec!["marker".into()])
        .await
        .unwrap();
    log.wait_for("the marker", |s| s.publishers.len() == CLIENTS + 1)
        .await;
    let seen = log.finish();
    check_history(&seen, &stable).unwrap();

    drop(publications);
    for client in clients {
        client.close().await;
    }
    watcher.close().await;
    stop_second.cancel();
    second_task.await.unwrap().unwrap();
    cluster.stop().await;
}

/// Clients that know only the overloaded session are asked to move, find nowhere else, and
/// reconnect to the same server: the end of each old connection must not remove what the client
/// has just registered again on its new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_asked_to_move_back_to_the_same_session_keep_their_publishers() {
    let cluster = roster_tests::Cluster::start_with(roster_tests::ClusterOptions {
        sessions: 2,
        ..Default::default()
    })
    .await;
    let mut config = cluster.client_config();
    config.connect_timeout_ms = 1000;
    let mut clients = Vec::new();
    let mut publications = Vec::new();
    let mut states = Vec::new();
    for i in 0..CLIENTS {
        let client = Client::connect(config.clone()).await.unwrap();
        publications.push(
            client
                .publish("stays", vec![format!("10.0.1.{i}:80").into()])
                .await
                .unwrap(),
        );
        let mut state = client.connection_state();
        state.mark_unchanged();
        states.push(state);
        clients.push(client);
    }
    let stable: BTreeSet<PublisherKey> = clients
        .iter()
        .zip(&publications)
        .map(|(c, p)| (c.client_id().to_owned(), p.register_id().to_owned()))
        .collect();

    let watcher = Client::connect(config.clone()).await.unwrap();
    let sub = watcher.subscribe("stays").await.unwrap();
    let log = SnapshotLog::start(sub);
    log.wait_for("every publisher seen", |s| keys(s) == stable)
        .await;

    // Session 2 holds nobody: session 1 asks some clients to move; they come back to it.
    let moved = eventually(Duration::from_secs(30), "clients reconnected", || async {
        let moved = states
            .iter()
            .filter(|s| s.has_changed().unwrap_or(false))
            .count();
        (moved >= 5).then_some(moved)
    })
    .await;
    assert!(
        clients
            .iter()
            .all(|c| c.session_addr() == Some(cluster.session_addrs[0]))
    );

    // A change after the moves reaches the watcher, and every publisher is still there.
    let _marker = watcher
        .publish("stays", vec!["marker".into()])
        .await
        .unwrap();
    log.wait_for("the marker", |s| s.publishers.len() == CLIENTS + 1)
        .await;
    let seen = log.finish();
    check_history(&seen, &stable)
        .unwrap_or_else(|e| panic!("after {moved} clients reconnected: {e}"));

    drop(publications);
    for client in clients {
        client.close().await;
    }
    watcher.close().await;
    cluster.stop().await;
}

/// A hand-driven client that published one address in `demo` on the cluster's first session.
async fn raw_publisher(cluster: &Cluster, client_id: &str, addr: &str) -> RawClient {
    let raw = RawClient::connect(cluster, cluster.session_addrs[0], None).await;
    let secret = format!("the secret of the client {client_id}");
    assert!(
        raw.hello_with_secret(client_id, secret.as_bytes())
            .await
            .is_ok()
    );
    let publish = ClientRequest::Publish {
        register_id: "r1".into(),
        service: "demo".parse().unwrap(),
        data: vec![addr.as_bytes().to_vec().into()],
        attributes: Default::default(),
        client_version: 1,
        check: None,
    };
    assert!(matches!(
        raw.call(&publish).await,
        Ok(ClientResponse::Accepted { durable: true })
    ));
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moving_on_keeps_its_publishers_for_the_grace_one_leaving_does_not() {
    const GRACE: Duration = Duration::from_secs(4);
    let cluster = Cluster::start_with(ClusterOptions {
        session: |config| config.client_grace = GRACE,
        ..Default::default()
    })
    .await;
    let subscriber = Client::connect(cluster.client_config()).await.unwrap();
    let log = SnapshotLog::start(subscriber.subscribe("demo").await.unwrap());

    // Leaving (close code 0): removed at once.
    let leaver = raw_publisher(&cluster, "leaver", "10.0.0.1:1").await;
    log.wait_for("the leaver's address", |s| addresses(s) == ["10.0.0.1:1"])
        .await;
    let closed = Instant::now();
    leaver.conn.close(0u32.into(), b"client closed");
    log.wait_for("the leaver's address gone", |s| addresses(s).is_empty())
        .await;
    assert!(
        closed.elapsed() < GRACE,
        "a client that left loses its publishers at once, not after {GRACE:?} ({:?})",
        closed.elapsed()
    );

    // Moving on (CLOSE_MOVED): kept for the grace, for its registration elsewhere to land first;
    // nobody registered it elsewhere here, so it goes after the grace.
    let mover = raw_publisher(&cluster, "mover", "10.0.0.2:1").await;
    log.wait_for("the mover's address", |s| addresses(s) == ["10.0.0.2:1"])
        .await;
    let closed = Instant::now();
    mover
        .conn
        .close(CLOSE_MOVED.into(), b"moved to another session server");
    log.wait_for("the mover's address gone after the grace", |s| {
        addresses(s).is_empty()
    })
    .await;
    assert!(
        closed.elapsed() >= GRACE,
        "a client that moved on keeps its publishers for the grace ({:?})",
        closed.elapsed()
    );

    subscriber.close().await;
    cluster.stop().await;
}
