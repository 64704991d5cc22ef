//! Where a client goes when its session server goes away: the other configured servers first,
//! but not only. When every other address is silent, the server it left is dialed too after a
//! second, since it may be the one back first; waiting out a silent address's handshake timeout
//! would outlast the grace the data tier gives the client's publishers.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use roster_client::Client;
use roster_session::SessionConfig;
use roster_tests::{Cluster, bind_loopback, eventually};

/// Session server 2 drains for a moment only: its client has nowhere else to go.
fn short_drain(config: &mut SessionConfig) {
    config.drain_timeout = Duration::from_millis(300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_goes_back_to_the_server_it_left_when_the_others_are_silent() {
    let cluster = Cluster::start().await;
    let socket = bind_loopback();
    let addr: SocketAddr = socket.local_addr().unwrap();
    let (stop, task) = cluster.start_session_on(socket, short_drain).await;
    let silent = bind_loopback();
    let mut config = cluster.client_config();
    config.sessions = vec![addr.to_string(), silent.local_addr().unwrap().to_string()];
    // The silent address never completes a handshake: a client waiting it out before trying the
    // server it left would be away for a minute (the handshake's idle timeout is the limit too).
    config.connect_timeout_ms = 60_000;
    config.idle_timeout_ms = 60_000;
    let client = Client::connect(config).await.unwrap();
    assert_eq!(client.session_addr(), Some(addr));
    let _publication = client
        .publish("returns", vec!["10.0.0.1:80".into()])
        .await
        .unwrap();

    // The server stops, and starts again on the same address.
    stop.cancel();
    task.await.unwrap().unwrap();
    let again = UdpSocket::bind(addr).expect("the address is free again");
    let (stop, task) = cluster.start_session_on(again, short_drain).await;

    eventually(
        Duration::from_secs(20),
        "the client back on the restarted server",
        || async {
            let stats = client.stats();
            (stats.reconnects >= 1 && client.session_addr() == Some(addr)).then_some(())
        },
    )
    .await;
    // And it is served there: a request round trip on the new connection.
    let watcher = client.subscribe("returns").await.unwrap();
    drop(watcher);

    client.close().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    cluster.stop().await;
}
