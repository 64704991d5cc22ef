//! One client connection: `Hello`, then requests, then cleanup when it ends.
//!
//! The connection's publishers are the source copy of what its client published: they are kept
//! here, forwarded to the slot leaders, and removed from the data tier when the connection ends —
//! at once when the client closed it, after `client_grace` when it was lost. A client that says
//! `Hello` again within that grace (the same `client_id` and secret) takes the lost connection's
//! publishers over, so they are never removed in between.
//!
//! Identity: a `client_id` is only a name. What proves a connection belongs to the client of that
//! name is the secret it presents in `Hello`: while a connection (live, or lost and within its
//! grace) holds a client id here, a `Hello` with that id and another secret is refused with
//! `PermissionDenied`, and every record carries the owner derived from id and secret, which the
//! slot leader checks before replacing a record (so a client on another session server cannot
//! take it either). Subscriptions live in the [`crate::hub::Hub`].
//!
//! Rights: where the cluster checks tokens, `Hello` must carry one (`Unauthenticated` otherwise,
//! and the connection is closed with [`CLOSE_UNAUTHENTICATED`]); each request is checked against
//! what it grants in the service's namespace (`PermissionDenied`). The connection watches the
//! cluster view: when its token is revoked or expires, it is closed with the same code and its
//! publishers are removed at once. A source that keeps failing to authenticate is refused for a
//! while without its token being looked at.
//! Pushes go out on one unidirectional stream the server opens after `Hello`, written by a task
//! that takes from the hub whatever is due each time it is free to write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use roster_common::acl::{Permission, Principal, failure_reason};
use roster_common::proto::{
    CAPABILITY_DELTA, ClientRequest, ClientResponse, DataRequest, DataResponse, Publisher, Role,
    ServiceSummary, WriteOp,
};
use roster_common::{ClientId, Error, RegisterId, Result, ServiceId, rpc, serve, unix_millis};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::forward::Forward;
use crate::hub::ConnId;
use crate::links::LinkEvent;
use crate::server::{Identity, Orphan, Shared};
use crate::{CLOSE_FULL, CLOSE_PROTOCOL, CLOSE_SLOW_CONSUMER, CLOSE_UNAUTHENTICATED};

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
        shared.hub.lock().attach(id, hello.deltas, wake.clone());
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
                shared.config.max_requests_per_connection as usize,
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

/// What a client said in its `Hello`.
struct Hello {
    /// The client id it proved, held for this connection.
    hold: IdentityHold,
    /// What its token allows.
    principal: Principal,
    /// It takes `Delta` pushes.
    deltas: bool,
}

/// A connection's hold on its client id (see [`claim`]); released on drop.
struct IdentityHold {
    shared: Arc<Shared>,
    client_id: ClientId,
    owner: u128,
}

impl Drop for IdentityHold {
    fn drop(&mut self) {
        let mut identities = self.shared.identities.lock();
        if let Some(identity) = identities.get_mut(&self.client_id) {
            identity.holds -= 1;
            if identity.holds == 0 {
                identities.remove(&self.client_id);
            }
        }
    }
}

/// Takes a hold on `client_id` for a connection that presented `secret`: refused while
/// connections with another owner hold it (live, or lost and within their grace).
fn claim(shared: &Arc<Shared>, client_id: ClientId, secret: &[u8]) -> Result<IdentityHold> {
    let owner = roster_common::ids::owner_of(&client_id, secret);
    let mut identities = shared.identities.lock();
    let identity = identities
        .entry(client_id.clone())
        .or_insert(Identity { owner, holds: 0 });
    if identity.owner != owner {
        metrics::counter!("roster_auth_failures_total", "reason" => "client_id_in_use")
            .increment(1);
        return Err(Error::PermissionDenied(format!(
            "client_id {client_id:?} is in use on this session server by a client with another \
             secret; a client presents the same secret on every connection"
        )));
    }
    identity.holds += 1;
    Ok(IdentityHold {
        shared: shared.clone(),
        client_id,
        owner,
    })
}

/// The publishers of this client's lost connections still within their grace, now this
/// connection's: they are not removed, and the client's registering them again replaces them.
fn adopt(shared: &Shared, client_id: &str, conn: ConnId) -> HashMap<RegisterId, ServiceId> {
    let orphans = shared.orphans.lock().remove(client_id).unwrap_or_default();
    let mut adopted = HashMap::new();
    if orphans.is_empty() {
        return adopted;
    }
    let mut owned = shared.owned.lock();
    for orphan in orphans {
        for (register_id, service) in orphan.publishers {
            owned.reassign(&service, client_id, &register_id, orphan.conn, conn);
            adopted.insert(register_id, service);
        }
    }
    drop(owned);
    metrics::counter!("roster_session_client_returns_total").increment(1);
    info!(
        publishers = adopted.len(),
        "the client came back within its grace; its publishers stay"
    );
    adopted
}

