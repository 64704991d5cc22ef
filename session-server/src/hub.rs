//! The subscriber registry: who subscribes to what, the last datum of each service, and what each
//! subscriber was last pushed.
//!
//! Plain data and functions: the server keeps one `Hub` behind a mutex that is never held across an
//! `.await`. Pushing is a non-blocking send of a pre-encoded frame into the connection's bounded push
//! queue; a datum is encoded once however many subscribers get it.
//!
//! Ordering: a subscriber is pushed a datum only if its version is newer than the last one it was
//! pushed, and the cached datum of a service never goes back to an older version, so every
//! subscriber sees versions strictly increase.
//!
//! Overflow policy: a connection whose push queue is full is cut off: the hub drops its queue and
//! cancels its token, and its writer task — even one stuck on a peer that grants no more flow
//! control — closes the connection with [`crate::CLOSE_SLOW_CONSUMER`]; the client reconnects and
//! resubscribes, getting fresh snapshots, rather than slowing the session down.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use roster_common::proto::{Push, Snapshot};
use roster_common::{RegisterId, Result, ServiceId, Version, frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A client connection's number within this session server.
pub type ConnId = u64;
/// One subscriber: its connection and the register id its client chose.
pub type SubKey = (ConnId, RegisterId);

struct Cached {
    version: Version,
    frame: Bytes,
}

#[derive(Default)]
struct ServiceState {
    /// When the first change not yet pushed was announced: where push latency is measured from.
    changed_at: Option<Instant>,
    /// Each subscriber and the version it was last pushed (`None`: nothing yet).
    subscribers: HashMap<SubKey, Option<Version>>,
    datum: Option<Cached>,
    fetching: bool,
    refetch: bool,
}

/// What [`Hub::subscribe`] changed in the set of wanted services.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Subscribed {
    /// The service had no subscriber here before: interest must be registered.
    pub first: bool,
    /// The register id was subscribed to another service, which now has no subscriber left.
    pub abandoned: Option<ServiceId>,
}

/// One frame in a connection's push queue, with the moment its change reached this server
/// (`None` for frames that carry no change, like `GoAway`).
#[derive(Debug)]
pub struct Outgoing {
    pub frame: Bytes,
    pub since: Option<Instant>,
}

/// Subscribers and cached datums of one session server.
pub struct Hub {
    max_frame: u32,
    /// Push queues of live connections; a connection cut off for falling behind is absent.
    push: HashMap<ConnId, PushQueue>,
    services: HashMap<ServiceId, ServiceState>,
    subs: HashMap<SubKey, ServiceId>,
    /// The register ids each connection subscribes with.
    conn_subs: HashMap<ConnId, Vec<RegisterId>>,
}

impl Hub {
    pub fn new(max_frame: u32) -> Self {
        Hub {
            max_frame,
            push: HashMap::new(),
            services: HashMap::new(),
            subs: HashMap::new(),
            conn_subs: HashMap::new(),
        }
    }

    /// Registers a connection's push queue.
    pub fn attach(&mut self, conn: ConnId, tx: mpsc::Sender<Outgoing>, cut: CancellationToken) {
        self.push.insert(conn, PushQueue { tx, cut });
    }

    /// Forgets a connection and its subscribers; returns services no one here subscribes to now.
    pub fn detach(&mut self, conn: ConnId) -> Vec<ServiceId> {
        self.push.remove(&conn);
        let register_ids = self.conn_subs.remove(&conn).unwrap_or_default();
        let mut abandoned: Vec<ServiceId> = register_ids
            .into_iter()
            .filter_map(|register_id| self.remove_sub(&(conn, register_id)))
            .collect();
        abandoned.sort();
        abandoned.dedup();
        abandoned
    }

