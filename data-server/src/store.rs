//! Slot storage: the publishers of every service in the slots this server leads, and their versions.
//!
//! Plain data and functions, no I/O. The server applies each committed slot table with
//! [`Store::apply_table`] and each session's change with [`Store::write`]; both return what changed so
//! the caller can notify sessions.
//!
//! Versions: when this server takes the lead of a slot it records the table epoch as the slot's
//! term; every change of a service in that slot gets `(term << 32) | counter`, with the counter
//! counting changes in the slot. Terms only grow, so versions of a service only grow, across
//! leaders too.

use std::collections::{BTreeMap, HashMap};

use roster_common::proto::{Publisher, ServiceSummary, SlotTable, Snapshot, WriteOp};
use roster_common::{
    ClientId, Epoch, Error, InstanceId, NodeId, RegisterId, Result, ServiceId, SlotId, Version,
};

type PublisherKey = (ClientId, RegisterId);

#[derive(Debug, Default)]
struct Datum {
    version: Version,
    publishers: BTreeMap<PublisherKey, Publisher>,
}

#[derive(Debug, Default)]
struct Slot {
    /// Whether this server leads the slot in the latest table.
    led: bool,
    term: Epoch,
    counter: u32,
    services: HashMap<ServiceId, Datum>,
}

impl Slot {
    fn next_version(&mut self) -> Version {
        // A slot would need 2^32 changes within one term to exhaust the counter; saturating keeps
        // versions from wrapping backwards should that ever happen.
        self.counter = self.counter.saturating_add(1);
        (self.term << 32) | u64::from(self.counter)
    }
}

/// The records of every slot this server leads.
#[derive(Debug)]
pub struct Store {
    me: NodeId,
    epoch: Epoch,
    slot_count: u32,
    slots: Vec<Slot>,
    /// Publishers held per owning session instance, to find what a lost session owned.
    owners: HashMap<InstanceId, usize>,
}

/// A service whose datum changed, and its new version.
pub type Change = (ServiceId, Version);

impl Store {
    pub fn new(me: NodeId) -> Self {
        Store {
            me,
            epoch: 0,
            slot_count: 0,
            slots: Vec::new(),
            owners: HashMap::new(),
        }
    }

    /// The epoch of the last table applied; 0 before any.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Adopts a committed table. Slots this server starts leading begin a new term at the table's
    /// epoch; slots it no longer leads are emptied (their new leader rebuilds them from sessions).
    /// Returns the slots it took over. Tables older than the current one are ignored.
    pub fn apply_table(&mut self, table: &SlotTable) -> Vec<SlotId> {
        if table.epoch <= self.epoch && self.slot_count == table.slot_count {
            return Vec::new();
        }
        if self.slot_count != table.slot_count {
            self.slots = (0..table.slot_count).map(|_| Slot::default()).collect();
            self.slot_count = table.slot_count;
            self.owners.clear();
        }
        self.epoch = table.epoch;
        let mut taken = Vec::new();
        for (id, slot) in self.slots.iter_mut().enumerate() {
            let leads = table.leader(id as SlotId) == Some(self.me);
            if leads && !slot.led {
                slot.led = true;
                slot.term = table.epoch;
                slot.counter = 0;
                taken.push(id as SlotId);
            } else if !leads && slot.led {
                slot.led = false;
                for datum in std::mem::take(&mut slot.services).into_values() {
                    for publisher in datum.publishers.values() {
                        release(&mut self.owners, publisher.session_instance);
                    }
                }
            }
        }
        taken
    }

    fn slot_index(&self, service: &ServiceId) -> Result<usize> {
        if self.slot_count == 0 {
            return Err(Error::Unavailable(
                "this data server has no slot table yet".into(),
            ));
        }
        let id = roster_common::slot::slot_of(service, self.slot_count) as usize;
        if !self.slots[id].led {
            return Err(Error::NotLeader { leader: None });
        }
        Ok(id)
    }

