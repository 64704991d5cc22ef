//! Names for the things Roster talks about.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// A meta, data or session server's configured id (`--id`). Unique within its tier.
pub type NodeId = u64;
/// A server process's incarnation: random, chosen at start. A restarted server with the same
/// [`NodeId`] has a new instance, so what the old process owned can be told apart and dropped.
pub type InstanceId = u64;
/// The slot table's epoch: bumped on every committed table change.
pub type Epoch = u64;
/// A datum's version: `(slot leader term << 32) | counter`. Only grows.
pub type Version = u64;
/// A slot number, `0..slot_count`.
pub type SlotId = u32;
/// A client process's id, chosen by the client (the SDK picks a random one) and sent in `Hello`.
pub type ClientId = String;
/// A publisher's or subscriber's id, chosen by the client, unique within that client.
pub type RegisterId = String;

/// The `client_id` of every persistent instance (`RegisterPersistent`). Client ids starting with
/// `~` are reserved: a `Hello` presenting one is refused.
pub const PERSISTENT_CLIENT_ID: &str = "~persistent";
/// The owner of every persistent instance's record: no client's [`owner_of`] is meant to be it,
/// and a session never writes it.
pub const PERSISTENT_OWNER: u128 = u128::MAX;

/// Whether `client_id` is reserved for records the cluster itself keeps.
pub fn is_reserved_client_id(client_id: &str) -> bool {
    client_id.starts_with('~')
}

/// The namespace a bare service name lands in.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The group a bare service name lands in.
pub const DEFAULT_GROUP: &str = "DEFAULT";
/// The longest service id accepted, in bytes of its canonical text.
pub const MAX_SERVICE_ID_LEN: usize = 512;

/// A service: `namespace/group/data_id`.
///
/// Held as its canonical text behind an `Arc`, so the many records of one service share one
/// allocation and hashing the id (for its slot) needs no formatting. Parsing accepts a bare
/// `data_id` (no `/`) for `default/DEFAULT/<data_id>`; otherwise the text must have three non-empty
/// parts, and the `data_id` part may itself contain `/`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(Arc<str>);

impl ServiceId {
    /// Builds an id from its three parts.
    pub fn new(namespace: &str, group: &str, data_id: &str) -> Result<Self, Error> {
        format!("{namespace}/{group}/{data_id}").parse()
    }

    /// The canonical text, `namespace/group/data_id`. The slot hash is taken over these bytes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn parts(&self) -> (&str, &str, &str) {
        let mut it = self.0.splitn(3, '/');
        let ns = it.next().unwrap_or_default();
        let group = it.next().unwrap_or_default();
        let data_id = it.next().unwrap_or_default();
        (ns, group, data_id)
    }

    pub fn namespace(&self) -> &str {
        self.parts().0
    }

    pub fn group(&self) -> &str {
        self.parts().1
    }

    pub fn data_id(&self) -> &str {
        self.parts().2
    }
}

impl FromStr for ServiceId {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::InvalidArgument(format!("service id {text:?}: {why}"));
        if text.is_empty() {
            return Err(bad("must not be empty"));
        }
        if text.chars().any(char::is_control) {
            return Err(bad("must not contain control characters"));
        }
        let canonical = if text.contains('/') {
            let parts: Vec<&str> = text.splitn(3, '/').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
                return Err(bad(
                    "expected namespace/group/data_id with three non-empty parts, or a bare data_id",
                ));
            }
            text.to_owned()
        } else {
            format!("{DEFAULT_NAMESPACE}/{DEFAULT_GROUP}/{text}")
        };
        if canonical.len() > MAX_SERVICE_ID_LEN {
            return Err(bad(&format!("longer than {MAX_SERVICE_ID_LEN} bytes")));
        }
        Ok(ServiceId(canonical.into()))
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for ServiceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ServiceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        // Marked, so that a frame carrying it is answered `InvalidArgument` like any other value
        // the server refuses (see `frame::decode`).
        text.parse().map_err(|e: Error| {
            serde::de::Error::custom(format!(
                "{}{}",
                crate::frame::REFUSED_VALUE,
                e.to_wire().message
            ))
        })
    }
}

