//! Balancing: a session server holding well more than the mean connection count asks some clients
//! to move (`GoAway`); they move to the less loaded server without any subscriber seeing their
//! publishers disappear. A client that closes a connection to go on from another keeps its
//! publishers there for the client grace; one that leaves loses them at once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use roster_client::{Client, Publication};
use roster_common::peers::FaultTable;
use roster_common::proto::{CLOSE_MOVED, ClientRequest, ClientResponse};
use roster_tests::{
    Cluster, ClusterOptions, DEADLINE, PublisherKey, RawClient, SnapshotLog, addresses,
    bind_loopback, check_history, eventually, keys,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 40;

/// The client grace of [`cluster_with_a_long_grace`]: long enough to tell "at once" from "after
/// the grace" on a loaded machine.
const GRACE: Duration = Duration::from_secs(4);

/// A cluster whose session server keeps the publishers of a lost or moved-on connection for
/// [`GRACE`].
async fn cluster_with_a_long_grace() -> Cluster {
    Cluster::start_with(ClusterOptions {
        session: |config| config.client_grace = GRACE,
        ..Default::default()
    })
    .await
}

/// `CLIENTS` clients, each publishing one address in `service`, all on the cluster's first session
/// server though they also list `second` (where nothing answers yet); and their publisher keys.
async fn clients_on_the_first(
    cluster: &Cluster,
    second: SocketAddr,
    service: &str,
) -> (Vec<Client>, Vec<Publication>, BTreeSet<PublisherKey>) {
    let mut config = cluster.client_config();
    config.sessions.push(second.to_string());
    config.connect_timeout_ms = 1000;
    let mut clients = Vec::new();
    let mut publications = Vec::new();
    for i in 0..CLIENTS {
        let client = Client::connect(config.clone()).await.unwrap();
        assert_eq!(client.session_addr(), Some(cluster.session_addrs[0]));
        publications.push(
            client
                .publish(service, vec![format!("10.0.0.{i}:80").into()])
                .await
                .unwrap(),
        );
        clients.push(client);
    }
    let stable = clients
        .iter()
        .zip(&publications)
        .map(|(c, p)| (c.client_id().to_owned(), p.register_id().to_owned()))
        .collect();
    (clients, publications, stable)
}

/// How many of `clients` are connected to `addr`.
fn connected_to(clients: &[Client], addr: SocketAddr) -> usize {
    clients
        .iter()
        .filter(|c| c.session_addr() == Some(addr))
        .count()
}

/// Closes every client and the watcher, then stops session server 2 and the cluster.
async fn tear_down(
    clients: Vec<Client>,
    watcher: Client,
    (stop_second, second_task): (CancellationToken, JoinHandle<roster_common::Result<()>>),
    cluster: Cluster,
) {
    for client in clients {
        client.close().await;
    }
    watcher.close().await;
    stop_second.cancel();
    second_task.await.unwrap().unwrap();
    cluster.stop().await;
}

/// A watcher connected to the cluster's first session server only, recording `service`.
async fn watch_first(cluster: &Cluster, service: &str) -> (Client, SnapshotLog) {
    let mut config = cluster.client_config();
    config.connect_timeout_ms = 1000;
    let watcher = Client::connect(config).await.unwrap();
    let log = SnapshotLog::start(watcher.subscribe(service).await.unwrap());
    (watcher, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_session_moves_clients_to_a_new_one_without_flap() {
    let cluster = Cluster::start().await;
    // The second session server's address is known from the start, so clients list both, but
    // nothing answers there yet: every client lands on the first.
    let second_socket = bind_loopback();
    let second_addr = second_socket.local_addr().unwrap();
    let (clients, publications, stable) =
        clients_on_the_first(&cluster, second_addr, "balanced").await;

    // A watcher on the first session records every snapshot while clients move.
    let (watcher, log) = watch_first(&cluster, "balanced").await;
    log.wait_for("every publisher seen", |s| keys(s) == stable)
        .await;

    let (stop_second, second_task) = cluster.start_session_on(second_socket, |_| {}).await;

    // Balancing runs every 5 s and needs the meta tier's mean of both loads (renewed every 1 s).
    let moved = eventually(Duration::from_secs(30), "some clients moved", || async {
        let moved = connected_to(&clients, second_addr);
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
    tear_down(clients, watcher, (stop_second, second_task), cluster).await;
}

/// Clients move to a session server that cannot reach the data tier for a while: it answers their
/// registrations `durable: false` and holds them. Each keeps its old connection — and with it its
/// publishers on the first server — until they have landed through the new one; only then does
/// the first server let them go, and no subscriber sees them missing in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_client_keeps_its_old_connection_until_its_publishers_land_elsewhere() {
    let cluster = cluster_with_a_long_grace().await;
    let data_addr = cluster.data_addrs[0].to_string();
    let second_socket = bind_loopback();
    let second_addr = second_socket.local_addr().unwrap();
    let (mut clients, mut publications, mut stable) =
        clients_on_the_first(&cluster, second_addr, "handed").await;
    let (watcher, log) = watch_first(&cluster, "handed").await;
    log.wait_for("every publisher seen", |s| keys(s) == stable)
        .await;

    let faults = FaultTable::new();
    let (stop_second, second_task) = cluster
        .start_session_on(second_socket, |c| c.faults = Some(faults.clone()))
        .await;
    faults.drop_calls(&data_addr);

    eventually(Duration::from_secs(30), "some clients moved", || async {
        (connected_to(&clients, second_addr) >= 5).then_some(())
    })
    .await;
    // Past the time the moved clients' registrations were answered, with the second server still
    // cut off: the first still has every client's connection and every publisher.
    let first = cluster.session_admins[0].source().unwrap();
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_secs(3) {
        let status = first.status().await;
        // Every client and the watcher (which, asked to move too, may be on two connections for
        // a moment).
        assert!(
            status["connections"]["count"].as_u64().unwrap() > CLIENTS as u64,
            "clients that moved keep their old connection while their publishers are held: {}",
            status["connections"]
        );
        assert_eq!(status["connections"]["publishers"], CLIENTS);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A moved client that closes meanwhile leaves at once, through its old connection too, not
    // after the grace of a client that moved on.
    let at = clients
        .iter()
        .position(|c| c.session_addr() == Some(second_addr))
        .expect("a moved client");
    let (leaver, publication) = (clients.remove(at), publications.remove(at));
    let key = (
        leaver.client_id().to_owned(),
        publication.register_id().to_owned(),
    );
    stable.remove(&key);
    let closed = Instant::now();
    leaver.close().await;
    log.wait_for("the leaver gone", |s| !keys(s).contains(&key))
        .await;
    assert!(
        closed.elapsed() < GRACE,
        "a client closing during a hand-over leaves at once ({:?})",
        closed.elapsed()
    );
    drop(publication);

    // Reachable again: the held registrations land, and the old connections go.
    faults.heal_all();
    let moved = eventually(
        DEADLINE,
        "the first server let the moved clients go",
        || async {
            // Balancing may go on moving clients meanwhile.
            let moved = connected_to(&clients, second_addr);
            let status = first.status().await;
            (status["connections"]["count"] == CLIENTS - moved
                && status["connections"]["publishers"] == CLIENTS - 1 - moved)
                .then_some(moved)
        },
    )
    .await;
    let _marker = watcher
        .publish("handed", vec!["marker".into()])
        .await
        .unwrap();
    log.wait_for("the marker", |s| s.publishers.len() == CLIENTS)
        .await;
    let seen = log.finish();
    check_history(&seen, &stable).unwrap_or_else(|e| panic!("after {moved} clients moved: {e}"));

    drop(publications);
    tear_down(clients, watcher, (stop_second, second_task), cluster).await;
}

/// Clients that know only the overloaded session (and an address where nothing answers) are asked
/// to move, find nowhere else, and connect to the same server again: neither the end of the old
/// connection nor that of the new one may remove what the client registered on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_asked_to_move_back_to_the_same_session_keep_their_publishers() {
    let cluster = roster_tests::Cluster::start_with(roster_tests::ClusterOptions {
        sessions: 2,
        ..Default::default()
    })
    .await;
    let silent = bind_loopback();
    let mut config = cluster.client_config();
    config
        .sessions
        .push(silent.local_addr().unwrap().to_string());
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
    let cluster = cluster_with_a_long_grace().await;
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
