//! One client connection: `Hello` (see [`crate::hello`]), then requests, then cleanup when it
//! ends.
//!
//! The connection's publishers are the source copy of what its client published: they are kept
//! here, forwarded to the slot leaders, and removed from the data tier when the connection ends —
//! at once when the client closed it, after `client_grace` when it was lost. A client that says
//! `Hello` again within that grace (the same `client_id` and secret) takes the lost connection's
//! publishers over, so they are never removed in between. Every record carries the owner its
//! connection proved, which the slot leader checks before replacing a record (so a client on
//! another session server cannot take it either). Subscriptions live in the
//! [`crate::hub::Hub`].
//!
//! Each request is checked against what the connection's token grants in the service's
//! namespace (`PermissionDenied`). When the token is revoked or expires, the connection is closed
//! with [`CLOSE_UNAUTHENTICATED`] and its publishers are removed at once.
//!
//! Pushes go out on one unidirectional stream the server opens after `Hello`, written by a task
//! that takes from the hub whatever is due each time it is free to write.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use roster_common::acl::{Permission, Principal, failure_reason};
use roster_common::health::CheckSpec;
use roster_common::proto::{
    CLOSE_MOVED, ClientRequest, ClientResponse, DataRequest, DataResponse, PersistentInstance,
    Publisher, Role, ServiceSummary, WriteOp,
};
use roster_common::{ClientId, Error, RegisterId, Result, ServiceId, rpc, serve};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::CLOSE_UNAUTHENTICATED;
use crate::clients::Orphan;
use crate::hello::{IdentityHold, adopt, await_hello, request_name, rights_lost};
use crate::hub::ConnId;
use crate::persistent;
use crate::pushes::write_pushes;
use crate::shared::{LinkEvent, Shared};

/// A client connection after `Hello`.
struct Client {
    id: ConnId,
    client_id: ClientId,
    /// Proven by the secret in `Hello`; stamped on every record this connection writes.
    owner: u128,
    /// This connection's hold on its client id, released when the connection is done.
    _hold: IdentityHold,
    /// What its token allows.
    principal: Principal,
    /// The publishers this connection registered, by register id.
    publishers: Mutex<HashMap<RegisterId, ServiceId>>,
    /// Permits for requests in progress: at most `max_requests_per_connection`.
    requests: Arc<Semaphore>,
}

/// Serves one client connection until it ends or the server shuts down.
pub async fn serve_client(
    shared: Arc<Shared>,
    conn: Connection,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let id = shared.next_conn_id();
    let span = info_span!("client", conn = id, remote = %conn.remote_address(), client = tracing::field::Empty);
    async move {
        let Some(hello) = await_hello(&shared, &conn, &shutdown).await else {
            return;
        };
        tracing::Span::current().record("client", hello.hold.client_id.as_str());
        let push = match conn.open_uni().await {
            Ok(push) => push,
            Err(e) => {
                debug!(error = %e, "could not open the push stream");
                return;
            }
        };
        let wake = Arc::new(Notify::new());
        shared.hub().attach(id, hello.deltas, wake.clone());
        tracker.spawn(write_pushes(shared.clone(), id, conn.clone(), push, wake).in_current_span());
        debug!(deltas = hello.deltas, "client connected");

        let client = Arc::new(Client {
            id,
            publishers: Mutex::new(adopt(&shared, &hello.hold.client_id, id)),
            client_id: hello.hold.client_id.clone(),
            owner: hello.hold.owner,
            _hold: hello.hold,
            principal: hello.principal,
            requests: Arc::new(Semaphore::new(
                shared.config().max_requests_per_connection as usize,
            )),
        });
        let served = serve::serve_streams(&conn, &shutdown, &tracker, |send, recv| {
            handle_stream(shared.clone(), client.clone(), send, recv).in_current_span()
        });
        let rights_lost = tokio::select! {
            () = served => false,
            lost = rights_lost(&shared, &client.principal) => {
                warn!(error = %lost, "closing the connection: its token no longer holds");
                metrics::counter!("roster_auth_failures_total", "reason" => failure_reason(&lost)).increment(1);
                conn.close(CLOSE_UNAUTHENTICATED, lost.to_string().as_bytes());
                true
            }
        };
        let reason = conn.close_reason();
        if shutdown.is_cancelled() {
            conn.close(0u32.into(), b"session server shutting down");
        }
        cleanup(&shared, &client, reason.as_ref(), rights_lost).await;
    }
    .instrument(span)
    .await
}

