//! The session tier: where clients connect, publish and subscribe.
//!
//! A session server accepts clients on ALPN `roster/1` ([`conn`]). It keeps each connection's
//! publishers as the source copy and forwards every change to the slot leader ([`forward`]), one at
//! a time per publisher so order is kept, retrying while no leader is reachable. It registers
//! interest with the slot leader of every service its clients subscribe to, hears of each change on
//! a watch stream, fetches the new datum and pushes it to the subscribers ([`links`], [`hub`]) —
//! never an older version than a subscriber was last pushed. When a connection ends, cleanly or by
//! idle timeout, its subscribers are dropped and its publishers removed from the data tier.
//!
//! Caveats: there is no coalescing window beyond fetch deduplication (changes arriving during a
//! fetch are folded into one more fetch), no periodic comparison of the session's publishers with
//! the data tier, and no per-connection limits beyond the frame size and QUIC's stream limit.

mod admin;
mod conn;
mod forward;
mod gate;
pub mod hub;
mod links;
pub mod owned;
mod server;

use std::time::Duration;

use quinn::VarInt;
use roster_common::quic::TransportSettings;
use roster_common::{Error, NodeId, Result};

pub use server::SessionServer;

/// Push frames queued per connection before it is cut off as too slow, by default.
pub const PUSH_QUEUE: usize = 1024;
/// Application close code: the client did not read its pushes fast enough.
pub const CLOSE_SLOW_CONSUMER: VarInt = VarInt::from_u32(0x10);
/// Application close code: the client broke the protocol (unsupported version).
pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(0x11);
/// Application close code: the server holds its maximum of connections.
pub const CLOSE_FULL: VarInt = VarInt::from_u32(0x12);

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
    /// How long a closed connection's publishers stay before they are removed. Default 0.
    pub client_grace: Duration,
    /// How often this session tells each slot leader the digests of its publishers (besides every
    /// table change), so drift is repaired. Default 10 s.
    pub repair_interval: Duration,
    /// Deadline for a request to a peer. Default 5 s.
    pub request_timeout: Duration,
    /// Largest accepted frame. Default 1 MiB.
    pub max_frame: u32,
    /// QUIC settings towards clients: a dead client is detected within the idle timeout (plus up
    /// to one keep-alive interval: a keep-alive sent into the silence restarts the timer).
    /// Defaults 1 s keep-alive, 3 s idle timeout.
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
    /// How long a change waits for more changes of the same service before it is fetched and
    /// pushed, so bursts cost one push. Default 2 ms.
    pub coalesce_window: Duration,
    /// Push frames queued for one connection (beyond what QUIC flow control holds) before the
    /// client is disconnected as too slow; it reconnects and resyncs. Default 1024.
    pub push_queue: usize,
}

impl SessionConfig {
    /// A config with every default, for session server `id` joining through `metas`.
    pub fn new(id: NodeId, metas: Vec<String>) -> Self {
        SessionConfig {
            id,
            metas,
            advertise: None,
            zone: String::new(),
            client_grace: Duration::ZERO,
            repair_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            max_frame: roster_common::frame::DEFAULT_MAX_FRAME,
            client_transport: TransportSettings {
                idle_timeout: Duration::from_secs(3),
                ..TransportSettings::default()
            },
            peer_transport: TransportSettings::default(),
            drain_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_publishers_per_connection: 10_000,
            max_subscriptions_per_connection: 10_000,
            max_requests_per_connection: 64,
            max_publisher_bytes: 64 << 10,
            coalesce_window: Duration::from_millis(2),
            push_queue: PUSH_QUEUE,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.metas.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one meta address is needed (--meta)".into(),
            ));
        }
        self.client_transport.transport(false)?;
        self.peer_transport.transport(false)?;
        Ok(())
    }
}
