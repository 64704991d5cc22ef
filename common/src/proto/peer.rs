//! The member↔meta link, ALPN `roster-peer/1` with mutual TLS: membership, leases, the cluster
//! view, Raft between meta nodes, persistent instances and tokens. The data tier's links are in
//! [`super::data`].

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::acl::{AclView, Permission, TokenInfo};
use crate::health::CheckSpec;
use crate::ids::{Epoch, InstanceId, NodeId, RegisterId, ServiceId, SlotId, Version};
use crate::slot::slot_of;

/// Which tier a member belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Data,
    Session,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Data => "data",
            Role::Session => "session",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Data => "data",
            Role::Session => "session",
        })
    }
}

/// A member's identity in the meta tier: ids are unique within a role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberKey {
    pub role: Role,
    pub id: NodeId,
}

impl std::fmt::Display for MemberKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.role, self.id)
    }
}

/// A data or session server known to the meta tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub role: Role,
    pub id: NodeId,
    /// The process incarnation; a restart registers a new one.
    pub instance: InstanceId,
    /// The advertised address: peers for a data server, clients for a session server.
    pub addr: String,
    #[serde(default)]
    pub zone: String,
    /// Set by the meta tier when it admits the member (Unix milliseconds).
    #[serde(default)]
    pub joined_at_ms: u64,
    /// The software version the member runs (empty from servers that predate it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

impl Member {
    pub fn key(&self) -> MemberKey {
        MemberKey {
            role: self.role,
            id: self.id,
        }
    }
}

/// Which data servers hold each slot: `slots[s] = [leader, followers...]`, empty while no data
/// server is live. Computed by the meta leader only and committed with a new `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotTable {
    pub epoch: Epoch,
    pub slot_count: u32,
    pub replicas: u32,
    pub slots: Vec<Vec<NodeId>>,
}

impl SlotTable {
    /// The table of a cluster with no data servers yet.
    pub fn empty(slot_count: u32, replicas: u32) -> Self {
        SlotTable {
            epoch: 0,
            slot_count,
            replicas,
            slots: vec![Vec::new(); slot_count as usize],
        }
    }

    pub fn slot_of(&self, service: &ServiceId) -> SlotId {
        slot_of(service, self.slot_count)
    }

    /// The leader of `slot`, if any.
    pub fn leader(&self, slot: SlotId) -> Option<NodeId> {
        self.slots.get(slot as usize)?.first().copied()
    }

    /// The leader of the slot `service` lives in.
    pub fn leader_of(&self, service: &ServiceId) -> Option<NodeId> {
        self.leader(self.slot_of(service))
    }

    /// The slots `node` leads.
    pub fn led_by(&self, node: NodeId) -> impl Iterator<Item = SlotId> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(move |(_, replicas)| replicas.first() == Some(&node))
            .map(|(slot, _)| slot as SlotId)
    }
}

/// What the meta tier pushes to every member: the committed membership and slot table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub cluster_id: String,
    /// Ordered by `(role, id)`.
    pub members: Vec<Member>,
    pub table: SlotTable,
    /// The meta node currently leading, when known (its peer address).
    #[serde(default)]
    pub meta_leader: Option<String>,
    /// Whether clients must authenticate, and the tokens they may present.
    #[serde(default)]
    pub acl: AclView,
    /// The version of each slot's set of persistent instances (slots that never held one are
    /// absent). A slot leader fetches the set with `PersistentSlot` when its version moves.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub persistent: BTreeMap<SlotId, Version>,
}

impl ClusterView {
    pub fn member(&self, role: Role, id: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.role == role && m.id == id)
    }

    /// The advertised address of data server `id`.
    pub fn data_addr(&self, id: NodeId) -> Option<&str> {
        self.member(Role::Data, id).map(|m| m.addr.as_str())
    }

    pub fn members_of(&self, role: Role) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.role == role)
    }
}

