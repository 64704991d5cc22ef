//! What every task of a data server shares ([`Shared`]), and the leader-side path of a change:
//! apply under the store lock, notify interested sessions, hand the ops to the replicators.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use roster_common::member::ViewRx;
use roster_common::peers::PeerPool;
use roster_common::proto::{
    ClusterView, DataResponse, Publisher, ReplicatedOp, Role, Snapshot, WriteOp, reply,
};
use roster_common::{Error, InstanceId, NodeId, Result, ServiceId, SlotId};
use tokio::sync::watch;
use tracing::{debug, info, trace, warn};

use crate::DataConfig;
use crate::interest::Interests;
use crate::owners::OwnerSweep;
use crate::store::{Applied, Change, Store};

use crate::replication::{Replicator, spawn_replicator};

/// How often slots being taken over are checked for readiness, and missing copies fetched.
pub(crate) const STEP: Duration = Duration::from_millis(50);
/// Repairs, by kind: `slot_fetch` (a followed slot fetched whole: a new copy, a gap in
/// replication, drift), `drift` (a followed slot found to differ from its leader's at the same
/// version), `lag` (one still behind what its leader had at the previous check),
/// `session_sync` (a session's records in a slot differed from this leader's).
pub(crate) const METRIC_REPAIRS: &str = "roster_data_repairs_total";

pub(crate) struct Shared {
    pub(crate) config: DataConfig,
    pub(crate) instance: InstanceId,
    pub(crate) store: Mutex<Store>,
    pub(crate) interests: Mutex<Interests>,
    pub(crate) view: ViewRx,
    pub(crate) ready_tx: watch::Sender<bool>,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) replicators: Mutex<HashMap<NodeId, Replicator>>,
    /// Repairs made since start, by kind (also counted in `roster_data_repairs_total`).
    pub(crate) repairs: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// When the meta tier admitted this server, as the last view applied said (`None`: not a
    /// member). A change means the membership lapsed in between (see [`Shared::apply_view`]).
    pub(crate) admitted: Mutex<Option<u64>>,
}

impl Shared {
    /// The current view, if one arrived.
    pub(crate) fn view(&self) -> Option<Arc<ClusterView>> {
        self.view.borrow().clone()
    }

    /// Fills in the leader's address on a `NotLeader` error.
    pub(crate) fn with_leader_hint(&self, err: Error, service: &ServiceId) -> Error {
        match err {
            Error::NotLeader { leader: None } => Error::NotLeader {
                leader: self.view().and_then(|view| {
                    let id = view.table.leader_of(service)?;
                    view.data_addr(id).map(str::to_owned)
                }),
            },
            other => other,
        }
    }

