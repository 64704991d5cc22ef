//! The publishers this session server owns — the source copy of its clients' registrations — indexed
//! for the digests and syncs with slot leaders.
//!
//! Plain data: the server keeps one behind a mutex, updated with every publish, unpublish and closed
//! connection, and read when a slot leader must be told what this session holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use roster_common::proto::{Digest, Publisher, SlotDigest};
use roster_common::{InstanceId, NodeId, ServiceId, SlotId, slot::slot_of};

use crate::hub::ConnId;

/// What is kept of one publisher: everything but its ids, which are the keys it is found by, and
/// the session it belongs to, which is this one.
#[derive(Debug)]
struct Entry {
    data: Vec<Bytes>,
    attributes: BTreeMap<String, String>,
    client_version: u64,
    /// The owner of the client that registered it (see `roster_common::ids::owner_of`).
    owner: u128,
    /// The health check the client asked for, carried again by every re-sync.
    check: Option<Box<roster_common::health::CheckSpec>>,
    /// When the client registered this version of it here (see `Publisher::registered_ms`).
    registered_ms: u64,
    /// The connection that holds it now (a returning client's new connection takes over its
    /// lost one's).
    conn: ConnId,
    /// The connection that registered it last: its claim's time (`registered_ms`) belongs to that
    /// registration.
    claimed_on: ConnId,
}

/// The publishers of one service: by client (its id shared by all of that client's publishers
/// here), then by register id.
type ServicePublishers = HashMap<Arc<str>, HashMap<Box<str>, Entry>>;

/// Every publisher of every client connected here.
#[derive(Debug)]
pub struct Owned {
    session: NodeId,
    instance: InstanceId,
    by_service: HashMap<ServiceId, ServicePublishers>,
    count: usize,
}

impl Owned {
    /// The publishers of session server `session`, incarnation `instance`.
    pub fn new(session: NodeId, instance: InstanceId) -> Self {
        Owned {
            session,
            instance,
            by_service: HashMap::new(),
            count: 0,
        }
    }

    fn entry(&self, service: &ServiceId, client_id: &str, register_id: &str) -> Option<&Entry> {
        self.by_service
            .get(service)?
            .get(client_id)?
            .get(register_id)
    }

    fn entry_mut(
        &mut self,
        service: &ServiceId,
        client_id: &str,
        register_id: &str,
    ) -> Option<&mut Entry> {
        self.by_service
            .get_mut(service)?
            .get_mut(client_id)?
            .get_mut(register_id)
    }

    /// When `publisher` was registered on connection `conn`, if it was registered there exactly
    /// so: registering it again unchanged on the same connection (a client asking whether a held
    /// registration has landed) keeps its claim's time, so the slot leader sees the same record
    /// and changes nothing. A registration on another connection — a client back after a lost
    /// connection or from another session server — is a new claim with a new time: the slot
    /// leader orders claims of different sessions by it.
    pub fn unchanged_since(&self, publisher: &Publisher, conn: ConnId) -> Option<u64> {
        let entry = self.entry(
            &publisher.service,
            &publisher.client_id,
            &publisher.register_id,
        )?;
        (entry.claimed_on == conn
            && entry.data == publisher.data
            && entry.attributes == publisher.attributes
            && entry.client_version == publisher.client_version
            && entry.owner == publisher.owner
            && entry.check.as_deref() == publisher.check.as_ref())
        .then_some(entry.registered_ms)
    }

    /// Records (or replaces) a publisher registered on connection `conn`.
    pub fn put(&mut self, publisher: Publisher, conn: ConnId) {
        let entry = Entry {
            data: publisher.data,
            attributes: publisher.attributes,
            client_version: publisher.client_version,
            owner: publisher.owner,
            check: publisher.check.map(Box::new),
            registered_ms: publisher.registered_ms,
            conn,
            claimed_on: conn,
        };
        let clients = self.by_service.entry(publisher.service).or_default();
        let registered = match clients.get_mut(publisher.client_id.as_str()) {
            Some(registered) => registered,
            None => clients.entry(Arc::from(publisher.client_id)).or_default(),
        };
        if registered
            .insert(publisher.register_id.into_boxed_str(), entry)
            .is_none()
        {
            self.count += 1;
        }
    }

