//! Forwarding publisher changes to slot leaders: in order per publisher, in batches per leader,
//! with retries.
//!
//! One task owns every change on its way to the data tier. Changes of one publisher — keyed by
//! service, client and register id — are sent one at a time, so the leader sees them in the order
//! the client made them. A change arriving while an earlier one of the same publisher is in flight
//! replaces the one waiting behind it: each change carries the publisher's whole state, so only
//! the latest matters.
//!
//! Changes ready to go are grouped by the data server leading their slot and sent as one
//! `WriteBatch` each, up to [`MAX_BATCH`] changes and [`BATCHES_PER_LEADER`] batches in flight per
//! data server: a lone change goes at once in a batch of one, and the changes that arrive while
//! batches are in flight make the next batch bigger, so throughput grows with load instead of
//! round trips. The leader applies each change of a batch on its own and answers for each.
//!
//! A change the leader refuses with a retryable error (no leader, not the leader, unreachable,
//! slot moving) is answered `durable: false` and retried with backoff until it lands or is
//! replaced; this is how a session keeps the source copy while the data tier is unavailable.
//! A change whose slot is being synced (see `gate`) waits until the sync is answered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roster_common::proto::{DataRequest, DataResponse, Publisher, WriteOp};
use roster_common::{ClientId, Error, RegisterId, Result, ServiceId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::gate::WritePass;
use crate::server::Shared;

/// Changes queued for the forwarder before senders wait. Senders are connection handlers, which
/// then stop reading requests: backpressure reaches the clients.
pub const FORWARD_QUEUE: usize = 8192;
/// Changes in one `WriteBatch` at most.
pub const MAX_BATCH: usize = 512;
/// Bytes of publisher data and attributes in one batch at most, well inside a frame.
const MAX_BATCH_BYTES: usize = 256 << 10;
/// Batches in flight to one data server at once.
pub const BATCHES_PER_LEADER: usize = 4;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How often changes held back (backing off, or waiting for a slot sync) are looked at again.
const RETRY_CHECK: Duration = Duration::from_millis(10);

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

/// The size a change adds to a batch, roughly.
fn weight(op: &WriteOp) -> usize {
    match op {
        WriteOp::Put {
            publisher: Publisher {
                data, attributes, ..
            },
        } => {
            64 + data.iter().map(|d| d.len()).sum::<usize>()
                + attributes
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        }
        WriteOp::Remove { .. } => 64,
    }
}

/// The latest change of a publisher not sent yet.
struct Pending {
    op: WriteOp,
    acks: Vec<Ack>,
    /// Failed attempts so far (for the backoff).
    attempt: u32,
    /// Backing off until then.
    not_before: Option<Instant>,
}

/// What a batch came back with: each change, its attempt count and its outcome.
type BatchDone = (String, Vec<(Key, WriteOp, u32, Result<()>)>);

#[derive(Default)]
struct Forwarder {
    pending: HashMap<Key, Pending>,
    /// Pending changes that may go now (not in flight, not backing off), in arrival order.
    ready: VecDeque<Key>,
    /// Keys in `ready`.
    queued: HashSet<Key>,
    /// Changes in a batch on their way, with the acks waiting for them.
    in_flight: HashMap<Key, Vec<Ack>>,
    /// Batches in flight per data server address.
    batches: HashMap<String, usize>,
    /// The earliest moment a backing-off change may go again.
    next_retry: Option<Instant>,
}

fn answer(acks: Vec<Ack>, result: &Result<bool>) {
    for ack in acks {
        let _ = ack.send(result.clone());
    }
}

impl Forwarder {
    fn back_off(&mut self, key: &Key, now: Instant) {
        let Some(pending) = self.pending.get_mut(key) else {
            return;
        };
        let delay = FIRST_RETRY
            .saturating_mul(1 << pending.attempt.min(5))
            .min(MAX_RETRY);
        pending.attempt += 1;
        let at = now + delay;
        pending.not_before = Some(at);
        self.next_retry = Some(self.next_retry.map_or(at, |t| t.min(at)));
    }

    fn enqueue(&mut self, key: Key) {
        if self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    /// A new change from a client connection.
    fn handle_change(&mut self, op: WriteOp, ack: Option<Ack>) {
        let key = key_of(&op);
        let pending = self.pending.entry(key.clone()).or_insert_with(|| Pending {
            op: op.clone(),
            acks: Vec::new(),
            attempt: 0,
            not_before: None,
        });
        pending.op = op;
        pending.acks.extend(ack);
        let backing_off = pending.not_before.is_some();
        if !self.in_flight.contains_key(&key) && !backing_off {
            self.enqueue(key);
        }
    }

    /// A batch came back: answer, retry or give up on each change.
    fn handle_done(&mut self, (addr, results): BatchDone, now: Instant) {
        if let Some(n) = self.batches.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.batches.remove(&addr);
            }
        }
        for (key, op, attempt, result) in results {
            let Some(acks) = self.in_flight.remove(&key) else {
                continue;
            };
            match result {
                Ok(()) => answer(acks, &Ok(true)),
                Err(e) if e.is_retryable() => {
                    debug!(service = %key.0, register_id = %key.2, error = %e, "change not applied yet; will retry");
                    answer(acks, &Ok(false));
                    // A newer change of the same publisher replaces this one, and inherits the
                    // backoff.
                    self.pending
                        .entry(key.clone())
                        .or_insert(Pending {
                            op,
                            acks: Vec::new(),
                            attempt: 0,
                            not_before: None,
                        })
                        .attempt = attempt;
                    self.back_off(&key, now);
                }
                Err(e) => {
                    warn!(service = %key.0, register_id = %key.2, error = %e, "change refused by the data tier");
                    answer(acks, &Err(e));
                }
            }
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.not_before.is_none())
            {
                self.enqueue(key);
            }
        }
    }

    /// Changes whose backoff has passed become ready.
    fn handle_tick(&mut self, now: Instant) {
        if self.next_retry.is_none_or(|t| t > now) {
            return;
        }
        self.next_retry = self
            .pending
            .values()
            .filter_map(|p| p.not_before)
            .filter(|t| *t > now)
            .min();
        let due: Vec<Key> = self
            .pending
            .iter()
            .filter(|(key, p)| {
                p.not_before.is_some_and(|t| t <= now) && !self.in_flight.contains_key(*key)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            if let Some(p) = self.pending.get_mut(&key) {
                p.not_before = None;
            }
            self.enqueue(key);
        }
    }

    /// Sends what is ready, grouped by slot leader, within the batch limits. Changes that cannot
    /// go yet (their leader has enough batches in flight, their slot is being synced) stay ready.
    fn dispatch(&mut self, shared: &Arc<Shared>, sends: &mut JoinSet<BatchDone>, now: Instant) {
        if self.ready.is_empty() {
            return;
        }
        let view = shared.view();
        let mut building: HashMap<String, Batch> = HashMap::new();
        let mut held = VecDeque::new();
        while let Some(key) = self.ready.pop_front() {
            let Some(pending) = self.pending.get_mut(&key) else {
                self.queued.remove(&key);
                continue;
            };
            let leader = view.as_ref().and_then(|view| {
                let slot = view.table.slot_of(&key.0);
                let id = view.table.leader(slot)?;
                Some((view.data_addr(id)?.to_owned(), slot))
            });
            let Some((addr, slot)) = leader else {
                // No leader to send to: held, and retried with backoff.
                self.queued.remove(&key);
                answer(std::mem::take(&mut pending.acks), &Ok(false));
                self.back_off(&key, now);
                continue;
            };
            let in_flight = self.batches.get(&addr).copied().unwrap_or(0);
            let batch = match building.get_mut(&addr) {
                Some(batch) => batch,
                None if in_flight < BATCHES_PER_LEADER => building.entry(addr.clone()).or_default(),
                None => {
                    held.push_back(key);
                    continue;
                }
            };
            let Some(pass) = shared.slot_gate.try_write(slot) else {
                held.push_back(key);
                continue;
            };
            self.queued.remove(&key);
            let pending = self.pending.remove(&key).expect("present above");
            batch.bytes += weight(&pending.op);
            batch.items.push((key.clone(), pending.op, pending.attempt));
            batch.passes.push(pass);
            self.in_flight.insert(key, pending.acks);
            if batch.items.len() >= MAX_BATCH || batch.bytes >= MAX_BATCH_BYTES {
                let batch = building.remove(&addr).expect("present above");
                self.launch(shared, sends, addr, batch);
            }
        }
        self.ready = held;
        for (addr, batch) in building {
            self.launch(shared, sends, addr, batch);
        }
    }

    fn launch(
        &mut self,
        shared: &Arc<Shared>,
        sends: &mut JoinSet<BatchDone>,
        addr: String,
        batch: Batch,
    ) {
        *self.batches.entry(addr.clone()).or_default() += 1;
        sends.spawn(send_batch(shared.clone(), addr, batch));
    }
}

