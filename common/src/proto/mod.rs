//! Every message of every link, in one place. `docs/PROTOCOL.md` is their specification.
//!
//! Each link has one request enum and one response enum. A request travels alone on a fresh
//! bidirectional stream and is answered by one [`Reply`] frame on the same stream; the long-lived
//! streams (`Watch` requests, the client push stream) carry a sequence of frames instead.
//!
//! Enums use serde's external tagging, so every message is a MessagePack map with one key, the
//! variant name, whose value is a map of named fields: `{"Publish": {"register_id": "r1", ...}}`.

mod client;
mod data;
mod peer;

pub use client::{
    CAPABILITY_DELTA, ClientRequest, ClientResponse, Delta, PublisherId, PublisherView, Push,
    Scope, ServiceSummary, Snapshot, publisher_size,
};
pub use data::{
    DataEvent, DataRequest, DataResponse, DataStatus, Digest, HeldSlot, HeldState, Publisher,
    PublisherChange, ReplicatedOp, SlotDigest, SlotDump, WriteOp,
};
pub use peer::{
    ClusterStatus, ClusterView, LeaseStatus, Member, MemberKey, MetaNodeStatus, MetaRequest,
    MetaResponse, PersistentInstance, RaftKind, Role, SlotTable,
};

use crate::error::{Error, WireError};

/// The version of `roster/1` this build speaks, sent in `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// ALPN of the client link.
pub const ALPN_CLIENT: &[u8] = b"roster/1";
/// ALPN of every server-to-server link (mutual TLS).
pub const ALPN_PEER: &[u8] = b"roster-peer/1";

/// Application close code of a session server: the client's push stream made no progress for the
/// stall timeout (`docs/PROTOCOL.md` §4, §6).
pub const CLOSE_SLOW_CONSUMER: u32 = 0x10;
/// Application close code of a session server: the client broke the protocol (unsupported
/// version).
pub const CLOSE_PROTOCOL: u32 = 0x11;
/// Application close code of a session server: it holds its maximum of connections.
pub const CLOSE_FULL: u32 = 0x12;
/// Application close code of a session server: the connection's token was revoked or expired.
pub const CLOSE_UNAUTHENTICATED: u32 = 0x13;

/// Application close code of a client: it moved to another session server and registered its
/// publishers there, or it gave up on a connection that went silent and will connect again. The
/// session it left removes its publishers only after the client grace, as for a lost connection,
/// so that the removal cannot overtake the registration on the new connection.
pub const CLOSE_MOVED: u32 = 0x20;

/// A response frame: `{"Ok": body}` or `{"Err": {code, message, ...}}`.
pub type Reply<T> = std::result::Result<T, WireError>;

/// Turns a local result into a reply frame.
pub fn reply<T>(result: Result<T, Error>) -> Reply<T> {
    result.map_err(|e| e.to_wire())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode};

    /// The byte-level example in `docs/PROTOCOL.md` §2.
    #[test]
    fn documented_ping_bytes() {
        let ping = encode(&ClientRequest::Ping {}, u32::MAX).unwrap();
        assert_eq!(
            &ping[..],
            &[0, 0, 0, 7, 0x81, 0xa4, b'P', b'i', b'n', b'g', 0x80]
        );
        let pong = encode(&reply(Ok(ClientResponse::Pong {})), u32::MAX).unwrap();
        assert_eq!(
            &pong[..],
            &[
                0, 0, 0, 0x0b, 0x81, 0xa2, b'O', b'k', 0x81, 0xa4, b'P', b'o', b'n', b'g', 0x80
            ]
        );
    }

    /// Errors travel as `{"Err": {code, message}}` with optional details left out when absent.
    #[test]
    fn error_replies_are_maps_with_a_code() {
        let frame = encode(
            &reply::<ClientResponse>(Err(Error::NotFound("x".into()))),
            u32::MAX,
        )
        .unwrap();
        let value: std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<String, rmp_value::Any>,
        > = rmp_serde::from_slice(&frame[4..]).unwrap();
        let fields = &value["Err"];
        assert_eq!(fields.keys().collect::<Vec<_>>(), ["code", "message"]);
        let back: Reply<ClientResponse> = decode(&frame[4..]).unwrap();
        assert_eq!(back.unwrap_err().code, 9);
    }

    /// Optional fields may be left out by other-language clients.
    #[test]
    fn optional_fields_default() {
        let minimal = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([(
            "Subscribe",
            std::collections::BTreeMap::from([("register_id", "s1"), ("service", "demo")]),
        )]))
        .unwrap();
        let request: ClientRequest = decode(&minimal).unwrap();
        assert_eq!(
            request,
            ClientRequest::Subscribe {
                register_id: "s1".into(),
                service: "demo".parse().unwrap(),
                scope: Scope::Global,
                healthy_only: false,
            }
        );
    }

    mod rmp_value {
        /// Accepts any MessagePack value, for inspecting shapes.
        #[derive(Debug)]
        pub struct Any;
        impl<'de> serde::Deserialize<'de> for Any {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                serde::de::IgnoredAny::deserialize(d).map(|_| Any)
            }
        }
    }
}
