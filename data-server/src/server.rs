//! The data server's network shell: joins the cluster, follows the slot table, serves sessions,
//! replicates to followers and keeps its own copies in step with the leaders.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use quinn::{RecvStream, SendStream};
use roster_common::admin::{Admin, AdminSource};
use roster_common::member::{self, MemberConfig, ViewRx};
use roster_common::peers::PeerPool;
use roster_common::proto::{
    ClusterView, DataEvent, DataRequest, DataResponse, Member, Publisher, ReplicatedOp, Role,
    Snapshot, WriteOp, reply,
};
use roster_common::tls::NodeIdentity;
use roster_common::{
    Error, InstanceId, NodeId, Result, ServiceId, SlotId, frame, ids, quic, rpc, serve,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::DataConfig;
use crate::interest::Interests;
use crate::owners::OwnerSweep;
use crate::store::{Applied, Change, SlotState, Store};

/// How often publishers of departed sessions are looked for.
const SWEEP_PERIOD: Duration = Duration::from_millis(250);
/// How often slots being taken over are checked for readiness, and missing copies fetched.
const STEP: Duration = Duration::from_millis(50);
/// Changes queued per follower. When full, changes are dropped: the follower sees the gap and
/// fetches the slot whole.
pub const REPLICATION_QUEUE: usize = 65_536;
/// Changes sent to a follower in one message at most.
const REPLICATION_BATCH: usize = 1_024;
/// Slots fetched at once.
const FETCH_CONCURRENCY: usize = 8;
/// Notifications written to a session's watch stream in one write, at most (a little more when
/// one event is larger).
const EVENT_BATCH_BYTES: usize = 64 << 10;

/// A data server, built from its config and run until a shutdown signal.
pub struct DataServer {
    config: DataConfig,
    identity: NodeIdentity,
    instance: InstanceId,
    ready_tx: watch::Sender<bool>,
    admin: Admin,
}

/// Repairs, by kind: `slot_fetch` (a followed slot fetched whole: a new copy, a gap in
/// replication, drift), `drift` (a followed slot found to differ from its leader's at the same
/// version), `session_sync` (a session's records in a slot differed from this leader's).
const METRIC_REPAIRS: &str = "roster_data_repairs_total";

struct Shared {
    config: DataConfig,
    instance: InstanceId,
    store: Mutex<Store>,
    interests: Mutex<Interests>,
    view: ViewRx,
    ready_tx: watch::Sender<bool>,
    pool: Arc<PeerPool>,
    replicators: Mutex<HashMap<NodeId, Replicator>>,
    /// Repairs made since start, by kind (also counted in `roster_data_repairs_total`).
    repairs: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

/// The queue of changes for one follower, drained by its own task.
struct Replicator {
    addr: String,
    tx: mpsc::Sender<ReplicatedOp>,
}

impl DataServer {
    pub fn new(config: DataConfig, identity: NodeIdentity) -> Result<Self> {
        config.validate()?;
        Ok(DataServer {
            config,
            identity,
            instance: ids::new_instance_id(),
            ready_tx: watch::channel(false).0,
            admin: Admin::default(),
        })
    }

    /// Where the HTTP admin port finds this server's status and gauges once it runs.
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// True once the server is a member of the cluster and every slot it leads is open.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Serves sessions on `socket` until `shutdown` fires.
    pub async fn run(self, socket: UdpSocket, shutdown: CancellationToken) -> Result<()> {
        let advertise = quic::advertised_addr(self.config.advertise.as_deref(), &socket)?;
        let (endpoint, peer_config) =
            quic::peer_endpoint(socket, &self.identity, &self.config.transport)?;
        let pool = Arc::new(PeerPool::new(
            endpoint.clone(),
            peer_config,
            self.config.request_timeout,
        ));
        let member = Member {
            role: Role::Data,
            id: self.config.id,
            instance: self.instance,
            addr: advertise.clone(),
            zone: self.config.zone.clone(),
            joined_at_ms: 0,
        };
        let agent_shutdown = CancellationToken::new();
        let (view, agent) = member::spawn(
            MemberConfig {
                metas: self.config.metas.clone(),
                member,
                max_frame: self.config.max_frame,
                request_timeout: self.config.request_timeout,
                load: None,
            },
            pool.clone(),
            agent_shutdown.clone(),
        );
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            instance: self.instance,
            store: Mutex::new(Store::new(self.config.id)),
            interests: Mutex::new(Interests::default()),
            view,
            ready_tx: self.ready_tx,
            pool: pool.clone(),
            replicators: Mutex::new(HashMap::new()),
            repairs: Mutex::new(std::collections::BTreeMap::new()),
        });
        self.admin.install(Arc::new(DataAdmin {
            shared: shared.clone(),
            advertise: advertise.clone(),
        }));
        info!(id = self.config.id, addr = %advertise, instance = format_args!("{:x}", self.instance), "data server serving");

        let tracker = TaskTracker::new();
        tracker.spawn(follow_cluster(shared.clone(), shutdown.clone()));
        tracker.spawn(keep_copies(shared.clone(), shutdown.clone()));
        let stream_shutdown = shutdown.clone();
        let stream_shared = shared.clone();
        serve::serve_requests(&endpoint, &shutdown, &tracker, move |send, recv| {
            handle_stream(stream_shared.clone(), send, recv, stream_shutdown.clone())
        })
        .await;
        // Leave the cluster before the endpoint closes, so the meta tier hears it at once.
        agent_shutdown.cancel();
        let _ = agent.await;
        shared.replicators.lock().clear();
        serve::drain(&endpoint, &tracker, Some(&pool), Duration::from_secs(2)).await;
        info!(id = self.config.id, "data server stopped");
        Ok(())
    }
}

