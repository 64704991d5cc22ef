//! The subscriber registry: who subscribes to what, this session's copy of every subscribed
//! service's datum with its recent history, and the version each subscription was last pushed.
//!
//! Plain data and functions, no I/O, time passed in: the server keeps one `Hub` behind a mutex
//! that is never held across an `.await`.
//!
//! **Changes in, deltas out.** The slot leader tells this session each change of a subscribed
//! service (the publisher put or removed, with the versions before and after it); [`Hub::apply`]
//! applies it to the cached datum and records it as a step of the datum's history. Each publisher
//! is kept MessagePack-encoded, as it will be pushed, so a push is assembled from bytes that are
//! already there. A change that does not follow the cached version (a gap: a lost stream, a new
//! slot leader) asks the caller to fetch the whole datum; changes arriving meanwhile are held and
//! replayed on top of it, and the fetched datum enters the history as one step — the difference
//! from the copy it replaces — so subscribers still get a delta.
//!
//! **Pull, not queue.** A change marks each watching connection as due for that service and wakes
//! its writer; the writer calls [`Hub::take_pushes`] when it is free to write, and gets, for each
//! due subscription, one frame taking it from the version it was last pushed to the current one:
//! a `Delta` (the history's steps from its version, squashed) for clients that asked for deltas,
//! unless the full `Snapshot` is smaller or the history no longer reaches back that far. So the
//! first change of a quiet service goes out at once, and changes that arrive while a connection's
//! writer is still busy are merged into its next push: a slow reader gets fewer, larger pushes,
//! never a backlog, and never slows anyone else. Frames for one version are built once per base
//! version and shared by every subscriber at that base.
//!
//! Pushes are also paced ([`Pacing`], given to [`Hub::new`]): one service is pushed to one
//! connection up to `burst` times at once and then once per `window`, so a quiet service's change
//! goes out at once and a service changing many times a second (a rollout) goes out as fewer,
//! larger pushes, none held longer than the window.
//!
//! A healthy-only subscription is pushed, at each version, the full snapshot of the publishers it
//! is shown instead ([`healthy`]); plain subscriptions of the same service keep their deltas.
//!
//! Ordering: a subscription is pushed only versions newer than the last it was pushed; the cached
//! datum never goes back to an older version; so every subscriber sees versions strictly increase,
//! and every delta's `base` is exactly the version that subscription holds.
//!
//! Bounds: the history of a service is kept while its encoded size is within twice the datum's
//! (changes squash, so a delta over a longer history is rarely smaller than the snapshot), at
//! least [`MIN_STEPS`] steps and at most [`MAX_STEPS`]; what
//! is due per connection is a set of services, bounded by its subscriptions; a pull returns about
//! [`PULL_BUDGET`] bytes at most. Changes held during a fetch are bounded by [`MAX_HELD`]; past it
//! the service is fetched again instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use roster_common::proto::Push;
use roster_common::push::removed_len;
use roster_common::{ClientId, RegisterId, ServiceId, Version, frame};
use rustc_hash::FxHashMap;
use tokio::sync::Notify;
use tracing::warn;

use datum::Datum;
pub use datum::Fetched;

mod datum;
mod healthy;
mod pace;
mod watch;

pub use pace::Pacing;

/// A client connection's number within this session server.
pub type ConnId = u64;
/// One subscriber: its connection and the register id its client chose.
pub type SubKey = (ConnId, RegisterId);
/// A publisher's identity within a datum.
pub type PubKey = (ClientId, RegisterId);

/// Steps of history kept per service at most.
pub const MAX_STEPS: usize = 4096;
/// Steps of history kept per service whatever their size.
pub const MIN_STEPS: usize = 16;
/// Bytes of frames one [`Hub::take_pushes`] returns, about (a frame is never split).
pub const PULL_BUDGET: usize = 256 << 10;
/// Changes held per service while its datum is being fetched; more and it is fetched again.
pub const MAX_HELD: usize = 65_536;

/// One publisher change as the hub applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Added or replaced: the publisher encoded as it is pushed.
    Put(PubKey, Bytes),
    Removed(PubKey),
}

impl Op {
    fn key(&self) -> &PubKey {
        match self {
            Op::Put(key, _) | Op::Removed(key) => key,
        }
    }

    /// What this op adds to a delta, in bytes.
    fn weight(&self) -> usize {
        match self {
            Op::Put(_, bytes) => bytes.len(),
            Op::Removed((c, r)) => removed_len(c, r),
        }
    }
}

