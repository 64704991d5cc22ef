//! The meta node's network shell: serves members, operators and other meta nodes, keeps the lease
//! clocks while leading, and streams every new view to watchers.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::UdpSocket;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use quinn::{RecvStream, SendStream};
use roster_common::acl::{ANY_NAMESPACE, Permission, TokenRecord};
use roster_common::admin::{Admin, AdminSource};
use roster_common::peers::PeerPool;
use roster_common::proto::{
    ClusterStatus, ClusterView, LeaseStatus, Member, MemberKey, MetaNodeStatus, MetaRequest,
    MetaResponse, Role, reply,
};
use roster_common::tls::NodeIdentity;
use roster_common::{Error, NodeId, Result, frame, quic, rpc, serve, unix_millis};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::leases::{LeaseBook, Leases, Preservation};
use crate::raft::RaftNode;
use crate::raft::store::Disk;
use crate::state::Command;
use crate::tokens::{TokenRequest, mint};
use crate::{MetaConfig, Start};

/// How long an operator's request to add a meta node may take (it waits for the node to catch up).
const ADD_META_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a follower waits for the leader to answer a forwarded member or read request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);

/// A meta node, built from its config and run until a shutdown signal.
pub struct MetaServer {
    config: MetaConfig,
    identity: NodeIdentity,
    disk: Disk,
    ready_tx: watch::Sender<bool>,
    admin: Admin,
}

