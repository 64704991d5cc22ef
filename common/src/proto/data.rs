//! The session↔data and data↔data links (ALPN `roster-peer/1`, mutual TLS): the records the
//! data tier stores, the requests sessions and other data servers make of a data server, and the
//! frames of a session's watch stream.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::client::{PublisherId, PublisherView, ServiceSummary, Snapshot};
use crate::health::{CheckSpec, Health};
use crate::ids::{ClientId, Epoch, InstanceId, NodeId, RegisterId, ServiceId, SlotId, Version};

/// A publisher as the data tier stores it: the view subscribers get, plus its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publisher {
    pub client_id: ClientId,
    pub register_id: RegisterId,
    pub service: ServiceId,
    pub data: Vec<Bytes>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub client_version: u64,
    /// The session server holding the client's connection, and its incarnation.
    pub session: NodeId,
    pub session_instance: InstanceId,
    /// Who may replace this record: [`crate::ids::owner_of`] the client's id and secret. 0 for
    /// a record written by a session server that predates ownership (anyone may replace it).
    /// [`crate::ids::PERSISTENT_OWNER`] for a persistent instance.
    #[serde(default)]
    pub owner: u128,
    /// When the session holding the record accepted this version of it from its client (Unix
    /// milliseconds, that session's clock; 0 from sessions that predate it, and for persistent
    /// instances). Orders two sessions' claims: a `SessionSync` replaces a record another live
    /// session holds only with a later one — the client registered it there after leaving the
    /// other, which may still list it until it notices.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub registered_ms: u64,
    /// A persistent instance, put by its slot leader from the meta group's set; never removed
    /// because a session went away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persistent: bool,
    /// The health check the slot leader runs on it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// What the check found; set by the slot leader only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

impl Publisher {
    pub fn view(&self) -> PublisherView {
        PublisherView {
            client_id: self.client_id.clone(),
            register_id: self.register_id.clone(),
            data: self.data.clone(),
            attributes: self.attributes.clone(),
            client_version: self.client_version,
            persistent: self.persistent,
            health: self.health.clone(),
        }
    }
}

/// One change of one publisher, sent by the owning session to the slot leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Adds or replaces the publisher `(client_id, register_id)`.
    Put { publisher: Publisher },
    /// Removes the publisher `(client_id, register_id)` if `session_instance` still holds it, or,
    /// with `owner`, if that client owns it whichever session holds it (an unpublish that arrived
    /// through another session server).
    Remove {
        service: ServiceId,
        client_id: ClientId,
        register_id: RegisterId,
        session_instance: InstanceId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u128>,
    },
}

impl WriteOp {
    pub fn service(&self) -> &ServiceId {
        match self {
            WriteOp::Put { publisher } => &publisher.service,
            WriteOp::Remove { service, .. } => service,
        }
    }
}

/// Session → data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataRequest {
    /// Opens the session's notification stream: one `Ready` frame, then a `Changed` frame for every
    /// change of a service the session registered interest in. Interest lives as long as this stream.
    Watch {
        session: NodeId,
        instance: InstanceId,
    },
    /// Applies one publisher change at the slot leader.
    Write { op: Box<WriteOp> },
    /// Applies several publisher changes at the slot leader, in order, each on its own: one may
    /// fail (its slot moved, say) while the others apply. Answered `WrittenBatch`, a result per op.
    WriteBatch { ops: Vec<WriteOp> },
    /// Registers (`on`) or drops interest in services for the session's watch stream. Registering
    /// answers with the current version of each service, read after the registration: the session
    /// fetches those it does not have (datums travel one per `Fetch`, so a batch of large services
    /// never makes one oversized frame).
    Interest {
        instance: InstanceId,
        services: Vec<ServiceId>,
        on: bool,
    },
    /// The current datums of these services.
    Fetch { services: Vec<ServiceId> },
    /// Every service this server leads with at least one publisher.
    ListServices {},
    /// Session → slot leader: the digest of the session's own publishers in each slot the receiver
    /// leads (empty slots included). Answered with the slots whose records differ, for which the
    /// session then sends `SessionSync`. A slot taking a new leader opens once every live session
    /// has been heard from this way (or after a bound).
    SessionDigests {
        instance: InstanceId,
        /// The table epoch the session computed `digests` for. A data server that has not yet
        /// applied that table answers `Unavailable`, and the session reports again shortly.
        #[serde(default)]
        epoch: Epoch,
        digests: Vec<SlotDigest>,
    },
    /// Session → slot leader: every publisher the session owns in `slot`. The leader makes its
    /// records of that session in the slot exactly this.
    SessionSync {
        instance: InstanceId,
        slot: SlotId,
        publishers: Vec<Publisher>,
    },
    /// Leader → follower: changes in the order the leader applied them.
    Replicate { ops: Vec<ReplicatedOp> },
    /// Follower → leader: a whole slot, to start following it or to repair drift.
    SlotDump { slot: SlotId },
    /// Follower → leader: the digests of whole slots, for the periodic drift check.
    SlotDigests { slots: Vec<SlotId> },
    /// Session → data, for the console: what the receiver holds (its version, the table epoch it
    /// applied, the state of every slot it holds). Answered `Status`.
    Status {},
    /// Session → slot leader, for the console: the records of `service` as stored, each with the
    /// session holding it. Answered `Records`; refused like `Fetch` (`NotLeader`, `SlotMoving`).
    Records { service: ServiceId },
}