async fn handle_stream(
    shared: Arc<Shared>,
    client: Arc<Client>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let max_frame = shared.config().max_frame;
    // A request holds its slot from the moment its stream opens until it is answered. A stream
    // opened while every slot is taken is refused at once, unread: it costs nothing more.
    let (name, result) = match client.requests.clone().try_acquire_owned() {
        Ok(_permit) => match rpc::read_request::<ClientRequest>(&mut recv, max_frame).await {
            Ok(request) => (
                request_name(&request),
                handle_request(&shared, &client, request).await,
            ),
            Err(e) => ("Unreadable", Err(e)),
        },
        Err(_) => {
            let _ = recv.stop(rpc::STOP_REFUSED);
            (
                "OverLimit",
                Err(Error::LimitExceeded(format!(
                    "more than {} requests outstanding on this connection",
                    shared.config().max_requests_per_connection
                ))),
            )
        }
    };
    roster_common::admin::count_request("session", name, &result);
    if let Err(e) = &result {
        debug!(error = %e, "request failed");
    }
    if let Err(e) = rpc::send_reply(&mut send, result, max_frame).await {
        debug!(error = %e, "could not send reply");
    }
}

async fn handle_request(
    shared: &Shared,
    client: &Client,
    request: ClientRequest,
) -> Result<ClientResponse> {
    match request {
        ClientRequest::Hello { .. } => Err(Error::UnexpectedMessage(
            "Hello was already sent on this connection".into(),
        )),
        ClientRequest::Publish {
            check,
            register_id,
            service,
            data,
            attributes,
            client_version,
        } => {
            check_register_id(&register_id)?;
            client
                .principal
                .check(service.namespace(), Permission::Publish)?;
            check_publish(
                shared.config().max_publisher_bytes,
                &data,
                &attributes,
                check.as_ref(),
            )?;
            {
                let publishers = client.publishers.lock();
                if !publishers.contains_key(&register_id)
                    && publishers.len() >= shared.config().max_publishers_per_connection
                {
                    return Err(Error::LimitExceeded(format!(
                        "this connection holds its maximum of {} publishers",
                        shared.config().max_publishers_per_connection
                    )));
                }
            }
            let mut publisher = Publisher {
                check,
                health: None,
                persistent: false,
                client_id: client.client_id.clone(),
                register_id: register_id.clone(),
                service: service.clone(),
                data,
                attributes,
                client_version,
                session: shared.config().id,
                session_instance: shared.instance(),
                owner: client.owner,
                registered_ms: roster_common::unix_millis(),
            };
            let moved_from = client
                .publishers
                .lock()
                .insert(register_id.clone(), service.clone());
            {
                let mut owned = shared.owned();
                if let Some(old) = moved_from.as_ref().filter(|old| **old != service) {
                    owned.remove(old, &client.client_id, &register_id);
                }
                if let Some(earlier) = owned.unchanged_since(&publisher, client.id) {
                    publisher.registered_ms = earlier;
                }
                owned.put(publisher.clone(), client.id);
            }
            if let Some(old) = moved_from.filter(|old| *old != service) {
                shared
                    .forward(
                        remove_op(shared, client, old, register_id.clone(), None),
                        None,
                    )
                    .await?;
            }
            let (ack_tx, ack_rx) = oneshot::channel();
            shared
                .forward(WriteOp::Put { publisher }, Some(ack_tx))
                .await?;
            match ack_rx.await.map_err(|_| Error::ShuttingDown)? {
                Ok(durable) => Ok(ClientResponse::Accepted { durable }),
                Err(refused) => {
                    forget_refused(shared, client, &service, &register_id, client_version);
                    Err(refused)
                }
            }
        }
        ClientRequest::Unpublish {
            register_id,
            service: named,
        } => {
            let held = client.publishers.lock().remove(&register_id);
            let Some(service) = held else {
                let Some(service) = named else {
                    return Err(Error::NotFound(format!(
                        "no publisher {register_id:?} on this connection"
                    )));
                };
                // Registered through another connection (a session server that died, say): the
                // slot leader removes it if this client owns it.
                check_register_id(&register_id)?;
                client
                    .principal
                    .check(service.namespace(), Permission::Publish)?;
                let op = remove_op(shared, client, service, register_id, Some(client.owner));
                let (ack_tx, ack_rx) = oneshot::channel();
                shared.forward(op, Some(ack_tx)).await?;
                let durable = ack_rx.await.map_err(|_| Error::ShuttingDown)??;
                return Ok(ClientResponse::Accepted { durable });
            };
            shared
                .owned()
                .remove(&service, &client.client_id, &register_id);
            let (ack_tx, ack_rx) = oneshot::channel();
            shared
                .forward(
                    remove_op(shared, client, service, register_id, None),
                    Some(ack_tx),
                )
                .await?;
            let durable = ack_rx.await.map_err(|_| Error::ShuttingDown)??;
            Ok(ClientResponse::Accepted { durable })
        }
        ClientRequest::Subscribe {
            healthy_only,
            register_id,
            service,
            scope: _,
        } => {
            check_register_id(&register_id)?;
            client
                .principal
                .check(service.namespace(), Permission::Subscribe)?;
            let outcome = {
                let mut hub = shared.hub();
                if !hub.is_subscribed(client.id, &register_id)
                    && hub.subscriptions_of(client.id)
                        >= shared.config().max_subscriptions_per_connection
                {
                    return Err(Error::LimitExceeded(format!(
                        "this connection holds its maximum of {} subscriptions",
                        shared.config().max_subscriptions_per_connection
                    )));
                }
                hub.subscribe_with(client.id, register_id, service.clone(), healthy_only)
            };
            if let Some(abandoned) = outcome.abandoned {
                shared.link_event(LinkEvent::Unwant(abandoned)).await;
            }
            if outcome.first {
                shared.link_event(LinkEvent::Want(service)).await;
            }
            Ok(ClientResponse::Done {})
        }
        ClientRequest::Unsubscribe { register_id } => {
            let abandoned = {
                let mut hub = shared.hub();
                if !hub.is_subscribed(client.id, &register_id) {
                    return Err(Error::NotFound(format!(
                        "no subscriber {register_id:?} on this connection"
                    )));
                }
                hub.unsubscribe(client.id, &register_id)
            };
            if let Some(service) = abandoned {
                shared.link_event(LinkEvent::Unwant(service)).await;
            }
            Ok(ClientResponse::Done {})
        }
        ClientRequest::Ping {} => Ok(ClientResponse::Pong {}),
        ClientRequest::ListServices {} => {
            let principal = &client.principal;
            // Only the namespaces this token may subscribe in; none at all is a refusal.
            if !principal.allow.contains(&Permission::Subscribe) {
                return Err(Error::PermissionDenied(format!(
                    "token {} has no subscribe permission, which listing needs",
                    principal.token_id.as_deref().unwrap_or("-")
                )));
            }
            let mut services = list_services(shared).await?;
            services.retain(|s| principal.may(s.service.namespace(), Permission::Subscribe));
            Ok(ClientResponse::Services { services })
        }
        ClientRequest::RegisterPersistent {
            service,
            id,
            data,
            attributes,
            check,
        } => {
            client
                .principal
                .check(service.namespace(), Permission::Publish)?;
            let instance = PersistentInstance {
                service,
                id,
                data,
                attributes,
                check,
                registered_ms: roster_common::unix_millis(),
                by: who(client),
            };
            persistent::check_instance(&instance, shared.config().max_publisher_bytes)?;
            persistent::register(shared, instance).await?;
            Ok(ClientResponse::Accepted { durable: true })
        }
        ClientRequest::DeregisterPersistent { service, id } => {
            client
                .principal
                .check(service.namespace(), Permission::Publish)?;
            roster_common::ids::check_id("id", &id)?;
            persistent::deregister(shared, service, id, who(client)).await?;
            Ok(ClientResponse::Accepted { durable: true })
        }
    }
}

