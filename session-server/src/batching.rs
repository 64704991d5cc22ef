//! What the forwarder decides, without I/O or a clock: which publisher changes go to which slot
//! leader in which batch, what a batch's answers mean, and when to look again.
//!
//! Changes of one publisher — keyed by service, client and register id — are sent one at a time,
//! so the leader sees them in the order the client made them. A change arriving while an earlier
//! one of the same publisher is in flight replaces the one waiting behind it: each change carries
//! the publisher's whole state, so only the latest matters, and every ack waiting on the replaced
//! one is answered with the newer one's outcome.
//!
//! Changes ready to go are grouped by the data server leading their slot, up to [`MAX_BATCH`]
//! changes (and [`MAX_BATCH_BYTES`]) a batch and [`BATCHES_PER_LEADER`] batches in flight per data
//! server: a lone change goes at once in a batch of one, and the changes that arrive while batches
//! are in flight make the next batch bigger, so throughput grows with load instead of round trips.
//! Changes for a data server whose batches are all in flight wait aside, and are looked at again
//! when one of its batches comes back (or the routes change), so a new change costs the same
//! however many wait.
//!
//! A change refused with a retryable error (no leader, not the leader, unreachable, slot moving)
//! is answered `durable: false` and retried with backoff until it lands or is replaced; a change
//! whose slot is being synced waits (see `gate`). [`Forwarder::due`] says when either needs a look.
//! The task around this (`forward`) does the sending.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use roster_common::proto::{Publisher, WriteOp};
use roster_common::{ClientId, RegisterId, Result, ServiceId, SlotId};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// Changes in one `WriteBatch` at most.
pub const MAX_BATCH: usize = 512;
/// Bytes of publisher data and attributes in one batch at most, well inside a frame.
pub const MAX_BATCH_BYTES: usize = 256 << 10;
/// Batches in flight to one data server at once.
pub const BATCHES_PER_LEADER: usize = 4;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How soon changes held back by a slot sync are looked at again.
const GATE_RECHECK: Duration = Duration::from_millis(10);

/// The answer to a forwarded change: `Ok(true)` once the leader applied it, `Ok(false)` when it is
/// held and retried.
pub type Ack = oneshot::Sender<Result<bool>>;

/// One publisher change for the forwarder.
pub struct Forward {
    pub op: WriteOp,
    pub ack: Option<Ack>,
}

/// Which publisher a change is of.
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

fn answer(acks: Vec<Ack>, result: &Result<bool>) {
    for ack in acks {
        let _ = ack.send(result.clone());
    }
}

/// One change in a batch.
pub struct Item {
    key: Key,
    pub op: WriteOp,
    /// Failed attempts before this one.
    attempt: u32,
}

/// Changes for one data server, to be sent as one `WriteBatch`. `passes` (one per change, from
/// the slot gate) are held until the batch is answered, so no slot sync overtakes it.
pub struct Batch<P> {
    pub addr: String,
    pub items: Vec<Item>,
    pub passes: Vec<P>,
    bytes: usize,
}

