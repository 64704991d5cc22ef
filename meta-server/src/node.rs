//! A meta node's shared state ([`Node`]) and the requests it serves: members registering and
//! renewing, views, status, meta-group changes, tokens, Raft messages; leader-only requests are
//! forwarded to the leader by followers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use roster_common::peers::PeerPool;
use roster_common::proto::{
    ClusterStatus, ClusterView, LeaseStatus, Member, MemberKey, MetaNodeStatus, MetaRequest,
    MetaResponse,
};
use roster_common::{Error, InstanceId, NodeId, Result, unix_millis};
use tokio::sync::watch;
use tracing::info;

use crate::leases::LeaseBook;
use crate::raft::RaftNode;
use crate::raft::store::Disk;
use crate::state::Command;
use crate::tokens::{TokenRequest, mint};
use crate::{MetaConfig, Start};

/// How long an operator's request to add a meta node may take (it waits for the node to catch up).
pub(crate) const ADD_META_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a follower waits for the leader to answer a forwarded member or read request.
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);

/// What every task of a meta node shares: its config, the Raft node, the peer pool, the leader's
/// lease book and the latest view.
pub(crate) struct Node {
    pub(crate) config: MetaConfig,
    pub(crate) raft: RaftNode,
    pub(crate) disk: Disk,
    /// The cluster this node belongs to; `None` only on a fresh node that has not joined yet.
    pub(crate) cluster_id: Arc<RwLock<Option<String>>>,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) advertise: String,
    pub(crate) leases: Mutex<LeaseBook>,
    pub(crate) view_tx: watch::Sender<Option<Arc<ClusterView>>>,
    /// When a refusal of each foreign node was last logged (they repeat with every heartbeat).
    pub(crate) refusals_logged: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Node {
    /// Records `id` as this node's cluster, refusing a different one.
    pub(crate) fn adopt_cluster(&self, id: &str) -> Result<()> {
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
    pub(crate) fn check_cluster(&self, theirs: &str, from: NodeId) -> Result<()> {
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

    pub(crate) fn leader_addr(&self) -> Result<String> {
        let view = self.raft.view();
        match (view.leader, view.leader_addr) {
            (Some(_), Some(addr)) => Ok(addr),
            _ => Err(Error::NoQuorum("the meta group has no leader".into())),
        }
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.raft.view().is_leader
    }

    /// Sends `request` to the leader and returns its answer.
    pub(crate) async fn forward(
        &self,
        request: MetaRequest,
        timeout: Duration,
    ) -> Result<MetaResponse> {
        let addr = self.leader_addr()?;
        let forwarded = MetaRequest::Forwarded {
            request: Box::new(request),
        };
        self.pool
            .call(&addr, &forwarded, self.config.max_frame, timeout)
            .await
    }

    /// The current view, if the cluster exists.
    pub(crate) fn current_view(&self) -> Option<Arc<ClusterView>> {
        self.view_tx.borrow().clone()
    }

    pub(crate) async fn handle(
        &self,
        request: MetaRequest,
        forwarded: bool,
    ) -> Result<MetaResponse> {
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
                | MetaRequest::RegisterPersistent { .. }
                | MetaRequest::DeregisterPersistent { .. }
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
                subscribers,
            } => self.renew(MemberKey { role, id }, instance, load, subscribers),
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
            MetaRequest::RegisterPersistent { instance } => {
                self.register_persistent(instance).await
            }
            MetaRequest::DeregisterPersistent { service, id, by } => {
                let by = crate::persistent::clean(&by);
                let command = Command::DeregisterPersistent {
                    service: service.clone(),
                    id: id.clone(),
                    by,
                };
                if !self.raft.write(command).await?.changed {
                    return Err(Error::NotFound(format!(
                        "no persistent instance {id:?} in {service}"
                    )));
                }
                Ok(MetaResponse::Done {})
            }
            MetaRequest::PersistentSlot { slot, at_least } => {
                let (version, instances) = self
                    .raft
                    .state_machine()
                    .read(|m| crate::persistent::read_slot(&m.state, slot, at_least))?;
                Ok(MetaResponse::Persistent {
                    slot,
                    version,
                    instances,
                })
            }
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

    pub(crate) async fn register(
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

    pub(crate) fn renew(
        &self,
        key: MemberKey,
        instance: InstanceId,
        load: Option<u64>,
        subscribers: Option<u64>,
    ) -> Result<MetaResponse> {
        let now = Instant::now();
        let mut book = self.leases.lock();
        if let Some(load) = load {
            book.report_load(key, load, subscribers);
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

    pub(crate) async fn leave(&self, key: MemberKey, instance: InstanceId) -> Result<MetaResponse> {
        let applied = self.raft.write(Command::Remove { key, instance }).await?;
        if applied.changed {
            info!(member = %key, "member left");
        }
        self.leases.lock().forget(&key);
        Ok(MetaResponse::Done {})
    }

    pub(crate) async fn create_token(&self, request: TokenRequest) -> Result<MetaResponse> {
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

    /// Stores a persistent instance once it is admissible and, if new, within the bound.
    async fn register_persistent(
        &self,
        mut instance: roster_common::proto::PersistentInstance,
    ) -> Result<MetaResponse> {
        crate::persistent::admit(&mut instance)?;
        let (known, count) = self.raft.state_machine().read(|m| {
            (
                m.state
                    .persistent_instance(&instance.service, &instance.id)
                    .is_some(),
                m.state.persistent_count(),
            )
        });
        // Checked before the write, so two racing registrations may pass it together: the bound
        // is a brake on runaway registration, not an exact quota.
        let max = self.config.max_persistent_instances;
        if !known && count >= max {
            return Err(Error::LimitExceeded(format!(
                "the cluster holds its maximum of {max} persistent instances \
                 (--max-persistent-instances)"
            )));
        }
        self.raft
            .write(Command::RegisterPersistent { instance })
            .await?;
        Ok(MetaResponse::Done {})
    }

    pub(crate) async fn add_meta(&self, addr: String, learner: bool) -> Result<MetaResponse> {
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

    pub(crate) async fn transfer_leader(&self, target: NodeId) -> Result<MetaResponse> {
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

    pub(crate) fn status(&self, local: bool) -> ClusterStatus {
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
                    connections: book.reported(&m.key()).0,
                    subscribers: book.reported(&m.key()).1,
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
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}
