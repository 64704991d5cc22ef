//! A publisher record belongs to the client that created it. Another client presenting the same
//! `client_id` (every subscriber sees it in every snapshot) but not the owner's secret can neither
//! replace nor remove it — on the owner's own session server, nor through another one — and no
//! subscriber ever sees its data under the owner's id.

use std::collections::BTreeSet;

use roster_client::Client;
use roster_common::Error;
use roster_common::proto::{ClientRequest, ClientResponse, Reply};
use roster_tests::{
    Cluster, ClusterOptions, RawClient, SnapshotLog, addresses, check_history, keys,
};

const IMPOSTOR_ADDR: &str = "6.6.6.6:6";

/// `Publish` of `register_id` in service `demo` with one address.
fn publish(register_id: &str, addr: &str, client_version: u64) -> ClientRequest {
    ClientRequest::Publish {
        check: None,
        register_id: register_id.into(),
        service: "demo".parse().unwrap(),
        data: vec![addr.to_owned().into()],
        attributes: Default::default(),
        client_version,
    }
}

/// Whether `reply` is the error `expected` describes.
fn refused_with(reply: Reply<ClientResponse>, expected: fn(&Error) -> bool) -> bool {
    reply
        .map_err(Error::from_wire)
        .err()
        .as_ref()
        .is_some_and(expected)
}