/// A fresh random id for a process incarnation.
pub fn new_instance_id() -> InstanceId {
    // Zero is kept free so "no instance" never collides with a real one.
    rand::random::<u64>().max(1)
}

/// A fresh random client id: 32 hex digits.
pub fn new_client_id() -> ClientId {
    format!("{:032x}", rand::random::<u128>())
}

/// The longest client or register id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Bounds of the secret a client presents in `Hello`, in bytes.
pub const CLIENT_SECRET_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// Checks a client-chosen id (`what`: "client_id", "register_id"): 1 to [`MAX_ID_LEN`] bytes, no
/// control characters (digests join ids with 0x00, so a NUL inside one could make two different
/// pairs of ids look alike).
pub fn check_id(what: &str, id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 1 to {MAX_ID_LEN} bytes"
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "{what} {id:?} must not contain control characters"
        )));
    }
    Ok(())
}

/// A fresh random client secret, for [`owner_of`].
pub fn new_client_secret() -> [u8; 32] {
    rand::random()
}

/// Who owns the records a client creates: the first 128 bits of
/// `SHA-256("roster-owner/1" 0x00 client_id 0x00 secret)`, never 0. Only a connection presenting
/// the same id and secret can replace or remove them; the secret itself never leaves the session
/// server the client gave it to.
pub fn owner_of(client_id: &str, secret: &[u8]) -> u128 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"roster-owner/1\0");
    ctx.update(client_id.as_bytes());
    ctx.update(b"\0");
    ctx.update(secret);
    let digest = ctx.finish();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest.as_ref()[..16]);
    u128::from_be_bytes(first).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_differ_by_secret_and_by_client() {
        let a = owner_of("client", b"0123456789abcdef");
        assert_eq!(a, owner_of("client", b"0123456789abcdef"));
        assert_ne!(a, owner_of("client", b"0123456789abcdeg"));
        assert_ne!(a, owner_of("client2", b"0123456789abcdef"));
        assert_ne!(a, 0);
    }

    #[test]
    fn ids_with_control_characters_or_out_of_bounds_are_refused() {
        for bad in ["", "a\0b", "a\nb", "\u{7f}", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(check_id("register_id", bad).is_err(), "{bad:?}");
        }
        for good in ["a", "instance-1", "ünïcödé", &"x".repeat(MAX_ID_LEN)] {
            assert!(check_id("register_id", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn an_owner_survives_the_wire() {
        let owner = owner_of("client", b"0123456789abcdef");
        let bytes = rmp_serde::to_vec_named(&owner).unwrap();
        let back: u128 = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, owner);
    }

    #[test]
    fn bare_name_lands_in_default_namespace_and_group() {
        let id: ServiceId = "demo".parse().unwrap();
        assert_eq!(id.as_str(), "default/DEFAULT/demo");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.group(), "DEFAULT");
        assert_eq!(id.data_id(), "demo");
    }

    #[test]
    fn full_name_keeps_slashes_in_data_id() {
        let id: ServiceId = "prod/payments/api/v2".parse().unwrap();
        assert_eq!(id.namespace(), "prod");
        assert_eq!(id.group(), "payments");
        assert_eq!(id.data_id(), "api/v2");
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in ["", "a/b", "a//c", "/b/c", "a/b/", "x\ny"] {
            let err = bad.parse::<ServiceId>().unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{bad:?} gave {err:?}"
            );
        }
        let long = "x".repeat(MAX_SERVICE_ID_LEN);
        assert!(long.parse::<ServiceId>().is_err());
    }

    #[test]
    fn serializes_as_its_canonical_text() {
        let id: ServiceId = "demo".parse().unwrap();
        let bytes = rmp_serde::to_vec_named(&id).unwrap();
        let back: ServiceId = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, id);
        let text: String = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(text, "default/DEFAULT/demo");
    }
}
