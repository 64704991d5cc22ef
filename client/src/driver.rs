//! Keeping the client connected: dialing a session server, registering everything there, reading
//! and applying its pushes, and moving to another one when the connection ends, goes silent, or
//! the server says `GoAway`. Everything here runs on the SDK's own threads (see `io`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use quinn::{Connection, ConnectionError};
use rand::seq::SliceRandom;
use roster_common::proto::{
    self, CAPABILITY_DELTA, CLOSE_MOVED, CLOSE_SLOW_CONSUMER, ClientRequest, ClientResponse, Delta,
    PROTOCOL_VERSION, Push,
};
use roster_common::{Error, RegisterId, Result, frame, push, quic, rpc};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::accept::{DeltaVerdict, accept, judge_delta, snapshot_is_newer};
use crate::handover::hand_over;
use crate::liveness::Liveness;
use crate::requests::{REGISTER_CONCURRENCY, call_all};
use crate::snapshot::Snapshot;
use crate::{ConnectionState, Inner, Live, SubscriptionState, publish_request, subscribe_request};

/// One address to dial: a configured session address, or one of the addresses its DNS name
/// resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub addr: SocketAddr,
    /// The name the server's certificate must be valid for.
    pub name: String,
}

/// Every address of every configured session, each once, in configuration order.
pub(crate) fn candidates(
    resolved: impl IntoIterator<Item = (String, Vec<SocketAddr>)>,
    server_name: Option<&str>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for (configured, addrs) in resolved {
        let name = server_name.unwrap_or_else(|| quic::host_of(&configured));
        for addr in addrs {
            if !out.iter().any(|c| c.addr == addr) {
                out.push(Candidate {
                    addr,
                    name: name.to_owned(),
                });
            }
        }
    }
    out
}

/// How long the address a client just left waits before it is dialed too, unless every other
/// address has failed by then.
const AVOIDED_AFTER: Duration = Duration::from_secs(1);

/// Dials every address of the configured session servers at once (a DNS name counts with each of
/// its addresses), takes the first whose QUIC handshake completes, then says `Hello` and
/// registers everything there. Dialing in parallel keeps a dead address — which answers nothing
/// until the handshake times out — from delaying the move. `avoid`, the server just left, is
/// dialed only once the others have all failed or [`AVOIDED_AFTER`] has passed: when both session
/// servers of a pair die one after the other, the one left first may well be the one back first,
/// and waiting out a dead server's handshake timeout before trying it would outlast the grace the
/// data tier gives the client's publishers. The connection comes with the publications the server
/// answered `durable: false` (see [`register_all`]).
pub(crate) async fn connect_any(
    inner: &Inner,
    avoid: Option<SocketAddr>,
) -> Result<(Live, Vec<RegisterId>)> {
    let mut last_error = None;
    let mut resolved = Vec::new();
    for configured in &inner.config.sessions {
        match quic::resolve_all(configured).await {
            Ok(addrs) => resolved.push((configured.clone(), addrs)),
            Err(e) => {
                debug!(session = %configured, error = %e, "could not resolve a session address");
                last_error = Some(e);
            }
        }
    }
    let mut order = candidates(resolved, inner.config.server_name.as_deref());
    order.shuffle(&mut rand::rng());
    let only_choice = order.len() == 1;
    let (preferred, avoided): (Vec<Candidate>, Vec<Candidate>) = order
        .into_iter()
        .partition(|c| avoid != Some(c.addr) || only_choice);
    let timeout = Duration::from_millis(inner.config.connect_timeout_ms);
    let dial = |candidate: Candidate| async move {
        let conn = quic::connect_to(
            &inner.endpoint,
            &inner.quic_config,
            candidate.addr,
            &candidate.name,
            timeout,
        )
        .await;
        (candidate.addr, conn)
    };
    let mut dials: FuturesUnordered<_> = preferred.into_iter().map(dial).collect();
    let mut avoided = (!avoided.is_empty()).then_some(avoided);
    let avoided_at = tokio::time::sleep(AVOIDED_AFTER);
    tokio::pin!(avoided_at);
    loop {
        let (addr, conn) = tokio::select! {
            next = dials.next() => match next {
                Some(dialed) => dialed,
                // Every other address failed: the avoided one is all there is.
                None => match avoided.take() {
                    Some(late) => {
                        dials.extend(late.into_iter().map(dial));
                        continue;
                    }
                    None => break,
                },
            },
            _ = &mut avoided_at, if avoided.is_some() => {
                dials.extend(avoided.take().into_iter().flatten().map(dial));
                continue;
            }
        };
        let attempt = match conn {
            Ok(conn) => hello_and_register(inner, conn).await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(live) => return Ok(live),
            Err(e) => {
                debug!(session = %addr, error = %e, "could not use this session server");
                // A refusal of who the client is says more than another server's silence.
                let refusal =
                    |e: &Error| matches!(e, Error::Unauthenticated(_) | Error::PermissionDenied(_));
                if refusal(&e) || !last_error.as_ref().is_some_and(refusal) {
                    last_error = Some(e);
                }
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::Unavailable("no session server configured".into())))
}

async fn hello_and_register(inner: &Inner, conn: Connection) -> Result<(Live, Vec<RegisterId>)> {
    let hello = ClientRequest::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: inner.client_id.clone(),
        client_name: inner.config.client_name.clone(),
        token: inner.config.token.as_ref().map(|t| t.expose().to_owned()),
        client_secret: inner.client_secret.clone(),
        capabilities: vec![CAPABILITY_DELTA.to_owned()],
    };
    let session_id = match rpc::call(
        &conn,
        &hello,
        inner.config.max_frame,
        inner.config.request_timeout(),
    )
    .await?
    {
        ClientResponse::Welcome {
            session_id,
            max_requests,
            ..
        } => {
            let needed = inner.config.max_in_flight as usize + REGISTER_CONCURRENCY + 2;
            if let Some(limit) = max_requests
                && (limit as usize) < needed
            {
                warn!(
                    session = session_id,
                    limit,
                    max_in_flight = inner.config.max_in_flight,
                    "the session server allows fewer requests in flight than this client may send; \
                     lower max_in_flight to avoid LimitExceeded errors"
                );
            }
            session_id
        }
        other => {
            return Err(Error::UnexpectedMessage(format!(
                "expected Welcome, got {other:?}"
            )));
        }
    };
    let held = register_all(inner, &conn).await?;
    Ok((Live { conn, session_id }, held))
}