/// Who asked, as the meta group records it: the token's id, or the client's id where the cluster
/// checks no tokens.
fn who(client: &Client) -> String {
    match &client.principal.token_id {
        Some(token) => token.clone(),
        None => client.client_id.clone(),
    }
}

/// Refuses a publisher over `max_bytes` (`--max-publisher-bytes`) or with a check that cannot
/// run.
fn check_publish(
    max_bytes: usize,
    data: &[Bytes],
    attributes: &BTreeMap<String, String>,
    check: Option<&CheckSpec>,
) -> Result<()> {
    let size = roster_common::proto::publisher_size(data, attributes);
    if size > max_bytes {
        return Err(Error::LimitExceeded(format!(
            "publisher of {size} bytes exceeds the limit of {max_bytes} bytes"
        )));
    }
    check.map_or(Ok(()), |check| check.validate(data))
}

fn check_register_id(register_id: &str) -> Result<()> {
    roster_common::ids::check_id("register_id", register_id)
}

/// The slot leader refused a publisher this connection registered (another client owns the record):
/// this session forgets it, unless the client registered it again meanwhile.
fn forget_refused(
    shared: &Shared,
    client: &Client,
    service: &ServiceId,
    register_id: &RegisterId,
    client_version: u64,
) {
    let forgotten = shared.owned().forget_refused(
        service,
        &client.client_id,
        register_id,
        client.id,
        client_version,
    );
    if forgotten {
        let mut publishers = client.publishers.lock();
        if publishers.get(register_id) == Some(service) {
            publishers.remove(register_id);
        }
    }
}