/// A change of one service's datum from version `prev` to `version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub service: ServiceId,
    pub prev: Version,
    pub version: Version,
    pub op: Op,
}

/// What [`Hub::apply`] did with a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied; the subscribers are due a push.
    Done,
    /// Already covered by the cached datum.
    Stale,
    /// Held until the fetch under way completes.
    Held,
    /// The change does not follow the cached datum (or there is none): fetch the datum now.
    Fetch,
    /// Nobody here subscribes to the service.
    Unwanted,
}

/// What [`Hub::subscribe`] changed in the set of wanted services.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Subscribed {
    /// The service had no subscriber here before: interest must be registered.
    pub first: bool,
    /// The register id was subscribed to another service, which now has no subscriber left.
    pub abandoned: Option<ServiceId>,
}

/// One frame for a connection's push stream, with the moment the oldest change it carries reached
/// this server (`None` for frames that carry no change: a first snapshot, a `GoAway`).
#[derive(Debug)]
pub struct Outgoing {
    pub frame: Bytes,
    pub since: Option<Instant>,
    pub kind: PushKind,
}

/// What a push frame is, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushKind {
    Snapshot,
    Delta,
    GoAway,
}

impl PushKind {
    pub fn name(self) -> &'static str {
        match self {
            PushKind::Snapshot => "snapshot",
            PushKind::Delta => "delta",
            PushKind::GoAway => "goaway",
        }
    }
}

/// How much a hub holds: connections, subscriptions, services with a subscriber.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub connections: usize,
    pub subscribers: usize,
    pub services: usize,
}

/// One subscribed service as the admin view shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceStatus {
    pub service: ServiceId,
    pub subscribers: usize,
    /// The version cached here; `None` until the first fetch or change.
    pub version: Option<Version>,
}

/// What a connection's writer gets from [`Hub::take_pushes`].
#[derive(Debug, Default)]
pub struct Pull {
    /// Frames to write now, in order.
    pub frames: Vec<Outgoing>,
    /// Pushes held back by the pacing are due at this moment: wake then.
    pub wake_at: Option<Instant>,
}

/// A connection's subscriptions to one service. However many there are, they are pushed as
/// one: one sequence of pushes with strictly increasing versions (pushes name the service, not
/// the subscription, so two sequences could not be told apart). They are therefore all of one
/// kind, plain or healthy-only: the kind the latest of them asked for.
#[derive(Debug, Default)]
struct ConnWatch {
    /// The service is in the connection's due list.
    due: bool,
    /// The register ids of the subscriptions, in the order they came.
    register_ids: Vec<RegisterId>,
    /// Shown only healthy publishers (full snapshots, never deltas).
    healthy_only: bool,
    /// The version last pushed; `None`: nothing yet (or a resync was asked for).
    last: Option<Version>,
    /// The pacing's state for this connection and service (see [`Pacing`]).
    paced: Option<Instant>,
}

#[derive(Debug, Default)]
struct ServiceState {
    datum: Option<Datum>,
    /// The subscriptions of each connection to this service.
    watchers: FxHashMap<ConnId, ConnWatch>,
    fetching: bool,
    /// Fetch again once the fetch under way completes.
    refetch: bool,
    /// Changes that arrived while fetching, replayed on the fetched datum.
    held: Vec<(Change, Instant)>,
}

impl ServiceState {
    fn subscribers(&self) -> usize {
        self.watchers.values().map(|w| w.register_ids.len()).sum()
    }
}

/// A connection's side of the hub: what is due to it and how to wake its writer.
struct ConnPush {
    deltas: bool,
    wake: Arc<Notify>,
    /// Services with a push due, in the order they became due (each marked `due` in its
    /// [`ConnWatch`]).
    due: VecDeque<ServiceId>,
    /// Frames that are not service pushes (`GoAway`), sent first.
    control: VecDeque<Bytes>,
    /// Its subscriptions' register ids.
    subs: HashSet<RegisterId>,
}

impl ConnPush {
    fn mark_due(&mut self, watch: &mut ConnWatch, service: &ServiceId) {
        if !watch.due {
            watch.due = true;
            self.due.push_back(service.clone());
            self.wake.notify_one();
        }
    }
}

/// Subscribers and cached datums of one session server.
pub struct Hub {
    max_frame: u32,
    pacing: Pacing,
    /// The share of unhealthy publishers above which healthy-only subscribers see all of them.
    protection_threshold: f64,
    conns: FxHashMap<ConnId, ConnPush>,
    services: HashMap<ServiceId, ServiceState>,
    subs: HashMap<SubKey, ServiceId>,
}

