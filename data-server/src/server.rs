//! The data server's network shell: joins the cluster, follows the slot table, serves sessions
//! and streams change events to them. Replication lives in [`crate::replication`], copy keeping in
//! [`crate::copies`], the shared state and the leader's write path in [`crate::shared`].

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use quinn::{RecvStream, SendStream};
use roster_common::admin::Admin;
use roster_common::member::{self, MemberConfig};
use roster_common::peers::PeerPool;
use roster_common::proto::{DataEvent, DataRequest, DataResponse, Member, Role, reply};
use roster_common::tls::NodeIdentity;
use roster_common::{Error, InstanceId, Result, frame, ids, quic, rpc, serve};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::DataConfig;
use crate::interest::Interests;
use crate::owners::OwnerSweep;
use crate::store::Store;

use crate::admin::DataAdmin;
use crate::checker::run_checks;
use crate::copies::keep_copies;
use crate::persistent::keep_persistent;
use crate::shared::{STEP, Shared};

/// How often publishers of departed sessions are looked for.
const SWEEP_PERIOD: Duration = Duration::from_millis(250);
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
        let pool = Arc::new(
            PeerPool::new(endpoint.clone(), peer_config, self.config.request_timeout)
                .with_faults(self.config.faults.clone()),
        );
        let member = Member {
            role: Role::Data,
            id: self.config.id,
            instance: self.instance,
            addr: advertise.clone(),
            zone: self.config.zone.clone(),
            joined_at_ms: 0,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let agent_shutdown = CancellationToken::new();
        let (view, agent) = member::spawn(
            MemberConfig {
                metas: self.config.metas.clone(),
                member,
                max_frame: self.config.max_frame,
                request_timeout: self.config.request_timeout,
                load: None,
                subscribers: None,
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
            admitted: Mutex::new(None),
        });
        self.admin.install(Arc::new(DataAdmin {
            shared: shared.clone(),
            advertise: advertise.clone(),
        }));
        info!(id = self.config.id, addr = %advertise, instance = format_args!("{:x}", self.instance), "data server serving");

        let tracker = TaskTracker::new();
        tracker.spawn(follow_cluster(shared.clone(), shutdown.clone()));
        tracker.spawn(keep_copies(shared.clone(), shutdown.clone()));
        tracker.spawn(keep_persistent(shared.clone(), shutdown.clone()));
        tracker.spawn(run_checks(shared.clone(), shutdown.clone()));
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
        DataRequest::Write { op } => shared.handle_write(*op),
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
        DataRequest::Status {} => Ok(DataResponse::Status(
            shared.store.lock().status(env!("CARGO_PKG_VERSION")),
        )),
        DataRequest::Records { service } => {
            shared
                .store
                .lock()
                .records(&service)
                .map(|(version, publishers)| DataResponse::Records {
                    version,
                    publishers,
                })
        }
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
        DataRequest::Status {} => "Status",
        DataRequest::Records { .. } => "Records",
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
    let (stream, mut events) = shared.interests.lock().attach(session, instance);
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
