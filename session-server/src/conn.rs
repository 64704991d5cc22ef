//! One client connection: `Hello`, then requests, then cleanup when it ends.
//!
//! The connection's publishers are the source copy of what its client published: they are kept
//! here, forwarded to the slot leaders, and removed from the data tier when the connection ends
//! (after `client_grace`). Subscriptions live in the [`crate::hub::Hub`]. Pushes go out on one
//! unidirectional stream the server opens after `Hello`, written by a task that drains the
//! connection's bounded push queue.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quinn::{Connection, RecvStream, SendStream};
use roster_common::proto::{
    ClientRequest, ClientResponse, DataRequest, DataResponse, Publisher, Role, ServiceSummary,
    WriteOp,
};
use roster_common::{ClientId, Error, RegisterId, Result, ServiceId, rpc, serve};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::forward::Forward;
use crate::hub::{ConnId, Outgoing};
use crate::links::LinkEvent;
use crate::server::Shared;
use crate::{CLOSE_FULL, CLOSE_PROTOCOL, CLOSE_SLOW_CONSUMER};

/// The longest register id accepted, in bytes.
pub const MAX_REGISTER_ID_LEN: usize = 256;

/// A client connection after `Hello`.
struct Client {
    id: ConnId,
    client_id: ClientId,
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
        let Some(client_id) = await_hello(&shared, &conn, &shutdown).await else {
            return;
        };
        tracing::Span::current().record("client", client_id.as_str());
        let push = match conn.open_uni().await {
            Ok(push) => push,
            Err(e) => {
                debug!(error = %e, "could not open the push stream");
                return;
            }
        };
        let (push_tx, push_rx) = mpsc::channel(shared.config.push_queue.max(1));
        let cut = CancellationToken::new();
        shared.hub.lock().attach(id, push_tx, cut.clone());
        tracker.spawn(write_pushes(conn.clone(), push, push_rx, cut).in_current_span());
        debug!("client connected");

        let client = Arc::new(Client {
            id,
            client_id,
            publishers: Mutex::new(HashMap::new()),
            requests: Arc::new(Semaphore::new(
                shared.config.max_requests_per_connection as usize,
            )),
        });
        serve::serve_streams(&conn, &shutdown, &tracker, |send, recv| {
            handle_stream(shared.clone(), client.clone(), send, recv).in_current_span()
        })
        .await;
        let reason = conn
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "server shutting down".into());
        if shutdown.is_cancelled() {
            conn.close(0u32.into(), b"session server shutting down");
        }
        cleanup(&shared, &client).await;
        debug!(%reason, "client disconnected");
    }
    .instrument(span)
    .await
}

/// Serves requests until a valid `Hello` arrives; everything before it is refused with
/// `HelloRequired`. Returns the client's id, or `None` if the connection ended first.
async fn await_hello(
    shared: &Shared,
    conn: &Connection,
    shutdown: &CancellationToken,
) -> Option<ClientId> {
    let max_frame = shared.config.max_frame;
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = shutdown.cancelled() => return None,
            stream = conn.accept_bi() => stream.ok()?,
        };
        let request = rpc::read_request::<ClientRequest>(&mut recv, max_frame).await;
        let (result, client_id) = match request {
            Ok(ClientRequest::Hello {
                protocol_version,
                client_id,
                ..
            }) => match check_hello(protocol_version, &client_id)
                .and_then(|()| check_capacity(shared))
            {
                Ok(()) => (
                    Ok(ClientResponse::Welcome {
                        protocol_version: roster_common::proto::PROTOCOL_VERSION,
                        session_id: shared.config.id,
                        max_frame,
                        idle_timeout_ms: shared.config.client_transport.idle_timeout.as_millis()
                            as u64,
                    }),
                    Some(client_id),
                ),
                Err(e) => (Err(e), None),
            },
            Ok(other) => (
                Err(Error::HelloRequired(format!(
                    "got {} before Hello",
                    request_name(&other)
                ))),
                None,
            ),
            Err(e) => (Err(e), None),
        };
        roster_common::admin::count_request("session", "Hello", &result);
        if let Err(e) = &result {
            debug!(error = %e, "refused a request before Hello");
        }
        let fatal = match &result {
            Err(Error::UnsupportedVersion(_)) => {
                Some((CLOSE_PROTOCOL, &b"unsupported protocol version"[..]))
            }
            Err(Error::LimitExceeded(_)) => Some((CLOSE_FULL, &b"too many connections"[..])),
            _ => None,
        };
        let _ = rpc::send_reply(&mut send, result, max_frame).await;
        if let Some((code, reason)) = fatal {
            // Give the reply a moment to leave before the connection goes.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            conn.close(code, reason);
            return None;
        }
        if client_id.is_some() {
            return client_id;
        }
    }
}