impl Hub {
    /// A hub whose frames stay within `max_frame`, pushing a service to one connection as
    /// `pacing` allows.
    pub fn new(max_frame: u32, pacing: Pacing) -> Self {
        Hub {
            max_frame,
            pacing,
            protection_threshold: roster_common::health::DEFAULT_PROTECTION_THRESHOLD,
            conns: FxHashMap::default(),
            services: HashMap::new(),
            subs: HashMap::new(),
        }
    }

    /// Registers a connection: whether its client takes deltas, and how to wake its writer.
    pub fn attach(&mut self, conn: ConnId, deltas: bool, wake: Arc<Notify>) {
        self.conns.insert(
            conn,
            ConnPush {
                deltas,
                wake,
                due: VecDeque::new(),
                control: VecDeque::new(),
                subs: HashSet::new(),
            },
        );
    }

    /// Forgets a connection and its subscribers (its writer, woken, finds it gone and stops);
    /// returns the services no one here subscribes to now.
    pub fn detach(&mut self, conn: ConnId) -> Vec<ServiceId> {
        let Some(push) = self.conns.remove(&conn) else {
            return Vec::new();
        };
        push.wake.notify_one();
        let mut abandoned: Vec<ServiceId> = push
            .subs
            .into_iter()
            .filter_map(|register_id| self.remove_sub(&(conn, register_id)))
            .collect();
        abandoned.sort();
        abandoned.dedup();
        abandoned
    }