/// What came back for a batch: one outcome per item, in order, or one error for all of them.
pub struct Answered {
    pub addr: String,
    pub items: Vec<Item>,
    pub results: Result<Vec<Result<()>>>,
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

#[derive(Default)]
pub struct Forwarder {
    pending: HashMap<Key, Pending>,
    /// Pending changes that may go now (not in flight, not backing off), in arrival order.
    ready: VecDeque<Key>,
    /// Pending changes whose data server had its batches in flight at their last look: looked at
    /// again only when a batch comes back or the routes change, not at every new change (with
    /// thousands waiting, walking them all at each arrival cost more than sending them).
    waiting_for_room: VecDeque<Key>,
    /// Keys in `ready` or `waiting_for_room`.
    queued: HashSet<Key>,
    /// Changes in a batch on their way, with the acks waiting for them.
    in_flight: HashMap<Key, Vec<Ack>>,
    /// Batches in flight per data server address.
    batches: HashMap<String, usize>,
    /// The earliest moment a backing-off change may go again.
    next_retry: Option<Instant>,
    /// When changes held back by a slot sync are looked at again.
    gate_recheck: Option<Instant>,
}

impl Forwarder {
    /// A new change from a client connection.
    pub fn on_change(&mut self, Forward { op, ack }: Forward) {
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
    pub fn on_result(&mut self, answered: Answered, now: Instant) {
        let Answered {
            addr,
            items,
            results,
        } = answered;
        if let Some(n) = self.batches.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.batches.remove(&addr);
            }
        }
        self.room_made();
        let results: Vec<Result<()>> = match results {
            Ok(results) if results.len() == items.len() => results,
            Ok(results) => {
                let e = roster_common::Error::UnexpectedMessage(format!(
                    "{} results for a batch of {}",
                    results.len(),
                    items.len()
                ));
                vec![Err(e); items.len()]
            }
            Err(e) => vec![Err(e); items.len()],
        };
        for (Item { key, op, attempt }, result) in items.into_iter().zip(results) {
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

    /// The slot leaders may have changed: the changes waiting for room at their old leader are
    /// looked at again.
    pub fn routes_changed(&mut self) {
        self.room_made();
    }

    /// A data server has room for a batch (or the routes changed): what waited for room goes
    /// first, being older than what is ready.
    fn room_made(&mut self) {
        while let Some(key) = self.waiting_for_room.pop_back() {
            self.ready.push_front(key);
        }
    }

    /// When something held back (a backoff, a slot being synced) needs a look even if nothing
    /// else happens; `None` while nothing is held back.
    pub fn due(&self) -> Option<Instant> {
        match (self.next_retry, self.gate_recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The batches to send now. `route` gives a service's slot leader's address and the slot
    /// (`None`: no leader known, and the change backs off); `admit` gives a pass to write a slot,
    /// `None` while the slot is being synced (the change waits). Changes beyond a leader's
    /// batches in flight stay ready for the next call.
    pub fn take_batches<P>(
        &mut self,
        now: Instant,
        route: impl Fn(&ServiceId) -> Option<(String, SlotId)>,
        mut admit: impl FnMut(SlotId) -> Option<P>,
    ) -> Vec<Batch<P>> {
        self.retry_due(now);
        self.gate_recheck = None;
        let mut done = Vec::new();
        if self.ready.is_empty() {
            return done;
        }
        let mut building: HashMap<String, Batch<P>> = HashMap::new();
        let mut held = VecDeque::new();
        while let Some(key) = self.ready.pop_front() {
            let Some(pending) = self.pending.get_mut(&key) else {
                self.queued.remove(&key);
                continue;
            };
            let Some((addr, slot)) = route(&key.0) else {
                // No leader to send to: held, and retried with backoff.
                self.queued.remove(&key);
                answer(std::mem::take(&mut pending.acks), &Ok(false));
                self.back_off(&key, now);
                continue;
            };
            let batch = match building.get_mut(&addr) {
                Some(batch) => batch,
                None if self.batches.get(&addr).copied().unwrap_or(0) < BATCHES_PER_LEADER => {
                    *self.batches.entry(addr.clone()).or_default() += 1;
                    building.entry(addr.clone()).or_insert_with(|| Batch {
                        addr: addr.clone(),
                        items: Vec::new(),
                        passes: Vec::new(),
                        bytes: 0,
                    })
                }
                None => {
                    self.waiting_for_room.push_back(key);
                    continue;
                }
            };
            let Some(pass) = admit(slot) else {
                self.gate_recheck = Some(now + GATE_RECHECK);
                held.push_back(key);
                continue;
            };
            self.queued.remove(&key);
            let pending = self.pending.remove(&key).expect("present above");
            batch.bytes += weight(&pending.op);
            batch.items.push(Item {
                key: key.clone(),
                op: pending.op,
                attempt: pending.attempt,
            });
            batch.passes.push(pass);
            self.in_flight.insert(key, pending.acks);
            if batch.items.len() >= MAX_BATCH || batch.bytes >= MAX_BATCH_BYTES {
                done.push(building.remove(&addr).expect("present above"));
            }
        }
        self.ready = held;
        for (addr, batch) in building {
            if batch.items.is_empty() {
                // Opened, then every change for it waited on its slot: not in flight after all.
                self.batch_not_sent(&addr);
            } else {
                done.push(batch);
            }
        }
        done
    }

    fn batch_not_sent(&mut self, addr: &str) {
        if let Some(n) = self.batches.get_mut(addr) {
            *n -= 1;
            if *n == 0 {
                self.batches.remove(addr);
            }
        }
    }

    /// Changes whose backoff has passed become ready.
    fn retry_due(&mut self, now: Instant) {
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
}

#[cfg(test)]
mod tests;
