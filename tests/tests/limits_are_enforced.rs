//! Every per-server and per-connection limit, exceeded once: each gives `LimitExceeded` with a
//! message naming the limit, and the server goes on serving everyone else.

use std::time::Duration;

use roster_client::{Client, ErrorCode};
use roster_common::Error;
use roster_common::frame::{self, DEFAULT_MAX_FRAME};
use roster_common::proto::{ClientRequest, ClientResponse, Reply};
use roster_tests::{
    Cluster, ClusterOptions, DEADLINE, RawClient, addresses, eventually, next_matching,
};

fn small_limits(config: &mut roster_session::SessionConfig) {
    config.max_connections = 3;
    config.max_publishers_per_connection = 2;
    config.max_subscriptions_per_connection = 2;
    config.max_requests_per_connection = 2;
    config.max_publisher_bytes = 100;
}

fn assert_limit<T: std::fmt::Debug>(result: Result<T, Error>, names: &str) {
    match result {
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e:?}");
            assert!(
                e.to_string().contains(names),
                "the error names the limit ({names}): {e}"
            );
        }
        Ok(v) => panic!("expected LimitExceeded ({names}), got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_gives_its_error_and_the_server_keeps_serving() {
    let cluster = Cluster::start_with(ClusterOptions {
        session: small_limits,
        ..ClusterOptions::default()
    })
    .await;
    // A bystander that must keep working throughout.
    let bystander = Client::connect(cluster.client_config()).await.unwrap();
    let mut watch = bystander.subscribe("steady").await.unwrap();
    let _steady = bystander
        .publish("steady", vec!["10.0.0.1:1".into()])
        .await
        .unwrap();
    next_matching(&mut watch, DEADLINE, "the bystander's publisher", |s| {
        addresses(s) == ["10.0.0.1:1"]
    })
    .await;

    // Publishers per connection.
    let client = Client::connect(cluster.client_config()).await.unwrap();
    let _a = client.publish("svc", vec!["a".into()]).await.unwrap();
    let _b = client.publish("svc", vec!["b".into()]).await.unwrap();
    assert_limit(
        client.publish("svc", vec!["c".into()]).await.map(|_| ()),
        "2 publishers",
    );

    // Bytes per publisher.
    assert_limit(
        client
            .publish("svc", vec![vec![b'x'; 200].into()])
            .await
            .map(|_| ()),
        "100 bytes",
    );

    // Subscriptions per connection.
    let _s1 = client.subscribe("one").await.unwrap();
    let _s2 = client.subscribe("two").await.unwrap();
    assert_limit(
        client.subscribe("three").await.map(|_| ()),
        "2 subscriptions",
    );

    // Connections per server: the bystander, `client` and one more fill it.
    let third = Client::connect(cluster.client_config()).await.unwrap();
    assert_limit(
        Client::connect(cluster.client_config()).await.map(|_| ()),
        "3 connections",
    );

    // Outstanding requests per connection, with a raw connection sending many at once. It needs
    // a free connection slot: close one, and wait until the session has let it go.
    third.close().await;
    let raw = eventually(DEADLINE, "a free connection slot", || async {
        let raw = RawClient::connect(&cluster, cluster.session_addrs[0], None).await;
        let hello = raw
            .hello_with_secret("raw", b"the secret of the raw client")
            .await;
        hello.is_ok().then_some(raw)
    })
    .await;
    // Hold two requests open by sending only part of their frames.
    let (refused_tx, mut refused) = tokio::sync::mpsc::unbounded_channel();
    let mut open = Vec::new();
    for _ in 0..2 {
        let (mut send, mut recv) = raw.conn.open_bi().await.unwrap();
        // Half a frame: the server reads and waits for the rest, holding a request slot.
        send.write_all(&[0, 0, 0, 50]).await.unwrap();
        open.push(send);
        // Unless a ping below took the slot first: then this stream is refused at once.
        let refused_tx = refused_tx.clone();
        tokio::spawn(async move {
            let reply =
                frame::read_frame::<_, Reply<ClientResponse>>(&mut recv, DEFAULT_MAX_FRAME).await;
            if let Ok(Some(Err(wire))) = reply {
                let _ = refused_tx.send(wire);
            }
        });
    }
    // With both slots taken, a third request is refused: a ping, or one of the two held streams
    // when a ping was served before it. Either way the limit holds.
    let start = std::time::Instant::now();
    let refusal = loop {
        if let Ok(wire) = refused.try_recv() {
            break wire;
        }
        match raw.call(&ClientRequest::Ping {}).await {
            Err(wire) => break wire,
            Ok(ClientResponse::Pong {}) => {
                assert!(
                    start.elapsed() < DEADLINE,
                    "the request limit never applied"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        refusal.code,
        ErrorCode::LimitExceeded.as_u16(),
        "{refusal:?}"
    );
    assert!(
        refusal.message.contains("2 requests"),
        "{}",
        refusal.message
    );
    drop(open);

    // The bystander still publishes and is pushed to.
    let _more = bystander
        .publish("steady", vec!["10.0.0.2:1".into()])
        .await
        .unwrap();
    next_matching(
        &mut watch,
        DEADLINE,
        "the bystander's second publisher",
        |s| addresses(s) == ["10.0.0.1:1", "10.0.0.2:1"],
    )
    .await;
    cluster.stop().await;
}