/// Requests a meta node serves: from members (data and session servers), from operators
/// (`roster cluster`), and from other meta nodes.
///
/// Writes (`Register`, `Leave`, the membership changes) and lease renewals are carried out by the
/// Raft leader; a follower passes them on (`Forwarded`) and returns the leader's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaRequest {
    /// Joins (or re-joins) the cluster and starts a lease. A member already known under the same
    /// key with another instance is replaced: what the old instance owned is gone.
    Register {
        member: Member,
        /// The cluster the member expects; refused with `ClusterMismatch` if it differs.
        #[serde(default)]
        cluster_id: Option<String>,
    },
    /// Renews the lease of a registered member. `UnknownMember` means it expired: register again.
    /// A session server reports its client connection count as `load`.
    Renew {
        role: Role,
        id: NodeId,
        instance: InstanceId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load: Option<u64>,
        /// A session server's subscription count, reported with its load (shown by the console).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subscribers: Option<u64>,
    },
    /// Leaves the cluster at once, without waiting for the lease to lapse.
    Leave {
        role: Role,
        id: NodeId,
        instance: InstanceId,
    },
    /// Opens a stream of [`ClusterView`] frames: the current view at once, then every change of
    /// the membership, the slot table or the meta leader.
    Watch {},
    /// The current view, once: linearizable (confirmed by the leader) unless `stale` is set, in
    /// which case the answering node's own copy is returned and marked stale.
    GetView {
        #[serde(default)]
        stale: bool,
    },
    /// The meta group's status: from the leader, or this node's own view when `local`.
    Status {
        #[serde(default)]
        local: bool,
    },
    /// Adds the meta node listening at `addr` as a learner; once it has caught up it becomes a
    /// voter unless `learner`.
    AddMeta {
        addr: String,
        #[serde(default)]
        learner: bool,
    },
    /// Removes meta node `id` from the group.
    RemoveMeta { id: NodeId },
    /// Creates a token granting `allow` in `namespaces` (`*`: all), expiring after `ttl_ms` if
    /// given. Answered with `TokenCreated`, the only place the token's secret is ever shown.
    /// `by` names who asks, for the log.
    CreateToken {
        namespaces: Vec<String>,
        allow: Vec<Permission>,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        description: String,
        #[serde(default)]
        by: String,
    },
    /// The tokens, without their secrets (linearizable).
    ListTokens {},
    /// Revokes token `id`: connections that presented it lose their rights.
    RevokeToken {
        id: String,
        #[serde(default)]
        by: String,
    },
    /// Stores (or replaces) a persistent instance; answered `Done` once committed. `by` names who
    /// asked, for the log.
    RegisterPersistent { instance: PersistentInstance },
    /// Removes the persistent instance `id` of `service`; `NotFound` if there is none.
    DeregisterPersistent {
        service: ServiceId,
        id: RegisterId,
        #[serde(default)]
        by: String,
    },
    /// The persistent instances of `slot`, from the answering node's own state, once it has
    /// applied at least version `at_least` of that slot (`Unavailable` before). Answered
    /// `Persistent`.
    PersistentSlot { slot: SlotId, at_least: Version },
    /// Hands leadership to voter `id`.
    TransferLeader { id: NodeId },
    /// Meta ↔ meta: who the answering node is.
    NodeInfo {},
    /// Meta ↔ meta: one Raft message. `payload` is opaque outside the meta tier (the MessagePack
    /// of the Raft library's own message types); `cluster_id` is checked on every message.
    Raft {
        cluster_id: String,
        from: NodeId,
        kind: RaftKind,
        payload: Bytes,
    },
    /// Meta ↔ meta: starts an election on the receiving node (leadership transfer).
    Campaign {},
    /// Meta ↔ meta: a request a follower passes to the leader. Never forwarded again.
    Forwarded { request: Box<MetaRequest> },
}