/// The `Remove` of this client's publisher: held by this session, or, with `owner`, whichever
/// session holds it, if the record is this client's.
fn remove_op(
    shared: &Shared,
    client: &Client,
    service: ServiceId,
    register_id: RegisterId,
    owner: Option<u128>,
) -> WriteOp {
    WriteOp::Remove {
        service,
        client_id: client.client_id.clone(),
        register_id,
        session_instance: shared.instance(),
        owner,
    }
}

/// Asks every data server for the services it leads and merges the answers.
async fn list_services(shared: &Shared) -> Result<Vec<ServiceSummary>> {
    let view = shared
        .view()
        .ok_or_else(|| Error::Unavailable("no cluster view yet".into()))?;
    let mut all = Vec::new();
    for member in view.members_of(Role::Data) {
        match shared
            .call_data(&member.addr, &DataRequest::ListServices {})
            .await?
        {
            DataResponse::Services { services } => all.extend(services),
            other => {
                return Err(Error::UnexpectedMessage(format!(
                    "expected services, got {other:?}"
                )));
            }
        }
    }
    Ok(merge_services(all))
}

/// The data servers' lists as one, sorted by service. Each lists the slots it leads; while a slot
/// changes hands two may both list a service, and the copy at the higher version is kept whole
/// (its counts, healthy ones included, belong together).
pub(crate) fn merge_services(mut all: Vec<ServiceSummary>) -> Vec<ServiceSummary> {
    all.sort_by(|a, b| a.service.cmp(&b.service).then(b.version.cmp(&a.version)));
    all.dedup_by(|later, kept| later.service == kept.service);
    all
}

