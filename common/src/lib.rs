//! What every Roster process shares: the wire protocol and the machinery to speak it.
//!
//! Roster has three tiers (see `docs/ARCHITECTURE.md`): session servers hold client connections, data
//! servers own slots of publisher records, and the meta tier tracks membership and the slot table. The
//! tiers talk only through the types in this crate:
//!
//! - [`proto`] holds one request enum and one response enum per link (client↔session, member↔meta,
//!   session↔data), plus the push and event streams. `docs/PROTOCOL.md` is their specification.
//! - [`frame`] is the codec: a 4-byte big-endian length, then MessagePack with named fields. Frames above
//!   a configured limit are refused before they are read. [`push`] assembles push frames from
//!   publishers encoded once.
//! - [`error`] is the one error type whose code crosses the wire, with the classification callers act on
//!   (`is_retryable`, `NotLeader { leader }`, `SlotMoving { retry_after }`).
//! - [`quic`] and [`tls`] build QUIC endpoints (quinn with rustls and the ring provider) and the dev PKI.
//! - [`rpc`] runs one request on one bidirectional stream; [`peers`] keeps one connection per peer.
//! - [`member`] is the agent every data and session server runs to join the cluster: it registers with
//!   the meta tier, renews its lease, and receives each new [`proto::ClusterView`] as it is committed.
//! - [`ids`] and [`slot`] hold the domain names and the fixed slot hash; [`acl`] holds tokens and the
//!   checks every server runs on them.
//!
//! Caveats: the member agent talks to one meta address at a time and follows pushed leader changes; it
//! does not probe the meta tier for a better node by itself.

pub mod acl;
pub mod admin;
pub mod error;
pub mod frame;
pub mod health;
pub mod ids;
pub mod member;
pub mod peers;
pub mod proto;
pub mod push;
pub mod quic;
pub mod rpc;
pub mod serve;
pub mod slot;
pub mod tls;

pub use error::{Error, ErrorCode, Result};
pub use ids::{ClientId, Epoch, InstanceId, NodeId, RegisterId, ServiceId, SlotId, Version};

/// Installs the ring crypto provider as rustls' process default. Safe to call more than once.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Milliseconds since the Unix epoch, for records that carry wall-clock times for people to read
/// (join times) and for token expiry; never used for ordering.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
