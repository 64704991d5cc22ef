//! The meta tier's Raft group, and the only module that knows it is openraft.
//!
//! [`RaftNode`] is what the rest of the meta server sees: write a [`Command`] through the leader,
//! confirm a read with the leader, manage the voters and learners, and pass incoming Raft messages
//! on. Underneath, openraft 0.9 (v2 storage API) runs on a redb log ([`store`]) and talks to the
//! other meta nodes over QUIC ([`network`]).
//!
//! Two things openraft 0.9 does not do are added here:
//! - **Leadership transfer**: the leader stops heartbeating for one leader lease, then asks the
//!   target to campaign; the target's log is up to date, so it wins.
//! - **Stepping down without a quorum**: a leader that has not heard from a quorum for
//!   [`RaftConfig::step_down_after`] gives up leadership (it records a vote for the next term, which
//!   makes openraft turn it into a follower), so a minority-side leader stops claiming to lead.

mod network;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy, Vote};
use parking_lot::RwLock;
use roster_common::peers::PeerPool;
use roster_common::proto::RaftKind;
use roster_common::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::network::{Network, SnapshotMessage};
use self::store::{Disk, LogStore, StateMachine};
use crate::state::{Applied, Command};

pub type NodeId = u64;

/// What Raft stores about each meta node: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    pub addr: String,
}

impl fmt::Display for MetaNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// The meta tier's Raft types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = MetaNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Vec<u8>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Raft timing and log settings.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// Leader heartbeat interval. Default 100 ms.
    pub heartbeat: Duration,
    /// Election timeout range. Defaults 300–600 ms: a dead leader is replaced in about a second.
    pub election_min: Duration,
    pub election_max: Duration,
    /// Build a snapshot every this many applied entries (ZooKeeper's snapCount). Default 10,000.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, for followers slightly behind. Default 1,000.
    pub keep_behind_snapshot: u64,
    /// Writes are refused with `Overloaded` while more entries than this wait to be applied.
    /// Default 5,000.
    pub max_pending: u64,
    /// A write not committed within this is answered `NoQuorum`. Default 3 s.
    pub write_timeout: Duration,
    /// A leader with no quorum contact for this long steps down. Default 1.2 s.
    pub step_down_after: Duration,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(300),
            election_max: Duration::from_millis(600),
            snapshot_every: 10_000,
            keep_behind_snapshot: 1_000,
            max_pending: 5_000,
            write_timeout: Duration::from_secs(3),
            step_down_after: Duration::from_millis(1_200),
        }
    }
}

/// A meta node's Raft: the handle the server uses.
#[derive(Clone)]
pub struct RaftNode {
    id: NodeId,
    raft: Raft<TypeConfig>,
    config: RaftConfig,
    state_machine: StateMachine,
    network: Network,
    log: LogStore,
    /// The term this node last led in, and since when: a leader that has not yet had a quorum ack
    /// counts its silence from there.
    leading_since: Arc<parking_lot::Mutex<Option<(u64, std::time::Instant)>>>,
}

/// A snapshot of this node's Raft metrics, in plain types.
#[derive(Clone, Debug, Default)]
pub struct RaftView {
    pub leader: Option<NodeId>,
    pub leader_addr: Option<String>,
    pub is_leader: bool,
    pub term: u64,
    pub state: String,
    pub voters: BTreeMap<NodeId, String>,
    pub learners: BTreeMap<NodeId, String>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// Leader only: the last index replicated to each node.
    pub matched: BTreeMap<NodeId, Option<u64>>,
    pub millis_since_quorum_ack: Option<u64>,
}

fn openraft_config(config: &RaftConfig) -> Result<openraft::Config> {
    let c = openraft::Config {
        cluster_name: "roster-meta".into(),
        heartbeat_interval: config.heartbeat.as_millis() as u64,
        election_timeout_min: config.election_min.as_millis() as u64,
        election_timeout_max: config.election_max.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: config.keep_behind_snapshot,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| Error::InvalidArgument(format!("Raft settings: {e}")))
}