    /// Forgets a publisher if connection `conn` registered it last, and says whether it did. A
    /// client that reconnected to this same server registers everything again on its new
    /// connection before closing the old one; the old one's end must not remove any of it.
    pub fn remove_held_by(
        &mut self,
        service: &ServiceId,
        client_id: &str,
        register_id: &str,
        conn: ConnId,
    ) -> bool {
        let held = self
            .entry(service, client_id, register_id)
            .is_some_and(|e| e.conn == conn);
        if held {
            self.remove(service, client_id, register_id);
        }
        held
    }

    /// Moves a publisher held by connection `from` to connection `to` (a client that came back
    /// took its lost connection's publishers over).
    pub fn reassign(
        &mut self,
        service: &ServiceId,
        client_id: &str,
        register_id: &str,
        from: ConnId,
        to: ConnId,
    ) {
        if let Some(entry) = self.entry_mut(service, client_id, register_id)
            && entry.conn == from
        {
            entry.conn = to;
        }
    }

    /// Forgets a publisher if connection `conn` holds it and it is still at `client_version` (a
    /// write the slot leader refused; a newer registration stays).
    pub fn forget_refused(
        &mut self,
        service: &ServiceId,
        client_id: &str,
        register_id: &str,
        conn: ConnId,
        client_version: u64,
    ) -> bool {
        let refused = self
            .entry(service, client_id, register_id)
            .is_some_and(|e| e.conn == conn && e.client_version == client_version);
        if refused {
            self.remove(service, client_id, register_id);
        }
        refused
    }

    /// Forgets a publisher.
    pub fn remove(&mut self, service: &ServiceId, client_id: &str, register_id: &str) {
        let Some(clients) = self.by_service.get_mut(service) else {
            return;
        };
        let Some(registered) = clients.get_mut(client_id) else {
            return;
        };
        if registered.remove(register_id).is_some() {
            self.count -= 1;
        }
        if registered.is_empty() {
            clients.remove(client_id);
        }
        if clients.is_empty() {
            self.by_service.remove(service);
        }
    }

    /// The digest of what this session owns in each of `slots` (empty slots included).
    pub fn digests(&self, slots: &[SlotId], slot_count: u32) -> Vec<SlotDigest> {
        let mut by_slot: HashMap<SlotId, Digest> =
            slots.iter().map(|s| (*s, Digest::default())).collect();
        for (service, clients) in &self.by_service {
            if let Some(digest) = by_slot.get_mut(&slot_of(service, slot_count)) {
                for (client_id, registered) in clients {
                    for (register_id, entry) in registered {
                        digest.add_parts(client_id, register_id, entry.client_version);
                    }
                }
            }
        }
        let mut out: Vec<SlotDigest> = by_slot
            .into_iter()
            .map(|(slot, digest)| SlotDigest {
                slot,
                digest,
                version: 0,
            })
            .collect();
        out.sort_by_key(|d| d.slot);
        out
    }