impl MetaRequest {
    /// The variant's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            MetaRequest::Register { .. } => "Register",
            MetaRequest::Renew { .. } => "Renew",
            MetaRequest::Leave { .. } => "Leave",
            MetaRequest::Watch {} => "Watch",
            MetaRequest::GetView { .. } => "GetView",
            MetaRequest::Status { .. } => "Status",
            MetaRequest::AddMeta { .. } => "AddMeta",
            MetaRequest::RemoveMeta { .. } => "RemoveMeta",
            MetaRequest::CreateToken { .. } => "CreateToken",
            MetaRequest::ListTokens {} => "ListTokens",
            MetaRequest::RevokeToken { .. } => "RevokeToken",
            MetaRequest::RegisterPersistent { .. } => "RegisterPersistent",
            MetaRequest::DeregisterPersistent { .. } => "DeregisterPersistent",
            MetaRequest::PersistentSlot { .. } => "PersistentSlot",
            MetaRequest::TransferLeader { .. } => "TransferLeader",
            MetaRequest::NodeInfo {} => "NodeInfo",
            MetaRequest::Raft { .. } => "Raft",
            MetaRequest::Campaign {} => "Campaign",
            MetaRequest::Forwarded { .. } => "Forwarded",
        }
    }
}

/// The kind of a [`MetaRequest::Raft`] message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RaftKind {
    AppendEntries,
    Vote,
    Snapshot,
}

/// The body of a successful reply to a [`MetaRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaResponse {
    Registered {
        cluster_id: String,
        lease_timeout_ms: u64,
        renew_interval_ms: u64,
    },
    /// `mean_session_load`: the mean of the loads session servers reported, for balancing.
    Renewed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mean_session_load: Option<u64>,
    },
    Done {},
    View {
        view: ClusterView,
        /// True when the view was read from a node's local copy without confirming it with the
        /// leader: it may lag the committed state.
        stale: bool,
    },
    Status(ClusterStatus),
    NodeInfo {
        id: NodeId,
        addr: String,
        /// `None` until the node belongs to a cluster.
        cluster_id: Option<String>,
        leader: Option<NodeId>,
    },
    Raft {
        payload: Bytes,
    },
    /// Answer to `CreateToken`: the token itself (shown once) and what it grants.
    TokenCreated {
        token: String,
        info: TokenInfo,
    },
    /// Answer to `ListTokens`.
    Tokens {
        /// False for a cluster created with `--insecure-no-auth`.
        enabled: bool,
        tokens: Vec<TokenInfo>,
    },
    /// Answer to `PersistentSlot`: the slot's persistent instances at `version`, ordered by
    /// `(service, id)`.
    Persistent {
        slot: SlotId,
        version: Version,
        instances: Vec<PersistentInstance>,
    },
}

/// A persistent instance as the meta group stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentInstance {
    pub service: ServiceId,
    pub id: RegisterId,
    pub data: Vec<Bytes>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// When it was registered (Unix milliseconds), and who registered it (a token id or a
    /// client's name), for people to read.
    #[serde(default)]
    pub registered_ms: u64,
    #[serde(default)]
    pub by: String,
}

/// The meta group as `roster cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// The node that answered, and whether it answered as the leader (with lag and leases).
    pub answered_by: NodeId,
    pub from_leader: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Voters and learners, ordered by id.
    pub nodes: Vec<MetaNodeStatus>,
    /// Lease of every member, as the leader's clock has it (empty when not from the leader).
    pub leases: Vec<LeaseStatus>,
    pub table_epoch: Epoch,
    pub self_preservation: bool,
    /// The answering node's log: last index, last applied, last snapshot, last purged.
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// How many snapshots the answering node installed from a leader since it started.
    pub snapshots_installed: u64,
    /// The software version of the answering node (empty from nodes that predate it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

/// One meta node in a [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNodeStatus {
    pub id: NodeId,
    pub addr: String,
    pub voter: bool,
    /// The last log index known replicated to it (leader's view only).
    pub matched_index: Option<u64>,
    /// Entries it is behind the leader's log (leader's view only).
    pub lag: Option<u64>,
}

/// One member's lease in a [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub role: Role,
    pub id: NodeId,
    pub instance: InstanceId,
    pub addr: String,
    /// Milliseconds until the lease lapses; 0 when it has.
    pub remaining_ms: u64,
    /// What a session server last reported with its renewals: client connections and
    /// subscriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribers: Option<u64>,
}