    /// Applies one publisher change. `Ok(None)` means it changed nothing (an identical put, or a
    /// remove of something absent or owned by another session).
    pub fn write(&mut self, op: WriteOp) -> Result<Option<Change>> {
        let service = op.service().clone();
        let index = self.slot_index(&service)?;
        let slot = &mut self.slots[index];
        let owners = &mut self.owners;
        match op {
            WriteOp::Put { publisher } => {
                let datum = slot.services.entry(service.clone()).or_default();
                let key = (publisher.client_id.clone(), publisher.register_id.clone());
                if datum.publishers.get(&key) == Some(&publisher) {
                    return Ok(None);
                }
                *owners.entry(publisher.session_instance).or_default() += 1;
                if let Some(old) = datum.publishers.insert(key, publisher) {
                    release(owners, old.session_instance);
                }
            }
            WriteOp::Remove {
                service: _,
                client_id,
                register_id,
                session_instance,
            } => {
                let Some(datum) = slot.services.get_mut(&service) else {
                    return Ok(None);
                };
                let key = (client_id, register_id);
                match datum.publishers.get(&key) {
                    Some(p) if p.session_instance == session_instance => {}
                    _ => return Ok(None),
                }
                datum.publishers.remove(&key);
                release(owners, session_instance);
            }
        }
        let version = slot.next_version();
        slot.services
            .get_mut(&service)
            .expect("present above")
            .version = version;
        Ok(Some((service, version)))
    }

    /// The current datum of `service` (empty at version 0 if it never had a publisher).
    pub fn snapshot(&self, service: &ServiceId) -> Result<Snapshot> {
        let slot = &self.slots[self.slot_index(service)?];
        Ok(match slot.services.get(service) {
            Some(datum) => Snapshot {
                service: service.clone(),
                version: datum.version,
                publishers: datum.publishers.values().map(Publisher::view).collect(),
            },
            None => Snapshot {
                service: service.clone(),
                version: 0,
                publishers: Vec::new(),
            },
        })
    }

    /// Session instances that own at least one publisher here.
    pub fn owners(&self) -> impl Iterator<Item = InstanceId> + '_ {
        self.owners.keys().copied()
    }

    /// Drops every publisher owned by `instance`; returns the services that changed.
    pub fn drop_owner(&mut self, instance: InstanceId) -> Vec<Change> {
        let mut changes = Vec::new();
        for slot in self.slots.iter_mut().filter(|s| s.led) {
            let mut touched = Vec::new();
            for (service, datum) in slot.services.iter_mut() {
                let before = datum.publishers.len();
                datum
                    .publishers
                    .retain(|_, p| p.session_instance != instance);
                if datum.publishers.len() != before {
                    touched.push(service.clone());
                }
            }
            for service in touched {
                let version = slot.next_version();
                slot.services.get_mut(&service).expect("touched").version = version;
                changes.push((service, version));
            }
        }
        self.owners.remove(&instance);
        changes
    }

    /// Every service with at least one publisher, with its count.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let mut out: Vec<ServiceSummary> = self
            .slots
            .iter()
            .filter(|s| s.led)
            .flat_map(|s| s.services.iter())
            .filter(|(_, d)| !d.publishers.is_empty())
            .map(|(service, d)| ServiceSummary {
                service: service.clone(),
                publishers: d.publishers.len() as u64,
                version: d.version,
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }
}