    /// Every publisher this session owns in `slot`.
    pub fn in_slot(&self, slot: SlotId, slot_count: u32) -> Vec<Publisher> {
        let mut out = Vec::new();
        for (service, clients) in &self.by_service {
            if slot_of(service, slot_count) != slot {
                continue;
            }
            for (client_id, registered) in clients {
                for (register_id, entry) in registered {
                    out.push(Publisher {
                        check: entry.check.as_deref().cloned(),
                        health: None,
                        persistent: false,
                        client_id: client_id.to_string(),
                        register_id: register_id.to_string(),
                        service: service.clone(),
                        data: entry.data.clone(),
                        attributes: entry.attributes.clone(),
                        client_version: entry.client_version,
                        session: self.session,
                        session_instance: self.instance,
                        owner: entry.owner,
                        registered_ms: entry.registered_ms,
                    });
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher(service: &str, reg: &str, version: u64) -> Publisher {
        Publisher {
            check: None,
            health: None,
            persistent: false,
            client_id: "c".into(),
            register_id: reg.into(),
            service: service.parse().unwrap(),
            data: vec![],
            attributes: Default::default(),
            client_version: version,
            session: 1,
            session_instance: 7,
            owner: 42,
            registered_ms: 0,
        }
    }

    #[test]
    fn digests_cover_the_asked_slots_and_follow_changes() {
        let mut owned = Owned::new(1, 7);
        let a = publisher("demo", "r1", 1);
        let slot = slot_of(&a.service, 256);
        owned.put(a.clone(), 1);
        let other = (slot + 1) % 256;
        let digests = owned.digests(&[slot, other], 256);
        assert_eq!(digests.len(), 2);
        let of = |s: SlotId| digests.iter().find(|d| d.slot == s).unwrap().digest;
        assert_eq!(of(slot), Digest::of([&a]));
        assert_eq!(of(other), Digest::default());
        // A new client version changes the digest; removal empties it.
        owned.put(publisher("demo", "r1", 2), 1);
        assert_ne!(owned.digests(&[slot], 256)[0].digest, Digest::of([&a]));
        assert_eq!(owned.in_slot(slot, 256), vec![publisher("demo", "r1", 2)]);
        owned.remove(&a.service, "c", "r1");
        assert!(owned.is_empty());
        assert_eq!(owned.digests(&[slot], 256)[0].digest, Digest::default());
    }

    #[test]
    fn only_the_connection_that_registered_last_removes_on_closing() {
        let mut owned = Owned::new(1, 7);
        let a = publisher("demo", "r1", 1);
        owned.put(a.clone(), 1);
        // The client reconnected to this server and registered again on connection 2.
        owned.put(a.clone(), 2);
        assert!(!owned.remove_held_by(&a.service, "c", "r1", 1));
        assert_eq!(owned.len(), 1, "the old connection's end leaves it");
        assert!(owned.remove_held_by(&a.service, "c", "r1", 2));
        assert!(owned.is_empty());
    }

    #[test]
    fn registering_again_unchanged_on_the_same_connection_keeps_the_time_of_the_claim() {
        let mut owned = Owned::new(1, 7);
        let mut a = publisher("demo", "r1", 1);
        a.registered_ms = 1_000;
        owned.put(a.clone(), 1);
        let mut again = a.clone();
        again.registered_ms = 5_000;
        assert_eq!(owned.unchanged_since(&again, 1), Some(1_000));
        let mut updated = again.clone();
        updated.client_version = 2;
        assert_eq!(owned.unchanged_since(&updated, 1), None);
        // The same client back on another connection, having taken the first one's over, makes
        // a new claim.
        owned.reassign(&a.service, "c", "r1", 1, 2);
        assert_eq!(owned.unchanged_since(&again, 2), None);
        owned.put(updated, 2);
        let synced = owned.in_slot(slot_of(&a.service, 8), 8);
        assert_eq!(
            synced[0].registered_ms, 5_000,
            "a sync carries the claim's time"
        );
    }

    #[test]
    fn a_returning_client_takes_its_publishers_over() {
        let mut owned = Owned::new(1, 7);
        let a = publisher("demo", "r1", 1);
        owned.put(a.clone(), 1);
        owned.reassign(&a.service, "c", "r1", 1, 2);
        assert!(!owned.remove_held_by(&a.service, "c", "r1", 1));
        // Only from the connection that holds it.
        owned.reassign(&a.service, "c", "r1", 1, 3);
        assert!(owned.remove_held_by(&a.service, "c", "r1", 2));
    }

    #[test]
    fn a_resync_carries_the_check_and_never_a_health_or_persistence() {
        let mut owned = Owned::new(1, 7);
        let mut a = publisher("demo", "r1", 1);
        a.check = Some(roster_common::health::CheckSpec::new("tcp://10.0.0.1:80"));
        let slot = slot_of(&a.service, 256);
        // Whatever a caller hands in, only the client's own fields are kept.
        let mut handed = a.clone();
        handed.health = Some(roster_common::health::Health::unchecked());
        handed.persistent = true;
        owned.put(handed, 1);
        assert_eq!(owned.in_slot(slot, 256), vec![a]);
    }
}