fn check_hello(protocol_version: u32, client_id: &str) -> Result<()> {
    if protocol_version != roster_common::proto::PROTOCOL_VERSION {
        return Err(Error::UnsupportedVersion(format!(
            "client speaks version {protocol_version}; this server speaks {}",
            roster_common::proto::PROTOCOL_VERSION
        )));
    }
    if client_id.is_empty() || client_id.len() > MAX_REGISTER_ID_LEN {
        return Err(Error::InvalidArgument(format!(
            "client_id must be 1 to {MAX_REGISTER_ID_LEN} bytes"
        )));
    }
    Ok(())
}

/// Refuses a connection beyond `max_connections`.
fn check_capacity(shared: &Shared) -> Result<()> {
    let connections = shared.hub.lock().counts().0;
    if connections >= shared.config.max_connections {
        return Err(Error::LimitExceeded(format!(
            "this session server holds its maximum of {} connections; try another",
            shared.config.max_connections
        )));
    }
    Ok(())
}

fn request_name(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::Hello { .. } => "Hello",
        ClientRequest::Publish { .. } => "Publish",
        ClientRequest::Unpublish { .. } => "Unpublish",
        ClientRequest::Subscribe { .. } => "Subscribe",
        ClientRequest::Unsubscribe { .. } => "Unsubscribe",
        ClientRequest::Ping {} => "Ping",
        ClientRequest::ListServices {} => "ListServices",
    }
}

/// Drains the push queue into the push stream until the queue closes. When the hub cuts the
/// connection off (`cut`: its queue was full), the connection is closed for the client to resync —
/// also if this task is stuck writing to a peer that stopped reading.
async fn write_pushes(
    conn: Connection,
    mut push: SendStream,
    mut rx: mpsc::Receiver<Outgoing>,
    cut: CancellationToken,
) {
    loop {
        let outgoing = tokio::select! {
            _ = cut.cancelled() => break,
            outgoing = rx.recv() => match outgoing {
                Some(outgoing) => outgoing,
                None => return,
            },
        };
        tokio::select! {
            _ = cut.cancelled() => break,
            written = push.write_all(&outgoing.frame) => if let Err(e) = written {
                debug!(error = %e, "push stream failed");
                return;
            },
        }
        metrics::counter!("roster_session_pushes_total").increment(1);
        if let Some(since) = outgoing.since {
            metrics::histogram!("roster_session_push_seconds").record(since.elapsed());
        }
    }
    if conn.close_reason().is_none() {
        warn!("client fell behind on pushes; disconnecting it");
        conn.close(CLOSE_SLOW_CONSUMER, b"push queue full");
    }
}