struct Node {
    config: MetaConfig,
    raft: RaftNode,
    disk: Disk,
    /// The cluster this node belongs to; `None` only on a fresh node that has not joined yet.
    cluster_id: Arc<RwLock<Option<String>>>,
    pool: Arc<PeerPool>,
    advertise: String,
    leases: Mutex<LeaseBook>,
    view_tx: watch::Sender<Option<Arc<ClusterView>>>,
    /// When a refusal of each foreign node was last logged (they repeat with every heartbeat).
    refusals_logged: Mutex<BTreeMap<NodeId, Instant>>,
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

/// A node with state asked to `--join` checks that the node it names is of its own cluster.
async fn refuse_other_cluster(
    pool: &PeerPool,
    addr: &str,
    ours: &str,
    config: &MetaConfig,
) -> Result<()> {
    let answer = pool.call::<_, MetaResponse>(
        addr,
        &MetaRequest::NodeInfo {},
        config.max_frame,
        config.request_timeout,
    );
    match answer.await {
        Ok(MetaResponse::NodeInfo {
            cluster_id: Some(theirs),
            ..
        }) if theirs != ours => Err(Error::ClusterMismatch(format!(
            "the data in {} belongs to cluster {ours}, but the meta node at {addr} belongs to cluster {theirs}; use an empty --data-dir to join it",
            config.data_dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Creates the cluster (bootstrap) or joins it, as configured, for a node that has not yet.
async fn enter_cluster(node: Arc<Node>, shutdown: CancellationToken) {
    let result = match node.config.start.clone() {
        Start::Recover => return,
        Start::Bootstrap(voters) => bootstrap(&node, voters).await,
        Start::Join { addr, learner } => {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = join(&node, &addr, learner, &shutdown) => result,
            }
        }
    };
    if let Err(e) = result {
        warn!(error = %e, "could not enter the cluster");
    }
}

async fn bootstrap(node: &Node, voters: BTreeMap<NodeId, String>) -> Result<()> {
    if node.raft.is_initialized().await || node.cluster_id.read().is_some() {
        return Ok(());
    }
    let lowest = *voters.keys().next().expect("validated non-empty");
    if lowest != node.config.id {
        info!(
            creator = lowest,
            "waiting for meta node {lowest} to create the cluster"
        );
        return Ok(());
    }
    let cluster_id = format!("{:016x}", rand::random::<u64>());
    node.adopt_cluster(&cluster_id)?;
    info!(cluster = %cluster_id, voters = ?voters, "creating the meta group");
    node.raft.initialize(voters).await
}

async fn join(node: &Node, addr: &str, learner: bool, shutdown: &CancellationToken) -> Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match try_join(node, addr, learner).await {
            Ok(()) => return Ok(()),
            Err(e @ Error::ClusterMismatch(_)) => {
                tracing::error!(error = %e, "refusing to join");
                return Err(e);
            }
            Err(e) => warn!(via = %addr, error = %e, "could not join the meta group yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn try_join(node: &Node, addr: &str, learner: bool) -> Result<()> {
    let view = node.raft.view();
    if view.voters.contains_key(&node.config.id)
        || (learner && view.learners.contains_key(&node.config.id))
    {
        return Ok(());
    }
    let info = node
        .pool
        .call(
            addr,
            &MetaRequest::NodeInfo {},
            node.config.max_frame,
            node.config.request_timeout,
        )
        .await?;
    let MetaResponse::NodeInfo {
        cluster_id: Some(theirs),
        ..
    } = info
    else {
        return Err(Error::Unavailable(format!(
            "the meta node at {addr} belongs to no cluster yet"
        )));
    };
    node.adopt_cluster(&theirs)?;
    info!(via = %addr, cluster = %theirs, "asking to join the meta group");
    let request = MetaRequest::AddMeta {
        addr: node.advertise.clone(),
        learner,
    };
    node.pool
        .call::<_, MetaResponse>(addr, &request, node.config.max_frame, ADD_META_TIMEOUT)
        .await?;
    info!(learner, "joined the meta group");
    Ok(())
}

impl Node {
    /// Records `id` as this node's cluster, refusing a different one.
    fn adopt_cluster(&self, id: &str) -> Result<()> {
        let mut current = self.cluster_id.write();
        match current.as_deref() {
            Some(ours) if ours == id => Ok(()),
            Some(ours) => Err(Error::ClusterMismatch(format!(
                "this meta node (id {}) belongs to cluster {ours}, not to cluster {id}",
                self.config.id
            ))),
            None => {
                self.disk.set_cluster_id(id)?;
                *current = Some(id.to_owned());
                Ok(())
            }
        }
    }

    /// Checks a Raft message's cluster. A fresh bootstrap voter adopts the cluster of the first
    /// message from a fellow voter.
    fn check_cluster(&self, theirs: &str, from: NodeId) -> Result<()> {
        let ours = self.cluster_id.read().clone();
        match ours {
            Some(ours) if ours == theirs => Ok(()),
            Some(ours) => {
                let refusal = Error::ClusterMismatch(format!(
                    "meta node {from} is of cluster {theirs}, this node (id {}) of cluster {ours}",
                    self.config.id
                ));
                let mut logged = self.refusals_logged.lock();
                if logged
                    .get(&from)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    logged.insert(from, Instant::now());
                    tracing::error!(error = %refusal, "refusing Raft messages from another cluster");
                }
                Err(refusal)
            }
            None => match &self.config.start {
                Start::Bootstrap(voters) if voters.contains_key(&from) && !theirs.is_empty() => {
                    info!(cluster = %theirs, creator = from, "joining the cluster being created");
                    self.adopt_cluster(theirs)
                }
                _ => Err(Error::Unavailable(format!(
                    "this meta node (id {}) belongs to no cluster yet",
                    self.config.id
                ))),
            },
        }
    }

    fn leader_addr(&self) -> Result<String> {
        let view = self.raft.view();
        match (view.leader, view.leader_addr) {
            (Some(_), Some(addr)) => Ok(addr),
            _ => Err(Error::NoQuorum("the meta group has no leader".into())),
        }
    }

    fn is_leader(&self) -> bool {
        self.raft.view().is_leader
    }

    /// Sends `request` to the leader and returns its answer.
    async fn forward(&self, request: MetaRequest, timeout: Duration) -> Result<MetaResponse> {
        let addr = self.leader_addr()?;
        let forwarded = MetaRequest::Forwarded {
            request: Box::new(request),
        };
        self.pool
            .call(&addr, &forwarded, self.config.max_frame, timeout)
            .await
    }

    /// The current view, if the cluster exists.
    fn current_view(&self) -> Option<Arc<ClusterView>> {
        self.view_tx.borrow().clone()
    }

    async fn handle(&self, request: MetaRequest, forwarded: bool) -> Result<MetaResponse> {
        let leader_only = matches!(
            request,
            MetaRequest::Register { .. }
                | MetaRequest::Renew { .. }
                | MetaRequest::Leave { .. }
                | MetaRequest::AddMeta { .. }
                | MetaRequest::RemoveMeta { .. }
                | MetaRequest::TransferLeader { .. }
                | MetaRequest::CreateToken { .. }
                | MetaRequest::ListTokens {}
                | MetaRequest::RevokeToken { .. }
                | MetaRequest::GetView { stale: false }
                | MetaRequest::Status { local: false }
        );
        if leader_only && !self.is_leader() {
            if forwarded {
                return Err(Error::NotLeader {
                    leader: self.leader_addr().ok(),
                });
            }
            // A forward to a leader that just died hangs until its connection times out; small
            // requests give up sooner so the caller retries against the new leader.
            let timeout = match request {
                MetaRequest::AddMeta { .. } => ADD_META_TIMEOUT,
                MetaRequest::RemoveMeta { .. } | MetaRequest::TransferLeader { .. } => {
                    self.config.request_timeout
                }
                _ => FORWARD_TIMEOUT,
            };
            return match self.forward(request.clone(), timeout).await {
                // Unreachable leader: as far as this node can tell, there is no quorum to write to.
                Err(e @ (Error::Connection(_) | Error::Timeout(_))) => Err(Error::NoQuorum(
                    format!("the meta leader is unreachable: {e}"),
                )),
                other => other,
            };
        }
        match request {
            MetaRequest::Register { member, cluster_id } => self.register(member, cluster_id).await,
            MetaRequest::Renew {
                role,
                id,
                instance,
                load,
            } => self.renew(MemberKey { role, id }, instance, load),
            MetaRequest::Leave { role, id, instance } => {
                self.leave(MemberKey { role, id }, instance).await
            }
            MetaRequest::GetView { stale } => {
                if !stale {
                    self.raft.ensure_linearizable().await?;
                }
                let view = self
                    .current_view()
                    .ok_or_else(|| Error::Unavailable("the cluster is not created yet".into()))?;
                Ok(MetaResponse::View {
                    view: (*view).clone(),
                    stale,
                })
            }
            MetaRequest::Status { local } => Ok(MetaResponse::Status(self.status(local))),
            MetaRequest::AddMeta { addr, learner } => self.add_meta(addr, learner).await,
            MetaRequest::RemoveMeta { id } => self
                .raft
                .remove_node(id)
                .await
                .map(|()| MetaResponse::Done {}),
            MetaRequest::TransferLeader { id } => self.transfer_leader(id).await,
            MetaRequest::CreateToken {
                namespaces,
                allow,
                ttl_ms,
                description,
                by,
            } => {
                let request = TokenRequest {
                    namespaces,
                    allow,
                    ttl_ms,
                    description,
                    by,
                };
                self.create_token(request).await
            }
            MetaRequest::ListTokens {} => {
                self.raft.ensure_linearizable().await?;
                let (enabled, tokens) = self.raft.state_machine().read(|m| {
                    let acl = &m.state.acl;
                    (acl.enabled, acl.tokens.iter().map(|t| t.info()).collect())
                });
                Ok(MetaResponse::Tokens { enabled, tokens })
            }
            MetaRequest::RevokeToken { id, by } => {
                let by = crate::tokens::clean_name(&by);
                let applied = self
                    .raft
                    .write(Command::RevokeToken { id: id.clone(), by })
                    .await?;
                if !applied.changed {
                    return Err(Error::NotFound(format!("no token {id:?}")));
                }
                Ok(MetaResponse::Done {})
            }
            MetaRequest::NodeInfo {} => Ok(MetaResponse::NodeInfo {
                id: self.config.id,
                addr: self.advertise.clone(),
                cluster_id: self.cluster_id.read().clone(),
                leader: self.raft.view().leader,
            }),
            MetaRequest::Raft {
                cluster_id,
                from,
                kind,
                payload,
            } => {
                self.check_cluster(&cluster_id, from)?;
                let payload = self.raft.handle_message(kind, &payload).await?;
                Ok(MetaResponse::Raft { payload })
            }
            MetaRequest::Campaign {} => self.raft.campaign().await.map(|()| MetaResponse::Done {}),
            MetaRequest::Forwarded { .. } if forwarded => Err(Error::UnexpectedMessage(
                "a forwarded request cannot be forwarded again".into(),
            )),
            MetaRequest::Forwarded { request } => Box::pin(self.handle(*request, true)).await,
            MetaRequest::Watch {} => Err(Error::UnexpectedMessage(
                "Watch opens a stream; send it alone".into(),
            )),
        }
    }

    async fn register(
        &self,
        mut member: Member,
        cluster_id: Option<String>,
    ) -> Result<MetaResponse> {
        let ours = self
            .current_view()
            .map(|v| v.cluster_id.clone())
            .ok_or_else(|| Error::Unavailable("the cluster is not created yet".into()))?;
        if let Some(theirs) = cluster_id
            && theirs != ours
        {
            return Err(Error::ClusterMismatch(format!(
                "member {} belongs to cluster {theirs}, this meta group to cluster {ours}",
                member.key()
            )));
        }
        if member.addr.trim().is_empty() {
            return Err(Error::InvalidArgument(format!(
                "member {} has no address",
                member.key()
            )));
        }
        let known = self
            .raft
            .state_machine()
            .read(|m| m.state.members.get(&member.key()).cloned());
        member.joined_at_ms = match known {
            Some(known) if known.instance == member.instance => known.joined_at_ms,
            _ => unix_millis(),
        };
        let key = member.key();
        let instance = member.instance;
        self.raft.write(Command::Join { member }).await?;
        self.leases
            .lock()
            .leases
            .grant(key, instance, Instant::now());
        Ok(MetaResponse::Registered {
            cluster_id: ours,
            lease_timeout_ms: self.config.lease_timeout.as_millis() as u64,
            renew_interval_ms: self.config.renew_interval.as_millis() as u64,
        })
    }

    fn renew(&self, key: MemberKey, instance: u64, load: Option<u64>) -> Result<MetaResponse> {
        let now = Instant::now();
        let mut book = self.leases.lock();
        if let Some(load) = load {
            book.report_load(key, load);
        }
        let mean = book.mean_session_load(now);
        if book.leases.renew(key, instance, now) {
            metrics::counter!("roster_lease_renewals_total", "role" => key.role.name())
                .increment(1);
            return Ok(MetaResponse::Renewed {
                mean_session_load: mean,
            });
        }
        // A member committed by the previous leader's term and not yet in our book.
        let known = self.raft.state_machine().read(|m| {
            m.state
                .members
                .get(&key)
                .is_some_and(|m| m.instance == instance)
        });
        if known {
            book.leases.grant(key, instance, now);
            return Ok(MetaResponse::Renewed {
                mean_session_load: mean,
            });
        }
        Err(Error::UnknownMember(format!(
            "{key} instance {instance:x} has no lease here; register again"
        )))
    }

    async fn leave(&self, key: MemberKey, instance: u64) -> Result<MetaResponse> {
        let applied = self.raft.write(Command::Remove { key, instance }).await?;
        if applied.changed {
            info!(member = %key, "member left");
        }
        self.leases.lock().forget(&key);
        Ok(MetaResponse::Done {})
    }

    async fn create_token(&self, request: TokenRequest) -> Result<MetaResponse> {
        let enabled = self.raft.state_machine().read(|m| m.state.acl.enabled);
        if !enabled {
            return Err(Error::InvalidArgument(
                "this cluster was created with --insecure-no-auth: it checks no tokens".into(),
            ));
        }
        let (token, record) = mint(request, unix_millis())?;
        let info = record.info();
        self.raft.write(Command::CreateToken { record }).await?;
        Ok(MetaResponse::TokenCreated { token, info })
    }

    async fn add_meta(&self, addr: String, learner: bool) -> Result<MetaResponse> {
        let info = self
            .pool
            .call(
                &addr,
                &MetaRequest::NodeInfo {},
                self.config.max_frame,
                self.config.request_timeout,
            )
            .await?;
        let MetaResponse::NodeInfo { id, cluster_id, .. } = info else {
            return Err(Error::UnexpectedMessage(format!(
                "{addr} did not say who it is"
            )));
        };
        let ours = self.cluster_id.read().clone().unwrap_or_default();
        match cluster_id {
            Some(theirs) if theirs == ours => {}
            Some(theirs) => {
                return Err(Error::ClusterMismatch(format!(
                    "the meta node at {addr} (id {id}) belongs to cluster {theirs}, this group to cluster {ours}"
                )));
            }
            None => {
                return Err(Error::Unavailable(format!(
                    "the meta node at {addr} (id {id}) has not been started with --join; start it with --join {}",
                    self.advertise
                )));
            }
        }
        self.raft.add_node(id, addr, learner).await?;
        Ok(MetaResponse::Done {})
    }

    async fn transfer_leader(&self, target: NodeId) -> Result<MetaResponse> {
        let pool = self.pool.clone();
        let max_frame = self.config.max_frame;
        let timeout = self.config.request_timeout;
        self.raft
            .transfer_leadership(target, |addr| async move {
                pool.call::<_, MetaResponse>(&addr, &MetaRequest::Campaign {}, max_frame, timeout)
                    .await
                    .map(|_| ())
            })
            .await?;
        Ok(MetaResponse::Done {})
    }

    fn status(&self, local: bool) -> ClusterStatus {
        let raft = self.raft.view();
        let from_leader = raft.is_leader && !local;
        let last = raft.last_log_index.unwrap_or(0);
        let mut nodes: Vec<MetaNodeStatus> = raft
            .voters
            .iter()
            .map(|(id, addr)| (id, addr, true))
            .chain(raft.learners.iter().map(|(id, addr)| (id, addr, false)))
            .map(|(id, addr, voter)| {
                let matched = if from_leader {
                    if *id == self.config.id {
                        raft.last_log_index
                    } else {
                        raft.matched.get(id).copied().flatten()
                    }
                } else {
                    None
                };
                MetaNodeStatus {
                    id: *id,
                    addr: addr.clone(),
                    voter,
                    matched_index: matched,
                    lag: from_leader.then(|| last.saturating_sub(matched.unwrap_or(0))),
                }
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        let (members, epoch, preservation, cluster) = self.raft.state_machine().read(|m| {
            (
                m.state.members.values().cloned().collect::<Vec<Member>>(),
                m.state.table.epoch,
                m.state.self_preservation,
                m.state.cluster_id.clone(),
            )
        });
        let leases = if from_leader {
            let now = Instant::now();
            let book = self.leases.lock();
            members
                .iter()
                .map(|m| LeaseStatus {
                    role: m.role,
                    id: m.id,
                    instance: m.instance,
                    addr: m.addr.clone(),
                    remaining_ms: book
                        .leases
                        .remaining(&m.key(), now)
                        .map_or(0, |d| d.as_millis() as u64),
                })
                .collect()
        } else {
            Vec::new()
        };
        ClusterStatus {
            // Empty until the cluster's creation is applied here.
            cluster_id: cluster,
            answered_by: self.config.id,
            from_leader,
            leader: raft.leader,
            term: raft.term,
            nodes,
            leases,
            table_epoch: epoch,
            self_preservation: preservation,
            last_log_index: raft.last_log_index,
            last_applied: raft.last_applied,
            snapshot_index: raft.snapshot_index,
            purged_index: raft.purged_index,
            snapshots_installed: self.raft.state_machine().snapshots_installed(),
        }
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

/// The meta node's admin view: the Raft group, members, slot table, and its gauges.
struct MetaAdmin {
    node: Arc<Node>,
}

impl AdminSource for MetaAdmin {
    fn refresh_metrics(&self) {
        let raft = self.node.raft.view();
        metrics::gauge!("roster_raft_term").set(raft.term as f64);
        metrics::gauge!("roster_raft_leader_id").set(raft.leader.unwrap_or(0) as f64);
        metrics::gauge!("roster_raft_is_leader").set(if raft.is_leader { 1.0 } else { 0.0 });
        metrics::gauge!("roster_raft_last_log_index").set(raft.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("roster_raft_applied_index").set(raft.last_applied.unwrap_or(0) as f64);
        let (data, sessions, epoch, preservation) = self.node.raft.state_machine().read(|m| {
            let count = |role| m.state.members.values().filter(|x| x.role == role).count();
            (
                count(Role::Data),
                count(Role::Session),
                m.state.table.epoch,
                m.state.self_preservation,
            )
        });
        metrics::gauge!("roster_meta_members", "role" => "data").set(data as f64);
        metrics::gauge!("roster_meta_members", "role" => "session").set(sessions as f64);
        metrics::gauge!("roster_meta_table_epoch").set(epoch as f64);
        metrics::gauge!("roster_self_preservation").set(if preservation { 1.0 } else { 0.0 });
    }

    fn acl(&self) -> Option<roster_common::acl::AclView> {
        self.node
            .raft
            .state_machine()
            .read(|m| m.state.is_initialized().then(|| m.state.acl.clone()))
    }

    fn status(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            let node = &self.node;
            // The leader's status (with replication lag and leases) when it answers in time;
            // this node's own otherwise.
            let status = match tokio::time::timeout(
                FORWARD_TIMEOUT,
                node.handle(MetaRequest::Status { local: false }, false),
            )
            .await
            {
                Ok(Ok(MetaResponse::Status(status))) => status,
                _ => node.status(true),
            };
            let (members, table) = node.raft.state_machine().read(|m| {
                (
                    m.state.members.values().cloned().collect::<Vec<_>>(),
                    m.state.table.clone(),
                )
            });
            serde_json::json!({
                "server": {
                    "role": "meta",
                    "id": node.config.id,
                    "addr": node.advertise,
                    "version": env!("CARGO_PKG_VERSION"),
                },
                "raft": status,
                "members": members,
                "table": table,
            })
        })
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

/// While leading: starts every lease afresh on taking over, creates the cluster's `Init` if it is
/// missing, and expires lapsed members (sessions subject to self-preservation).
async fn keep_leases(node: Arc<Node>, shutdown: CancellationToken) {
    let period = (node.config.lease_timeout / 10).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let raft = node.raft.view();
        if !raft.is_leader {
            node.leases.lock().leader_term = None;
            continue;
        }
        if node.leases.lock().leader_term != Some(raft.term) {
            take_over(&node, raft.term).await;
            continue;
        }
        expire_lapsed(&node).await;
        maybe_rebalance(&node).await;
    }
}

/// Hands a data server that joined its share of leaderships once the table has been stable for
/// `rebalance_delay` (time for the newcomer to copy the slots it follows).
async fn maybe_rebalance(node: &Node) {
    let (epoch, needed) = node
        .raft
        .state_machine()
        .read(|m| (m.state.table.epoch, m.state.needs_rebalance()));
    let settled =
        node.leases
            .lock()
            .table_settled(epoch, Instant::now(), node.config.rebalance_delay);
    if needed && settled {
        match node.raft.write(Command::Rebalance {}).await {
            Ok(_) => info!(epoch, "rebalanced slot leadership over the data servers"),
            Err(e) => debug!(error = %e, "could not rebalance yet"),
        }
    }
}

async fn take_over(node: &Node, term: u64) {
    let (initialized, members) = node.raft.state_machine().read(|m| {
        (
            m.state.is_initialized(),
            m.state
                .members
                .values()
                .map(|m| (m.key(), m.instance))
                .collect::<Vec<_>>(),
        )
    });
    if !initialized {
        let Some(cluster_id) = node.cluster_id.read().clone() else {
            return;
        };
        let admin_token = match &node.config.admin_token {
            Some(token) => {
                let record = TokenRecord::of_token(
                    token.expose(),
                    vec![ANY_NAMESPACE.to_owned()],
                    Permission::ALL.to_vec(),
                    None,
                )
                .map(|mut record| {
                    record.description = "bootstrap admin token".into();
                    record.created_at_ms = unix_millis();
                    record.created_by = format!("meta node {}", node.config.id);
                    record
                });
                match record {
                    Ok(record) => Some(record),
                    Err(e) => {
                        warn!(error = %e, "the admin token is malformed; not creating the cluster");
                        return;
                    }
                }
            }
            None => None,
        };
        let init = Command::Init {
            cluster_id,
            slot_count: node.config.slot_count,
            replicas: node.config.replicas,
            min_data_servers: node.config.min_data_servers,
            admin_token,
        };
        if let Err(e) = node.raft.write(init).await {
            warn!(error = %e, "could not create the cluster yet");
            return;
        }
    }
    let now = Instant::now();
    let mut book = node.leases.lock();
    book.leases = Leases::new(node.config.lease_timeout);
    for (key, instance) in &members {
        book.leases.grant(*key, *instance, now);
    }
    book.leader_term = Some(term);
    info!(
        term,
        members = members.len(),
        "leading the meta group; every lease starts afresh"
    );
}

async fn expire_lapsed(node: &Node) {
    let now = Instant::now();
    let lapsed = node.leases.lock().leases.lapsed(now);
    if lapsed.is_empty()
        && !node
            .raft
            .state_machine()
            .read(|m| m.state.self_preservation)
    {
        return;
    }
    let (sessions, data): (Vec<_>, Vec<_>) = lapsed
        .into_iter()
        .partition(|(key, _)| key.role == Role::Session);
    for (key, instance) in data {
        expire(node, key, instance).await;
    }
    let (live, active) = node.raft.state_machine().read(|m| {
        (
            m.state
                .members
                .keys()
                .filter(|k| k.role == Role::Session)
                .count(),
            m.state.self_preservation,
        )
    });
    let verdict = node
        .leases
        .lock()
        .preservation
        .decide(sessions.len(), live, active, now);
    if let Some(on) = verdict.switch {
        if on {
            warn!(
                lapsed = sessions.len(),
                live,
                "too many session servers lost at once: self-preservation on, not expiring sessions"
            );
        }
        if let Err(e) = node.raft.write(Command::SelfPreservation { on }).await {
            warn!(error = %e, "could not switch self-preservation");
        }
    }
    if verdict.expire {
        for (key, instance) in sessions {
            if expire(node, key, instance).await {
                node.leases.lock().preservation.expired(now);
            }
        }
    }
}

async fn expire(node: &Node, key: MemberKey, instance: u64) -> bool {
    match node.raft.write(Command::Remove { key, instance }).await {
        Ok(_) => {
            info!(member = %key, "lease expired");
            metrics::counter!("roster_lease_expiries_total", "role" => key.role.name())
                .increment(1);
            node.leases.lock().forget(&key);
            true
        }
        Err(e) => {
            warn!(member = %key, error = %e, "could not commit an expiry; will retry");
            false
        }
    }
}