    /// Subscribes `(conn, register_id)` to `service`, pushing the cached datum at once if there is one.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        register_id: RegisterId,
        service: ServiceId,
    ) -> Subscribed {
        let key = (conn, register_id);
        let mut outcome = Subscribed::default();
        match self.subs.get(&key) {
            Some(current) if *current == service => return outcome,
            Some(_) => outcome.abandoned = self.remove_sub(&key),
            None => {}
        }
        let state = self.services.entry(service.clone()).or_default();
        outcome.first = state.subscribers.is_empty();
        let mut last = None;
        if let Some(datum) = &state.datum
            && let Some(tx) = self.push.get(&conn)
        {
            if try_push(tx, &datum.frame, None) {
                last = Some(datum.version);
            } else {
                self.push.remove(&conn);
            }
        }
        state.subscribers.insert(key.clone(), last);
        self.conn_subs.entry(conn).or_default().push(key.1.clone());
        self.subs.insert(key, service);
        outcome
    }

    /// Ends a subscription; returns the service if no one here subscribes to it now. `None` also
    /// when the subscription did not exist: see [`Hub::is_subscribed`].
    pub fn unsubscribe(&mut self, conn: ConnId, register_id: &str) -> Option<ServiceId> {
        self.remove_sub(&(conn, register_id.to_owned()))
    }

    pub fn is_subscribed(&self, conn: ConnId, register_id: &str) -> bool {
        self.subs.contains_key(&(conn, register_id.to_owned()))
    }

    fn remove_sub(&mut self, key: &SubKey) -> Option<ServiceId> {
        let service = self.subs.remove(key)?;
        if let Some(ids) = self.conn_subs.get_mut(&key.0) {
            ids.retain(|id| *id != key.1);
        }
        let state = self.services.get_mut(&service)?;
        state.subscribers.remove(key);
        if state.subscribers.is_empty() {
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
            .map(|d| d.version)
    }

    /// Takes a datum from the slot leader: caches it if newer than the cached one, and pushes it to
    /// every subscriber that has not had it. Returns whether it was newer.
    pub fn update(&mut self, snapshot: Snapshot) -> Result<bool> {
        let Some(state) = self.services.get_mut(&snapshot.service) else {
            return Ok(false);
        };
        if state
            .datum
            .as_ref()
            .is_some_and(|d| d.version >= snapshot.version)
        {
            return Ok(false);
        }
        let version = snapshot.version;
        let frame = frame::encode(&Push::Snapshot(snapshot), self.max_frame)?;
        let since = Some(state.changed_at.take().unwrap_or_else(Instant::now));
        for (key, last) in state.subscribers.iter_mut() {
            if last.is_some_and(|l| l >= version) {
                continue;
            }
            if let Some(tx) = self.push.get(&key.0) {
                if try_push(tx, &frame, since) {
                    *last = Some(version);
                } else {
                    self.push.remove(&key.0);
                }
            }
        }
        state.datum = Some(Cached { version, frame });
        Ok(true)
    }

    /// Notes that the leader has `service` at `version`. Returns true if the caller should fetch it
    /// now; while a fetch is under way, further changes only mark it to be repeated.
    pub fn changed(&mut self, service: &ServiceId, version: Version) -> bool {
        let Some(state) = self.services.get_mut(service) else {
            return false;
        };
        if state.datum.as_ref().is_some_and(|d| d.version >= version) {
            return false;
        }
        state.changed_at.get_or_insert_with(Instant::now);
        if state.fetching {
            state.refetch = true;
            return false;
        }
        state.fetching = true;
        true
    }

    /// Ends a fetch of `service`. Returns true if the caller should fetch again at once.
    pub fn fetch_done(&mut self, service: &ServiceId) -> bool {
        let Some(state) = self.services.get_mut(service) else {
            return false;
        };
        if state.refetch {
            state.refetch = false;
            return true;
        }
        state.fetching = false;
        false
    }

    /// Pushes the cached datum to every subscriber that has not had it (a push that failed, or a
    /// subscriber that came while its connection was being cut): the periodic safety net. Returns
    /// how many were pushed.
    pub fn rescan(&mut self) -> usize {
        let mut pushed = 0;
        for state in self.services.values_mut() {
            let Some(datum) = &state.datum else { continue };
            for (key, last) in state.subscribers.iter_mut() {
                if last.is_some_and(|l| l >= datum.version) {
                    continue;
                }
                if let Some(tx) = self.push.get(&key.0)
                    && try_push(tx, &datum.frame, None)
                {
                    *last = Some(datum.version);
                    pushed += 1;
                }
            }
        }
        pushed
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
        let mut conns: Vec<ConnId> = self.push.keys().copied().collect();
        // The newest connections move first: they have the least history here.
        conns.sort_unstable_by(|a, b| b.cmp(a));
        conns.truncate(n);
        let asked = conns
            .iter()
            .filter(|c| try_push(&self.push[c], &frame, None))
            .count();
        metrics::counter!("roster_session_goaways_total").increment(asked as u64);
        asked
    }

    /// Subscriptions held by connection `conn`.
    pub fn subscriptions_of(&self, conn: ConnId) -> usize {
        self.conn_subs.get(&conn).map_or(0, Vec::len)
    }

    /// Frames queued for all connections, not yet written.
    pub fn queued_frames(&self) -> usize {
        self.push
            .values()
            .map(|q| q.tx.max_capacity() - q.tx.capacity())
            .sum()
    }

    /// Each service with its subscriber count and cached version, sorted by service.
    pub fn services(&self) -> Vec<(ServiceId, usize, Option<Version>)> {
        let mut out: Vec<_> = self
            .services
            .iter()
            .map(|(service, state)| {
                (
                    service.clone(),
                    state.subscribers.len(),
                    state.datum.as_ref().map(|d| d.version),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Counts for status reporting: (connections, subscribers, services).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.push.len(), self.subs.len(), self.services.len())
    }
}

/// A connection's push queue, and the token that cuts the connection off when the queue is full.
struct PushQueue {
    tx: mpsc::Sender<Outgoing>,
    cut: CancellationToken,
}

/// Queues `frame`; false when the queue is full (the connection is then cut off) or its writer is
/// gone.
fn try_push(queue: &PushQueue, frame: &Bytes, since: Option<Instant>) -> bool {
    let outgoing = Outgoing {
        frame: frame.clone(),
        since,
    };
    match queue.tx.try_send(outgoing) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            if !queue.cut.is_cancelled() {
                metrics::counter!("roster_session_slow_consumers_total").increment(1);
            }
            queue.cut.cancel();
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use roster_common::frame::{DEFAULT_MAX_FRAME, HEADER_LEN, decode};

    use super::*;

    fn svc(name: &str) -> ServiceId {
        name.parse().unwrap()
    }

    fn snapshot(name: &str, version: Version) -> Snapshot {
        Snapshot {
            service: svc(name),
            version,
            publishers: Vec::new(),
        }
    }

    fn pushed_versions(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<Version> {
        let mut out = Vec::new();
        while let Ok(Outgoing { frame, .. }) = rx.try_recv() {
            let Ok(Push::Snapshot(s)) = decode::<Push>(&frame[HEADER_LEN..]) else {
                panic!("not a snapshot")
            };
            out.push(s.version);
        }
        out
    }

    #[test]
    fn subscribers_get_only_newer_versions() {
        let mut hub = Hub::new(DEFAULT_MAX_FRAME);
        let (tx, mut rx) = mpsc::channel(16);
        hub.attach(1, tx, CancellationToken::new());
        assert!(hub.subscribe(1, "s".into(), svc("a")).first);
        assert!(hub.update(snapshot("a", 5)).unwrap());
        assert!(
            !hub.update(snapshot("a", 4)).unwrap(),
            "older datum ignored"
        );
        assert!(!hub.update(snapshot("a", 5)).unwrap(), "same datum ignored");
        assert!(hub.update(snapshot("a", 9)).unwrap());
        assert_eq!(pushed_versions(&mut rx), vec![5, 9]);
    }

    #[test]
    fn a_late_subscriber_gets_the_cached_datum_at_once() {
        let mut hub = Hub::new(DEFAULT_MAX_FRAME);
        let (tx1, _rx1) = mpsc::channel(16);
        let (tx2, mut rx2) = mpsc::channel(16);
        hub.attach(1, tx1, CancellationToken::new());
        hub.attach(2, tx2, CancellationToken::new());
        hub.subscribe(1, "s".into(), svc("a"));
        hub.update(snapshot("a", 3)).unwrap();
        assert!(!hub.subscribe(2, "s".into(), svc("a")).first);
        assert_eq!(pushed_versions(&mut rx2), vec![3]);
    }

    #[test]
    fn the_last_subscriber_leaving_abandons_the_service() {
        let mut hub = Hub::new(DEFAULT_MAX_FRAME);
        let (tx, _rx) = mpsc::channel(16);
        hub.attach(1, tx, CancellationToken::new());
        hub.subscribe(1, "s1".into(), svc("a"));
        hub.subscribe(1, "s2".into(), svc("a"));
        assert_eq!(hub.unsubscribe(1, "s1"), None);
        assert_eq!(hub.unsubscribe(1, "s2"), Some(svc("a")));
        assert!(!hub.is_wanted(&svc("a")));
        hub.subscribe(1, "s3".into(), svc("b"));
        let moved = hub.subscribe(1, "s3".into(), svc("c"));
        assert_eq!(
            moved,
            Subscribed {
                first: true,
                abandoned: Some(svc("b"))
            }
        );
        assert_eq!(hub.detach(1), vec![svc("c")]);
        assert_eq!(hub.counts(), (0, 0, 0));
    }

    #[test]
    fn fetches_are_coalesced() {
        let mut hub = Hub::new(DEFAULT_MAX_FRAME);
        let (tx, _rx) = mpsc::channel(16);
        hub.attach(1, tx, CancellationToken::new());
        hub.subscribe(1, "s".into(), svc("a"));
        assert!(hub.changed(&svc("a"), 1));
        assert!(!hub.changed(&svc("a"), 2), "one fetch at a time");
        assert!(!hub.changed(&svc("a"), 3));
        assert!(
            hub.fetch_done(&svc("a")),
            "changes during the fetch ask for one more"
        );
        hub.update(snapshot("a", 3)).unwrap();
        assert!(!hub.fetch_done(&svc("a")));
        assert!(!hub.changed(&svc("a"), 3), "already have it");
        assert!(!hub.changed(&svc("b"), 1), "no subscriber, no fetch");
    }

    #[test]
    fn a_full_push_queue_cuts_the_connection_off() {
        let mut hub = Hub::new(DEFAULT_MAX_FRAME);
        let (tx, mut rx) = mpsc::channel(1);
        hub.attach(1, tx, CancellationToken::new());
        hub.subscribe(1, "s".into(), svc("a"));
        hub.update(snapshot("a", 1)).unwrap();
        hub.update(snapshot("a", 2)).unwrap();
        assert_eq!(pushed_versions(&mut rx), vec![1]);
        assert!(
            rx.is_closed(),
            "the sender was dropped, so the writer closes the connection"
        );
    }
}