/// Serves requests until a valid `Hello` arrives; everything before it is refused with
/// `HelloRequired`. Returns what the client said, or `None` if the connection ended first.
async fn await_hello(
    shared: &Arc<Shared>,
    conn: &Connection,
    shutdown: &CancellationToken,
) -> Option<Hello> {
    let max_frame = shared.config.max_frame;
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = shutdown.cancelled() => return None,
            stream = conn.accept_bi() => stream.ok()?,
        };
        let request = rpc::read_request::<ClientRequest>(&mut recv, max_frame).await;
        let (result, hello) = match request {
            Ok(ClientRequest::Hello {
                protocol_version,
                client_id,
                capabilities,
                client_secret,
                token,
                ..
            }) => match check_hello(protocol_version, &client_id, &client_secret)
                .and_then(|()| authenticate(shared, conn, token.as_deref()))
                .and_then(|principal| {
                    check_capacity(shared)?;
                    Ok((principal, claim(shared, client_id, &client_secret)?))
                }) {
                Ok((principal, hold)) => {
                    // The capabilities this server grants: those asked for that it has.
                    let granted: Vec<String> = capabilities
                        .into_iter()
                        .filter(|c| c == CAPABILITY_DELTA)
                        .take(1)
                        .collect();
                    let deltas = !granted.is_empty();
                    (
                        Ok(ClientResponse::Welcome {
                            protocol_version: roster_common::proto::PROTOCOL_VERSION,
                            session_id: shared.config.id,
                            max_frame,
                            idle_timeout_ms: shared.config.client_transport.idle_timeout.as_millis()
                                as u64,
                            capabilities: granted,
                            max_requests: Some(shared.config.max_requests_per_connection),
                        }),
                        Some(Hello {
                            hold,
                            principal,
                            deltas,
                        }),
                    )
                }
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
            Err(Error::Unauthenticated(_)) => {
                Some((CLOSE_UNAUTHENTICATED, &b"unauthenticated"[..]))
            }
            _ => None,
        };
        let _ = rpc::send_reply(&mut send, result, max_frame).await;
        if let Some((code, reason)) = fatal {
            // Give the reply a moment to leave before the connection goes.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            conn.close(code, reason);
            return None;
        }
        if hello.is_some() {
            return hello;
        }
    }
}

fn check_hello(protocol_version: u32, client_id: &str, secret: &[u8]) -> Result<()> {
    if protocol_version != roster_common::proto::PROTOCOL_VERSION {
        return Err(Error::UnsupportedVersion(format!(
            "client speaks version {protocol_version}; this server speaks {}",
            roster_common::proto::PROTOCOL_VERSION
        )));
    }
    roster_common::ids::check_id("client_id", client_id)?;
    let bounds = roster_common::ids::CLIENT_SECRET_LEN;
    if !bounds.contains(&secret.len()) {
        return Err(Error::InvalidArgument(format!(
            "client_secret must be {} to {} random bytes, the same on every connection of the \
             client (got {})",
            bounds.start(),
            bounds.end(),
            secret.len()
        )));
    }
    Ok(())
}

/// What the token of a `Hello` allows: `Unauthenticated` (counted, and held against the source
/// address) when the cluster checks tokens and this one does not pass.
fn authenticate(shared: &Shared, conn: &Connection, token: Option<&str>) -> Result<Principal> {
    let view = shared
        .view()
        .ok_or_else(|| Error::Unavailable("this session server has no cluster view yet".into()))?;
    let source = conn.remote_address().ip();
    let now = Instant::now();
    let result = shared
        .auth_failures
        .lock()
        .check(source, now)
        .and_then(|()| view.acl.authenticate(token, unix_millis()));
    if let Err(e) = &result {
        let reason = failure_reason(e);
        metrics::counter!("roster_auth_failures_total", "reason" => reason).increment(1);
        if reason != "rate_limited" {
            shared.auth_failures.lock().failed(source, now);
        }
        info!(%source, reason, "refused a client's token");
    }
    result
}

