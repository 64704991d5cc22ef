//! The client link, ALPN `roster/1`: what SDKs send to a session server and what it pushes back.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::health::{CheckSpec, Health};
use crate::ids::{ClientId, NodeId, RegisterId, ServiceId, Version};

/// The bytes a publisher's size limit counts (a publish's and a persistent instance's alike): its
/// data items, attribute keys and values.
pub fn publisher_size(data: &[Bytes], attributes: &BTreeMap<String, String>) -> usize {
    data.iter().map(Bytes::len).sum::<usize>()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// A client's request. The first request on a connection must be `Hello`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Opens the session: protocol version, the client's id, an optional name and token.
    Hello {
        protocol_version: u32,
        client_id: ClientId,
        #[serde(default)]
        client_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// A random secret the client chose for itself, the same on every connection it opens
        /// (16 to 64 bytes): its records can be replaced or removed only by a connection that
        /// presents it again. See [`crate::ids::owner_of`].
        #[serde(default)]
        client_secret: Bytes,
        /// Optional protocol features the client asks for (see [`CAPABILITY_DELTA`]). The server
        /// answers with those it grants in `Welcome`; names it does not know are ignored.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        capabilities: Vec<String>,
    },
    /// Registers (or replaces) the publisher `register_id` of this client.
    Publish {
        register_id: RegisterId,
        service: ServiceId,
        data: Vec<Bytes>,
        #[serde(default)]
        attributes: BTreeMap<String, String>,
        /// Bumped by the client on every update of the same `register_id`.
        #[serde(default)]
        client_version: u64,
        /// A health check the slot leader runs on this publisher while it lives (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<CheckSpec>,
    },
    /// Removes the publisher `register_id` of this client. With `service`, it is removed even when
    /// it was registered through another connection (a session server that died before the client
    /// could unpublish there): the slot leader removes the record if this client owns it.
    Unpublish {
        register_id: RegisterId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<ServiceId>,
    },
    /// Subscribes `register_id` to `service`: a snapshot is pushed now and on every change.
    Subscribe {
        register_id: RegisterId,
        service: ServiceId,
        #[serde(default)]
        scope: Scope,
        /// Push only healthy publishers, unless more than the session's protection threshold of
        /// them are unhealthy, in which case all are pushed, marked (`docs/PROTOCOL.md` §4).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        healthy_only: bool,
    },
    /// Ends the subscription `register_id`.
    Unsubscribe { register_id: RegisterId },
    /// Liveness check.
    Ping {},
    /// Every service with at least one publisher, and its publisher count.
    ListServices {},
    /// Registers (or replaces) the persistent instance `id` of `service`: stored by the meta
    /// group, not bound to this connection, removed only by `DeregisterPersistent`. Answered
    /// `Accepted { durable: true }` once a quorum of the meta group has it on disk.
    RegisterPersistent {
        service: ServiceId,
        id: RegisterId,
        data: Vec<Bytes>,
        #[serde(default)]
        attributes: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<CheckSpec>,
    },
    /// Removes the persistent instance `id` of `service`; `NotFound` if there is none.
    DeregisterPersistent { service: ServiceId, id: RegisterId },
}

/// The body of a successful reply to a [`ClientRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// Answer to `Hello`.
    Welcome {
        protocol_version: u32,
        session_id: NodeId,
        max_frame: u32,
        idle_timeout_ms: u64,
        /// The capabilities of the `Hello` that this server grants.
        #[serde(default)]
        capabilities: Vec<String>,
        /// Requests this connection may have outstanding at once (`None` from servers that do
        /// not say; their default was 64).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_requests: Option<u32>,
    },
    /// Answer to `Publish` and `Unpublish`. `durable` is true once the slot leader applied the
    /// change; false when the session holds it and retries because no leader was reachable.
    Accepted { durable: bool },
    /// Answer to `Subscribe` and `Unsubscribe`.
    Done {},
    /// Answer to `Ping`.
    Pong {},
    /// Answer to `ListServices`.
    Services { services: Vec<ServiceSummary> },
}

/// One service in a `Services` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub service: ServiceId,
    pub publishers: u64,
    pub version: Version,
    /// How many publishers are healthy, when at least one of them is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<u64>,
}

/// Which publishers a subscriber wants. Only `global` is served today; the others are accepted and
/// treated as `global`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Zone,
    Datacenter,
    #[default]
    Global,
}

/// The capability a client asks for in `Hello` to be pushed [`Push::Delta`]s after each
/// subscription's first snapshot. Without it a client gets full snapshots only.
pub const CAPABILITY_DELTA: &str = "delta";

/// A frame on the server-to-client push stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Push {
    /// The full current set of publishers of a service the connection subscribes to.
    Snapshot(Snapshot),
    /// What changed in a service since the version `base` this subscription was last pushed
    /// (only to clients that asked for [`CAPABILITY_DELTA`]).
    Delta(Delta),
    /// The session server asks the client to move to another session server: it is draining for
    /// shutdown, or has more than its share of connections. The client connects elsewhere,
    /// registers everything there, then closes this connection.
    GoAway { reason: String },
}

/// All live publishers of one service at one version. Also the datum a data server returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub service: ServiceId,
    pub version: Version,
    /// Ordered by `(client_id, register_id)`.
    pub publishers: Vec<PublisherView>,
}

/// The change of one service from version `base` to `version`: the publishers added or replaced
/// (`put`, whole) and those removed. A publisher appears at most once in the two lists together.
/// It applies only to a copy at exactly `base`; see `docs/PROTOCOL.md` §4.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub service: ServiceId,
    pub base: Version,
    pub version: Version,
    /// Ordered by `(client_id, register_id)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put: Vec<PublisherView>,
    /// Ordered by `(client_id, register_id)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<PublisherId>,
}

/// One publisher as subscribers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublisherView {
    pub client_id: ClientId,
    pub register_id: RegisterId,
    pub data: Vec<Bytes>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub client_version: u64,
    /// A persistent instance (registered with `RegisterPersistent`, `client_id` is
    /// [`crate::ids::PERSISTENT_CLIENT_ID`]) rather than an ephemeral publisher.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persistent: bool,
    /// What its health check found, for a checked publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

impl PublisherView {
    /// The publisher's identity.
    pub fn id(&self) -> PublisherId {
        PublisherId {
            client_id: self.client_id.clone(),
            register_id: self.register_id.clone(),
        }
    }
}

/// A publisher's identity: its client and the register id that client gave it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublisherId {
    pub client_id: ClientId,
    pub register_id: RegisterId,
}
