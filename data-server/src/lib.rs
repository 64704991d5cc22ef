//! The data tier: the publisher records of each slot, ordered by the slot's leader.
//!
//! A data server joins the cluster through the member agent and adopts every slot table the meta
//! tier commits. For each slot it leads it holds the datum of every service in the slot — the live
//! publishers and a version — in [`store::Store`]. Sessions send publisher changes in batches
//! ([`roster_common::proto::DataRequest::WriteBatch`]); the leader applies them in arrival order
//! (refusing a record's replacement by another owner), bumps the datum's version, replicates the
//! ops in order to the slot's followers, and sends every session that registered interest in the
//! service ([`interest::Interests`]) a `Changed` event carrying the change itself, which the
//! session applies to its copy.
//!
//! Followers keep a copy of each slot they follow: fetched whole when they get the seat, then
//! kept by the leader's replication stream, fetched again after a gap, and compared with the
//! leader's digest every `repair_interval` (drift at the same version, or a copy still behind what
//! the leader had at the previous check: a lost last batch). A promoted follower starts from its
//! copy, a server new to the slot from nothing; either way the new leader takes the slot over and
//! serves it only once every live session has reported its digests and synced what differs, or
//! `takeover_timeout` passed.
//!
//! Sessions own their clients' publishers. When the meta tier removes a session server, its
//! publishers here are dropped after `session_grace` ([`owners::OwnerSweep`]) unless they were
//! re-registered through another session meanwhile.
//!
//! Persistent instances belong to no session: the meta group stores them, and the leader of each
//! slot merges the slot's set into its records ([`persistent`]) and removes them only when the
//! meta group's set no longer has them. The slot leader also runs the health checks of the
//! records that carry one ([`health`] for the rise/fall bookkeeping, [`probe`] for the probes)
//! and writes each change of health as a change of the record. Sessions can neither write
//! persistent records nor set a health.
//!
//! Caveats: records live in memory only; sessions are the source of truth, and a slot with no
//! surviving copy is rebuilt from them.

mod admin;
mod checker;
mod copies;
pub mod health;
pub mod interest;
pub mod owners;
pub mod persistent;
pub mod probe;
mod replication;
mod server;
mod shared;
pub mod store;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

use roster_common::peers::FaultTable;
use roster_common::quic::TransportSettings;
use roster_common::{Error, NodeId, Result};

pub use server::DataServer;

/// The default bound on health probes running at once.
pub const DEFAULT_PROBE_CONCURRENCY: usize = 256;

/// How a data server runs. Every field's default is given in its comment.
#[derive(Clone, Debug)]
pub struct DataConfig {
    /// This server's id among data servers (`--id`). Required.
    pub id: NodeId,
    /// Meta node addresses (`--meta`). Required.
    pub metas: Vec<String>,
    /// The address sessions dial (`--advertise`). Default: the listen address, which must then be a
    /// specific IP.
    pub advertise: Option<String>,
    /// Failure zone, reported to the meta tier. Default empty.
    pub zone: String,
    /// How long a departed session's publishers are kept for its clients to re-register elsewhere.
    /// Default 5 s.
    pub session_grace: Duration,
    /// How long a slot being taken over waits for every live session to report its publishers
    /// before it opens without the silent ones (their records arrive when they report). A dead
    /// session stops counting once its lease lapses, so this bound only matters for a session that
    /// is alive but cannot reach this server. Default 10 s.
    pub takeover_timeout: Duration,
    /// How often followed slots are compared with their leader's. Default 10 s.
    pub repair_interval: Duration,
    /// Deadline for a request to a peer. Default 5 s.
    pub request_timeout: Duration,
    /// Largest accepted frame. Default 1 MiB.
    pub max_frame: u32,
    /// QUIC keep-alive and idle timeout. Defaults 1 s and 4 s.
    pub transport: TransportSettings,
    /// Health probes running at once, at most, across every check this server runs; more wait
    /// their turn. Default 256.
    pub probe_concurrency: usize,
    /// Faults injected into this server's calls to its peers (tests only). Default none.
    pub faults: Option<Arc<FaultTable>>,
}

impl DataConfig {
    /// A config with every default, for data server `id` joining through `metas`.
    pub fn new(id: NodeId, metas: Vec<String>) -> Self {
        DataConfig {
            id,
            metas,
            advertise: None,
            zone: String::new(),
            session_grace: Duration::from_secs(5),
            takeover_timeout: Duration::from_secs(10),
            repair_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            max_frame: roster_common::frame::DEFAULT_MAX_FRAME,
            transport: TransportSettings::default(),
            probe_concurrency: DEFAULT_PROBE_CONCURRENCY,
            faults: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.metas.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one meta address is needed (--meta)".into(),
            ));
        }
        if self.probe_concurrency == 0 {
            return Err(Error::InvalidArgument(
                "--probe-concurrency must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
