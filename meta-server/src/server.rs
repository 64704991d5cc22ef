//! The meta node's network shell: opens the node, serves members, operators and other meta nodes
//! ([`crate::node`]), starts the leader's jobs ([`crate::leader`]) and the way into a cluster
//! ([`crate::entry`]), and streams every new view to watchers.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use quinn::{RecvStream, SendStream};
use roster_common::admin::Admin;
use roster_common::peers::PeerPool;
use roster_common::proto::{ClusterView, MetaRequest, MetaResponse, reply};
use roster_common::tls::NodeIdentity;
use roster_common::{Error, Result, frame, quic, rpc, serve};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::leases::{LeaseBook, Preservation};
use crate::raft::RaftNode;
use crate::raft::store::Disk;
use crate::{MetaConfig, Start};

use crate::entry::{enter_cluster, refuse_other_cluster};
use crate::leader::keep_leases;
use crate::node::Node;
use crate::status::MetaAdmin;

/// A meta node, built from its config and run until a shutdown signal.
pub struct MetaServer {
    config: MetaConfig,
    identity: NodeIdentity,
    disk: Disk,
    ready_tx: watch::Sender<bool>,
    admin: Admin,
}

impl MetaServer {
    /// Opens the node's data directory and checks that it may start: with state on disk, or with a
    /// way to enter a cluster.
    pub fn open(config: MetaConfig, identity: NodeIdentity) -> Result<Self> {
        config.validate()?;
        let disk = Disk::open(&config.data_dir)?;
        let has_state = disk.has_raft_state()?;
        let cluster = disk.cluster_id()?;
        match (&config.start, has_state || cluster.is_some()) {
            (Start::Recover, false) => {
                return Err(Error::InvalidArgument(format!(
                    "{} holds no meta state: create a cluster with --bootstrap ID=ADDR,... (every initial voter started alike) or join one with --join ADDR",
                    config.data_dir.display()
                )));
            }
            (Start::Bootstrap(_), true) | (Start::Join { .. }, true) if has_state => {
                info!(
                    cluster = cluster.as_deref().unwrap_or("?"),
                    "recovering the state on disk; --bootstrap/--join only apply to a fresh node"
                );
            }
            _ => {}
        }
        Ok(MetaServer {
            config,
            identity,
            disk,
            ready_tx: watch::channel(false).0,
            admin: Admin::default(),
        })
    }

