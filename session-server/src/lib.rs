//! The session tier: where clients connect, publish and subscribe.
//!
//! A session server accepts clients on ALPN `roster/1` ([`conn`]). It keeps each connection's
//! publishers as the source copy and forwards every change to the slot leader ([`batching`]
//! decides, [`forward`] sends), one at a time per publisher so order is kept, in batches per slot
//! leader, retrying while no leader is reachable. It registers interest with the slot leader of every service its clients subscribe
//! to and hears of each change on a watch stream — the change itself, which it applies to its copy
//! of the datum — and pushes each subscriber what changed since its last push, or the whole
//! snapshot when that is smaller or the subscriber has nothing yet ([`links`], [`hub`]), never an
//! older version than it was last pushed. When a connection ends, its subscribers are dropped;
//! its publishers are removed from the data tier at once if the client closed it, or after
//! `client_grace` if it was lost — unless the same client comes back within the grace, when they
//! stay.
//!
//! Changes that arrive while a push of a service is still being written merge into the next one
//! ([`hub`]); a quiet service's change goes at once. Each connection is held to limits (connections
//! per server, publishers, subscriptions and requests per connection, publisher size). Where the
//! cluster checks tokens, `Hello` is authenticated ([`hello`]) and each request authorized against
//! the token's namespaces ([`conn`]). Persistent instances are checked the same way and stored by
//! the meta group, not here ([`persistent`]); a healthy-only subscription is pushed snapshots of
//! the healthy publishers ([`hub`]). Session servers balance their connection counts and drain on
//! shutdown with `GoAway`; [`links`] also decides when the data tier gets this session's digests,
//! and [`repair`] sends them and the syncs they call for. The tasks share [`shared::Shared`].
//! Every session server also serves the web console, a read-only view of the whole cluster, on
//! its HTTP admin port ([`console`], [`SessionServer::console`]), and with `--dns` answers DNS
//! queries for services from the copies it keeps for subscribers ([`dns`]).
//!
//! Caveats: a snapshot must fit in one frame (`max_frame`), so a service's publishers together are
//! limited to about 1 MiB by default.

mod admin;
pub mod balance;
mod batching;
mod clients;
mod conn;
mod console;
pub mod dns;
mod forward;
mod gate;
mod hello;
pub mod hub;
mod links;
pub mod owned;
mod persistent;
mod pushes;
mod repair;
mod server;
mod shared;

use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use roster_common::peers::FaultTable;
use roster_common::quic::TransportSettings;
use roster_common::{Error, NodeId, Result, proto};

pub use console::ConsoleSlot;
pub use dns::{DnsConfig, DnsSockets};
pub use hub::Pacing;
pub use server::SessionServer;

/// Application close code: the client's push stream made no progress for `push_stall_timeout`.
pub const CLOSE_SLOW_CONSUMER: VarInt = VarInt::from_u32(proto::CLOSE_SLOW_CONSUMER);
/// Application close code: the client broke the protocol (unsupported version).
pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(proto::CLOSE_PROTOCOL);
/// Application close code: the server holds its maximum of connections.
pub const CLOSE_FULL: VarInt = VarInt::from_u32(proto::CLOSE_FULL);
/// Closes a connection whose token was revoked or expired, or that presented none that is valid.
pub const CLOSE_UNAUTHENTICATED: VarInt = VarInt::from_u32(proto::CLOSE_UNAUTHENTICATED);