    /// Subscribes `(conn, register_id)` to `service`, pushed every publisher. Subscribing again to
    /// the same service asks for a resync: the next push is the full snapshot.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        register_id: RegisterId,
        service: ServiceId,
    ) -> Subscribed {
        self.subscribe_with(conn, register_id, service, false)
    }

    /// Like [`Hub::subscribe`]; with `healthy_only` the subscription is pushed only healthy
    /// publishers (see [`roster_common::health::healthy_view`]), always as full snapshots.
    ///
    /// A second subscription of the connection to the same service joins the first: both are
    /// pushed the full snapshot next, then one sequence of pushes, of the newcomer's kind (plain or
    /// healthy-only) — so a client that drops one kind and subscribes with the other before its
    /// `Unsubscribe` arrived gets what it asked for last.
    pub fn subscribe_with(
        &mut self,
        conn: ConnId,
        register_id: RegisterId,
        service: ServiceId,
        healthy_only: bool,
    ) -> Subscribed {
        let key = (conn, register_id);
        let mut outcome = Subscribed::default();
        match self.subs.get(&key) {
            Some(current) if *current == service => {}
            Some(_) => outcome.abandoned = self.remove_sub(&key),
            None => {}
        }
        let state = self.services.entry(service.clone()).or_default();
        outcome.first = state.watchers.is_empty();
        let has_datum = state.datum.is_some();
        let watch = state.watchers.entry(conn).or_default();
        if !watch.register_ids.contains(&key.1) {
            watch.register_ids.push(key.1.clone());
        }
        watch.healthy_only = healthy_only;
        watch.last = None;
        if let Some(push) = self.conns.get_mut(&conn) {
            push.subs.insert(key.1.clone());
            if has_datum {
                push.mark_due(watch, &service);
            }
        }
        self.subs.insert(key, service);
        outcome
    }

    /// Ends a subscription; returns the service if no one here subscribes to it now. `None` also
    /// when the subscription did not exist: see [`Hub::is_subscribed`].
    pub fn unsubscribe(&mut self, conn: ConnId, register_id: &str) -> Option<ServiceId> {
        let key = (conn, register_id.to_owned());
        if let Some(push) = self.conns.get_mut(&conn) {
            push.subs.remove(register_id);
        }
        self.remove_sub(&key)
    }

    pub fn is_subscribed(&self, conn: ConnId, register_id: &str) -> bool {
        self.subs.contains_key(&(conn, register_id.to_owned()))
    }

    fn remove_sub(&mut self, key: &SubKey) -> Option<ServiceId> {
        let service = self.subs.remove(key)?;
        let state = self.services.get_mut(&service)?;
        if let Some(watch) = state.watchers.get_mut(&key.0) {
            watch.register_ids.retain(|r| *r != key.1);
            if watch.register_ids.is_empty() {
                state.watchers.remove(&key.0);
            }
        }
        if state.watchers.is_empty() {
            self.services.remove(&service);
            return Some(service);
        }
        None
    }

    /// Whether anyone here subscribes to `service`.
    pub fn is_wanted(&self, service: &ServiceId) -> bool {
        self.services.contains_key(service)
    }

    /// Every service someone here subscribes to.
    pub fn wanted(&self) -> Vec<ServiceId> {
        self.services.keys().cloned().collect()
    }

    /// The version of the cached datum of `service`.
    pub fn version(&self, service: &ServiceId) -> Option<Version> {
        self.services
            .get(service)?
            .datum
            .as_ref()
            .map(|d| d.version())
    }

    /// Takes one change from the slot leader (see [`Applied`]).
    pub fn apply(&mut self, change: Change, now: Instant) -> Applied {
        let Some(state) = self.services.get_mut(&change.service) else {
            return Applied::Unwanted;
        };
        if state.fetching {
            if state.held.len() < MAX_HELD {
                state.held.push((change, now));
            } else {
                state.refetch = true;
            }
            return Applied::Held;
        }
        let Some(datum) = state.datum.as_mut() else {
            state.fetching = true;
            state.held.push((change, now));
            return Applied::Fetch;
        };
        if change.version <= datum.version() {
            return Applied::Stale;
        }
        if change.prev != datum.version() {
            // A gap: fetch the datum, and replay this change (and those after it) on top.
            state.fetching = true;
            state.held.push((change, now));
            return Applied::Fetch;
        }
        datum.step(change.version, vec![change.op], now);
        mark_watchers_due(&mut self.conns, &change.service, state);
        Applied::Done
    }

    /// Notes that the slot leader has `service` at `version` (a registration's answer, or a
    /// change announced without its content). True: fetch it now. While a fetch is under way,
    /// it is only marked to be repeated.
    pub fn changed(&mut self, service: &ServiceId, version: Version) -> bool {
        let Some(state) = self.services.get_mut(service) else {
            return false;
        };
        if state.datum.as_ref().is_some_and(|d| d.version() >= version) {
            return false;
        }
        if state.fetching {
            state.refetch = true;
            return false;
        }
        state.fetching = true;
        true
    }

    /// Takes a fetched datum: installs it if newer, replays the changes held meanwhile, and
    /// pushes. True: fetch again now (a change was missed, or it was asked for meanwhile).
    pub fn fetched(&mut self, fetched: Fetched, now: Instant) -> bool {
        let Some(state) = self.services.get_mut(&fetched.service) else {
            return false;
        };
        let before = state.datum.as_ref().map(|d| d.version());
        match state.datum.as_mut() {
            None => state.datum = Some(Datum::new(fetched.version, fetched.entries)),
            Some(datum) if fetched.version > datum.version() => {
                datum.replace(fetched.version, fetched.entries, now)
            }
            Some(_) => {}
        }
        let datum = state.datum.as_mut().expect("installed above");
        let mut again = std::mem::take(&mut state.refetch);
        let mut held = std::mem::take(&mut state.held);
        held.sort_by_key(|(c, _)| c.version);
        for (change, at) in held {
            if change.version <= datum.version() {
                continue;
            }
            if change.prev != datum.version() {
                again = true;
                break;
            }
            datum.step(change.version, vec![change.op], at);
        }
        state.fetching = again;
        if before != Some(datum.version()) {
            mark_watchers_due(&mut self.conns, &fetched.service, state);
        }
        again
    }

    /// A fetch of `service` failed: forget what was held for it; the caller retries later.
    pub fn fetch_failed(&mut self, service: &ServiceId) {
        if let Some(state) = self.services.get_mut(service) {
            state.fetching = false;
            state.refetch = false;
            state.held.clear();
        }
    }

    /// The frames due on connection `conn` now, up to about [`PULL_BUDGET`] bytes (the rest stays
    /// due and the writer is woken again), paced for a client answering `late` (see [`Pacing`]).
    /// `None` once the connection is detached.
    pub fn take_pushes(&mut self, conn: ConnId, now: Instant, late: Duration) -> Option<Pull> {
        let pacing = self.pacing.for_client_late_by(late);
        let push = self.conns.get_mut(&conn)?;
        let mut pull = Pull::default();
        let mut bytes = 0;
        while let Some(frame) = push.control.pop_front() {
            bytes += frame.len();
            pull.frames.push(Outgoing {
                frame,
                since: None,
                kind: PushKind::GoAway,
            });
        }
        for _ in 0..push.due.len() {
            if bytes >= PULL_BUDGET {
                push.wake.notify_one();
                break;
            }
            let Some(service) = push.due.pop_front() else {
                break;
            };
            let Some(state) = self.services.get_mut(&service) else {
                continue;
            };
            let (Some(datum), Some(conn_watch)) =
                (state.datum.as_mut(), state.watchers.get_mut(&conn))
            else {
                continue;
            };
            let version = datum.version();
            if conn_watch.last == Some(version) {
                conn_watch.due = false;
                continue;
            }
            if let Some(at) = pacing.held_until(conn_watch.paced, now) {
                pull.wake_at = Some(pull.wake_at.map_or(at, |w| w.min(at)));
                push.due.push_back(service);
                continue;
            }
            conn_watch.due = false;
            conn_watch.paced = pacing.pushed(conn_watch.paced, now);
            let framed = if conn_watch.healthy_only {
                datum.healthy_frame(&service, self.protection_threshold, self.max_frame)
            } else {
                datum.frame(&service, conn_watch.last, push.deltas, self.max_frame)
            };
            match framed {
                Ok((frame, kind)) => {
                    bytes += frame.len();
                    let since = datum.since(conn_watch.last);
                    pull.frames.push(Outgoing { frame, since, kind });
                }
                Err(e) => {
                    // Too large for one frame: this version is skipped, not retried forever.
                    warn!(%service, version, error = %e, "cannot push this service");
                }
            }
            conn_watch.last = Some(version);
        }
        Some(pull)
    }

    /// Marks due every subscription behind its service's cached datum: the periodic safety net
    /// (a subscription that came while its connection was being set up, say). Also forgets the
    /// history no subscription needs any more, so a quiet service holds none. Returns how many
    /// connection-service pairs were due.
    pub fn rescan(&mut self) -> usize {
        let mut due = 0;
        for (service, state) in &mut self.services {
            let Some(datum) = &mut state.datum else {
                continue;
            };
            let oldest = state
                .watchers
                .values()
                .filter_map(|w| w.last)
                .filter(|last| *last < datum.version())
                .min();
            datum.forget_before(oldest);
            for (conn, watch) in &mut state.watchers {
                if !watch.due
                    && watch.last != Some(datum.version())
                    && let Some(push) = self.conns.get_mut(conn)
                {
                    push.mark_due(watch, service);
                    due += 1;
                }
            }
        }
        due
    }

    /// Asks up to `n` connections to move to another session server; returns how many were asked.
    pub fn go_away(&mut self, n: usize, reason: &str) -> usize {
        let frame = match frame::encode(
            &Push::GoAway {
                reason: reason.to_owned(),
            },
            self.max_frame,
        ) {
            Ok(frame) => frame,
            Err(_) => return 0,
        };
        let mut conns: Vec<ConnId> = self.conns.keys().copied().collect();
        // The newest connections move first: they have the least history here.
        conns.sort_unstable_by(|a, b| b.cmp(a));
        conns.truncate(n);
        for conn in &conns {
            let push = self.conns.get_mut(conn).expect("listed above");
            push.control.push_back(frame.clone());
            push.wake.notify_one();
        }
        metrics::counter!("roster_session_goaways_total").increment(conns.len() as u64);
        conns.len()
    }

    /// Subscriptions held by connection `conn`.
    pub fn subscriptions_of(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |p| p.subs.len())
    }

    /// Connection-service pairs with a push due, not yet taken by their writers.
    pub fn pending(&self) -> usize {
        self.conns.values().map(|p| p.due.len()).sum()
    }

    /// Each service with its subscriber count and cached version, sorted by service.
    pub fn services(&self) -> Vec<ServiceStatus> {
        let mut out: Vec<_> = self
            .services
            .iter()
            .map(|(service, state)| ServiceStatus {
                service: service.clone(),
                subscribers: state.subscribers(),
                version: state.datum.as_ref().map(|d| d.version()),
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// Counts for status reporting and limits.
    pub fn counts(&self) -> Counts {
        Counts {
            connections: self.conns.len(),
            subscribers: self.subs.len(),
            services: self.services.len(),
        }
    }
}

/// Marks every connection watching `service` as due, where a subscription is behind.
fn mark_watchers_due(
    conns: &mut FxHashMap<ConnId, ConnPush>,
    service: &ServiceId,
    state: &mut ServiceState,
) {
    let Some(version) = state.datum.as_ref().map(|d| d.version()) else {
        return;
    };
    for (conn, watch) in &mut state.watchers {
        if !watch.due
            && watch.last != Some(version)
            && let Some(push) = conns.get_mut(conn)
        {
            push.mark_due(watch, service);
        }
    }
}

#[cfg(test)]
mod tests;