/// Registers every publication and subscription on `conn`, concurrently. A transport failure fails
/// the whole (the caller tries another server); a refusal of one registration is logged and the
/// rest go on. Returns the publications the server holds on their way to the data tier (answered
/// `durable: false`).
async fn register_all(inner: &Inner, conn: &Connection) -> Result<Vec<RegisterId>> {
    let requests: Vec<(Option<RegisterId>, ClientRequest)> = {
        let registry = inner.registry.lock();
        registry
            .publications
            .iter()
            // A publication whose first publish is still being made is sent by that publish.
            .filter(|(_, state)| state.client_version > 0)
            .map(|(id, state)| (Some(id.clone()), publish_request(id, state)))
            .chain(registry.subscriptions.iter().map(|(service, sub)| {
                let request =
                    subscribe_request(sub.register_id.clone(), service.clone(), sub.healthy_only);
                (None, request)
            }))
            .collect()
    };
    let count = requests.len();
    let results = call_all(inner, conn, requests).await;
    let mut held = Vec::new();
    for (publication, result) in results {
        match result {
            Ok(ClientResponse::Accepted { durable: false }) => held.extend(publication),
            Ok(_) => {}
            Err(e @ (Error::Connection(_) | Error::Timeout(_))) => return Err(e),
            Err(e) => warn!(error = %e, "the session server refused a registration"),
        }
    }
    if count > 0 {
        debug!(
            registrations = count,
            held = held.len(),
            "registered everything on the new connection"
        );
    }
    Ok(held)
}

/// Makes `live` the connection in use and starts reading its pushes.
pub(crate) fn install(inner: &Arc<Inner>, live: Live) {
    let addr = live.conn.remote_address();
    let connects = inner.stats.connects.fetch_add(1, Ordering::Relaxed) + 1;
    info!(session = live.session_id, %addr, connects, "connected to a session server");
    crate::io::spawn(read_pushes(inner.clone(), live.conn.clone()));
    inner.state_tx.send_replace(ConnectionState::Connected {
        session_id: live.session_id,
        addr: addr.to_string(),
    });
    *inner.live.write() = Some(live);
}

/// The pause before reconnect attempt `attempt`: doubling from the minimum, capped, with jitter.
fn backoff(inner: &Inner, attempt: u32) -> Duration {
    let min = inner.config.reconnect_min_ms.max(1);
    let max = inner.config.reconnect_max_ms.max(min);
    let base = min
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(max);
    Duration::from_millis(rand::random_range(base / 2..=base))
}

