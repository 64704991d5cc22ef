//! The data server's network shell: joins the cluster, follows the slot table, serves sessions.

use std::collections::HashSet;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quinn::{RecvStream, SendStream};
use roster_common::member::{self, MemberConfig, ViewRx};
use roster_common::peers::PeerPool;
use roster_common::proto::{
    ClusterView, DataEvent, DataRequest, DataResponse, Member, Role, Snapshot, WriteOp, reply,
};
use roster_common::tls::NodeIdentity;
use roster_common::{Error, InstanceId, Result, ServiceId, frame, ids, quic, rpc, serve};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::DataConfig;
use crate::interest::Interests;
use crate::owners::OwnerSweep;
use crate::store::{Change, Store};

/// How often publishers of departed sessions are looked for.
const SWEEP_PERIOD: Duration = Duration::from_millis(250);

/// A data server, built from its config and run until a shutdown signal.
pub struct DataServer {
    config: DataConfig,
    identity: NodeIdentity,
    instance: InstanceId,
    ready_tx: watch::Sender<bool>,
}

struct Shared {
    config: DataConfig,
    instance: InstanceId,
    store: Mutex<Store>,
    interests: Mutex<Interests>,
    view: ViewRx,
    ready_tx: watch::Sender<bool>,
}

impl DataServer {
    pub fn new(config: DataConfig, identity: NodeIdentity) -> Result<Self> {
        config.validate()?;
        Ok(DataServer {
            config,
            identity,
            instance: ids::new_instance_id(),
            ready_tx: watch::channel(false).0,
        })
    }

    /// True once the server is a member of the cluster and serves the slots its table gives it.
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
        });
        info!(id = self.config.id, addr = %advertise, instance = format_args!("{:x}", self.instance), "data server serving");

        let tracker = TaskTracker::new();
        tracker.spawn(follow_cluster(shared.clone(), shutdown.clone()));
        let stream_shutdown = shutdown.clone();
        serve::serve_requests(&endpoint, &shutdown, &tracker, move |send, recv| {
            handle_stream(shared.clone(), send, recv, stream_shutdown.clone())
        })
        .await;
        // Leave the cluster before the endpoint closes, so the meta tier hears it at once.
        agent_shutdown.cancel();
        let _ = agent.await;
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
        let mut interests = self.interests.lock();
        for (service, version) in changes {
            let detached = interests.notify(service, *version);
            if detached > 0 {
                warn!(%service, detached, "sessions fell behind on notifications and were detached; they will resync");
            }
        }
    }

    fn handle_write(&self, op: WriteOp) -> Result<DataResponse> {
        if let WriteOp::Put { publisher } = &op
            && (publisher.register_id.is_empty() || publisher.client_id.is_empty())
        {
            return Err(Error::InvalidArgument(
                "publisher needs a client id and a register id".into(),
            ));
        }
        let service = op.service().clone();
        let result = self.store.lock().write(op);
        match result {
            Ok(Some(change)) => {
                let version = change.1;
                debug!(%service, version, "applied");
                self.notify(&[change]);
                Ok(DataResponse::Written { version })
            }
            Ok(None) => {
                let version = self
                    .store
                    .lock()
                    .snapshot(&service)
                    .map(|s| s.version)
                    .unwrap_or(0);
                Ok(DataResponse::Written { version })
            }
            Err(e) => Err(self.with_leader_hint(e, &service)),
        }
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
        match self.snapshots(&services) {
            Ok(datums) => Ok(DataResponse::Datums { datums }),
            Err(e) => {
                self.interests.lock().set(instance, &services, false);
                Err(e)
            }
        }
    }

    /// Adopts the latest committed view: its table, and the departure of sessions.
    fn apply_view(&self, view: &ClusterView) {
        let me = view.member(Role::Data, self.config.id);
        let member = me.is_some_and(|m| m.instance == self.instance);
        if member {
            let taken = self.store.lock().apply_table(&view.table);
            if !taken.is_empty() {
                info!(
                    epoch = view.table.epoch,
                    slots = taken.len(),
                    "took the lead of slots"
                );
            }
        }
        self.ready_tx
            .send_if_modified(|ready| std::mem::replace(ready, member) != member);
    }

    fn sweep_owners(&self, sweep: &mut OwnerSweep, view: &ClusterView) {
        let live: HashSet<InstanceId> =
            view.members_of(Role::Session).map(|m| m.instance).collect();
        let expired = {
            let store = self.store.lock();
            sweep.sweep(&live, store.owners(), Instant::now())
        };
        for instance in expired {
            let changes = self.store.lock().drop_owner(instance);
            info!(
                session_instance = format_args!("{instance:x}"),
                services = changes.len(),
                "dropped the publishers of a departed session"
            );
            self.notify(&changes);
        }
    }
}

/// Applies every new view and sweeps departed sessions' publishers.
async fn follow_cluster(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut views = shared.view.clone();
    let mut sweep = OwnerSweep::new(shared.config.session_grace);
    let mut tick = tokio::time::interval(SWEEP_PERIOD);
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
            _ = tick.tick() => {
                if let Some(view) = shared.view() {
                    shared.sweep_owners(&mut sweep, &view);
                }
            }
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
    let result = match request {
        DataRequest::Watch { session, instance } => {
            stream_events(&shared, send, session, instance, shutdown).await;
            return;
        }
        DataRequest::Write { op } => shared.handle_write(op),
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
    };
    if let Err(e) = rpc::send_reply(&mut send, result, max_frame).await {
        debug!(error = %e, "could not send reply");
    }
}

/// Serves a session's watch stream: `Ready`, then its notifications, until either side ends it.
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
    loop {
        if let Some(event) = next.take() {
            let frame = match frame::encode(&reply::<DataEvent>(Ok(event)), max_frame) {
                Ok(frame) => frame,
                Err(e) => {
                    warn!(error = %e, "event does not fit in a frame");
                    break;
                }
            };
            if send.write_all(&frame).await.is_err() {
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