impl Shared {
    /// The current view, if one arrived.
    fn view(&self) -> Option<Arc<ClusterView>> {
        self.view.borrow().clone()
    }

    /// Fills in the leader's address on a `NotLeader` error.
    fn with_leader_hint(&self, err: Error, service: &ServiceId) -> Error {
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

    fn notify(&self, changes: &[Change]) {
        if changes.is_empty() {
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
    /// followers (in the order applied), then notifies interested sessions.
    fn lead(&self, change: impl FnOnce(&mut Store) -> Result<Applied>) -> Result<Applied> {
        let applied = {
            let mut store = self.store.lock();
            let applied = change(&mut store)?;
            self.queue_replication(&applied.ops);
            applied
        };
        self.notify(&applied.changes);
        Ok(applied)
    }

    /// Queues `ops` to the followers of their slots. Never waits: a full queue drops the op, and the
    /// follower repairs the gap by fetching the slot.
    fn queue_replication(&self, ops: &[ReplicatedOp]) {
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
    fn handle_write(&self, op: WriteOp) -> Result<DataResponse> {
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
    fn handle_write_batch(&self, ops: Vec<WriteOp>) -> Result<DataResponse> {
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

    fn snapshots(&self, services: &[ServiceId]) -> Result<Vec<Snapshot>> {
        let store = self.store.lock();
        services
            .iter()
            .map(|s| store.snapshot(s).map_err(|e| (e, s)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|(e, s)| self.with_leader_hint(e, s))
    }

    fn handle_interest(
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

    fn handle_session_sync(
        &self,
        instance: InstanceId,
        slot: SlotId,
        publishers: Vec<Publisher>,
    ) -> Result<DataResponse> {
        let applied = self.lead(|store| store.session_sync(instance, slot, publishers))?;
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

    fn handle_replicate(&self, ops: Vec<ReplicatedOp>) -> DataResponse {
        let (_, resync) = self.store.lock().replicate(ops);
        if !resync.is_empty() {
            debug!(slots = ?resync, "replication gap; fetching those slots whole");
        }
        DataResponse::Replicated { resync }
    }

    fn handle_slot_digests(&self, slots: &[SlotId]) -> DataResponse {
        let store = self.store.lock();
        DataResponse::Digests {
            digests: slots.iter().filter_map(|s| store.slot_digest(*s)).collect(),
        }
    }

    /// Adopts the latest committed view: its table, and the departure of followers.
    fn apply_view(&self, view: &ClusterView) {
        let me = view.member(Role::Data, self.config.id);
        let member = me.is_some_and(|m| m.instance == self.instance);
        if member {
            let change = self.store.lock().apply_table(&view.table, Instant::now());
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

    fn repaired(&self, kind: &'static str) {
        metrics::counter!(METRIC_REPAIRS, "kind" => kind).increment(1);
        *self.repairs.lock().entry(kind).or_default() += 1;
    }

    fn update_readiness(&self, view: Option<&ClusterView>) {
        let member = view
            .and_then(|v| v.member(Role::Data, self.config.id))
            .is_some_and(|m| m.instance == self.instance);
        let ready = member && self.store.lock().moving() == 0;
        self.ready_tx
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    fn sweep_owners(&self, sweep: &mut OwnerSweep, view: &ClusterView) {
        let live: HashSet<InstanceId> =
            view.members_of(Role::Session).map(|m| m.instance).collect();
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

    /// Opens slots whose takeover completed.
    fn open_ready_slots(&self, view: &ClusterView) {
        let live: HashSet<InstanceId> =
            view.members_of(Role::Session).map(|m| m.instance).collect();
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

/// Starts the task that sends queued changes to follower `id` at `addr`.
fn spawn_replicator(
    pool: Arc<PeerPool>,
    config: DataConfig,
    id: NodeId,
    addr: String,
) -> Replicator {
    let (tx, mut rx) = mpsc::channel::<ReplicatedOp>(REPLICATION_QUEUE);
    let target = addr.clone();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut ops = vec![first];
            while ops.len() < REPLICATION_BATCH
                && let Ok(op) = rx.try_recv()
            {
                ops.push(op);
            }
            let sent = async {
                pool.call::<_, DataResponse>(
                    &target,
                    &DataRequest::Replicate { ops },
                    config.max_frame,
                    config.request_timeout,
                )
                .await
            };
            if let Err(e) = sent.await {
                // The follower notices the gap with the next change it gets, and fetches the slot.
                debug!(follower = id, error = %e, "replication failed");
            }
        }
    });
    Replicator { addr, tx }
}

/// Applies every new view, opens slots whose takeover completed, and sweeps departed sessions'
/// publishers.
async fn follow_cluster(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut views = shared.view.clone();
    let mut sweep = OwnerSweep::new(shared.config.session_grace);
    let mut step = tokio::time::interval(STEP);
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
                let view = views.borrow_and_update().clone();
                if let Some(view) = view {
                    shared.apply_view(&view);
                }
            }
            _ = step.tick() => {
                let Some(view) = shared.view() else { continue };
                shared.open_ready_slots(&view);
                if last_sweep.elapsed() >= SWEEP_PERIOD {
                    last_sweep = Instant::now();
                    shared.sweep_owners(&mut sweep, &view);
                }
            }
        }
    }
}

/// Keeps this server's copies of the slots it follows: fetches slots it has no copy of (new, or a
/// gap in replication), and periodically compares digests with the leaders to catch drift.
async fn keep_copies(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut step = tokio::time::interval(STEP * 2);
    step.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = Instant::now();
    let mut fetching: HashSet<SlotId> = HashSet::new();
    let mut fetches: JoinSet<(SlotId, Result<()>)> = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(done) = fetches.join_next() => {
                if let Ok((slot, result)) = done {
                    fetching.remove(&slot);
                    if let Err(e) = result {
                        debug!(slot, error = %e, "could not fetch a slot yet");
                    }
                }
                continue;
            }
            _ = step.tick() => {}
        }
        let Some(view) = shared.view() else { continue };
        let wanted = shared.store.lock().out_of_sync();
        for slot in wanted {
            if fetching.len() >= FETCH_CONCURRENCY || fetching.contains(&slot) {
                continue;
            }
            let Some(addr) = view
                .table
                .leader(slot)
                .and_then(|l| view.data_addr(l))
                .map(str::to_owned)
            else {
                continue;
            };
            fetching.insert(slot);
            let shared = shared.clone();
            fetches.spawn(async move { (slot, fetch_slot(&shared, slot, &addr).await) });
        }
        if last_check.elapsed() >= shared.config.repair_interval {
            last_check = Instant::now();
            check_drift(&shared, &view).await;
        }
    }
}

async fn fetch_slot(shared: &Shared, slot: SlotId, addr: &str) -> Result<()> {
    let answer = shared
        .pool
        .call(
            addr,
            &DataRequest::SlotDump { slot },
            shared.config.max_frame,
            shared.config.request_timeout,
        )
        .await?;
    let DataResponse::Slot(dump) = answer else {
        return Err(Error::UnexpectedMessage(format!(
            "expected a slot, got {answer:?}"
        )));
    };
    let publishers = dump.publishers.len();
    if shared.store.lock().install_dump(dump) {
        shared.repaired("slot_fetch");
        debug!(slot, publishers, "fetched a followed slot");
    }
    Ok(())
}

/// Compares the digests of followed slots with their leaders; a slot that differs at the same
/// version has drifted, and one still behind what its leader had at the previous check has lost a
/// replication batch: either is fetched again (see `Store::compare_with_leader`).
async fn check_drift(shared: &Shared, view: &ClusterView) {
    let slots = shared.store.lock().followed_in_sync();
    let mut by_leader: HashMap<NodeId, Vec<SlotId>> = HashMap::new();
    for slot in slots {
        if let Some(leader) = view.table.leader(slot) {
            by_leader.entry(leader).or_default().push(slot);
        }
    }
    for (leader, slots) in by_leader {
        let Some(addr) = view.data_addr(leader) else {
            continue;
        };
        let request = DataRequest::SlotDigests { slots };
        let answer = shared.pool.call::<_, DataResponse>(
            addr,
            &request,
            shared.config.max_frame,
            shared.config.request_timeout,
        );
        let Ok(DataResponse::Digests { digests }) = answer.await else {
            continue;
        };
        let mut store = shared.store.lock();
        for theirs in digests {
            let Some(why) = store.compare_with_leader(&theirs) else {
                continue;
            };
            warn!(
                slot = theirs.slot,
                leader, why, "a followed slot is not what its leader holds; fetching it again"
            );
            shared.repaired(why);
            store.mark_out_of_sync(theirs.slot);
        }
    }
}

async fn handle_stream(
    shared: Arc<Shared>,
    mut send: SendStream,
    mut recv: RecvStream,
    shutdown: CancellationToken,
) {
    let max_frame = shared.config.max_frame;
    let request = match rpc::read_request::<DataRequest>(&mut recv, max_frame).await {
        Ok(request) => request,
        Err(e) => {
            debug!(error = %e, "bad request");
            let _ = rpc::send_reply::<DataResponse>(&mut send, Err(e), max_frame).await;
            return;
        }
    };
    let name = request_name(&request);
    let result = match request {
        DataRequest::Watch { session, instance } => {
            stream_events(&shared, send, session, instance, shutdown).await;
            return;
        }
        DataRequest::Write { op } => shared.handle_write(op),
        DataRequest::WriteBatch { ops } => shared.handle_write_batch(ops),
        DataRequest::Interest {
            instance,
            services,
            on,
        } => shared.handle_interest(instance, services, on),
        DataRequest::Fetch { services } => shared
            .snapshots(&services)
            .map(|datums| DataResponse::Datums { datums }),
        DataRequest::ListServices {} => Ok(DataResponse::Services {
            services: shared.store.lock().services(),
        }),
        DataRequest::SessionDigests {
            instance,
            epoch,
            digests,
        } => {
            let mut store = shared.store.lock();
            if store.epoch() < epoch {
                Err(Error::Unavailable(format!(
                    "this data server has not applied table epoch {epoch} yet (it is at {})",
                    store.epoch()
                )))
            } else {
                Ok(DataResponse::Mismatched {
                    slots: store.session_digests(instance, &digests),
                })
            }
        }
        DataRequest::SessionSync {
            instance,
            slot,
            publishers,
        } => shared.handle_session_sync(instance, slot, publishers),
        DataRequest::Replicate { ops } => Ok(shared.handle_replicate(ops)),
        DataRequest::SlotDump { slot } => shared.store.lock().dump(slot).map(DataResponse::Slot),
        DataRequest::SlotDigests { slots } => Ok(shared.handle_slot_digests(&slots)),
    };
    roster_common::admin::count_request("data", name, &result);
    if let Err(e) = rpc::send_reply(&mut send, result, max_frame).await {
        debug!(error = %e, "could not send reply");
    }
}

fn request_name(request: &DataRequest) -> &'static str {
    match request {
        DataRequest::Watch { .. } => "Watch",
        DataRequest::Write { .. } => "Write",
        DataRequest::WriteBatch { .. } => "WriteBatch",
        DataRequest::Interest { .. } => "Interest",
        DataRequest::Fetch { .. } => "Fetch",
        DataRequest::ListServices {} => "ListServices",
        DataRequest::SessionDigests { .. } => "SessionDigests",
        DataRequest::SessionSync { .. } => "SessionSync",
        DataRequest::Replicate { .. } => "Replicate",
        DataRequest::SlotDump { .. } => "SlotDump",
        DataRequest::SlotDigests { .. } => "SlotDigests",
    }
}

/// Serves a session's watch stream: `Ready`, then its notifications, until either side ends it.
/// Events queued meanwhile go out together, in one write of up to [`EVENT_BATCH_BYTES`].
async fn stream_events(
    shared: &Shared,
    mut send: SendStream,
    session: u64,
    instance: InstanceId,
    shutdown: CancellationToken,
) {
    let max_frame = shared.config.max_frame;
    let (stream, mut events) = shared.interests.lock().attach(instance);
    debug!(
        session,
        instance = format_args!("{instance:x}"),
        "session watch attached"
    );
    let mut next = Some(DataEvent::Ready {});
    let mut batch = BytesMut::new();
    'stream: loop {
        if let Some(event) = next.take() {
            batch.clear();
            let mut event = Some(event);
            while let Some(current) = event.take() {
                match frame::encode(&reply::<DataEvent>(Ok(current)), max_frame) {
                    Ok(frame) => batch.extend_from_slice(&frame),
                    Err(e) => {
                        warn!(error = %e, "event does not fit in a frame");
                        break 'stream;
                    }
                }
                if batch.len() < EVENT_BATCH_BYTES {
                    event = events.try_recv().ok();
                }
            }
            if send.write_all(&batch).await.is_err() {
                break;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = send.finish();
                break;
            }
            _ = send.stopped() => break,
            event = events.recv() => match event {
                Some(event) => next = Some(event),
                // Detached: replaced by a newer stream, or fell behind.
                None => {
                    let _ = send.finish();
                    break;
                }
            },
        }
    }
    shared.interests.lock().detach(instance, stream);
    debug!(session, "session watch detached");
}

/// The data server's admin view: slots, counts, repairs, and its gauges.
struct DataAdmin {
    shared: Arc<Shared>,
    advertise: String,
}

impl AdminSource for DataAdmin {
    fn refresh_metrics(&self) {
        let slots = self.shared.store.lock().slot_summaries();
        for state in SlotState::ALL {
            let n = slots.iter().filter(|s| s.state == state).count();
            metrics::gauge!("roster_data_slots", "state" => state.name()).set(n as f64);
        }
        let led = slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::Leading | SlotState::Moving));
        let (services, publishers) =
            led.fold((0, 0), |(v, p), s| (v + s.services, p + s.publishers));
        metrics::gauge!("roster_data_services").set(services as f64);
        metrics::gauge!("roster_data_publishers").set(publishers as f64);
    }

    fn acl(&self) -> Option<roster_common::acl::AclView> {
        self.shared.view().map(|view| view.acl.clone())
    }

    fn status(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            let shared = &self.shared;
            let (epoch, slots) = {
                let store = shared.store.lock();
                (store.epoch(), store.slot_summaries())
            };
            let count = |state: SlotState| slots.iter().filter(|s| s.state == state).count();
            let led: Vec<&crate::store::SlotSummary> = slots
                .iter()
                .filter(|s| matches!(s.state, SlotState::Leading | SlotState::Moving))
                .collect();
            let view = shared.view.borrow().clone();
            serde_json::json!({
                "server": {
                    "role": "data",
                    "id": shared.config.id,
                    "instance": format!("{:x}", shared.instance),
                    "addr": self.advertise,
                    "zone": shared.config.zone,
                    "version": env!("CARGO_PKG_VERSION"),
                    "ready": *shared.ready_tx.borrow(),
                },
                "cluster": {
                    "cluster_id": view.as_ref().map(|v| v.cluster_id.clone()),
                    "table_epoch_applied": epoch,
                    "meta_leader": view.as_ref().and_then(|v| v.meta_leader.clone()),
                },
                "counts": {
                    "leading": count(SlotState::Leading),
                    "moving": count(SlotState::Moving),
                    "following": count(SlotState::Following),
                    "fetching": count(SlotState::Fetching),
                    "services": led.iter().map(|s| s.services).sum::<usize>(),
                    "publishers": led.iter().map(|s| s.publishers).sum::<usize>(),
                    "followers": shared.replicators.lock().len(),
                },
                "repairs": *shared.repairs.lock(),
                "owners": shared.store.lock().owner_counts().map(|(instance, n)| (format!("{instance:016x}"), n)).collect::<BTreeMap<String, usize>>(),
                "slots": slots,
            })
        })
    }
}