/// Bytes read from the push stream at once, at most.
const PUSH_READ: usize = 256 << 10;

/// How often the connection's liveness is checked.
const LIVENESS_CHECK: Duration = Duration::from_millis(100);
/// Requests queued by drops (removals, unsubscriptions) in flight at once.
const BACKGROUND_IN_FLIGHT: usize = 32;
/// How long closing the client spends on the requests still queued.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// Connects to another session server (the same one again if no other answers), registers
/// everything there and makes it the connection in use; `live` is closed once what the new server
/// holds has landed (see [`crate::handover`]). False if none answered.
///
/// A new connection to the same server is kept too, and the old one let go: registering there
/// gave the new connection every publisher the old one held, so closing the new one instead
/// would remove them while the old one still counts on them.
async fn move_on(inner: &Arc<Inner>, live: &Live, why: &'static [u8]) -> bool {
    match connect_any(inner, Some(live.conn.remote_address())).await {
        Ok((next, held)) => {
            let new = next.conn.clone();
            install(inner, next);
            crate::io::spawn(hand_over(inner.clone(), live.conn.clone(), new, held, why));
            true
        }
        Err(e) => {
            warn!(error = %e, "no other session server answered");
            false
        }
    }
}

/// Keeps the client connected until it is shut down, then sends pending removals and closes.
pub(crate) async fn run(inner: Arc<Inner>, mut background: mpsc::UnboundedReceiver<ClientRequest>) {
    let mut attempt = 0u32;
    let mut avoid: Option<SocketAddr> = None;
    let dead_after = Duration::from_millis(inner.config.dead_after_ms);
    let mut liveness_tick = tokio::time::interval(LIVENESS_CHECK);
    liveness_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The connection being watched, and its watchdog.
    let mut watchdog: Option<(usize, Liveness)> = None;
    // Requests queued by drops, on their way: sent side by side, never holding up the loop (and
    // with it the watchdog) for a round trip.
    let mut in_flight = FuturesUnordered::new();
    loop {
        let live = inner.live.read().clone();
        match live {
            None => {
                attempt += 1;
                inner
                    .state_tx
                    .send_replace(ConnectionState::Reconnecting { attempt });
                tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff(&inner, attempt)) => {}
                }
                match connect_any(&inner, avoid).await {
                    Ok((live, _)) => {
                        install(&inner, live);
                        attempt = 0;
                    }
                    // Refused for who it is: another process holds this client id with another
                    // secret (or this process's previous incarnation is not yet declared dead).
                    Err(e @ Error::PermissionDenied(_)) => {
                        warn!(attempt, error = %e, "a session server refused this client's id; retrying");
                    }
                    // Its token is missing, wrong, revoked or expired: nothing changes that but
                    // a new token, so say so on every attempt.
                    Err(e @ Error::Unauthenticated(_)) => {
                        warn!(attempt, error = %e, "the session servers refused this client's token; retrying");
                    }
                    Err(e) => debug!(attempt, error = %e, "still no session server"),
                }
            }
            Some(live) => {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    reason = live.conn.closed() => {
                        note_loss(&inner, &reason);
                        warn!(session = live.session_id, reason = %roster_common::error::describe_close(&reason), "lost the session server; reconnecting");
                        let mut current = inner.live.write();
                        if current.as_ref().is_some_and(|l| l.conn.stable_id() == live.conn.stable_id()) {
                            *current = None;
                        }
                        avoid = Some(live.conn.remote_address());
                    }
                    _ = inner.go_away.notified() => {
                        move_on(&inner, &live, b"moved to another session server").await;
                    }
                    _ = liveness_tick.tick() => {
                        // A session server killed outright sends no close: notice its silence
                        // well before the idle timeout, and move.
                        let id = live.conn.stable_id();
                        if watchdog.as_ref().is_none_or(|(watched, _)| *watched != id) {
                            watchdog = Some((id, Liveness::new(dead_after, LIVENESS_CHECK)));
                        }
                        let received = live.conn.stats().udp_rx.datagrams;
                        let dead = watchdog
                            .as_mut()
                            .is_some_and(|(_, w)| w.observe(std::time::Instant::now(), received));
                        if dead {
                            inner.stats.silent.fetch_add(1, Ordering::Relaxed);
                            warn!(session = live.session_id, silent = ?dead_after, "the session server went silent; moving");
                            watchdog = None;
                            // Registered elsewhere first; the silent connection goes after.
                            if !move_on(&inner, &live, b"server silent").await {
                                live.conn.close(CLOSE_MOVED.into(), b"server silent");
                            }
                        }
                    }
                    request = background.recv(), if in_flight.len() < BACKGROUND_IN_FLIGHT => {
                        if let Some(request) = request {
                            in_flight.push(send_background(live.conn.clone(), request, inner.config.max_frame, inner.config.request_timeout()));
                        }
                    }
                    Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                }
            }
        }
    }
    // Shut down: send what is still queued, for a second at most, then close (which removes
    // every publisher of the connection anyway; the queue may also name publishers registered
    // through an earlier connection).
    let live = inner.live.write().take();
    if let Some(live) = live {
        let deadline = tokio::time::sleep(SHUTDOWN_FLUSH);
        tokio::pin!(deadline);
        loop {
            while in_flight.len() < BACKGROUND_IN_FLIGHT {
                let Ok(request) = background.try_recv() else {
                    break;
                };
                in_flight.push(send_background(
                    live.conn.clone(),
                    request,
                    inner.config.max_frame,
                    SHUTDOWN_FLUSH,
                ));
            }
            if in_flight.is_empty() {
                break;
            }
            tokio::select! {
                _ = &mut deadline => break,
                _ = in_flight.next() => {}
            }
        }
        live.conn.close(0u32.into(), b"client closed");
    }
    crate::cache::flush(&inner);
    inner.registry.lock().subscriptions.clear();
    inner.state_tx.send_replace(ConnectionState::Closed);
}