/// Says `Hello` as `client_id` with `secret`, then tries to publish `register_id` of `demo` and
/// to unpublish it. Returns every answer it got (stopping after a refused `Hello`).
async fn try_to_take_over(
    raw: &RawClient,
    client_id: &str,
    secret: &[u8],
    register_id: &str,
) -> Vec<Reply<ClientResponse>> {
    let hello = raw.hello_with_secret(client_id, secret).await;
    let refused = hello.is_err();
    let mut answers = vec![hello];
    if refused {
        return answers;
    }
    answers.push(
        raw.call(&publish(register_id, IMPOSTOR_ADDR, u64::MAX))
            .await,
    );
    answers.push(
        raw.call(&ClientRequest::Unpublish {
            register_id: register_id.into(),
            service: None,
        })
        .await,
    );
    // Naming the service asks the slot leader to remove the record if this client owns it.
    answers.push(
        raw.call(&ClientRequest::Unpublish {
            register_id: register_id.into(),
            service: Some("demo".parse().unwrap()),
        })
        .await,
    );
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_cannot_take_over_another_clients_publisher() {
    let cluster = Cluster::start_with(ClusterOptions {
        datas: 1,
        sessions: 2,
        ..Default::default()
    })
    .await;
    let on_session = |i: usize| {
        let mut config = cluster.client_config();
        config.sessions = vec![cluster.session_addrs[i].to_string()];
        config
    };

    // The subscriber watches through session 2, the victim publishes through session 1.
    let subscriber = Client::connect(on_session(1)).await.unwrap();
    let log = SnapshotLog::start(subscriber.subscribe("demo").await.unwrap());
    let mut config = on_session(0);
    config.client_id = Some("victim".into());
    let victim = Client::connect(config).await.unwrap();
    let mine = victim
        .publisher("demo")
        .register_id("r1")
        .publish(vec!["10.0.0.1:1".into()])
        .await
        .unwrap();
    log.wait_for("the victim's publisher", |s| addresses(s) == ["10.0.0.1:1"])
        .await;

    // Both ways: on the victim's own session server, and through the other one.
    for (session, name) in [(0, "the victim's session"), (1, "another session")] {
        let raw = RawClient::connect(&cluster, cluster.session_addrs[session], None).await;
        let answers = try_to_take_over(&raw, "victim", b"not the victim's secret!", "r1").await;
        // A Hello may be welcomed where the victim is unknown; what it asks next is refused —
        // except an unpublish naming the service, which is accepted as "removed if it was yours"
        // and removes nothing here (the history below proves the record never left).
        let welcomed = matches!(answers[0], Ok(ClientResponse::Welcome { .. }));
        let asked = &answers[usize::from(welcomed)..answers.len().saturating_sub(1).max(1)];
        assert!(
            asked.iter().all(Result::is_err),
            "{name}: every attempt is refused: {answers:?}"
        );
        assert!(
            answers
                .iter()
                .any(|a| refused_with(a.clone(), |e| matches!(e, Error::PermissionDenied(_)))),
            "{name}: the impostor is told PermissionDenied: {answers:?}"
        );
        raw.conn.close(0u32.into(), b"impostor leaves");
        raw.endpoint.wait_idle().await;
    }

    // The victim is untouched: its next change goes through, its publisher is still there.
    let second = victim
        .publisher("demo")
        .register_id("r2")
        .publish(vec!["10.0.0.1:2".into()])
        .await
        .unwrap();
    log.wait_for("the victim's two publishers", |s| {
        addresses(s) == ["10.0.0.1:1", "10.0.0.1:2"]
    })
    .await;

    let seen = log.finish();
    for snapshot in &seen {
        assert!(
            !addresses(snapshot).iter().any(|a| a == IMPOSTOR_ADDR),
            "a subscriber saw the impostor's data at version {}: {snapshot:?}",
            snapshot.version
        );
    }
    let from_first = seen
        .iter()
        .position(|s| !s.publishers.is_empty())
        .expect("the victim's publisher was seen");
    let stable: BTreeSet<_> = [("victim".to_owned(), "r1".to_owned())].into();
    check_history(&seen[from_first..], &stable).unwrap();
    assert_eq!(keys(seen.last().unwrap()).len(), 2);

    drop((mine, second));
    victim.close().await;
    subscriber.close().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_coming_back_with_its_secret_keeps_its_publisher() {
    let cluster = Cluster::start().await;
    let session = cluster.session_addrs[0];
    let subscriber = Client::connect(cluster.client_config()).await.unwrap();
    let log = SnapshotLog::start(subscriber.subscribe("demo").await.unwrap());

    // A hand-driven client publishes, loses its connection without closing it, and comes back
    // with the same id and secret on a new connection: it may replace its own record.
    let first = RawClient::connect(&cluster, session, None).await;
    assert!(
        first
            .hello_with_secret("owner", b"the owner's secret")
            .await
            .is_ok()
    );
    assert!(first.call(&publish("r1", "10.0.0.1:1", 1)).await.is_ok());
    log.wait_for("the first record", |s| addresses(s) == ["10.0.0.1:1"])
        .await;

    let second = RawClient::connect(&cluster, session, None).await;
    assert!(
        second
            .hello_with_secret("owner", b"the owner's secret")
            .await
            .is_ok(),
        "the owner may open a second connection"
    );
    assert!(second.call(&publish("r1", "10.0.0.1:2", 2)).await.is_ok());
    log.wait_for("the owner's update", |s| addresses(s) == ["10.0.0.1:2"])
        .await;

    // A Hello without a secret, or with one too short to be one, is refused outright.
    let third = RawClient::connect(&cluster, session, None).await;
    let refused = third.hello_with_secret("someone", b"short").await;
    assert!(
        refused_with(refused, |e| matches!(e, Error::InvalidArgument(_))),
        "a short secret is an invalid argument"
    );

    drop((first, second, third));
    subscriber.close().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_control_characters_are_refused() {
    let cluster = Cluster::start().await;
    let raw = RawClient::connect(&cluster, cluster.session_addrs[0], None).await;
    let refused = raw
        .hello_with_secret("a\0b", b"a secret of enough bytes")
        .await;
    assert!(
        refused_with(refused, |e| matches!(e, Error::InvalidArgument(_))),
        "a client_id with NUL is refused"
    );
    assert!(
        raw.hello_with_secret("fine", b"a secret of enough bytes")
            .await
            .is_ok()
    );
    for register_id in ["r\u{0}1", "r\n1", "r\u{7f}"] {
        let answer = raw.call(&publish(register_id, "10.0.0.1:1", 1)).await;
        assert!(
            refused_with(answer, |e| matches!(e, Error::InvalidArgument(_))),
            "register id {register_id:?} is refused"
        );
    }
    drop(raw);
    cluster.stop().await;
}