async fn handle_stream(
    shared: Arc<Shared>,
    client: Arc<Client>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let max_frame = shared.config.max_frame;
    // A request holds its slot from the moment its stream opens until it is answered.
    let permit = client.requests.clone().try_acquire_owned();
    let (name, result) = match rpc::read_request::<ClientRequest>(&mut recv, max_frame).await {
        Ok(request) => {
            let name = request_name(&request);
            let result = match permit {
                Ok(_permit) => handle_request(&shared, &client, request).await,
                Err(_) => Err(Error::LimitExceeded(format!(
                    "more than {} requests outstanding on this connection",
                    shared.config.max_requests_per_connection
                ))),
            };
            (name, result)
        }
        Err(e) => ("Unreadable", Err(e)),
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
            register_id,
            service,
            data,
            attributes,
            client_version,
        } => {
            check_register_id(&register_id)?;
            let size: usize = data.iter().map(Bytes::len).sum::<usize>()
                + attributes
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            if size > shared.config.max_publisher_bytes {
                return Err(Error::LimitExceeded(format!(
                    "publisher of {size} bytes exceeds the limit of {} bytes",
                    shared.config.max_publisher_bytes
                )));
            }
            {
                let publishers = client.publishers.lock();
                if !publishers.contains_key(&register_id)
                    && publishers.len() >= shared.config.max_publishers_per_connection
                {
                    return Err(Error::LimitExceeded(format!(
                        "this connection holds its maximum of {} publishers",
                        shared.config.max_publishers_per_connection
                    )));
                }
            }
            let publisher = Publisher {
                client_id: client.client_id.clone(),
                register_id: register_id.clone(),
                service: service.clone(),
                data,
                attributes,
                client_version,
                session: shared.config.id,
                session_instance: shared.instance,
            };
            let moved_from = client
                .publishers
                .lock()
                .insert(register_id.clone(), service.clone());
            {
                let mut owned = shared.owned.lock();
                if let Some(old) = moved_from.as_ref().filter(|old| **old != service) {
                    owned.remove(old, &client.client_id, &register_id);
                }
                owned.put(publisher.clone(), client.id);
            }
            if let Some(old) = moved_from.filter(|old| *old != service) {
                forward(shared, remove_op(shared, client, old, register_id), None).await?;
            }
            let (ack_tx, ack_rx) = oneshot::channel();
            forward(shared, WriteOp::Put { publisher }, Some(ack_tx)).await?;
            let durable = ack_rx.await.map_err(|_| Error::ShuttingDown)??;
            Ok(ClientResponse::Accepted { durable })
        }
        ClientRequest::Unpublish { register_id } => {
            let Some(service) = client.publishers.lock().remove(&register_id) else {
                return Err(Error::NotFound(format!(
                    "no publisher {register_id:?} on this connection"
                )));
            };
            shared
                .owned
                .lock()
                .remove(&service, &client.client_id, &register_id);
            let (ack_tx, ack_rx) = oneshot::channel();
            forward(
                shared,
                remove_op(shared, client, service, register_id),
                Some(ack_tx),
            )
            .await?;
            let durable = ack_rx.await.map_err(|_| Error::ShuttingDown)??;
            Ok(ClientResponse::Accepted { durable })
        }
        ClientRequest::Subscribe {
            register_id,
            service,
            scope: _,
        } => {
            check_register_id(&register_id)?;
            let outcome = {
                let mut hub = shared.hub.lock();
                if !hub.is_subscribed(client.id, &register_id)
                    && hub.subscriptions_of(client.id)
                        >= shared.config.max_subscriptions_per_connection
                {
                    return Err(Error::LimitExceeded(format!(
                        "this connection holds its maximum of {} subscriptions",
                        shared.config.max_subscriptions_per_connection
                    )));
                }
                hub.subscribe(client.id, register_id, service.clone())
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
                let mut hub = shared.hub.lock();
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
        ClientRequest::ListServices {} => list_services(shared)
            .await
            .map(|services| ClientResponse::Services { services }),
    }
}

fn check_register_id(register_id: &str) -> Result<()> {
    if register_id.is_empty() || register_id.len() > MAX_REGISTER_ID_LEN {
        return Err(Error::InvalidArgument(format!(
            "register_id must be 1 to {MAX_REGISTER_ID_LEN} bytes"
        )));
    }
    Ok(())
}

fn remove_op(
    shared: &Shared,
    client: &Client,
    service: ServiceId,
    register_id: RegisterId,
) -> WriteOp {
    WriteOp::Remove {
        service,
        client_id: client.client_id.clone(),
        register_id,
        session_instance: shared.instance,
    }
}

async fn forward(
    shared: &Shared,
    op: WriteOp,
    ack: Option<oneshot::Sender<Result<bool>>>,
) -> Result<()> {
    shared
        .forward_tx
        .send(Forward { op, ack })
        .await
        .map_err(|_| Error::ShuttingDown)
}

/// Asks every data server for the services it leads and merges the answers.
async fn list_services(shared: &Shared) -> Result<Vec<ServiceSummary>> {
    let view = shared
        .view()
        .ok_or_else(|| Error::Unavailable("no cluster view yet".into()))?;
    let mut all = Vec::new();
    for member in view.members_of(Role::Data) {
        let conn = shared.pool.get(&member.addr).await?;
        match rpc::call(
            &conn,
            &DataRequest::ListServices {},
            shared.config.max_frame,
            shared.config.request_timeout,
        )
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
    all.sort_by(|a, b| a.service.cmp(&b.service));
    Ok(all)
}

/// After the connection ends: forget its subscribers and, unless the server is shutting down,
/// remove its publishers from the data tier once `client_grace` has passed.
async fn cleanup(shared: &Shared, client: &Client) {
    let shutdown = &shared.draining;
    let abandoned = shared.hub.lock().detach(client.id);
    for service in abandoned {
        shared.link_event(LinkEvent::Unwant(service)).await;
    }
    let grace = shared.config.client_grace;
    if !grace.is_zero() {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(grace) => {}
        }
    }
    if shutdown.is_cancelled() {
        // The session is going away: its clients re-register elsewhere, and the data tier drops
        // what this session owned after its own grace. Removing now would flap subscribers.
        return;
    }
    let publishers: Vec<(RegisterId, ServiceId)> = {
        let held: Vec<(RegisterId, ServiceId)> = client.publishers.lock().drain().collect();
        let mut owned = shared.owned.lock();
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
            "removing the publishers of a closed connection"
        );
    }
    for (register_id, service) in publishers {
        let _ = forward(
            shared,
            remove_op(shared, client, service, register_id),
            None,
        )
        .await;
    }
}
