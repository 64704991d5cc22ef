//! The meta node's network shell: accepts members, turns their requests into commands, expires
//! leases, and streams every new view to watchers.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quinn::{RecvStream, SendStream};
use roster_common::proto::{ClusterView, Member, MemberKey, MetaRequest, MetaResponse, reply};
use roster_common::tls::NodeIdentity;
use roster_common::{Error, Result, frame, quic, rpc, serve, unix_millis};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::MetaConfig;
use crate::disk::StateFile;
use crate::leases::Leases;
use crate::state::{Command, MetaState};

/// A meta node, built from its config and run until a shutdown signal.
pub struct MetaServer {
    config: MetaConfig,
    identity: NodeIdentity,
    node: Arc<Node>,
}

struct Node {
    config: MetaConfig,
    state: Mutex<MetaState>,
    leases: Mutex<Leases>,
    file: StateFile,
    view_tx: watch::Sender<Arc<ClusterView>>,
}

impl MetaServer {
    /// Opens the node's data directory: recovers the saved state, or starts a new cluster.
    pub fn open(config: MetaConfig, identity: NodeIdentity) -> Result<Self> {
        config.validate()?;
        let file = StateFile::open(&config.data_dir)?;
        let state = match file.load()? {
            Some(state) => {
                if state.table.slot_count != config.slot_count {
                    warn!(
                        stored = state.table.slot_count,
                        configured = config.slot_count,
                        "the slot count is fixed when a cluster is created; keeping the stored one"
                    );
                }
                info!(cluster = %state.cluster_id, members = state.members.len(), epoch = state.table.epoch, "recovered meta state");
                state
            }
            None => {
                let cluster_id = format!("{:016x}", rand::random::<u64>());
                let state = MetaState::new(cluster_id, config.slot_count, config.replicas);
                file.save(&state)?;
                info!(cluster = %state.cluster_id, slots = config.slot_count, replicas = config.replicas, "created a new cluster");
                state
            }
        };
        // Every recovered member gets a fresh lease: it may expire only if it stays silent from now.
        let mut leases = Leases::new(config.lease_timeout);
        let now = Instant::now();
        for member in state.members.values() {
            leases.grant(member.key(), member.instance, now);
        }
        let (view_tx, _) = watch::channel(Arc::new(state.view(None)));
        let node = Arc::new(Node {
            config: config.clone(),
            state: Mutex::new(state),
            leases: Mutex::new(leases),
            file,
            view_tx,
        });
        Ok(MetaServer {
            config,
            identity,
            node,
        })
    }

    /// The id of the cluster this node belongs to.
    pub fn cluster_id(&self) -> String {
        self.node.state.lock().cluster_id.clone()
    }

    /// A watch of the current view, for health checks and tests.
    pub fn views(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.node.view_tx.subscribe()
    }

    /// Serves members on `socket` until `shutdown` fires.
    pub async fn run(self, socket: UdpSocket, shutdown: CancellationToken) -> Result<()> {
        let local = socket.local_addr().ok();
        let (endpoint, _) = quic::peer_endpoint(socket, &self.identity, &self.config.transport)?;
        let node = self.node.clone();
        node.publish_view(&node.state.lock());
        info!(id = self.config.id, addr = ?local, cluster = %self.cluster_id(), "meta node serving");

        let tracker = TaskTracker::new();
        tracker.spawn(expire_leases(node.clone(), shutdown.clone()));
        let stream_shutdown = shutdown.clone();
        serve::serve_requests(&endpoint, &shutdown, &tracker, move |send, recv| {
            handle_stream(node.clone(), send, recv, stream_shutdown.clone())
        })
        .await;
        serve::drain(&endpoint, &tracker, None, Duration::from_secs(2)).await;
        info!(id = self.config.id, "meta node stopped");
        Ok(())
    }
}

impl Node {
    /// Applies `command`, saves the state and tells every watcher. The one way state changes.
    fn commit(&self, command: Command) -> Result<bool> {
        let mut state = self.state.lock();
        let mut next = state.clone();
        if !next.apply(command) {
            return Ok(false);
        }
        // Save before anyone is told: a change the cluster acted on must survive a restart.
        self.file.save(&next)?;
        *state = next;
        self.publish_view(&state);
        Ok(true)
    }

    fn publish_view(&self, state: &MetaState) {
        self.view_tx.send_replace(Arc::new(state.view(None)));
    }

