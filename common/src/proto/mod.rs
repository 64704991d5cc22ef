//! Every message of every link, in one place. `docs/PROTOCOL.md` is their specification.
//!
//! Each link has one request enum and one response enum. A request travels alone on a fresh
//! bidirectional stream and is answered by one [`Reply`] frame on the same stream; the long-lived
//! streams (`Watch` requests, the client push stream) carry a sequence of frames instead.
//!
//! Enums use serde's external tagging, so every message is a MessagePack map with one key, the
//! variant name, whose value is a map of named fields: `{"Publish": {"register_id": "r1", ...}}`.

mod client;
mod peer;

pub use client::{
    ClientRequest, ClientResponse, PublisherView, Push, Scope, ServiceSummary, Snapshot,
};
pub use peer::{
    ClusterView, DataEvent, DataRequest, DataResponse, Member, MemberKey, MetaRequest,
    MetaResponse, Publisher, Role, SlotTable, WriteOp,
};

use crate::error::{Error, WireError};

/// The version of `roster/1` this build speaks, sent in `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// ALPN of the client link.
pub const ALPN_CLIENT: &[u8] = b"roster/1";
/// ALPN of every server-to-server link (mutual TLS).
pub const ALPN_PEER: &[u8] = b"roster-peer/1";

/// A response frame: `{"Ok": body}` or `{"Err": {code, message, ...}}`.
pub type Reply<T> = std::result::Result<T, WireError>;

/// Turns a local result into a reply frame.
pub fn reply<T>(result: Result<T, Error>) -> Reply<T> {
    result.map_err(|e| e.to_wire())
}