/// Sends one request a drop queued (an `Unpublish` or `Unsubscribe`); a failure is only logged:
/// the server removes what a lost connection held by itself.
async fn send_background(
    conn: Connection,
    request: ClientRequest,
    max_frame: u32,
    timeout: Duration,
) {
    if let Err(e) = rpc::call::<_, ClientResponse>(&conn, &request, max_frame, timeout).await {
        debug!(error = %e, "background request failed");
    }
}

/// Counts a connection that ended without this client closing it.
fn note_loss(inner: &Inner, reason: &ConnectionError) {
    match reason {
        ConnectionError::LocallyClosed => {}
        ConnectionError::ApplicationClosed(close)
            if close.error_code.into_inner() == u64::from(CLOSE_SLOW_CONSUMER) =>
        {
            inner.stats.lost.fetch_add(1, Ordering::Relaxed);
            inner.stats.cut_off_slow.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            inner.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads one connection's push stream into the subscriptions until the connection ends. Each
/// push is decoded once and applied to the subscription's shared snapshot.
async fn read_pushes(inner: Arc<Inner>, conn: Connection) {
    let result = async {
        let mut push = conn.accept_uni().await?;
        let mut frames = frame::FrameBuffer::new(inner.config.max_frame);
        loop {
            let body = match frames.next_frame()? {
                Some(body) => body,
                None => {
                    // Whatever has arrived, in one piece: many small pushes per read.
                    let chunk = push
                        .read_chunk(PUSH_READ, true)
                        .await
                        .map_err(|e| Error::Connection(format!("push stream: {e}")))?;
                    match chunk {
                        Some(chunk) => frames.extend(&chunk.bytes),
                        None if frames.pending() == 0 => return Ok::<_, Error>(()),
                        None => {
                            return Err(Error::BadFrame(
                                "the push stream ended inside a frame".into(),
                            ));
                        }
                    }
                    continue;
                }
            };
            inner
                .stats
                .push_bytes
                .fetch_add((body.len() + frame::HEADER_LEN) as u64, Ordering::Relaxed);
            match push::decode(&body) {
                Ok(Push::Snapshot(snapshot)) => {
                    inner.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                    deliver_snapshot(&inner, snapshot);
                }
                Ok(Push::Delta(delta)) => {
                    inner.stats.deltas.fetch_add(1, Ordering::Relaxed);
                    if let Some(request) = deliver_delta(&inner, delta) {
                        inner.stats.resyncs.fetch_add(1, Ordering::Relaxed);
                        crate::io::spawn(resync(inner.clone(), conn.clone(), request));
                    }
                }
                // Only the connection in use moves: one being handed over is closed anyway.
                Ok(Push::GoAway { reason }) if is_current(&inner, &conn) => {
                    inner.stats.go_aways.fetch_add(1, Ordering::Relaxed);
                    info!(%reason, "the session server asks us to move");
                    inner.go_away.notify_one();
                }
                Ok(Push::GoAway { .. }) => {}
                // A push this version does not know: skip it, newer servers may add kinds.
                Err(Error::UnexpectedMessage(e)) => debug!(error = %e, "skipped an unknown push"),
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    if let Err(e) = result
        && conn.close_reason().is_none()
    {
        warn!(error = %e, "push stream failed; closing the connection");
        conn.close(0u32.into(), b"bad push stream");
    }
}

fn is_current(inner: &Inner, conn: &Connection) -> bool {
    inner
        .live
        .read()
        .as_ref()
        .is_some_and(|live| live.conn.stable_id() == conn.stable_id())
}

/// Takes a full snapshot if it is newer than what the subscription holds.
fn deliver_snapshot(inner: &Inner, snapshot: proto::Snapshot) {
    // Built outside the lock: O(n) for a snapshot of n publishers.
    let snapshot = Snapshot::from_wire(snapshot);
    let mut registry = inner.registry.lock();
    let Some(entry) = registry.subscriptions.get_mut(&snapshot.service) else {
        return;
    };
    if !snapshot_is_newer(entry.latest.as_ref().map(|l| l.version), snapshot.version) {
        return;
    }
    entry.latest = Some(snapshot);
    publish(inner, entry);
}

/// Applies a delta to the subscription's snapshot. Returns the `Subscribe` that resyncs it when
/// the delta does not start from the version held (which a correct server never sends).
fn deliver_delta(inner: &Inner, delta: Delta) -> Option<ClientRequest> {
    let mut registry = inner.registry.lock();
    let entry = registry.subscriptions.get_mut(&delta.service)?;
    let held = entry.latest.as_ref().map(|l| l.version);
    match judge_delta(held, delta.base, delta.version) {
        DeltaVerdict::Stale => None,
        DeltaVerdict::Apply => {
            entry.latest.as_mut().expect("judged").apply(delta);
            publish(inner, entry);
            None
        }
        DeltaVerdict::Resync => {
            warn!(service = %delta.service, base = delta.base, version = delta.version, "a push does not follow the version held; asking for the full snapshot");
            Some(subscribe_request(
                entry.register_id.clone(),
                delta.service,
                entry.healthy_only,
            ))
        }
    }
}

/// Shows the subscription's latest snapshot to its readers — unless `refuse_empty` withholds an
/// empty one that would replace publishers.
fn publish(inner: &Inner, entry: &mut SubscriptionState) {
    let Some(latest) = &entry.latest else { return };
    let shown = accept(
        entry.tx.borrow().as_ref(),
        latest,
        inner.config.refuse_empty,
    );
    if !shown {
        inner.stats.refused_empty.fetch_add(1, Ordering::Relaxed);
        warn!(service = %latest.service, version = latest.version, "withheld an empty snapshot (refuse_empty)");
        return;
    }
    if inner.cache.is_some() {
        inner.cache_dirty.lock().insert(latest.service.clone());
    }
    entry.tx.send_replace(Some(latest.clone()));
}

/// Subscribes again under the same register id: the server answers with the full snapshot.
async fn resync(inner: Arc<Inner>, conn: Connection, request: ClientRequest) {
    if let Err(e) = rpc::call::<_, ClientResponse>(
        &conn,
        &request,
        inner.config.max_frame,
        inner.config.request_timeout(),
    )
    .await
    {
        debug!(error = %e, "resync failed; the next connection registers afresh");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_address_of_every_name_is_a_candidate_once() {
        let resolved = vec![
            (
                "sessions.example:7300".to_owned(),
                vec![
                    addr("10.0.0.1:7300"),
                    addr("10.0.0.2:7300"),
                    addr("[::1]:7300"),
                ],
            ),
            ("10.0.0.2:7300".to_owned(), vec![addr("10.0.0.2:7300")]),
            ("10.0.0.3:7300".to_owned(), vec![addr("10.0.0.3:7300")]),
        ];
        let found = candidates(resolved.clone(), None);
        let addrs: Vec<SocketAddr> = found.iter().map(|c| c.addr).collect();
        assert_eq!(
            addrs,
            [
                addr("10.0.0.1:7300"),
                addr("10.0.0.2:7300"),
                addr("[::1]:7300"),
                addr("10.0.0.3:7300")
            ]
        );
        // Each address is checked against the name it was configured under.
        assert_eq!(found[0].name, "sessions.example");
        assert_eq!(found[2].name, "sessions.example");
        assert_eq!(found[3].name, "10.0.0.3");
        // A configured server name wins.
        assert!(
            candidates(resolved, Some("roster"))
                .iter()
                .all(|c| c.name == "roster")
        );
    }
}