impl RaftNode {
    /// Starts Raft for node `id` on `disk`, recovering whatever it holds.
    pub async fn start(
        id: NodeId,
        config: RaftConfig,
        disk: Disk,
        pool: Arc<PeerPool>,
        cluster_id: Arc<RwLock<Option<String>>>,
        max_frame: u32,
    ) -> Result<Self> {
        let raft_config = Arc::new(openraft_config(&config)?);
        let state_machine = StateMachine::open(disk.clone())?;
        let network = Network {
            me: id,
            cluster_id,
            pool,
            max_frame,
        };
        let log = LogStore::new(disk);
        let raft = Raft::new(
            id,
            raft_config,
            network.clone(),
            log.clone(),
            state_machine.clone(),
        )
        .await
        .map_err(|e| Error::Internal(format!("cannot start Raft: {e}")))?;
        Ok(RaftNode {
            id,
            raft,
            config,
            state_machine,
            network,
            log,
            leading_since: Arc::default(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn state_machine(&self) -> &StateMachine {
        &self.state_machine
    }

    /// A receiver that changes whenever Raft's metrics do (leader, term, log positions).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, MetaNode>> {
        self.raft.metrics()
    }

    /// This node's view of the group now.
    pub fn view(&self) -> RaftView {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voter_ids: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut voters = BTreeMap::new();
        let mut learners = BTreeMap::new();
        for (id, node) in membership.nodes() {
            if voter_ids.contains(id) {
                voters.insert(*id, node.addr.clone());
            } else {
                learners.insert(*id, node.addr.clone());
            }
        }
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone()));
        RaftView {
            leader: m.current_leader,
            leader_addr,
            is_leader: m.state == ServerState::Leader,
            term: m.current_term,
            state: format!("{:?}", m.state),
            voters,
            learners,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, log)| (*id, log.map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
        }
    }

    fn not_leader(&self) -> Error {
        let view = self.view();
        match view.leader_addr {
            Some(addr) if view.leader != Some(self.id) => Error::NotLeader { leader: Some(addr) },
            _ => Error::NoQuorum("the meta group has no leader".into()),
        }
    }

    /// How long this leader has gone without a quorum acknowledging it: from the last ack, or
    /// from when it started leading if none came yet. Zero when not leading or leading alone.
    fn quorum_silence(&self, view: &RaftView) -> Duration {
        if !view.is_leader || view.voters.len() < 2 {
            *self.leading_since.lock() = None;
            return Duration::ZERO;
        }
        let since = {
            let mut leading = self.leading_since.lock();
            match *leading {
                Some((term, since)) if term == view.term => since,
                _ => {
                    let now = std::time::Instant::now();
                    *leading = Some((view.term, now));
                    now
                }
            }
        };
        match view.millis_since_quorum_ack {
            Some(ms) => Duration::from_millis(ms),
            None => since.elapsed(),
        }
    }

    /// Fails fast when this node leads but has not heard from a quorum lately.
    fn check_quorum(&self) -> Result<()> {
        let view = self.view();
        if !view.is_leader {
            return Err(self.not_leader());
        }
        let silent = self.quorum_silence(&view);
        if silent > self.config.election_max {
            return Err(Error::NoQuorum(format!(
                "no quorum of meta voters has answered for {} ms",
                silent.as_millis()
            )));
        }
        Ok(())
    }

    /// Commits `command` through this node, which must lead. Fails with `NotLeader`, `NoQuorum`
    /// (no quorum reachable; nothing is left pending) or `Overloaded`.
    pub async fn write(&self, command: Command) -> Result<Applied> {
        self.check_quorum()?;
        let view = self.view();
        check_backlog(
            view.last_log_index,
            view.last_applied,
            self.config.max_pending,
        )?;
        match tokio::time::timeout(self.config.write_timeout, self.raft.client_write(command)).await
        {
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(e)) => Err(self.write_error(e)),
            Err(_) => Err(Error::NoQuorum(format!(
                "the write was not committed within {:?}",
                self.config.write_timeout
            ))),
        }
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, MetaNode>>) -> Error {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
                leader: f.leader_node.map(|n| n.addr),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                Error::InvalidArgument(e.to_string())
            }
            RaftError::Fatal(e) => Error::Internal(format!("Raft stopped: {e}")),
        }
    }

    /// Confirms with a quorum that this node still leads and has applied everything committed
    /// before now: a read after this sees every acknowledged write.
    pub async fn ensure_linearizable(&self) -> Result<()> {
        self.check_quorum()?;
        match tokio::time::timeout(self.config.write_timeout, self.raft.ensure_linearizable()).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(_))) => Err(self.not_leader()),
            Ok(Err(RaftError::Fatal(e))) => Err(Error::Internal(format!("Raft stopped: {e}"))),
            Err(_) => Err(Error::NoQuorum(
                "the leader could not confirm its lease with a quorum".into(),
            )),
        }
    }

    /// Creates a group of `voters` on this node (which must be one of them). Other nodes join it
    /// as the leader replicates.
    pub async fn initialize(&self, voters: BTreeMap<NodeId, String>) -> Result<()> {
        let members: BTreeMap<NodeId, MetaNode> = voters
            .into_iter()
            .map(|(id, addr)| (id, MetaNode { addr }))
            .collect();
        self.raft
            .initialize(members)
            .await
            .map_err(|e| Error::Internal(format!("cannot initialise the meta group: {e}")))
    }

    /// Whether this node has Raft state already (a vote or a log).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Passes one Raft message from another meta node to this node's Raft and encodes the answer.
    pub async fn handle_message(&self, kind: RaftKind, payload: &[u8]) -> Result<Bytes> {
        let decode_err =
            |e: rmp_serde::decode::Error| Error::BadFrame(format!("bad Raft message: {e}"));
        let encoded = match kind {
            RaftKind::AppendEntries => {
                let request: AppendEntriesRequest<TypeConfig> =
                    rmp_serde::from_slice(payload).map_err(decode_err)?;
                rmp_serde::to_vec_named(&self.raft.append_entries(request).await)
            }
            RaftKind::Vote => {
                let request: VoteRequest<NodeId> =
                    rmp_serde::from_slice(payload).map_err(decode_err)?;
                rmp_serde::to_vec_named(&self.raft.vote(request).await)
            }
            RaftKind::Snapshot => {
                let message: SnapshotMessage =
                    rmp_serde::from_slice(payload).map_err(decode_err)?;
                let snapshot = openraft::Snapshot {
                    meta: message.meta,
                    snapshot: Box::new(message.data),
                };
                rmp_serde::to_vec_named(
                    &self
                        .raft
                        .install_full_snapshot(message.vote, snapshot)
                        .await,
                )
            }
        };
        encoded
            .map(Bytes::from)
            .map_err(|e| Error::Internal(format!("cannot encode a Raft answer: {e}")))
    }

    /// Adds node `id` at `addr` as a learner, waits until it has caught up, then makes it a voter
    /// unless `learner`. Must run on the leader.
    pub async fn add_node(&self, id: NodeId, addr: String, learner: bool) -> Result<()> {
        self.check_quorum()?;
        let view = self.view();
        if view.voters.contains_key(&id) {
            return Ok(());
        }
        if !view.learners.contains_key(&id) {
            info!(node = id, %addr, "adding a meta node as a learner");
        }
        let catch_up = Duration::from_secs(120);
        match tokio::time::timeout(catch_up, self.raft.add_learner(id, MetaNode { addr }, true))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(self.write_error(e)),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "meta node {id} did not catch up within {catch_up:?}; it stays a learner"
                )));
            }
        }
        info!(node = id, "meta node caught up");
        if learner {
            return Ok(());
        }
        let voters = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        match tokio::time::timeout(
            self.config.write_timeout * 4,
            self.raft.change_membership(voters, false),
        )
        .await
        {
            Ok(Ok(_)) => {
                info!(node = id, "meta node is now a voter");
                Ok(())
            }
            Ok(Err(e)) => Err(self.write_error(e)),
            Err(_) => Err(Error::NoQuorum(
                "the membership change was not committed in time".into(),
            )),
        }
    }

    /// Removes node `id` (voter or learner) from the group. Must run on the leader.
    pub async fn remove_node(&self, id: NodeId) -> Result<()> {
        self.check_quorum()?;
        let view = self.view();
        let change = if view.voters.contains_key(&id) {
            if view.voters.len() == 1 {
                return Err(Error::InvalidArgument(format!(
                    "meta node {id} is the only voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if view.learners.contains_key(&id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(Error::NotFound(format!(
                "meta node {id} is not in the group"
            )));
        };
        match tokio::time::timeout(
            self.config.write_timeout * 4,
            self.raft.change_membership(change, false),
        )
        .await
        {
            Ok(Ok(_)) => {
                info!(node = id, "meta node removed from the group");
                Ok(())
            }
            Ok(Err(e)) => Err(self.write_error(e)),
            Err(_) => Err(Error::NoQuorum(
                "the membership change was not committed in time".into(),
            )),
        }
    }

    /// Hands leadership to voter `target`, which `campaign` asks to stand for election. Must run
    /// on the leader.
    pub async fn transfer_leadership<F, Fut>(&self, target: NodeId, campaign: F) -> Result<()>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        self.check_quorum()?;
        let view = self.view();
        if target == self.id {
            return Ok(());
        }
        let Some(addr) = view.voters.get(&target).cloned() else {
            return Err(Error::InvalidArgument(format!(
                "meta node {target} is not a voter"
            )));
        };
        let last = view.last_log_index;
        if view.matched.get(&target).copied().flatten() != last {
            return Err(Error::Unavailable(format!(
                "meta node {target} has not caught up with the log yet; try again"
            )));
        }
        info!(target, "handing meta leadership over");
        // Let the voters' leader lease run out so they will vote for the target.
        self.raft.runtime_config().heartbeat(false);
        tokio::time::sleep(self.config.election_max + self.config.heartbeat).await;
        let asked = campaign(addr).await;
        let mut changes = self.raft.metrics();
        let outcome = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                if changes.borrow_and_update().current_leader == Some(target) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.raft.runtime_config().heartbeat(true);
        asked?;
        outcome.map_err(|_| {
            Error::Unavailable(format!("meta node {target} did not take over in time"))
        })
    }

    /// Stands for election now (the target side of a leadership transfer).
    pub async fn campaign(&self) -> Result<()> {
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Error::Internal(format!("Raft stopped: {e}")))
    }

    /// Watches for losing the quorum while leading, and steps down when it lasts. Runs until
    /// `shutdown`.
    pub async fn step_down_without_quorum(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let view = self.view();
            let silent = self.quorum_silence(&view);
            if silent < self.config.step_down_after {
                continue;
            }
            let Some(other) = view.voters.keys().copied().find(|id| *id != self.id) else {
                continue;
            };
            warn!(
                silent_ms = silent.as_millis() as u64,
                "no quorum of meta voters answers: stepping down"
            );
            // Granting a vote for the next term to another voter turns this node into a follower.
            let mut log = self.log.clone();
            let last_log_id = match openraft::storage::RaftLogStorage::get_log_state(&mut log).await
            {
                Ok(state) => state.last_log_id,
                Err(e) => {
                    warn!(error = %e, "cannot read the log to step down");
                    continue;
                }
            };
            let request = VoteRequest::new(Vote::new(view.term + 1, other), last_log_id);
            if let Err(e) = self.raft.vote(request).await {
                warn!(error = %e, "could not step down");
            }
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    /// The cluster id this node's RPCs carry.
    pub fn set_cluster_id(&self, id: String) {
        *self.network.cluster_id.write() = Some(id);
    }
}

/// Backpressure: refuses a write while more than `max_pending` log entries wait to be applied
/// (the log's last index stands in for the commit index, which it bounds from above).
fn check_backlog(last_log: Option<u64>, applied: Option<u64>, max_pending: u64) -> Result<()> {
    let pending = last_log.unwrap_or(0).saturating_sub(applied.unwrap_or(0));
    if pending > max_pending {
        return Err(Error::Overloaded(format!(
            "{pending} meta log entries wait to be applied (limit {max_pending})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_past_the_backlog_limit() {
        assert!(check_backlog(None, None, 5_000).is_ok());
        assert!(check_backlog(Some(10_000), Some(5_000), 5_000).is_ok());
        let err = check_backlog(Some(10_001), Some(5_000), 5_000).unwrap_err();
        assert!(
            matches!(&err, Error::Overloaded(m) if m.contains("5001")),
            "{err:?}"
        );
        assert!(err.is_retryable());
    }
}
