//! The publishers this session server owns — the source copy of its clients' registrations — indexed
//! for the digests and syncs with slot leaders.
//!
//! Plain data: the server keeps one behind a mutex, updated with every publish, unpublish and closed
//! connection, and read when a slot leader must be told what this session holds.

use std::collections::HashMap;

use roster_common::proto::{Digest, Publisher, SlotDigest};
use roster_common::{ClientId, RegisterId, ServiceId, SlotId, slot::slot_of};

use crate::hub::ConnId;

/// The publishers of one service, by client and register id, each with the connection that
/// registered it last.
type ServicePublishers = HashMap<(ClientId, RegisterId), (Publisher, ConnId)>;

/// Every publisher of every client connected here.
#[derive(Debug, Default)]
pub struct Owned {
    by_service: HashMap<ServiceId, ServicePublishers>,
}

impl Owned {
    /// Records (or replaces) a publisher registered on connection `conn`.
    pub fn put(&mut self, publisher: Publisher, conn: ConnId) {
        let key = (publisher.client_id.clone(), publisher.register_id.clone());
        self.by_service
            .entry(publisher.service.clone())
            .or_default()
            .insert(key, (publisher, conn));
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
        let key = (client_id.to_owned(), register_id.to_owned());
        let held = self
            .by_service
            .get(service)
            .and_then(|publishers| publishers.get(&key))
            .is_some_and(|(_, holder)| *holder == conn);
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
        let key = (client_id.to_owned(), register_id.to_owned());
        if let Some((_, holder)) = self
            .by_service
            .get_mut(service)
            .and_then(|publishers| publishers.get_mut(&key))
            && *holder == from
        {
            *holder = to;
        }
    }

    /// Forgets a publisher.
    pub fn remove(&mut self, service: &ServiceId, client_id: &str, register_id: &str) {
        if let Some(publishers) = self.by_service.get_mut(service) {
            publishers.remove(&(client_id.to_owned(), register_id.to_owned()));
            if publishers.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// The digest of what this session owns in each of `slots` (empty slots included).
    pub fn digests(&self, slots: &[SlotId], slot_count: u32) -> Vec<SlotDigest> {
        let mut by_slot: HashMap<SlotId, Digest> =
            slots.iter().map(|s| (*s, Digest::default())).collect();
        for (service, publishers) in &self.by_service {
            if let Some(digest) = by_slot.get_mut(&slot_of(service, slot_count)) {
                for (p, _) in publishers.values() {
                    digest.add(p);
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
        self.by_service
            .iter()
            .filter(|(service, _)| slot_of(service, slot_count) == slot)
            .flat_map(|(_, publishers)| publishers.values().map(|(p, _)| p.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_service.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher(service: &str, reg: &str, version: u64) -> Publisher {
        Publisher {
            client_id: "c".into(),
            register_id: reg.into(),
            service: service.parse().unwrap(),
            data: vec![],
            attributes: Default::default(),
            client_version: version,
            session: 1,
            session_instance: 7,
        }
    }

    #[test]
    fn digests_cover_the_asked_slots_and_follow_changes() {
        let mut owned = Owned::default();
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
        assert_eq!(owned.in_slot(slot, 256).len(), 1);
        owned.remove(&a.service, "c", "r1");
        assert!(owned.is_empty());
        assert_eq!(owned.digests(&[slot], 256)[0].digest, Digest::default());
    }

    #[test]
    fn only_the_connection_that_registered_last_removes_on_closing() {
        let mut owned = Owned::default();
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
    fn a_returning_client_takes_its_publishers_over() {
        let mut owned = Owned::default();
        let a = publisher("demo", "r1", 1);
        owned.put(a.clone(), 1);
        owned.reassign(&a.service, "c", "r1", 1, 2);
        assert!(!owned.remove_held_by(&a.service, "c", "r1", 1));
        // Only from the connection that holds it.
        owned.reassign(&a.service, "c", "r1", 1, 3);
        assert!(owned.remove_held_by(&a.service, "c", "r1", 2));
    }
}
