//! The meta tier: who is in the cluster, whose lease is live, and which data servers hold each slot.
//!
//! Data and session servers register with a meta node and renew a lease every `renew_interval`
//! (1 s). A member that stays silent for `lease_timeout` (3 s) is removed. Every change of
//! membership is a [`state::Command`] applied to the [`state::MetaState`] — the one way that state
//! changes — and a change in the set of data servers recomputes the slot table
//! ([`placement::place`]) under a new epoch. Members hold a watch stream and receive each new
//! [`roster_common::proto::ClusterView`] as soon as it is committed; they never recompute the table.
//!
//! Lease clocks are kept in memory only: on start every recovered member gets a fresh lease, so a
//! restarted meta node never expires a member that was renewing all along.
//!
//! Caveats: this node serves alone. Its state is durable (an fsynced file, replaced atomically on
//! every change) but not replicated; losing the meta node stops joins and expiries until it
//! returns, while data and session servers keep working on the last table they received.

mod disk;
pub mod leases;
pub mod placement;
mod server;
pub mod state;

use std::path::PathBuf;
use std::time::Duration;

use roster_common::quic::TransportSettings;
use roster_common::slot::DEFAULT_SLOT_COUNT;
use roster_common::{Error, NodeId, Result};

pub use server::MetaServer;

/// How a meta node runs. Every field's default is given in its comment.
#[derive(Clone, Debug)]
pub struct MetaConfig {
    /// This node's id (`--id`). Required.
    pub id: NodeId,
    /// Where the node keeps its state (`--data-dir`). Required.
    pub data_dir: PathBuf,
    /// Slots in a new cluster; fixed once the cluster exists. Default 256.
    pub slot_count: u32,
    /// Data servers per slot (leader plus followers), capped by how many are live. Default 3.
    pub replicas: u32,
    /// Silence after which a member is removed. Default 3 s.
    pub lease_timeout: Duration,
    /// How often members are asked to renew. Default 1 s.
    pub renew_interval: Duration,
    /// Largest accepted frame. Default 1 MiB.
    pub max_frame: u32,
    /// QUIC keep-alive and idle timeout. Defaults 1 s and 4 s.
    pub transport: TransportSettings,
}

impl MetaConfig {
    /// A config with every default, for node `id` keeping its state in `data_dir`.
    pub fn new(id: NodeId, data_dir: PathBuf) -> Self {
        MetaConfig {
            id,
            data_dir,
            slot_count: DEFAULT_SLOT_COUNT,
            replicas: 3,
            lease_timeout: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            max_frame: roster_common::frame::DEFAULT_MAX_FRAME,
            transport: TransportSettings::default(),
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
        Ok(())
    }
}