    fn handle_register(
        &self,
        mut member: Member,
        cluster_id: Option<String>,
    ) -> Result<MetaResponse> {
        let ours = self.state.lock().cluster_id.clone();
        if let Some(theirs) = cluster_id
            && theirs != ours
        {
            return Err(Error::ClusterMismatch(format!(
                "member {} belongs to cluster {theirs}, this meta node to cluster {ours}",
                member.key()
            )));
        }
        if member.addr.trim().is_empty() {
            return Err(Error::InvalidArgument(format!(
                "member {} has no address",
                member.key()
            )));
        }
        member.joined_at_ms = match self.state.lock().members.get(&member.key()) {
            Some(known) if known.instance == member.instance => known.joined_at_ms,
            _ => unix_millis(),
        };
        let key = member.key();
        let instance = member.instance;
        self.commit(Command::Join { member })?;
        self.leases.lock().grant(key, instance, Instant::now());
        Ok(MetaResponse::Registered {
            cluster_id: ours,
            lease_timeout_ms: self.config.lease_timeout.as_millis() as u64,
            renew_interval_ms: self.config.renew_interval.as_millis() as u64,
        })
    }

    fn handle_renew(&self, key: MemberKey, instance: u64) -> Result<MetaResponse> {
        if self.leases.lock().renew(key, instance, Instant::now()) {
            Ok(MetaResponse::Renewed {})
        } else {
            Err(Error::UnknownMember(format!(
                "{key} instance {instance:x} has no lease here; register again"
            )))
        }
    }

    fn handle_leave(&self, key: MemberKey, instance: u64) -> Result<MetaResponse> {
        if self.commit(Command::Remove { key, instance })? {
            info!(member = %key, "member left");
        }
        self.leases.lock().remove(&key);
        Ok(MetaResponse::Done {})
    }
}

async fn handle_stream(
    node: Arc<Node>,
    mut send: SendStream,
    mut recv: RecvStream,
    shutdown: CancellationToken,
) {
    let max_frame = node.config.max_frame;
    let request = match rpc::read_request::<MetaRequest>(&mut recv, max_frame).await {
        Ok(request) => request,
        Err(e) => {
            debug!(error = %e, "bad request");
            let _ = rpc::send_reply::<MetaResponse>(&mut send, Err(e), max_frame).await;
            return;
        }
    };
    let result = match request {
        MetaRequest::Register { member, cluster_id } => node.handle_register(member, cluster_id),
        MetaRequest::Renew { role, id, instance } => {
            node.handle_renew(MemberKey { role, id }, instance)
        }
        MetaRequest::Leave { role, id, instance } => {
            node.handle_leave(MemberKey { role, id }, instance)
        }
        MetaRequest::GetView {} => Ok(MetaResponse::View((**node.view_tx.borrow()).clone())),
        MetaRequest::Watch {} => {
            stream_views(&node, send, shutdown).await;
            return;
        }
    };
    if let Err(e) = rpc::send_reply(&mut send, result, max_frame).await {
        debug!(error = %e, "could not send reply");
    }
}

/// Sends the current view, then every new one, until the watcher goes away or shutdown.
async fn stream_views(node: &Node, mut send: SendStream, shutdown: CancellationToken) {
    let mut views = node.view_tx.subscribe();
    loop {
        let view = views.borrow_and_update().clone();
        let frame = match frame::encode(&reply::<&ClusterView>(Ok(&view)), node.config.max_frame) {
            Ok(frame) => frame,
            Err(e) => {
                warn!(error = %e, "cluster view does not fit in a frame");
                return;
            }
        };
        if send.write_all(&frame).await.is_err() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = send.finish();
                return;
            }
            _ = send.stopped() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
    }
}

/// Removes members whose lease lapsed, checking a few times per lease period.
async fn expire_leases(node: Arc<Node>, shutdown: CancellationToken) {
    let period = (node.config.lease_timeout / 10).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lapsed = node.leases.lock().lapsed(Instant::now());
        for (key, instance) in lapsed {
            match node.commit(Command::Remove { key, instance }) {
                Ok(_) => {
                    info!(member = %key, "lease expired");
                    node.leases.lock().remove(&key);
                }
                Err(e) => {
                    warn!(member = %key, error = %e, "could not commit an expiry; will retry")
                }
            }
        }
    }
}