    pub(crate) fn notify<'a>(&self, changes: impl IntoIterator<Item = &'a Change>) {
        let mut changes = changes.into_iter().peekable();
        if changes.peek().is_none() {
            return;
        }
        let mut interests = self.interests.lock();
        for change in changes {
            let detached = interests.notify(change);
            if detached > 0 {
                warn!(service = %change.service, detached, "sessions fell behind on notifications and were detached; they will resync");
            }
        }
    }

    /// Runs a leader-side change: applies it under the store lock, queues its ops for the
    /// followers (in the order applied), then notifies interested sessions — except of changes in
    /// slots still being taken over, which sessions read whole once the slot opens.
    pub(crate) fn lead(
        &self,
        change: impl FnOnce(&mut Store) -> Result<Applied>,
    ) -> Result<Applied> {
        let (applied, hidden) = {
            let mut store = self.store.lock();
            let applied = change(&mut store)?;
            self.queue_replication(&applied.ops);
            // Nothing to look up per change while no slot is being taken over (the usual case).
            let hidden: Option<Vec<bool>> = (store.moving() > 0).then(|| {
                applied
                    .changes
                    .iter()
                    .map(|c| store.is_moving(&c.service))
                    .collect()
            });
            (applied, hidden)
        };
        trace_applied(&applied.ops);
        match hidden {
            None => self.notify(&applied.changes),
            Some(hidden) => self.notify(
                applied
                    .changes
                    .iter()
                    .zip(hidden)
                    .filter_map(|(change, hidden)| (!hidden).then_some(change)),
            ),
        }
        Ok(applied)
    }

    /// Queues `ops` to the followers of their slots. Never waits: a full queue drops the op, and the
    /// follower repairs the gap by fetching the slot.
    pub(crate) fn queue_replication(&self, ops: &[ReplicatedOp]) {
        if ops.is_empty() {
            return;
        }
        let Some(view) = self.view() else { return };
        let mut replicators = self.replicators.lock();
        for op in ops {
            let followers = view
                .table
                .slots
                .get(op.slot as usize)
                .map(|r| &r[1.min(r.len())..])
                .unwrap_or(&[]);
            for follower in followers {
                let Some(addr) = view.data_addr(*follower) else {
                    continue;
                };
                let replicator = replicators.entry(*follower).or_insert_with(|| {
                    spawn_replicator(
                        self.pool.clone(),
                        self.config.clone(),
                        *follower,
                        addr.to_owned(),
                    )
                });
                if replicator.tx.try_send(op.clone()).is_err() {
                    debug!(
                        follower,
                        slot = op.slot,
                        "replication queue full; the follower will fetch the slot"
                    );
                }
            }
        }
    }

    /// A single change: the batch path with a batch of one.
    pub(crate) fn handle_write(&self, op: WriteOp) -> Result<DataResponse> {
        match self.handle_write_batch(vec![op])? {
            DataResponse::WrittenBatch { mut results } => match results.pop() {
                Some(Ok(version)) => Ok(DataResponse::Written { version }),
                Some(Err(wire)) => Err(Error::from_wire(wire)),
                None => Err(Error::Internal("a batch of one gave no result".into())),
            },
            other => Err(Error::Internal(format!(
                "expected WrittenBatch, got {other:?}"
            ))),
        }
    }

    /// Applies a batch of session changes under one store lock; each op succeeds or fails on
    /// its own.
    pub(crate) fn handle_write_batch(&self, ops: Vec<WriteOp>) -> Result<DataResponse> {
        if ops.iter().any(|op| match op {
            WriteOp::Put { publisher } => {
                publisher.register_id.is_empty() || publisher.client_id.is_empty()
            }
            WriteOp::Remove { .. } => false,
        }) {
            return Err(Error::InvalidArgument(
                "every publisher needs a client id and a register id".into(),
            ));
        }
        let services: Vec<ServiceId> = ops.iter().map(|op| op.service().clone()).collect();
        let mut results = Vec::new();
        self.lead(|store| {
            let (each, applied) = store.write_batch(ops);
            results = each;
            Ok(applied)
        })?;
        let written = results.iter().filter(|r| r.is_ok()).count();
        metrics::counter!("roster_data_writes_total").increment(written as u64);
        let results = results
            .into_iter()
            .zip(&services)
            .map(|(result, service)| reply(result.map_err(|e| self.with_leader_hint(e, service))))
            .collect();
        Ok(DataResponse::WrittenBatch { results })
    }

    pub(crate) fn snapshots(&self, services: &[ServiceId]) -> Result<Vec<Snapshot>> {
        let store = self.store.lock();
        services
            .iter()
            .map(|s| store.snapshot(s).map_err(|e| (e, s)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|(e, s)| self.with_leader_hint(e, s))
    }

    pub(crate) fn handle_interest(
        &self,
        instance: InstanceId,
        services: Vec<ServiceId>,
        on: bool,
    ) -> Result<DataResponse> {
        // Register before reading, so a change landing in between is either in the datum read or
        // notified afterwards: never lost.
        if !self.interests.lock().set(instance, &services, on) {
            return Err(Error::NotFound(format!(
                "no watch stream for session instance {instance:x}; open a Watch first"
            )));
        }
        if !on {
            return Ok(DataResponse::Done {});
        }
        let versions = {
            let store = self.store.lock();
            services
                .iter()
                .map(|s| {
                    store
                        .ready_version(s)
                        .map(|v| (s.clone(), v))
                        .map_err(|e| (e, s))
                })
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        match versions {
            Ok(versions) => Ok(DataResponse::Versions { versions }),
            Err((e, service)) => {
                self.interests.lock().set(instance, &services, false);
                Err(self.with_leader_hint(e, service))
            }
        }
    }

    pub(crate) fn handle_session_sync(
        &self,
        instance: InstanceId,
        slot: SlotId,
        publishers: Vec<Publisher>,
    ) -> Result<DataResponse> {
        let live = self.live_sessions(self.view().as_deref());
        let applied = self.lead(|store| store.session_sync(instance, slot, publishers, &live))?;
        if !applied.ops.is_empty() {
            self.repaired("session_sync");
            info!(
                slot,
                session_instance = format_args!("{instance:x}"),
                changes = applied.ops.len(),
                "synced a session's publishers"
            );
        }
        Ok(DataResponse::Done {})
    }

    pub(crate) fn handle_replicate(&self, ops: Vec<ReplicatedOp>) -> DataResponse {
        let (_, resync) = self.store.lock().replicate(ops);
        if !resync.is_empty() {
            debug!(slots = ?resync, "replication gap; fetching those slots whole");
        }
        DataResponse::Replicated { resync }
    }

    pub(crate) fn handle_slot_digests(&self, slots: &[SlotId]) -> DataResponse {
        let store = self.store.lock();
        DataResponse::Digests {
            digests: slots.iter().filter_map(|s| store.slot_digest(*s)).collect(),
        }
    }

    /// Adopts the latest committed view: its table, and the departure of followers.
    ///
    /// A view that no longer lists this server, or lists it admitted anew, means its lease lapsed
    /// (it was paused, or cut off from the meta tier, for longer than the lease) and its slots went
    /// to others: every slot it held becomes a copy out of step before the table is adopted, so
    /// that it takes over (new term, sessions heard) or fetches them like a new member, instead of
    /// leading on from copies that stopped in the past.
    pub(crate) fn apply_view(&self, view: &ClusterView) {
        let me = view
            .member(Role::Data, self.config.id)
            .filter(|m| m.instance == self.instance);
        let member = me.is_some();
        let admitted = me.map(|m| m.joined_at_ms);
        let (lapsed, change) = {
            let mut store = self.store.lock();
            // Judged on newer tables only (a lapse always commits one): a meta node that serves
            // a view behind the one applied cannot make this server drop its slots.
            let before = if view.table.epoch > store.epoch() {
                std::mem::replace(&mut *self.admitted.lock(), admitted)
            } else {
                admitted
            };
            let lapsed = (before.is_some() && before != admitted).then(|| store.lapse());
            let change = member.then(|| store.apply_table(&view.table, Instant::now()));
            (lapsed, change)
        };
        if let Some(held) = lapsed {
            self.replicators.lock().clear();
            if held > 0 {
                warn!(
                    slots = held,
                    "this data server's membership lapsed; its copies are out of step until taken over or fetched again"
                );
            }
        }
        if let Some(change) = change {
            if !change.took.is_empty() || !change.to_fetch.is_empty() || !change.dropped.is_empty()
            {
                info!(
                    epoch = view.table.epoch,
                    took = change.took.len(),
                    to_fetch = change.to_fetch.len(),
                    dropped = change.dropped.len(),
                    "new slot table"
                );
            }
            // Forget the queues of data servers that left or moved.
            self.replicators
                .lock()
                .retain(|id, r| view.data_addr(*id) == Some(r.addr.as_str()));
        }
        self.update_readiness(Some(view));
    }

    pub(crate) fn repaired(&self, kind: &'static str) {
        metrics::counter!(METRIC_REPAIRS, "kind" => kind).increment(1);
        *self.repairs.lock().entry(kind).or_default() += 1;
    }

    pub(crate) fn update_readiness(&self, view: Option<&ClusterView>) {
        let member = view
            .and_then(|v| v.member(Role::Data, self.config.id))
            .is_some_and(|m| m.instance == self.instance);
        let ready = member && self.store.lock().moving() == 0;
        self.ready_tx
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    pub(crate) fn sweep_owners(&self, sweep: &mut OwnerSweep, view: &ClusterView) {
        let live = self.live_sessions(Some(view));
        let expired = {
            let store = self.store.lock();
            sweep.sweep(&live, store.owners(), Instant::now())
        };
        for instance in expired {
            if let Ok(applied) = self.lead(|store| Ok(store.drop_owner(instance))) {
                info!(
                    session_instance = format_args!("{instance:x}"),
                    removed = applied.ops.len(),
                    "dropped the publishers of a departed session"
                );
            }
        }
    }

    /// The session instances whose publishers this server keeps, and whose claims on a record
    /// count against an older one: the session members of `view`, and every session with a watch
    /// stream attached here that `view` does not list under another instance. A session server
    /// whose lease lapsed (it was paused, or cut off from the meta tier) still serves its clients
    /// until the meta tier admits it again — which waits while the meta group has no leader — and
    /// the clients that moved to it register through it: dropping its publishers meanwhile would
    /// show subscribers live instances gone. One `view` lists another instance for was restarted:
    /// its old incarnation is gone, attached or not.
    pub(crate) fn live_sessions(&self, view: Option<&ClusterView>) -> HashSet<InstanceId> {
        let listed: HashMap<NodeId, InstanceId> = view
            .into_iter()
            .flat_map(|v| v.members_of(Role::Session))
            .map(|m| (m.id, m.instance))
            .collect();
        let attached: Vec<InstanceId> = self
            .interests
            .lock()
            .attached()
            .filter(|(id, _)| !listed.contains_key(id))
            .map(|(_, instance)| instance)
            .collect();
        listed.into_values().chain(attached).collect()
    }

    /// Opens slots whose takeover completed: every session member of `view` heard from (a session
    /// outside the view is not waited for), or the takeover timeout passed.
    pub(crate) fn open_ready_slots(&self, view: &ClusterView) {
        let live = member_sessions(view);
        let opened =
            self.store
                .lock()
                .open_ready(&live, Instant::now(), self.config.takeover_timeout);
        if !opened.is_empty() {
            info!(slots = opened.len(), "slots taken over and open");
        }
        self.update_readiness(Some(view));
    }
}

/// Logs each change this server made as leader, at `trace` (off unless asked for: one line per
/// change): what to read when a subscriber saw a publisher come and go.
fn trace_applied(ops: &[ReplicatedOp]) {
    if !tracing::enabled!(tracing::Level::TRACE) {
        return;
    }
    for op in ops {
        match &op.op {
            WriteOp::Put { publisher: p } => trace!(
                slot = op.slot,
                version = op.version,
                service = %p.service,
                client = %p.client_id,
                register = %p.register_id,
                session_instance = format_args!("{:x}", p.session_instance),
                registered_ms = p.registered_ms,
                "put"
            ),
            WriteOp::Remove {
                service,
                client_id,
                register_id,
                session_instance,
                ..
            } => trace!(
                slot = op.slot,
                version = op.version,
                service = %service,
                client = %client_id,
                register = %register_id,
                session_instance = format_args!("{session_instance:x}"),
                "remove"
            ),
        }
    }
}

/// The instances of the session servers that are members of the cluster in `view`.
fn member_sessions(view: &ClusterView) -> HashSet<InstanceId> {
    view.members_of(Role::Session).map(|m| m.instance).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use roster_common::proto::{DataEvent, Member, Role, WriteOp};

    use super::OwnerSweep;

    use crate::store::tests::{publisher, table};
    use crate::testing::{identity, node, view};

    #[tokio::test]
    async fn changes_of_a_slot_being_taken_over_are_told_to_no_session() {
        let node = node(&identity(), Vec::new(), view(BTreeMap::new()));
        let shared = node.shared;
        let (_, mut events) = shared.interests.lock().attach(9, 9);
        let service = publisher("c", "r", "a", 9).service;
        assert!(
            shared
                .interests
                .lock()
                .set(9, std::slice::from_ref(&service), true)
        );

        // Led again after following: the slot is moving until the sessions are heard.
        let now = std::time::Instant::now();
        shared.store.lock().apply_table(&table(2, &[2, 1]), now);
        shared.store.lock().apply_table(&table(3, &[1]), now);
        let put = |data: &str| WriteOp::Put {
            publisher: publisher("c", "r", data, 9),
        };
        let applied = shared.lead(|store| store.write(put("b"))).unwrap();
        assert_eq!(applied.changes.len(), 1, "the write is taken");
        assert!(events.try_recv().is_err(), "but told to nobody");

        shared
            .store
            .lock()
            .open_ready(&Default::default(), now, std::time::Duration::ZERO);
        shared.lead(|store| store.write(put("c"))).unwrap();
        match events.try_recv() {
            Ok(DataEvent::Changed { service: told, .. }) => assert_eq!(told, service),
            other => panic!("expected the change once the slot is open, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_server_admitted_anew_takes_its_slots_over_again() {
        let mut view = view(BTreeMap::new());
        view.members.push(Member {
            role: Role::Data,
            id: 1,
            instance: 1,
            addr: "127.0.0.1:1".into(),
            zone: String::new(),
            joined_at_ms: 100,
            version: String::new(),
        });
        let node = node(&identity(), Vec::new(), view.clone());
        let shared = node.shared;
        shared.apply_view(&view);
        let record = publisher("c", "r", "a", 9);
        let service = record.service.clone();
        shared
            .lead(|store| store.write(WriteOp::Put { publisher: record }))
            .unwrap();

        let held = || {
            shared
                .store
                .lock()
                .snapshot(&service)
                .map(|s| s.publishers.len())
        };

        // Later tables under the same admission keep the slots as they are.
        view.table.epoch = 2;
        shared.apply_view(&view);
        assert!(!shared.store.lock().is_moving(&service));
        assert_eq!(held().unwrap(), 1);

        // Admitted anew (the lease lapsed in between), leading the same slots: taken over again
        // (new term, sessions heard), not led on from the copy held before the lapse.
        view.members[0].joined_at_ms = 200;
        view.table.epoch = 3;
        shared.apply_view(&view);
        assert!(shared.store.lock().is_moving(&service), "taken over anew");
        shared.store.lock().open_ready(
            &Default::default(),
            std::time::Instant::now(),
            std::time::Duration::ZERO,
        );
        // From the copy it had, with versions of the new term.
        assert_eq!(held().unwrap(), 1);
        let applied = shared
            .lead(|store| {
                store.write(WriteOp::Put {
                    publisher: publisher("c", "r", "b", 9),
                })
            })
            .unwrap();
        assert_eq!(applied.changes[0].version >> 32, 3);

        // Not listed any more: it leads nothing.
        view.members.clear();
        view.table.epoch = 4;
        shared.apply_view(&view);
        assert!(matches!(
            held(),
            Err(roster_common::Error::NotLeader { .. })
        ));
    }

    #[tokio::test]
    async fn a_session_outside_the_view_keeps_its_publishers_while_its_watch_is_attached() {
        let member = |role, id, instance| Member {
            role,
            id,
            instance,
            addr: "127.0.0.1:1".into(),
            zone: String::new(),
            joined_at_ms: 100,
            version: String::new(),
        };
        let mut view = view(BTreeMap::new());
        view.members.push(member(Role::Data, 1, 1));
        let node = node(&identity(), Vec::new(), view.clone());
        let shared = node.shared;
        shared.apply_view(&view);
        let put = |client: &str, instance| {
            shared
                .lead(|store| {
                    store.write(WriteOp::Put {
                        publisher: publisher(client, "r", "a", instance),
                    })
                })
                .unwrap();
        };
        let owners = || shared.store.lock().owners().collect::<BTreeSet<_>>();
        // No grace: what the sweep does not keep, it drops at once.
        let mut sweep = OwnerSweep::new(Duration::ZERO);

        // Session 2 (instance 9) holds a publisher; its lease lapsed, so the view lists no session,
        // but it is alive and watching here.
        put("c", 9);
        let (stream, _events) = shared.interests.lock().attach(2, 9);
        shared.sweep_owners(&mut sweep, &view);
        assert_eq!(owners(), [9].into(), "attached: kept");
        shared.interests.lock().detach(9, stream);
        shared.sweep_owners(&mut sweep, &view);
        assert!(
            owners().is_empty(),
            "gone from the view and detached: dropped"
        );

        // Session 3 restarted: the view lists its new instance, and the old one's stream (not yet
        // timed out) does not keep the old incarnation's publishers.
        put("d", 11);
        let _old = shared.interests.lock().attach(3, 11);
        view.members.push(member(Role::Session, 3, 12));
        shared.sweep_owners(&mut sweep, &view);
        assert!(owners().is_empty(), "replaced: dropped");
    }
}
