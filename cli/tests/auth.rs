//! Authentication and authorization as a user meets them, with real processes and real QUIC: a
//! cluster created by `roster meta --bootstrap` (authentication on by default), tokens made with
//! `roster acl token create`, and clients that present none, a wrong one, one for another
//! namespace, one that is revoked while connected, and one that expires — while a bystander with a
//! good token keeps publishing and receiving pushes, never disconnected. Then the HTTP admin API:
//! 401 without a token, 403 without `admin`, open `/metrics`; and a source that keeps guessing.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use roster_client::{Client, ClientConfig};
use roster_common::proto::{CLOSE_UNAUTHENTICATED, ClientRequest, ClientResponse, Scope};
use roster_common::{ErrorCode, acl};
use roster_tests::{RawClient, SnapshotLog, addresses};
use support::{Cluster, create_token, http_get, http_status, run};

/// How soon a revoked or expired token's connection must be closed.
const LOSS_WITHIN: Duration = Duration::from_secs(2);
const SERVICE: &str = "prod/api/web";

fn publish(register_id: &str, service: &str, addr: &str) -> ClientRequest {
    ClientRequest::Publish {
        check: None,
        register_id: register_id.into(),
        service: service.parse().unwrap(),
        data: vec![addr.to_owned().into()],
        attributes: Default::default(),
        client_version: 1,
    }
}

fn subscribe(service: &str) -> ClientRequest {
    ClientRequest::Subscribe {
        healthy_only: false,
        register_id: "s".into(),
        service: service.parse().unwrap(),
        scope: Scope::Global,
    }
}

/// Asserts `reply` is the error `code` and its message holds every one of `words`.
fn assert_refused(
    what: &str,
    reply: roster_common::proto::Reply<ClientResponse>,
    code: ErrorCode,
    words: &[&str],
) {
    let err = match reply {
        Err(err) => err,
        Ok(ok) => panic!("{what}: expected {code:?}, got {ok:?}"),
    };
    assert_eq!(err.code, code as u16, "{what}: {}", err.message);
    for word in words {
        assert!(
            err.message.contains(word),
            "{what}: {:?} does not say {word:?}",
            err.message
        );
    }
}

/// Waits until the server closes `raw`'s connection, which must happen within `within`, with
/// [`CLOSE_UNAUTHENTICATED`]; returns the reason it gave.
async fn closed_unauthenticated(what: &str, raw: &RawClient, within: Duration) -> String {
    let closed = tokio::time::timeout(within, raw.conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection is still open after {within:?}"));
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code.into_inner(),
                u64::from(CLOSE_UNAUTHENTICATED),
                "{what}"
            );
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("{what}: closed with {other}, not by the server for its token"),
    }
}

fn revoke(cwd: &Path, meta: &str, token: &str) {
    let id = acl::token_id("t", token).unwrap();
    let (ok, out, err) = run(
        cwd,
        &[
            "acl",
            "token",
            "revoke",
            id,
            "--meta",
            meta,
            "--tls-dir",
            "tls",
        ],
    );
    assert!(ok && out.contains("revoked"), "{out} {err}");
}

