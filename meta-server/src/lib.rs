//! The meta tier: who is in the cluster, whose lease is live, and which data servers hold each slot.
//!
//! Three or five meta nodes form one Raft group ([`raft`], openraft on a redb log). Everything that
//! changes the cluster's shape — a member joining or leaving, a lease expiring, self-preservation
//! switching — is a [`state::Command`] in the replicated log, applied in order to the
//! [`state::MetaState`] on every node; a change in the set of data servers recomputes the slot table
//! ([`placement::place`]) under a new epoch. Snapshots of the state machine are taken every
//! `snapshot_every` entries and the log is compacted behind them.
//!
//! Any meta node serves. Writes and lease renewals go to the leader (a follower forwards them);
//! reads of the view are linearizable by default (the leader confirms its lease with a quorum) or
//! local and marked stale when asked. Data and session servers hold a watch stream on which every
//! committed view — and every change of meta leader — is pushed.
//!
//! Leases (default: renew every 1 s, expire after 3 s) are clocks in the leader's memory; only
//! expiries are committed. A new leader starts every lease afresh, with one lease more for the
//! members to find it, so a failover never expires a member that was renewing. Expiring session servers is held back by self-preservation
//! ([`leases::Preservation`]); data servers are always expired (moving slots loses nothing), but the
//! table freezes below `min_data_servers`.
//!
//! Start-up never makes two clusters by accident: a node with state recovers it; a fresh node
//! creates a cluster only with `bootstrap` (the initial voters, all started alike; the lowest id
//! creates it) or joins one with `join`. The cluster id is stored and carried on every Raft message;
//! a node of another cluster is refused with both ids named.
//!
//! Access rules live here too: whether the cluster asks clients for tokens (fixed when it is
//! created: on when it is created with an admin token), and the tokens, each a
//! [`roster_common::acl::TokenRecord`] holding only the digest of its secret. Creating and
//! revoking them are commands like any other ([`tokens::mint`] draws a new one on the leader);
//! every member receives them in the view.
//!
//! Caveats: self-preservation ends only when leases come back (there is no operator override yet);
//! leadership transfer pauses heartbeats for one election timeout.

mod entry;
mod leader;
pub mod leases;
mod node;
pub mod persistent;
pub mod placement;
pub mod raft;
mod server;
pub mod state;
mod status;
pub mod tokens;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use roster_common::acl::Secret;
use roster_common::quic::TransportSettings;
use roster_common::slot::DEFAULT_SLOT_COUNT;
use roster_common::{Error, NodeId, Result};

pub use raft::RaftConfig;
pub use server::MetaServer;

/// How a new meta node enters a cluster. A node with state on disk ignores this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Create the cluster with these voters (id → address); every one of them is started with the
    /// same list, and the one with the lowest id creates it.
    Bootstrap(BTreeMap<NodeId, String>),
    /// Join the cluster of the meta node at this address; stay a learner if `learner`.
    Join { addr: String, learner: bool },
    /// Only recover: a node without state refuses to start.
    Recover,
}

/// How a meta node runs. Every field's default is given in its comment.
#[derive(Clone, Debug)]
pub struct MetaConfig {
    /// This node's id (`--id`). Required.
    pub id: NodeId,
    /// Where the node keeps its log, vote and snapshots (`--data-dir`). Required.
    pub data_dir: PathBuf,
    /// How a fresh node enters a cluster (`--bootstrap`, `--join`). Default: recover only.
    pub start: Start,
    /// The address other meta nodes and members dial (`--advertise`). Default: the listen
    /// address, which must then be a specific IP.
    pub advertise: Option<String>,
    /// Slots in a new cluster; fixed once the cluster exists. Default 256.
    pub slot_count: u32,
    /// Data servers per slot (leader plus followers), capped by how many are live. Default 3.
    pub replicas: u32,
    /// Below this many live data servers the slot table is frozen. Default 0 (never).
    pub min_data_servers: u32,
    /// Silence after which a member is removed. Default 3 s.
    pub lease_timeout: Duration,
    /// How often members are asked to renew. Default 1 s.
    pub renew_interval: Duration,
    /// Self-preservation engages when more than this share of session servers is lost within
    /// `preservation_window`. Default 0.5.
    pub preservation_share: f64,
    /// Default 10 s.
    pub preservation_window: Duration,
    /// How long a changed slot table must stand before leadership is rebalanced onto data servers
    /// that joined (they first serve as followers). Default 5 s.
    pub rebalance_delay: Duration,
    /// Raft timing, snapshots, backpressure.
    pub raft: RaftConfig,
    /// Deadline for a request to another meta node. Default 5 s.
    pub request_timeout: Duration,
    /// Largest accepted frame. Default 64 MiB: a snapshot of the meta state travels in one frame.
    pub max_frame: u32,
    /// QUIC keep-alive and idle timeout. Defaults 1 s and 4 s.
    pub transport: TransportSettings,
    /// The admin token a new cluster is created with, which turns authentication on
    /// (`--admin-token-file`). `None` creates a cluster without authentication
    /// (`--insecure-no-auth`). Only the node that creates the cluster uses it. Default `None`.
    pub admin_token: Option<Secret>,
    /// The most persistent instances the cluster stores; registering a new one past it is refused
    /// with `LimitExceeded`. Default 100,000 (their snapshot must fit in `max_frame`).
    pub max_persistent_instances: usize,
}

