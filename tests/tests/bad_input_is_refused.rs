//! Bad input from a client gets a clear error and harms nothing else: garbage bytes, an oversized
//! frame, a well-formed frame of the wrong message, a request before Hello, an unknown protocol
//! version. Another client keeps publishing and receiving pushes throughout.

use std::time::Duration;

use roster_client::Client;
use roster_common::ErrorCode;
use roster_common::frame::{self, DEFAULT_MAX_FRAME};
use roster_common::proto::{ClientRequest, ClientResponse, DataRequest, PROTOCOL_VERSION, Reply};
use roster_tests::{Cluster, DEADLINE, RawClient, addresses, next_matching};

async fn exchange(raw: &RawClient, request: &impl serde::Serialize) -> Reply<ClientResponse> {
    raw.call_raw(&frame::encode(request, u32::MAX).unwrap())
        .await
}

fn assert_code(reply: Reply<ClientResponse>, code: ErrorCode) -> String {
    match reply {
        Err(wire) => {
            assert_eq!(wire.code, code.as_u16(), "expected {code:?}, got {wire:?}");
            assert!(!wire.message.is_empty(), "the error says what went wrong");
            wire.message
        }
        Ok(body) => panic!("expected {code:?}, got {body:?}"),
    }
}

fn hello(version: u32) -> ClientRequest {
    ClientRequest::Hello {
        protocol_version: version,
        client_id: "raw-client".into(),
        client_name: String::new(),
        token: None,
        client_secret: (*b"a secret of the raw client").as_slice().into(),
        capabilities: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_and_wrong_frames_get_clear_errors_while_others_keep_working() {
    let cluster = Cluster::start().await;

    // A well-behaved client, subscribed and publishing, watches the whole time.
    let good = Client::connect(cluster.client_config()).await.unwrap();
    let mut sub = good.subscribe("steady").await.unwrap();
    let _first = good
        .publish("steady", vec!["10.0.0.1:1".into()])
        .await
        .unwrap();
    next_matching(&mut sub, DEADLINE, "the first publisher", |s| {
        addresses(s) == ["10.0.0.1:1"]
    })
    .await;

    let raw = RawClient::connect(&cluster, cluster.session_addrs[0], None).await;

    // Before Hello, requests are refused and say why.
    let message = assert_code(
        exchange(&raw, &ClientRequest::Ping {}).await,
        ErrorCode::HelloRequired,
    );
    assert!(message.contains("Ping"), "{message}");
    assert!(matches!(
        exchange(&raw, &hello(PROTOCOL_VERSION)).await,
        Ok(ClientResponse::Welcome { .. })
    ));

    // Bytes that are not MessagePack.
    let message = assert_code(
        raw.call_raw(&[0, 0, 0, 5, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1])
            .await,
        ErrorCode::BadFrame,
    );
    assert!(message.contains("MessagePack"), "{message}");
    // A frame header promising more than the limit.
    let mut oversized = (2u32 << 20).to_be_bytes().to_vec();
    oversized.extend(std::iter::repeat_n(0u8, 64 * 1024));
    let message = assert_code(raw.call_raw(&oversized).await, ErrorCode::FrameTooLarge);
    assert!(message.contains("1048576"), "names the limit: {message}");
    // A stream that ends inside a frame.
    assert_code(
        raw.call_raw(&[0, 0, 0, 10, 1, 2]).await,
        ErrorCode::BadFrame,
    );
    // A well-formed frame of a message that does not belong on this link.
    let wrong = DataRequest::Fetch {
        services: vec!["steady".parse().unwrap()],
    };
    assert_code(exchange(&raw, &wrong).await, ErrorCode::UnexpectedMessage);
    // A valid message with a bad argument.
    let bad_service = frame::encode(
        &std::collections::BTreeMap::from([(
            "Subscribe",
            std::collections::BTreeMap::from([
                ("register_id", "s1"),
                ("service", "a/b"),
                ("scope", "global"),
            ]),
        )]),
        DEFAULT_MAX_FRAME,
    )
    .unwrap();
    let message = assert_code(raw.call_raw(&bad_service).await, ErrorCode::InvalidArgument);
    assert!(message.contains("\"a/b\""), "names the value: {message}");
    assert_code(
        exchange(
            &raw,
            &ClientRequest::Unpublish {
                register_id: "nope".into(),
                service: None,
            },
        )
        .await,
        ErrorCode::NotFound,
    );

    // The raw connection itself still works after all that.
    assert!(matches!(
        exchange(&raw, &ClientRequest::Ping {}).await,
        Ok(ClientResponse::Pong {})
    ));

    // And the good client still publishes and is pushed to.
    let _second = good
        .publish("steady", vec!["10.0.0.2:1".into()])
        .await
        .unwrap();
    next_matching(&mut sub, DEADLINE, "the second publisher", |s| {
        addresses(s) == ["10.0.0.1:1", "10.0.0.2:1"]
    })
    .await;

    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_protocol_version_is_refused_and_the_connection_closed() {
    let cluster = Cluster::start().await;
    let raw = RawClient::connect(&cluster, cluster.session_addrs[0], None).await;
    let message = assert_code(
        exchange(&raw, &hello(99)).await,
        ErrorCode::UnsupportedVersion,
    );
    assert!(
        message.contains("99") && message.contains(&PROTOCOL_VERSION.to_string()),
        "{message}"
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.conn.closed())
        .await
        .expect("the server closes the connection");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    cluster.stop().await;
}