/// After the connection ends: forget its subscribers and, unless the server is shutting down,
/// remove its publishers from the data tier — at once if the client closed the connection itself
/// (it left), after `client_grace` if it was lost or the client moved to another session server
/// ([`CLOSE_MOVED`]: its registrations there land first, and this removal then finds the records
/// held there and leaves them), unless the same client comes back within the grace and takes them
/// over (see [`adopt`]).
async fn cleanup(
    shared: &Shared,
    client: &Client,
    reason: Option<&ConnectionError>,
    rights_lost: bool,
) {
    let shutdown = shared.draining();
    let abandoned = shared.hub().detach(client.id);
    for service in abandoned {
        shared.link_event(LinkEvent::Unwant(service)).await;
    }
    let held: HashMap<RegisterId, ServiceId> = client.publishers.lock().drain().collect();
    // A connection closed for its token has no grace: coming back with the same token is refused.
    let closed_by_client = rights_lost
        || matches!(reason, Some(ConnectionError::ApplicationClosed(close))
            if close.error_code.into_inner() != u64::from(CLOSE_MOVED));
    let reason_text = reason.map_or_else(
        || "server shutting down".to_owned(),
        roster_common::error::describe_close,
    );
    debug!(reason = %reason_text, "client disconnected");
    if shutdown.is_cancelled() {
        // The session is going away: its clients re-register elsewhere, and the data tier drops
        // what this session owned after its own grace. Removing now would flap subscribers.
        return;
    }
    let grace = shared.config().client_grace;
    let held = if closed_by_client || grace.is_zero() || held.is_empty() {
        held
    } else {
        shared.clients().orphan(
            &client.client_id,
            Orphan {
                conn: client.id,
                publishers: held,
            },
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(grace) => {}
        }
        // Still there unless the client came back and adopted them.
        let Some(publishers) = shared.clients().reclaim(&client.client_id, client.id) else {
            return;
        };
        publishers
    };
    let publishers: Vec<(RegisterId, ServiceId)> = {
        let mut owned = shared.owned();
        // Those the client registered again on a newer connection here are not this one's to
        // remove.
        held.into_iter()
            .filter(|(register_id, service)| {
                owned.remove_held_by(service, &client.client_id, register_id, client.id)
            })
            .collect()
    };
    if !publishers.is_empty() {
        info!(
            publishers = publishers.len(),
            reason = %reason_text,
            "removing the publishers of a closed connection"
        );
    }
    for (register_id, service) in publishers {
        let _ = shared
            .forward(remove_op(shared, client, service, register_id, None), None)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_with_a_bad_check_or_too_much_data_is_refused() {
        let data = [Bytes::from_static(b"10.0.0.1:8080")];
        let none = BTreeMap::new();
        assert!(check_publish(64, &data, &none, None).is_ok());
        assert!(check_publish(64, &data, &none, Some(&CheckSpec::new("tcp"))).is_ok());
        for bad in [
            CheckSpec::new("udp://10.0.0.1:53"),
            CheckSpec {
                interval_ms: 1,
                ..CheckSpec::new("tcp")
            },
        ] {
            let refused = check_publish(64, &data, &none, Some(&bad)).unwrap_err();
            assert!(matches!(refused, Error::InvalidArgument(_)), "{refused}");
        }
        // A bare `tcp` check takes its address from the first data item.
        let not_an_address = [Bytes::from_static(b"hello")];
        assert!(matches!(
            check_publish(64, &not_an_address, &none, Some(&CheckSpec::new("tcp"))),
            Err(Error::InvalidArgument(_))
        ));
        let attributes = BTreeMap::from([("zone".to_owned(), "x".repeat(60))]);
        assert!(matches!(
            check_publish(64, &data, &attributes, None),
            Err(Error::LimitExceeded(_))
        ));
    }

    #[test]
    fn merged_service_lists_keep_the_newest_copy_with_its_healthy_count() {
        let summary = |service: &str, version, healthy| ServiceSummary {
            service: service.parse().unwrap(),
            publishers: 10,
            version,
            healthy,
        };
        // Data server 2 took "b" over from data server 1, which still lists its older copy.
        let merged = merge_services(vec![
            summary("c", 4, None),
            summary("b", 7, Some(9)),
            summary("a", 1, Some(3)),
            summary("b", 9, Some(2)),
        ]);
        assert_eq!(
            merged,
            vec![
                summary("a", 1, Some(3)),
                summary("b", 9, Some(2)),
                summary("c", 4, None),
            ]
        );
    }
}