/// The body of a successful reply to a [`DataRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataResponse {
    Written {
        version: Version,
    },
    /// Answer to `WriteBatch`: for each op, in order, the datum version it produced (or found,
    /// when it changed nothing) or why it was refused.
    WrittenBatch {
        results: Vec<super::Reply<Version>>,
    },
    Datums {
        datums: Vec<Snapshot>,
    },
    /// Answer to `Interest { on: true }`: each service's current version (0: never published).
    Versions {
        versions: Vec<(ServiceId, Version)>,
    },
    Services {
        services: Vec<ServiceSummary>,
    },
    Done {},
    /// Answer to `SessionDigests`.
    Mismatched {
        slots: Vec<SlotId>,
    },
    /// Answer to `Replicate`: slots the follower could not apply in order and will fetch whole.
    Replicated {
        resync: Vec<SlotId>,
    },
    /// Answer to `SlotDump`.
    Slot(SlotDump),
    /// Answer to `SlotDigests`.
    Digests {
        digests: Vec<SlotDigest>,
    },
    /// Answer to `Status`.
    Status(DataStatus),
    /// Answer to `Records`: the service's publishers at `version` (0: never published), ordered
    /// by `(client_id, register_id)`.
    Records {
        version: Version,
        publishers: Vec<Publisher>,
    },
}

/// What a data server holds, as it answers [`DataRequest::Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStatus {
    pub id: NodeId,
    /// Its software version.
    pub version: String,
    /// The slot table epoch it has applied.
    pub epoch: Epoch,
    /// Every slot it holds, in slot order.
    pub slots: Vec<HeldSlot>,
}

/// One slot in a [`DataStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSlot {
    pub slot: SlotId,
    pub state: HeldState,
    /// Publishers in the slot, persistent instances included.
    pub publishers: u64,
}

/// What a data server does with a slot it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldState {
    /// Leads it and serves it.
    Leading,
    /// Leads it and is still taking it over: reads and writes answer `SlotMoving`.
    Moving,
    /// Follows it with a copy in step with the leader.
    Following,
    /// Follows it and is fetching a copy.
    Fetching,
}

impl HeldState {
    pub fn name(self) -> &'static str {
        match self {
            HeldState::Leading => "leading",
            HeldState::Moving => "moving",
            HeldState::Following => "following",
            HeldState::Fetching => "fetching",
        }
    }
}

/// One change as the slot leader applied it: the slot's version before and after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedOp {
    pub slot: SlotId,
    pub prev: Version,
    pub version: Version,
    pub op: WriteOp,
}

/// A whole slot as its leader holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotDump {
    pub slot: SlotId,
    /// The slot's version: that of its last change.
    pub version: Version,
    /// Every service's datum version (services without publishers included).
    pub datums: Vec<(ServiceId, Version)>,
    pub publishers: Vec<Publisher>,
}

/// The fingerprint of a set of publishers: how many, and the wrapping sum of a 64-bit hash of each
/// one's `(client_id, register_id, client_version)`. Order does not matter, and adding or removing
/// one publisher updates it in constant time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest {
    pub count: u64,
    pub hash: u64,
}

impl Digest {
    /// The hash of one publisher's identity and version: CRC-32C of
    /// `client_id 0x00 register_id 0x00 client_version (8 bytes, big-endian)` in the low 32 bits,
    /// and the CRC-32C of the same bytes continued from 0x9E3779B9 in the high 32 bits.
    pub fn entry(client_id: &str, register_id: &str, client_version: u64) -> u64 {
        let mut bytes = Vec::with_capacity(client_id.len() + register_id.len() + 10);
        bytes.extend_from_slice(client_id.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(register_id.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&client_version.to_be_bytes());
        let low = crate::slot::crc32c(&bytes) as u64;
        let high = crc32c::crc32c_append(0x9E37_79B9, &bytes) as u64;
        (high << 32) | low
    }

    pub fn add(&mut self, publisher: &Publisher) {
        self.add_parts(
            &publisher.client_id,
            &publisher.register_id,
            publisher.client_version,
        );
    }

    /// Adds one publisher given by its ids and client version.
    pub fn add_parts(&mut self, client_id: &str, register_id: &str, client_version: u64) {
        self.count += 1;
        self.hash = self
            .hash
            .wrapping_add(Self::entry(client_id, register_id, client_version));
    }

    pub fn of<'a>(publishers: impl IntoIterator<Item = &'a Publisher>) -> Self {
        let mut digest = Digest::default();
        for p in publishers {
            digest.add(p);
        }
        digest
    }
}

/// A slot's [`Digest`]. Between data servers it also carries the slot's version, so a follower
/// compares digests only at equal versions; sessions leave it 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotDigest {
    pub slot: SlotId,
    pub digest: Digest,
    #[serde(default)]
    pub version: Version,
}

/// A frame on a session's watch stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataEvent {
    /// The stream is registered; interest may be sent now.
    Ready {},
    /// `service` changed; its datum is now at `version` (or later). With `prev` and `change` the
    /// event is the change itself: `change` applied to the datum at version `prev` gives the datum
    /// at `version`. Without them (older data servers), fetch the datum.
    Changed {
        service: ServiceId,
        version: Version,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prev: Option<Version>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<PublisherChange>,
    },
}

/// One publisher's change in a datum, as the slot leader applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublisherChange {
    /// Added or replaced, whole.
    Put(PublisherView),
    /// Removed.
    Remove(PublisherId),
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