/// A batch being built for one data server.
#[derive(Default)]
struct Batch {
    items: Vec<(Key, WriteOp, u32)>,
    bytes: usize,
    /// Held until the batch is answered, so no slot sync overtakes it.
    passes: Vec<WritePass>,
}

/// Runs the forwarder until `shutdown`. Changes still waiting then are dropped: the session is going
/// away, and its clients re-register through another one.
pub async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Forward>,
    shutdown: CancellationToken,
) {
    let mut state = Forwarder::default();
    let mut sends: JoinSet<BatchDone> = JoinSet::new();
    let mut check = tokio::time::interval(RETRY_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = rx.recv() => {
                let Some(Forward { op, ack }) = next else { break };
                state.handle_change(op, ack);
                // Take whatever else is queued too, so it can share the batch.
                while let Ok(Forward { op, ack }) = rx.try_recv() {
                    state.handle_change(op, ack);
                }
            }
            Some(done) = sends.join_next() => {
                let Ok(done) = done else { continue };
                state.handle_done(done, Instant::now());
            }
            _ = check.tick() => state.handle_tick(Instant::now()),
        }
        state.dispatch(&shared, &mut sends, Instant::now());
    }
}

async fn send_batch(shared: Arc<Shared>, addr: String, batch: Batch) -> BatchDone {
    let Batch { items, passes, .. } = batch;
    let ops: Vec<WriteOp> = items.iter().map(|(_, op, _)| op.clone()).collect();
    let results = send_once(&shared, &addr, ops).await;
    drop(passes);
    let done = match results {
        Ok(results) if results.len() == items.len() => items
            .into_iter()
            .zip(results)
            .map(|((key, op, attempt), result)| (key, op, attempt, result))
            .collect(),
        Ok(results) => {
            let e = Error::UnexpectedMessage(format!(
                "{} results for a batch of {}",
                results.len(),
                items.len()
            ));
            items
                .into_iter()
                .map(|(key, op, attempt)| (key, op, attempt, Err(e.clone())))
                .collect()
        }
        Err(e) => items
            .into_iter()
            .map(|(key, op, attempt)| (key, op, attempt, Err(e.clone())))
            .collect(),
    };
    (addr, done)
}

async fn send_once(shared: &Shared, addr: &str, ops: Vec<WriteOp>) -> Result<Vec<Result<()>>> {
    let request = DataRequest::WriteBatch { ops };
    match shared
        .pool
        .call::<_, DataResponse>(
            addr,
            &request,
            shared.config.max_frame,
            shared.config.request_timeout,
        )
        .await?
    {
        DataResponse::WrittenBatch { results } => Ok(results
            .into_iter()
            .map(|r| r.map(|_| ()).map_err(Error::from_wire))
            .collect()),
        other => Err(Error::UnexpectedMessage(format!(
            "expected WrittenBatch, got {other:?}"
        ))),
    }
}