    /// True while this node belongs to a cluster whose Raft group has a leader.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Where the HTTP admin port finds this node's status and gauges once it runs.
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// The id of the cluster this node belongs to, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.disk.cluster_id().ok().flatten()
    }

    /// Serves on `socket` until `shutdown` fires.
    pub async fn run(self, socket: UdpSocket, shutdown: CancellationToken) -> Result<()> {
        let config = self.config;
        let advertise = quic::advertised_addr(config.advertise.as_deref(), &socket)?;
        let (endpoint, peer_config) =
            quic::peer_endpoint(socket, &self.identity, &config.transport)?;
        let pool = Arc::new(PeerPool::new(
            endpoint.clone(),
            peer_config,
            config.request_timeout,
        ));
        let stored_cluster = self.disk.cluster_id()?;
        if let (Start::Join { addr, .. }, Some(ours)) = (&config.start, &stored_cluster) {
            refuse_other_cluster(&pool, addr, ours, &config).await?;
        }
        let cluster_id = Arc::new(RwLock::new(stored_cluster));
        let raft = RaftNode::start(
            config.id,
            config.raft.clone(),
            self.disk.clone(),
            pool.clone(),
            cluster_id.clone(),
            config.max_frame,
        )
        .await?;
        let node = Arc::new(Node {
            leases: Mutex::new(LeaseBook::new(
                config.lease_timeout,
                Preservation::new(config.preservation_share, config.preservation_window),
                Instant::now(),
            )),
            config: config.clone(),
            raft: raft.clone(),
            disk: self.disk,
            cluster_id,
            pool: pool.clone(),
            advertise: advertise.clone(),
            view_tx: watch::channel(None).0,
            refusals_logged: Mutex::new(BTreeMap::new()),
        });
        info!(
            id = config.id,
            addr = %advertise,
            cluster = node.cluster_id.read().as_deref().unwrap_or("(none yet)"),
            "meta node serving"
        );

        self.admin
            .install(Arc::new(MetaAdmin { node: node.clone() }));
        let tracker = TaskTracker::new();
        tracker.spawn(track_readiness(
            node.clone(),
            self.ready_tx,
            shutdown.clone(),
        ));
        tracker.spawn(publish_views(node.clone(), shutdown.clone()));
        tracker.spawn(keep_leases(node.clone(), shutdown.clone()));
        tracker.spawn(raft.clone().step_down_without_quorum(shutdown.clone()));
        tracker.spawn(enter_cluster(node.clone(), shutdown.clone()));
        let stream_node = node.clone();
        let stream_shutdown = shutdown.clone();
        serve::serve_requests(&endpoint, &shutdown, &tracker, move |send, recv| {
            handle_stream(stream_node.clone(), send, recv, stream_shutdown.clone())
        })
        .await;
        raft.shutdown().await;
        serve::drain(&endpoint, &tracker, Some(&pool), Duration::from_secs(2)).await;
        info!(id = config.id, "meta node stopped");
        Ok(())
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
    if let MetaRequest::Watch {} = request {
        stream_views(&node, send, shutdown).await;
        return;
    }
    let name = request.name();
    let result = node.handle(request, false).await;
    roster_common::admin::count_request("meta", name, &result);
    if let Err(e) = rpc::send_reply(&mut send, result, max_frame).await {
        debug!(error = %e, "could not send reply");
    }
}

/// Sends the current view (once the cluster exists), then every new one, until the watcher goes
/// away or shutdown.
async fn stream_views(node: &Node, mut send: SendStream, shutdown: CancellationToken) {
    let mut views = node.view_tx.subscribe();
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view {
            let frame =
                match frame::encode(&reply::<&ClusterView>(Ok(&view)), node.config.max_frame) {
                    Ok(frame) => frame,
                    Err(e) => {
                        warn!(error = %e, "cluster view does not fit in a frame");
                        return;
                    }
                };
            if send.write_all(&frame).await.is_err() {
                return;
            }
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

/// Ready: the node belongs to a cluster and knows a Raft leader.
async fn track_readiness(
    node: Arc<Node>,
    ready_tx: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut changes = node.raft.changes();
    loop {
        let has_leader = changes.borrow_and_update().current_leader.is_some();
        let ready = has_leader && node.cluster_id.read().is_some();
        ready_tx.send_if_modified(|r| std::mem::replace(r, ready) != ready);
        tokio::select! {
            _ = shutdown.cancelled() => {
                ready_tx.send_replace(false);
                return;
            }
            changed = changes.changed() => if changed.is_err() { return },
            // The cluster id is learnt from the log, not from a metrics change.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Publishes a new view whenever the applied state or the meta leader changes.
async fn publish_views(node: Arc<Node>, shutdown: CancellationToken) {
    let mut applied = node.raft.state_machine().changes();
    let mut metrics = node.raft.changes();
    loop {
        let leader = node.raft.view().leader_addr;
        let view = node
            .raft
            .state_machine()
            .read(|m| m.state.is_initialized().then(|| m.state.view(leader)));
        if let Some(view) = view {
            if node.view_tx.borrow().is_none() && !view.acl.enabled {
                warn!(
                    "this cluster was created with --insecure-no-auth: clients are not asked for tokens, and anyone who can reach a session server may publish, subscribe and read /admin"
                );
            }
            node.view_tx.send_if_modified(|current| {
                if current.as_deref() == Some(&view) {
                    return false;
                }
                *current = Some(Arc::new(view));
                true
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = applied.changed() => if changed.is_err() { return },
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}
