//! The edges of `roster/1` that docs/PROTOCOL.md settles, as a client written from the document
//! alone meets them: which code a refused value gets wherever it sits, a second `Hello`, a
//! field-less variant written as an empty array, stale and repeated client versions, register ids
//! of publishers and subscriptions, and two subscriptions of one connection to one service.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use roster_common::ErrorCode;
use roster_common::frame;
use roster_common::proto::{ClientRequest, ClientResponse, Push, Reply, Scope};
use roster_tests::{Cluster, RawClient};
use serde::Serialize;

/// How long a push that must come may take.
const PUSH_WITHIN: Duration = Duration::from_secs(10);

fn code_of(reply: Reply<ClientResponse>) -> u16 {
    match reply {
        Err(wire) => wire.code,
        Ok(body) => panic!("expected an error, got {body:?}"),
    }
}

fn publish(register_id: &str, service: &str, data: &str, client_version: u64) -> ClientRequest {
    ClientRequest::Publish {
        register_id: register_id.into(),
        service: service.parse().unwrap(),
        data: vec![Bytes::copy_from_slice(data.as_bytes())],
        attributes: BTreeMap::new(),
        client_version,
        check: None,
    }
}

fn subscribe(register_id: &str, service: &str, healthy_only: bool) -> ClientRequest {
    ClientRequest::Subscribe {
        healthy_only,
        register_id: register_id.into(),
        service: service.parse().unwrap(),
        scope: Scope::Global,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_edges_of_the_client_protocol() {
    let cluster = Cluster::start().await;
    let addr = cluster.session_addrs[0];
    let raw = RawClient::connect(&cluster, addr, None).await;

    // An empty client id is a value out of bounds: InvalidArgument, and Hello may be said again.
    assert_eq!(
        code_of(raw.hello_with_secret("", b"sixteen bytes at least").await),
        ErrorCode::InvalidArgument.as_u16()
    );
    raw.hello("edges", &[]).await;
    // A second Hello on the connection is not a message it expects; the connection goes on.
    assert_eq!(
        code_of(raw.hello_with_token("edges", None).await),
        ErrorCode::UnexpectedMessage.as_u16()
    );
    // `{"Ping": []}`: a field-less variant written as an empty array is accepted too.
    let ping_as_array = [0, 0, 0, 7, 0x81, 0xa4, b'P', b'i', b'n', b'g', 0x90];
    assert!(matches!(
        raw.call_raw(&ping_as_array).await,
        Ok(ClientResponse::Pong {})
    ));

    // A malformed service id inside an otherwise valid request is a refused value, like an empty
    // client id: InvalidArgument, not UnexpectedMessage.
    #[derive(Serialize)]
    struct RawPublish<'a> {
        register_id: &'a str,
        service: &'a str,
        data: Vec<Bytes>,
    }
    let long = "x".repeat(600);
    for service in [long.as_str(), "a//b", ""] {
        let request = BTreeMap::from([(
            "Publish",
            RawPublish {
                register_id: "p",
                service,
                data: vec![Bytes::from_static(b"10.0.0.1:80")],
            },
        )]);
        let reply = raw
            .call_raw(&frame::encode(&request, u32::MAX).unwrap())
            .await;
        match reply {
            Err(wire) => {
                assert_eq!(wire.code, ErrorCode::InvalidArgument.as_u16(), "{wire:?}");
                assert!(wire.message.starts_with("service id"), "{wire:?}");
            }
            other => panic!("{service:?}: expected InvalidArgument, got {other:?}"),
        }
    }

    // A watcher on its own connection sees every version (snapshots, no deltas).
    let mut watcher = RawClient::connect(&cluster, addr, None).await;
    watcher.hello("watcher", &[]).await;
    watcher.subscribe("w", "edge-versions").await;

    // Client versions: a lower one is acknowledged and ignored, an equal one applied.
    let accepted = |reply: Reply<ClientResponse>| {
        assert!(
            matches!(reply, Ok(ClientResponse::Accepted { durable: true })),
            "{reply:?}"
        )
    };
    accepted(
        raw.call(&publish("p1", "edge-versions", "v5-first", 5))
            .await,
    );
    accepted(
        raw.call(&publish("p1", "edge-versions", "v3-stale", 3))
            .await,
    );
    accepted(
        raw.call(&publish("p1", "edge-versions", "v5-again", 5))
            .await,
    );
    let mut seen = Vec::new();
    loop {
        let push = watcher
            .next_push(PUSH_WITHIN)
            .await
            .expect("pushes until the equal version's data");
        let Push::Snapshot(snapshot) = push else {
            continue;
        };
        let data: Vec<String> = snapshot
            .publishers
            .iter()
            .flat_map(|p| p.data.iter())
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .collect();
        seen.extend(data.clone());
        if data == ["v5-again"] {
            break;
        }
    }
    assert!(
        !seen.iter().any(|d| d == "v3-stale"),
        "the stale version never reached a subscriber: {seen:?}"
    );

    // Publisher and subscription register ids are separate spaces: `p1` may be both.
    assert!(matches!(
        raw.call(&subscribe("p1", "edge-other", false)).await,
        Ok(ClientResponse::Done {})
    ));

    // Two subscriptions of one connection to one service are pushed as one: one snapshot when
    // the second joins, then one push per version.
    let mut both = RawClient::connect(&cluster, addr, None).await;
    both.hello("both", &[]).await;
    both.subscribe("t1", "edge-two").await;
    both.subscribe("t2", "edge-two").await;
    // A joining subscription of the other kind switches the connection's pushes of the service to
    // it; this one goes again, leaving the plain ones.
    assert!(matches!(
        both.call(&subscribe("t3", "edge-two", true)).await,
        Ok(ClientResponse::Done {})
    ));
    assert!(matches!(
        both.call(&ClientRequest::Unsubscribe {
            register_id: "t3".into()
        })
        .await,
        Ok(ClientResponse::Done {})
    ));
    for (i, v) in (1..=4).enumerate() {
        accepted(
            raw.call(&publish(&format!("q{i}"), "edge-two", "10.0.0.9:80", v))
                .await,
        );
    }
    // (version, publishers) of every push, snapshots only (no deltas asked for), until the
    // fourth publisher: a second push of any earlier version would come before it.
    let mut pushed: Vec<(u64, usize)> = Vec::new();
    while pushed.last().is_none_or(|(_, n)| *n < 4) {
        match both.next_push(PUSH_WITHIN).await {
            Some(Push::Snapshot(s)) => pushed.push((s.version, s.publishers.len())),
            Some(_) => {}
            None => panic!("no push with the four publishers: {pushed:?}"),
        }
    }
    // Each subscription may have been pushed the empty service before the second joined; from
    // the last of those on, one sequence whose versions strictly increase.
    let from = pushed.iter().rposition(|(_, n)| *n == 0).unwrap_or(0);
    let after = &pushed[from..];
    assert!(
        after.windows(2).all(|w| w[0].0 < w[1].0),
        "one strictly increasing sequence of versions: {pushed:?}"
    );
    cluster.stop().await;
}