#[test]
fn tokens_decide_who_may_do_what_and_a_bystander_never_notices() {
    // Started ready: its data and session servers answer /readyz.
    let cluster = Cluster::builder().auth(true).start();
    let cwd = cluster.cwd();
    let meta = cluster.meta_list();
    let admin = cluster.admin_token.clone().unwrap();
    let (data_http, session, session_http) = (
        cluster.http("data", 1),
        cluster.addr("session", 1),
        cluster.http("session", 1),
    );
    let good = create_token(
        cwd,
        &meta,
        "prod",
        "publish,subscribe",
        &["--description", "bystander"],
    );
    let other_namespace = create_token(cwd, &meta, "dev", "publish,subscribe", &[]);
    let read_only = create_token(cwd, &meta, "prod", "subscribe", &[]);
    let doomed = create_token(cwd, &meta, "prod", "publish,subscribe", &[]);
    let ca = cwd.join("tls/ca.pem");
    let addr: SocketAddr = session.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    runtime.block_on(async {
        // The bystander: a good token, a publisher, and a subscription to the same service.
        let mut config = ClientConfig::new(vec![session.clone()], ca.clone());
        config.token = Some(good.as_str().into());
        let bystander = Client::connect(config).await.unwrap();
        let _first = bystander.publish(SERVICE, vec!["10.0.0.1:80".into()]).await.unwrap();
        let log = SnapshotLog::start(bystander.subscribe(SERVICE).await.unwrap());
        log.wait_for("the bystander's publisher", |s| addresses(s) == ["10.0.0.1:80"]).await;

        // No token, a malformed one, an unknown one: Unauthenticated, and the connection closed.
        let unknown = acl::generate_token();
        for (what, token) in [
            ("no token", None),
            ("a malformed token", Some("hunter2")),
            ("an unknown token", Some(unknown.as_str())),
        ] {
            let raw = RawClient::connect_with_ca(&ca, addr).await;
            let reply = raw.hello_with_token("stranger", token).await;
            assert_refused(what, reply, ErrorCode::Unauthenticated, &["token"]);
            closed_unauthenticated(what, &raw, LOSS_WITHIN).await;
        }

        // Another namespace's token: PermissionDenied naming the namespace and the permission.
        let raw = RawClient::connect_with_ca(&ca, addr).await;
        assert!(raw.hello_with_token("dev-client", Some(&other_namespace)).await.is_ok());
        let reply = raw.call(&publish("r", SERVICE, "6.6.6.6:66")).await;
        assert_refused("publish elsewhere", reply, ErrorCode::PermissionDenied, &["\"prod\"", "publish"]);
        let reply = raw.call(&subscribe(SERVICE)).await;
        assert_refused("subscribe elsewhere", reply, ErrorCode::PermissionDenied, &["\"prod\"", "subscribe"]);
        let reply = raw.call(&publish("r", "dev/api/web", "10.1.0.1:80")).await;
        assert!(matches!(reply, Ok(ClientResponse::Accepted { .. })), "its own namespace: {reply:?}");
        let listed = raw.call(&ClientRequest::ListServices {}).await;
        let Ok(ClientResponse::Services { services }) = listed else {
            panic!("ListServices: {listed:?}");
        };
        assert!(
            services.iter().all(|s| s.service.namespace() == "dev"),
            "a token lists only its namespaces: {services:?}"
        );

        // A subscribe-only token may watch but not publish.
        let raw = RawClient::connect_with_ca(&ca, addr).await;
        assert!(raw.hello_with_token("reader", Some(&read_only)).await.is_ok());
        let reply = raw.call(&publish("r", SERVICE, "6.6.6.6:66")).await;
        assert_refused("publish with subscribe only", reply, ErrorCode::PermissionDenied, &["publish"]);
        assert!(matches!(raw.call(&subscribe(SERVICE)).await, Ok(ClientResponse::Done {})));

        // Revoked while connected: closed within 2 s, and its publisher removed.
        let raw = RawClient::connect_with_ca(&ca, addr).await;
        assert!(raw.hello_with_token("doomed", Some(&doomed)).await.is_ok());
        let reply = raw.call(&publish("d", SERVICE, "10.0.0.9:80")).await;
        assert!(matches!(reply, Ok(ClientResponse::Accepted { .. })), "{reply:?}");
        log.wait_for("the doomed publisher", |s| addresses(s).contains(&"10.0.0.9:80".to_owned())).await;
        let (cwd2, meta2, doomed2) = (cwd.to_owned(), meta.clone(), doomed.clone());
        tokio::task::spawn_blocking(move || revoke(&cwd2, &meta2, &doomed2)).await.unwrap();
        let revoked = Instant::now();
        let reason = closed_unauthenticated("revoked", &raw, LOSS_WITHIN).await;
        assert!(reason.contains("revoked"), "{reason}");
        log.wait_for("the doomed publisher removed", |s| addresses(s) == ["10.0.0.1:80"]).await;
        let gone = revoked.elapsed();
        println!("revoked token: connection closed and its publisher removed {gone:?} after the revoke was acknowledged");
        assert!(gone < LOSS_WITHIN, "the revoked token's publisher stayed {gone:?}");
        let again = RawClient::connect_with_ca(&ca, addr).await;
        assert_refused("a revoked token", again.hello_with_token("doomed", Some(&doomed)).await, ErrorCode::Unauthenticated, &[]);

        // Expires while connected: closed within 2 s of its expiry.
        let (cwd2, meta2) = (cwd.to_owned(), meta.clone());
        let created = Instant::now();
        let short = tokio::task::spawn_blocking(move || {
            create_token(&cwd2, &meta2, "prod", "subscribe", &["--ttl", "3s"])
        })
        .await
        .unwrap();
        let raw = RawClient::connect_with_ca(&ca, addr).await;
        assert!(raw.hello_with_token("brief", Some(&short)).await.is_ok(), "valid before it expires");
        let reason = closed_unauthenticated("expired", &raw, Duration::from_secs(3) + LOSS_WITHIN).await;
        assert!(reason.contains("expired"), "{reason}");
        assert!(created.elapsed() >= Duration::from_secs(3) - Duration::from_millis(200), "not before its time");
        let again = RawClient::connect_with_ca(&ca, addr).await;
        assert_refused("an expired token", again.hello_with_token("brief", Some(&short)).await, ErrorCode::Unauthenticated, &["expired"]);

        // The bystander never noticed: still connected, never without its publisher, and pushed a
        // new one.
        let _second = bystander.publish(SERVICE, vec!["10.0.0.2:80".into()]).await.unwrap();
        log.wait_for("the bystander's second publisher", |s| addresses(s) == ["10.0.0.1:80", "10.0.0.2:80"]).await;
        assert_eq!(bystander.stats().reconnects, 0, "the bystander reconnected");
        let history = log.finish();
        let first = history.iter().position(|s| !s.publishers.is_empty()).unwrap();
        for snapshot in &history[first..] {
            assert!(
                addresses(snapshot).contains(&"10.0.0.1:80".to_owned()),
                "the bystander's publisher left at version {}",
                snapshot.version
            );
        }
        bystander.close().await;
    });

    // The admin API wants an admin token; health and metrics stay open.
    for http in [&session_http, &data_http] {
        assert_eq!(
            http_status(http, "/admin", None),
            401,
            "{http} without a token"
        );
        assert_eq!(
            http_status(http, "/admin/server", Some(&good)),
            403,
            "{http} without admin"
        );
        assert_eq!(
            http_status(http, "/admin", Some(&admin)),
            200,
            "{http} with the admin token"
        );
        assert_eq!(http_status(http, "/readyz", None), 200);
    }
    let (status, metrics) = http_get(&format!("{session_http}/metrics")).unwrap();
    assert_eq!(status, 200);
    for reason in [
        "missing_token",
        "invalid_token",
        "expired_token",
        "permission_denied",
    ] {
        let counted = metrics.lines().any(|l| {
            l.starts_with("roster_auth_failures_total")
                && l.contains(&format!("reason=\"{reason}\""))
                && !l.ends_with(" 0")
        });
        assert!(
            counted,
            "roster_auth_failures_total{{reason=\"{reason}\"}} counted:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains(&good) && !metrics.contains(&admin),
        "metrics name no secret"
    );

    // A source that keeps guessing is held back, whatever it presents next.
    runtime.block_on(async {
        let mut last = None;
        for _ in 0..=acl::FAILURES_ALLOWED {
            let raw = RawClient::connect_with_ca(&ca, addr).await;
            last = Some(
                raw.hello_with_token("guesser", Some(&acl::generate_token()))
                    .await,
            );
        }
        assert_refused(
            "guessing",
            last.unwrap(),
            ErrorCode::Unauthenticated,
            &["too many failed authentications"],
        );
        let raw = RawClient::connect_with_ca(&ca, addr).await;
        let reply = raw.hello_with_token("guesser", Some(&good)).await;
        assert_refused(
            "a good token from a held source",
            reply,
            ErrorCode::Unauthenticated,
            &["retry in"],
        );
    });
}