/// How a session server runs. Every field's default is given in its comment.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// This server's id among session servers (`--id`). Required.
    pub id: NodeId,
    /// Meta node addresses (`--meta`). Required.
    pub metas: Vec<String>,
    /// The address clients dial, reported to the meta tier (`--advertise`). Default: the listen
    /// address, which must then be a specific IP.
    pub advertise: Option<String>,
    /// Failure zone, reported to the meta tier. Default empty.
    pub zone: String,
    /// How long the publishers of a lost connection (timed out, reset: not closed by the client)
    /// stay before they are removed; the same client connecting again within it keeps them.
    /// Default 1 s.
    pub client_grace: Duration,
    /// How often this session tells each slot leader the digests of its publishers (besides every
    /// table change), so drift is repaired. Default 10 s.
    pub repair_interval: Duration,
    /// Deadline for a request to a peer. Default 5 s.
    pub request_timeout: Duration,
    /// Largest accepted frame. Default 1 MiB.
    pub max_frame: u32,
    /// QUIC settings towards clients: a dead client is detected within the idle timeout (plus up
    /// to one keep-alive interval: a keep-alive sent into the silence restarts the timer), and its
    /// publishers go `client_grace` later. Defaults 1 s keep-alive, 2.5 s idle timeout.
    pub client_transport: TransportSettings,
    /// QUIC settings towards meta and data servers. Defaults 1 s and 4 s.
    pub peer_transport: TransportSettings,
    /// How long a shutting-down server waits for its clients to move after `GoAway`. Default 10 s.
    pub drain_timeout: Duration,
    /// Client connections this server accepts; `Hello` beyond it answers `LimitExceeded`.
    /// Default 100,000.
    pub max_connections: usize,
    /// Publishers one connection may hold. Default 10,000.
    pub max_publishers_per_connection: usize,
    /// Subscriptions one connection may hold. Default 10,000.
    pub max_subscriptions_per_connection: usize,
    /// Requests one connection may have outstanding at once. Default 64.
    pub max_requests_per_connection: u32,
    /// Largest publisher: its data plus attribute keys and values, in bytes. Default 64 KiB.
    pub max_publisher_bytes: usize,
    /// How often one service is pushed to one connection (`--coalesce-ms`, `--coalesce-burst`):
    /// up to `burst` pushes at once, then one per window — 20 times how late the client answers
    /// (its smoothed round trip above its shortest, beyond 1 ms), at most `window` — each
    /// carrying every change since the one before ([`hub::Pacing`]). A client that keeps up is
    /// not paced at all; one whose process is saturated acknowledges late and gets fewer, larger
    /// pushes. Changes that arrive while the connection's writer is busy are merged into its next
    /// push whatever this says; a zero window adds nothing to that. Default 100 ms and 2.
    pub pacing: Pacing,
    /// How long a write to a client's push stream may make no progress (the client reads nothing
    /// and QUIC flow control holds the server back) before the connection is closed with
    /// [`CLOSE_SLOW_CONSUMER`]. A client that reads slowly is not cut off: its pushes merge.
    /// Default 30 s.
    pub push_stall_timeout: Duration,
    /// How often the server compares its connection count with the mean and asks clients to move
    /// when well above it (`--balance-interval-ms`). Default 5 s.
    pub balance_interval: Duration,
    /// Above this share of a service's publishers unhealthy, a healthy-only subscriber is pushed
    /// all of them, marked, rather than the few healthy ones (`--protection-threshold`, 0 to 1: at
    /// 0 one unhealthy publisher shows them all, at 1 the unhealthy are always hidden). Default
    /// 0.5.
    pub protection_threshold: f64,
    /// How the DNS interface answers, when it is served ([`SessionServer::serve_dns`]).
    pub dns: DnsConfig,
    /// Faults injected into this server's calls to its peers (tests only). Default none.
    pub faults: Option<Arc<FaultTable>>,
}

impl SessionConfig {
    /// A config with every default, for session server `id` joining through `metas`.
    pub fn new(id: NodeId, metas: Vec<String>) -> Self {
        SessionConfig {
            id,
            metas,
            advertise: None,
            zone: String::new(),
            client_grace: Duration::from_secs(1),
            repair_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            max_frame: roster_common::frame::DEFAULT_MAX_FRAME,
            client_transport: TransportSettings {
                idle_timeout: Duration::from_millis(2500),
                ..TransportSettings::default()
            },
            peer_transport: TransportSettings::default(),
            drain_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_publishers_per_connection: 10_000,
            max_subscriptions_per_connection: 10_000,
            max_requests_per_connection: 64,
            max_publisher_bytes: 64 << 10,
            pacing: Pacing {
                window: Duration::from_millis(100),
                burst: 2,
            },
            push_stall_timeout: Duration::from_secs(30),
            balance_interval: Duration::from_secs(5),
            protection_threshold: roster_common::health::DEFAULT_PROTECTION_THRESHOLD,
            dns: DnsConfig::default(),
            faults: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.pacing.burst == 0 {
            return Err(Error::InvalidArgument(
                "--coalesce-burst 0: at least one push per window must be allowed".into(),
            ));
        }
        if self.balance_interval.is_zero() {
            return Err(Error::InvalidArgument(
                "the balance interval must be above zero".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.protection_threshold) {
            return Err(Error::InvalidArgument(format!(
                "--protection-threshold {}: expected a share of a service's publishers, from 0 \
                 to 1 (0.5 is half)",
                self.protection_threshold
            )));
        }
        if self.metas.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one meta address is needed (--meta)".into(),
            ));
        }
        if self.push_stall_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "the push stall timeout must be more than zero".into(),
            ));
        }
        self.client_transport.transport(false)?;
        self.peer_transport.transport(false)?;
        self.dns.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protection_threshold_is_a_share() {
        let mut config = SessionConfig::new(1, vec!["127.0.0.1:7000".into()]);
        for ok in [0.0, 0.5, 1.0] {
            config.protection_threshold = ok;
            assert!(config.validate().is_ok(), "{ok}");
        }
        for bad in [-0.1, 1.5, f64::NAN] {
            config.protection_threshold = bad;
            let refused = config.validate().unwrap_err();
            assert!(
                refused.to_string().contains("--protection-threshold"),
                "{refused}"
            );
        }
    }

    #[test]
    fn pacing_lets_at_least_one_push_through() {
        let mut config = SessionConfig::new(1, vec!["127.0.0.1:7000".into()]);
        config.pacing.burst = 0;
        let refused = config.validate().unwrap_err();
        assert!(
            refused.to_string().contains("--coalesce-burst"),
            "{refused}"
        );
        config.pacing.burst = 1;
        assert!(config.validate().is_ok());
    }
}