/// The default frame limit of meta nodes: a snapshot of the meta state, persistent instances
/// included, travels in one frame.
pub const DEFAULT_META_MAX_FRAME: u32 = 64 << 20;
/// The default bound on stored persistent instances.
pub const DEFAULT_MAX_PERSISTENT_INSTANCES: usize = 100_000;

impl MetaConfig {
    /// A config with every default, for node `id` keeping its state in `data_dir`.
    pub fn new(id: NodeId, data_dir: PathBuf) -> Self {
        MetaConfig {
            id,
            data_dir,
            start: Start::Recover,
            advertise: None,
            slot_count: DEFAULT_SLOT_COUNT,
            replicas: 3,
            min_data_servers: 0,
            lease_timeout: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            preservation_share: 0.5,
            preservation_window: Duration::from_secs(10),
            rebalance_delay: Duration::from_secs(5),
            raft: RaftConfig::default(),
            request_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_META_MAX_FRAME,
            transport: TransportSettings::default(),
            admin_token: None,
            max_persistent_instances: DEFAULT_MAX_PERSISTENT_INSTANCES,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.slot_count == 0 || self.slot_count > 65_536 {
            return Err(Error::InvalidArgument(format!(
                "slot count {} must be between 1 and 65536",
                self.slot_count
            )));
        }
        if self.replicas == 0 {
            return Err(Error::InvalidArgument("replicas must be at least 1".into()));
        }
        if self.renew_interval >= self.lease_timeout {
            return Err(Error::InvalidArgument(format!(
                "renew interval {:?} must be shorter than the lease timeout {:?}",
                self.renew_interval, self.lease_timeout
            )));
        }
        if !(0.0..=1.0).contains(&self.preservation_share) {
            return Err(Error::InvalidArgument(
                "the self-preservation share must be within 0..=1".into(),
            ));
        }
        if let Some(token) = &self.admin_token {
            roster_common::acl::token_id("the admin token", token.expose())?;
        }
        if let Start::Bootstrap(voters) = &self.start
            && !voters.contains_key(&self.id)
        {
            return Err(Error::InvalidArgument(format!(
                "the bootstrap voters {} do not include this node (id {})",
                voters
                    .keys()
                    .map(|id| id.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                self.id
            )));
        }
        Ok(())
    }
}

/// Whether `data_dir` holds a meta node's state: then the node recovers it, and `--bootstrap` or
/// `--join` (and what comes with them, such as the admin token) do not apply.
pub fn holds_state(data_dir: &std::path::Path) -> Result<bool> {
    if !data_dir.join(raft::store::DB_FILE).exists() {
        return Ok(false);
    }
    let disk = raft::store::Disk::open(data_dir)?;
    Ok(disk.has_raft_state()? || disk.cluster_id()?.is_some())
}

/// Parses `ID=ADDR,ID=ADDR,...`.
pub fn parse_voters(text: &str) -> Result<BTreeMap<NodeId, String>> {
    let mut voters = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| Error::InvalidArgument(format!("{part:?} is not ID=ADDR")))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("{id:?} in {part:?} is not a node id")))?;
        if voters.insert(id, addr.trim().to_owned()).is_some() {
            return Err(Error::InvalidArgument(format!("node {id} is listed twice")));
        }
    }
    if voters.is_empty() {
        return Err(Error::InvalidArgument("the voter list is empty".into()));
    }
    Ok(voters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voter_lists_parse_and_refuse_mistakes() {
        let voters = parse_voters("1=10.0.0.1:7100, 2=10.0.0.2:7100,3=meta-2.meta:7100").unwrap();
        assert_eq!(voters.len(), 3);
        assert_eq!(voters[&3], "meta-2.meta:7100");
        assert!(parse_voters("1=a,1=b").is_err());
        assert!(parse_voters("x=a").is_err());
        assert!(parse_voters("1").is_err());
        assert!(parse_voters("").is_err());
    }

    #[test]
    fn a_bootstrap_list_must_include_the_node() {
        let mut config = MetaConfig::new(4, "x".into());
        config.start = Start::Bootstrap(parse_voters("1=a,2=b,3=c").unwrap());
        assert!(matches!(config.validate(), Err(Error::InvalidArgument(m)) if m.contains("id 4")));
    }
}