fn release(owners: &mut HashMap<InstanceId, usize>, instance: InstanceId) {
    if let Some(count) = owners.get_mut(&instance) {
        *count -= 1;
        if *count == 0 {
            owners.remove(&instance);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn table(epoch: Epoch, leader: NodeId) -> SlotTable {
        SlotTable {
            epoch,
            slot_count: 8,
            replicas: 1,
            slots: vec![vec![leader]; 8],
        }
    }

    fn publisher(client: &str, reg: &str, data: &str, instance: InstanceId) -> Publisher {
        Publisher {
            client_id: client.into(),
            register_id: reg.into(),
            service: "demo".parse().unwrap(),
            data: vec![Bytes::copy_from_slice(data.as_bytes())],
            attributes: Default::default(),
            client_version: 1,
            session: 1,
            session_instance: instance,
        }
    }

    fn demo() -> ServiceId {
        "demo".parse().unwrap()
    }

    #[test]
    fn versions_grow_with_every_change_and_carry_the_term() {
        let mut store = Store::new(1);
        assert_eq!(store.apply_table(&table(5, 1)).len(), 8);
        let (_, v1) = store
            .write(WriteOp::Put {
                publisher: publisher("c", "r1", "a", 9),
            })
            .unwrap()
            .unwrap();
        assert_eq!(v1 >> 32, 5);
        assert_eq!(
            store
                .write(WriteOp::Put {
                    publisher: publisher("c", "r1", "a", 9)
                })
                .unwrap(),
            None,
            "an identical put changes nothing"
        );
        let (_, v2) = store
            .write(WriteOp::Put {
                publisher: publisher("c", "r1", "b", 9),
            })
            .unwrap()
            .unwrap();
        assert!(v2 > v1);
        let snap = store.snapshot(&demo()).unwrap();
        assert_eq!(snap.version, v2);
        assert_eq!(snap.publishers.len(), 1);
        assert_eq!(snap.publishers[0].data[0], Bytes::from_static(b"b"));
    }

    #[test]
    fn removes_only_what_the_session_owns() {
        let mut store = Store::new(1);
        store.apply_table(&table(1, 1));
        store
            .write(WriteOp::Put {
                publisher: publisher("c", "r1", "a", 9),
            })
            .unwrap();
        let remove = |instance| WriteOp::Remove {
            service: demo(),
            client_id: "c".into(),
            register_id: "r1".into(),
            session_instance: instance,
        };
        assert_eq!(
            store.write(remove(8)).unwrap(),
            None,
            "another session's remove is ignored"
        );
        assert!(store.write(remove(9)).unwrap().is_some());
        assert!(store.snapshot(&demo()).unwrap().publishers.is_empty());
        assert_eq!(store.owners().count(), 0);
    }

    #[test]
    fn dropping_an_owner_removes_its_publishers_only() {
        let mut store = Store::new(1);
        store.apply_table(&table(1, 1));
        store
            .write(WriteOp::Put {
                publisher: publisher("c1", "r", "a", 7),
            })
            .unwrap();
        store
            .write(WriteOp::Put {
                publisher: publisher("c2", "r", "b", 8),
            })
            .unwrap();
        let before = store.snapshot(&demo()).unwrap().version;
        let changes = store.drop_owner(7);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].1 > before);
        let snap = store.snapshot(&demo()).unwrap();
        assert_eq!(snap.publishers.len(), 1);
        assert_eq!(snap.publishers[0].client_id, "c2");
        assert_eq!(store.owners().collect::<Vec<_>>(), vec![8]);
    }

    #[test]
    fn slots_led_elsewhere_refuse_writes() {
        let mut store = Store::new(1);
        assert!(matches!(
            store.snapshot(&demo()),
            Err(Error::Unavailable(_))
        ));
        store.apply_table(&table(1, 2));
        let err = store
            .write(WriteOp::Put {
                publisher: publisher("c", "r", "a", 1),
            })
            .unwrap_err();
        assert!(matches!(err, Error::NotLeader { .. }));
    }

    #[test]
    fn a_new_term_keeps_versions_growing_and_old_tables_are_ignored() {
        let mut store = Store::new(1);
        store.apply_table(&table(3, 1));
        let (_, v1) = store
            .write(WriteOp::Put {
                publisher: publisher("c", "r", "a", 1),
            })
            .unwrap()
            .unwrap();
        store.apply_table(&table(4, 2));
        assert!(
            store.apply_table(&table(2, 1)).is_empty(),
            "an older table is ignored"
        );
        store.apply_table(&table(6, 1));
        let (_, v2) = store
            .write(WriteOp::Put {
                publisher: publisher("c", "r", "a", 1),
            })
            .unwrap()
            .unwrap();
        assert!(v2 > v1);
        assert_eq!(v2 >> 32, 6);
    }
}