/// Resolves when `principal`'s token is revoked or expires, with the `Unauthenticated` error that
/// says which; never while the cluster does not check tokens.
async fn rights_lost(shared: &Shared, principal: &Principal) -> Error {
    if principal.token_id.is_none() {
        return std::future::pending().await;
    }
    let mut views = shared.view.clone();
    loop {
        let verdict = views
            .borrow_and_update()
            .as_ref()
            .map(|view| view.acl.still_valid(principal, unix_millis()));
        if let Some(Err(lost)) = verdict {
            return lost;
        }
        // Wake just after expiry; clocks in milliseconds round down.
        let expiry = principal.expires_at_ms.map(|at| {
            std::time::Duration::from_millis(at.saturating_sub(unix_millis()).saturating_add(1))
        });
        tokio::select! {
            changed = views.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
            _ = async { tokio::time::sleep(expiry.expect("guarded")).await }, if expiry.is_some() => {}
        }
    }
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

/// Writes the connection's pushes: whenever it is woken (something became due) it takes from the
/// hub what is due and writes it, so changes that arrive while it writes are merged into its next
/// take. A write that makes no progress for `push_stall_timeout` — the client reads nothing and
/// flow control holds the stream — closes the connection with [`CLOSE_SLOW_CONSUMER`]. Ends when
/// the connection does or the hub forgets it.
async fn write_pushes(
    shared: Arc<Shared>,
    id: ConnId,
    conn: Connection,
    mut push: SendStream,
    wake: Arc<Notify>,
) {
    let stall = shared.config.push_stall_timeout;
    loop {
        let Some(pull) = shared.hub.lock().take_pushes(id, Instant::now()) else {
            return;
        };
        if pull.frames.is_empty() {
            let deadline = pull.wake_at.map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = wake.notified() => {}
                _ = conn.closed() => return,
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {}
            }
            continue;
        }
        // One write for the whole take; the stall timer restarts with every bit of progress.
        let mut chunks: Vec<Bytes> = pull.frames.iter().map(|o| o.frame.clone()).collect();
        let mut rest = &mut chunks[..];
        while !rest.is_empty() {
            match tokio::time::timeout(stall, push.write_chunks(rest)).await {
                Ok(Ok(written)) => rest = &mut rest[written.chunks..],
                Ok(Err(e)) => {
                    debug!(error = %e, "push stream failed");
                    return;
                }
                Err(_) => {
                    warn!(stalled = ?stall, "the client read none of its pushes; disconnecting it");
                    metrics::counter!("roster_session_slow_consumers_total").increment(1);
                    conn.close(CLOSE_SLOW_CONSUMER, b"push stream stalled");
                    return;
                }
            }
        }
        for out in pull.frames {
            metrics::counter!("roster_session_pushes_total", "kind" => out.kind.name())
                .increment(1);
            metrics::counter!("roster_session_push_bytes_total").increment(out.frame.len() as u64);
            if let Some(since) = out.since {
                metrics::histogram!("roster_session_push_seconds").record(since.elapsed());
            }
        }
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
            client
                .principal
                .check(service.namespace(), Permission::Publish)?;
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
                owner: client.owner,
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
                forward(
                    shared,
                    remove_op(shared, client, old, register_id.clone(), None),
                    None,
                )
                .await?;
            }
            let (ack_tx, ack_rx) = oneshot::channel();
            forward(shared, WriteOp::Put { publisher }, Some(ack_tx)).await?;
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
                forward(shared, op, Some(ack_tx)).await?;
                let durable = ack_rx.await.map_err(|_| Error::ShuttingDown)??;
                return Ok(ClientResponse::Accepted { durable });
            };
            shared
                .owned
                .lock()
                .remove(&service, &client.client_id, &register_id);
            let (ack_tx, ack_rx) = oneshot::channel();
            forward(
                shared,
                remove_op(shared, client, service, register_id, None),
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
            client
                .principal
                .check(service.namespace(), Permission::Subscribe)?;
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
    }
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
    let forgotten = shared.owned.lock().forget_refused(
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
        session_instance: shared.instance,
        owner,
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
        match shared
            .pool
            .call(
                &member.addr,
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
/// remove its publishers from the data tier — at once if the client closed the connection itself
/// (it left, or moved and registered them elsewhere first), after `client_grace` if it was lost,
/// unless the same client comes back within the grace and takes them over (see [`adopt`]).
async fn cleanup(
    shared: &Shared,
    client: &Client,
    reason: Option<&ConnectionError>,
    rights_lost: bool,
) {
    let shutdown = &shared.draining;
    let abandoned = shared.hub.lock().detach(client.id);
    for service in abandoned {
        shared.link_event(LinkEvent::Unwant(service)).await;
    }
    let held: HashMap<RegisterId, ServiceId> = client.publishers.lock().drain().collect();
    // A connection closed for its token has no grace: coming back with the same token is refused.
    let closed_by_client =
        rights_lost || matches!(reason, Some(ConnectionError::ApplicationClosed(_)));
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
    let grace = shared.config.client_grace;
    let held = if closed_by_client || grace.is_zero() || held.is_empty() {
        held
    } else {
        shared
            .orphans
            .lock()
            .entry(client.client_id.clone())
            .or_default()
            .push(Orphan {
                conn: client.id,
                publishers: held,
            });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(grace) => {}
        }
        // Still there: the client did not come back.
        let mut orphans = shared.orphans.lock();
        let Some(mine) = orphans.get_mut(&client.client_id) else {
            return;
        };
        let Some(at) = mine.iter().position(|o| o.conn == client.id) else {
            return;
        };
        let orphan = mine.swap_remove(at);
        if mine.is_empty() {
            orphans.remove(&client.client_id);
        }
        orphan.publishers
    };
    let publishers: Vec<(RegisterId, ServiceId)> = {
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
            reason = %reason_text,
            "removing the publishers of a closed connection"
        );
    }
    for (register_id, service) in publishers {
        let _ = forward(
            shared,
            remove_op(shared, client, service, register_id, None),
            None,
        )
        .await;
    }
}
