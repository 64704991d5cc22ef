//! Forwarding publisher changes to slot leaders, in order, with retries.
//!
//! One task owns every change on its way to the data tier. Changes of one publisher — keyed by
//! service, client and register id — are sent one at a time, so the leader sees them in the order
//! the client made them; changes of different publishers go out concurrently. A change arriving
//! while an earlier one of the same publisher is in flight or waiting replaces the waiting one:
//! each change carries the publisher's whole state, so only the latest matters.
//!
//! A change the leader refuses with a retryable error (no leader, not the leader, unreachable) is
//! answered `durable: false` and retried with backoff until it lands or is replaced; this is how a
//! session keeps the source copy while the data tier is unavailable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roster_common::proto::{DataRequest, DataResponse, WriteOp};
use roster_common::{ClientId, Error, RegisterId, Result, ServiceId, rpc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::server::Shared;

/// Changes queued for the forwarder before senders wait. Senders are connection handlers, which
/// then stop reading requests: backpressure reaches the clients.
pub const FORWARD_QUEUE: usize = 8192;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);
const RETRY_CHECK: Duration = Duration::from_millis(50);

/// The answer to a forwarded change: `Ok(true)` once the leader applied it, `Ok(false)` when it is
/// held and retried.
pub type Ack = oneshot::Sender<Result<bool>>;

/// One publisher change for the forwarder.
pub struct Forward {
    pub op: WriteOp,
    pub ack: Option<Ack>,
}

type Key = (ServiceId, ClientId, RegisterId);

fn key_of(op: &WriteOp) -> Key {
    match op {
        WriteOp::Put { publisher } => (
            publisher.service.clone(),
            publisher.client_id.clone(),
            publisher.register_id.clone(),
        ),
        WriteOp::Remove {
            service,
            client_id,
            register_id,
            ..
        } => (service.clone(), client_id.clone(), register_id.clone()),
    }
}

struct Waiting {
    op: WriteOp,
    acks: Vec<Ack>,
    not_before: Instant,
    attempt: u32,
}

#[derive(Default)]
struct Forwarder {
    in_flight: HashMap<Key, Vec<Ack>>,
    waiting: HashMap<Key, Waiting>,
}

fn answer(acks: Vec<Ack>, result: &Result<bool>) {
    for ack in acks {
        let _ = ack.send(result.clone());
    }
}

/// Runs the forwarder until `shutdown`. Changes still waiting then are dropped: the session is going
/// away, and its clients re-register through another one.
pub async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Forward>,
    shutdown: CancellationToken,
) {
    let mut state = Forwarder::default();
    let mut sends: JoinSet<(Key, WriteOp, u32, Result<()>)> = JoinSet::new();
    let mut check = tokio::time::interval(RETRY_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = rx.recv() => {
                let Some(Forward { op, ack }) = next else { break };
                let key = key_of(&op);
                let acks: Vec<Ack> = ack.into_iter().collect();
                if state.in_flight.contains_key(&key) || state.waiting.contains_key(&key) {
                    let waiting = state.waiting.entry(key).or_insert_with(|| Waiting {
                        op: op.clone(),
                        acks: Vec::new(),
                        not_before: Instant::now(),
                        attempt: 0,
                    });
                    waiting.op = op;
                    waiting.acks.extend(acks);
                } else {
                    state.in_flight.insert(key.clone(), acks);
                    sends.spawn(send(shared.clone(), key, op, 0));
                }
            }
            Some(done) = sends.join_next() => {
                let Ok((key, op, attempt, result)) = done else { continue };
                let acks = state.in_flight.remove(&key).unwrap_or_default();
                match result {
                    Ok(()) => answer(acks, &Ok(true)),
                    Err(e) if e.is_retryable() => {
                        debug!(service = %key.0, register_id = %key.2, error = %e, "change not applied yet; will retry");
                        answer(acks, &Ok(false));
                        let delay = FIRST_RETRY.saturating_mul(1 << attempt.min(5)).min(MAX_RETRY);
                        state.waiting.entry(key.clone()).or_insert(Waiting {
                            op,
                            acks: Vec::new(),
                            not_before: Instant::now() + delay,
                            attempt: attempt + 1,
                        });
                    }
                    Err(e) => {
                        warn!(service = %key.0, register_id = %key.2, error = %e, "change refused by the data tier");
                        answer(acks, &Err(e));
                    }
                }
                start_due(&mut state, &mut sends, &shared, Some(key));
            }
            _ = check.tick() => start_due(&mut state, &mut sends, &shared, None),
        }
    }
}

/// Starts waiting changes whose time has come: just `only`'s if given, else all of them.
fn start_due(
    state: &mut Forwarder,
    sends: &mut JoinSet<(Key, WriteOp, u32, Result<()>)>,
    shared: &Arc<Shared>,
    only: Option<Key>,
) {
    let now = Instant::now();
    let due: Vec<Key> = match only {
        Some(key) => vec![key],
        None => state
            .waiting
            .iter()
            .filter(|(_, w)| w.not_before <= now)
            .map(|(k, _)| k.clone())
            .collect(),
    };
    for key in due {
        if state.in_flight.contains_key(&key) {
            continue;
        }
        let Some(waiting) = state.waiting.get(&key) else {
            continue;
        };
        if waiting.not_before > now {
            continue;
        }
        let waiting = state.waiting.remove(&key).expect("present above");
        state.in_flight.insert(key.clone(), waiting.acks);
        sends.spawn(send(shared.clone(), key, waiting.op, waiting.attempt));
    }
}

async fn send(
    shared: Arc<Shared>,
    key: Key,
    op: WriteOp,
    attempt: u32,
) -> (Key, WriteOp, u32, Result<()>) {
    let result = send_once(&shared, &op).await;
    (key, op, attempt, result)
}

async fn send_once(shared: &Shared, op: &WriteOp) -> Result<()> {
    let service = op.service();
    let view = shared
        .view()
        .ok_or_else(|| Error::Unavailable("no cluster view yet".into()))?;
    let leader = view.table.leader_of(service).ok_or_else(|| {
        Error::Unavailable(format!(
            "slot of {service} has no leader: no data server is live"
        ))
    })?;
    let addr = view
        .data_addr(leader)
        .ok_or_else(|| Error::Unavailable(format!("data server {leader} has no address")))?;
    // Not while a sync of the slot is being built or is in flight (see `gate`).
    let _pass = shared
        .slot_gate
        .write(roster_common::slot::slot_of(service, view.table.slot_count))
        .await;
    let conn = shared.pool.get(addr).await?;
    let request = DataRequest::Write { op: op.clone() };
    rpc::call::<_, DataResponse>(
        &conn,
        &request,
        shared.config.max_frame,
        shared.config.request_timeout,
    )
    .await?;
    Ok(())
}
