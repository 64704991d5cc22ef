//! What the health checker reads from the store and writes back: the records with a check in the
//! slots this server leads, a stamp per slot that moves when any of them may have changed (so a
//! rescan touches only those slots), and the write of a new health.

use roster_common::health::{CheckSpec, Health, Probe};
use roster_common::proto::{Publisher, WriteOp};
use roster_common::{ClientId, RegisterId, Result, ServiceId, SlotId};

use super::{Applied, Role, Store};

/// A record's identity: its service, client id and register id.
pub type RecordKey = (ServiceId, ClientId, RegisterId);

/// A record whose check this server runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub key: RecordKey,
    pub persistent: bool,
    pub check: CheckSpec,
    /// What to probe, resolved against the record's data; an error when the data does not name an
    /// address (a bare `tcp` check on data that changed): such a record is not probed.
    pub probe: Result<Probe>,
    /// The health recorded so far.
    pub health: Option<Health>,
}

/// How many records with a check the led slots hold, by health, and how many persistent ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckCounts {
    pub persistent: usize,
    pub healthy: usize,
    pub unhealthy: usize,
}

fn key_of(p: &Publisher) -> RecordKey {
    (
        p.service.clone(),
        p.client_id.clone(),
        p.register_id.clone(),
    )
}

impl Store {
    /// Each slot this server leads, with a stamp that moves whenever a record with a check in it
    /// changes or this server's role in it does.
    pub fn check_stamps(&self) -> Vec<(SlotId, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.role == Role::Leader)
            .map(|(index, s)| (index as SlotId, s.check_stamp))
            .collect()
    }

    /// The records with a check in `slot`, if this server leads it.
    pub fn checked_in(&self, slot: SlotId) -> Vec<Checked> {
        let Some(s) = self
            .slots
            .get(slot as usize)
            .filter(|s| s.role == Role::Leader)
        else {
            return Vec::new();
        };
        s.publishers()
            .filter_map(|p| {
                let check = p.check.as_ref()?;
                Some(Checked {
                    key: key_of(p),
                    persistent: p.persistent,
                    check: check.clone(),
                    probe: check.probe(&p.data),
                    health: p.health.clone(),
                })
            })
            .collect()
    }

    /// Records `health` on the record `key` if this server leads its slot and the record is still
    /// checked with `check` at `probe`; otherwise (gone, check or address changed, slot lost)
    /// changes nothing. An ephemeral record keeps its `client_version`, which the owning
    /// session's digest covers; a persistent one's is bumped, as for any change of it.
    pub fn set_health(
        &mut self,
        key: &RecordKey,
        check: &CheckSpec,
        probe: &Probe,
        health: Health,
    ) -> Result<Applied> {
        let mut applied = Applied::default();
        let index = self.slot_index(&key.0)?;
        if self.slots[index].role != Role::Leader {
            return Ok(applied);
        }
        let Some(current) = self.slots[index]
            .services
            .get(&key.0)
            .and_then(|d| d.publishers.get(&(key.1.clone(), key.2.clone())))
        else {
            return Ok(applied);
        };
        let unchanged = current.check.as_ref() == Some(check)
            && check.probe(&current.data).ok().as_ref() == Some(probe);
        if !unchanged || current.health.as_ref() == Some(&health) {
            return Ok(applied);
        }
        let mut record = current.clone();
        record.health = Some(health);
        if record.persistent {
            record.client_version += 1;
        }
        if let Some(led) = self.lead(index, WriteOp::Put { publisher: record })? {
            applied.push(led);
        }
        Ok(applied)
    }

    /// Checked and persistent records in the slots this server leads.
    pub fn check_counts(&self) -> CheckCounts {
        let mut counts = CheckCounts::default();
        for p in self
            .slots
            .iter()
            .filter(|s| s.role == Role::Leader)
            .flat_map(|s| s.publishers())
        {
            counts.persistent += usize::from(p.persistent);
            if p.check.is_some() {
                match p.health.as_ref().is_none_or(|h| h.healthy) {
                    true => counts.healthy += 1,
                    false => counts.unhealthy += 1,
                }
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use bytes::Bytes;
    use roster_common::proto::PersistentInstance;

    use super::super::tests::{demo, leader, publisher, put, slot_of_demo, table};
    use super::*;

    fn checked(client: &str, reg: &str, addr: &str) -> Publisher {
        let mut p = publisher(client, reg, addr, 9);
        p.check = Some(CheckSpec::new("tcp"));
        p
    }

    fn down(reason: &str) -> Health {
        Health {
            healthy: false,
            checked_ms: 5,
            failure: Some(reason.into()),
        }
    }

    fn stamp(store: &Store) -> u64 {
        store
            .check_stamps()
            .into_iter()
            .find(|(slot, _)| *slot == slot_of_demo())
            .unwrap()
            .1
    }

    #[test]
    fn the_stamp_moves_only_with_checked_records_and_roles() {
        let mut store = leader(1, 1, &[1]);
        let before = stamp(&store);
        store.write(put(publisher("c", "plain", "x", 9))).unwrap();
        assert_eq!(stamp(&store), before, "no check: nothing to rescan");
        store.write(put(checked("c", "r", "10.0.0.1:80"))).unwrap();
        let after = stamp(&store);
        assert!(after > before);
        let listed = store.checked_in(slot_of_demo());
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].probe,
            Ok(Probe::Tcp("10.0.0.1:80".into())),
            "resolved against the data"
        );

        store.apply_table(&table(2, &[2, 1]), Instant::now());
        assert!(store.check_stamps().is_empty(), "no longer led");
        assert!(store.checked_in(slot_of_demo()).is_empty());
    }

    #[test]
    fn a_health_is_written_only_for_the_same_check_and_address() {
        let mut store = leader(1, 1, &[1]);
        let p = checked("c", "r", "10.0.0.1:80");
        store.write(put(p.clone())).unwrap();
        let key = (demo(), "c".to_owned(), "r".to_owned());
        let check = CheckSpec::new("tcp");
        let old_probe = Probe::Tcp("10.0.0.9:80".into());
        assert!(
            store
                .set_health(&key, &check, &old_probe, down("refused"))
                .unwrap()
                .ops
                .is_empty(),
            "the probe of an address the record no longer has"
        );
        let other_check = CheckSpec::new("tcp://10.0.0.1:80");
        let probe = Probe::Tcp("10.0.0.1:80".into());
        assert!(
            store
                .set_health(&key, &other_check, &probe, down("refused"))
                .unwrap()
                .ops
                .is_empty()
        );
        let applied = store
            .set_health(&key, &check, &probe, down("refused"))
            .unwrap();
        assert_eq!(applied.ops.len(), 1, "replicated and notified");
        let view = &store.snapshot(&demo()).unwrap().publishers[0];
        assert_eq!(view.health, Some(down("refused")));
        assert_eq!(
            view.client_version, p.client_version,
            "an ephemeral record keeps its version"
        );
        assert!(
            store
                .set_health(&key, &check, &probe, down("refused"))
                .unwrap()
                .ops
                .is_empty(),
            "the same health again"
        );
        let gone = (demo(), "c".to_owned(), "nobody".to_owned());
        assert!(
            store
                .set_health(&gone, &check, &probe, down("x"))
                .unwrap()
                .ops
                .is_empty()
        );
        assert_eq!(
            store.check_counts(),
            CheckCounts {
                persistent: 0,
                healthy: 0,
                unhealthy: 1
            }
        );
    }

    #[test]
    fn a_persistent_record_gets_a_new_version_with_its_health() {
        let mut store = leader(1, 1, &[1]);
        let instance = PersistentInstance {
            service: demo(),
            id: "db".into(),
            data: vec![Bytes::from_static(b"10.0.0.1:5432")],
            attributes: BTreeMap::new(),
            check: Some(CheckSpec::new("tcp")),
            registered_ms: 0,
            by: String::new(),
        };
        store
            .merge_persistent(slot_of_demo(), 1, vec![instance])
            .unwrap();
        let [record] = store.checked_in(slot_of_demo()).try_into().unwrap();
        assert!(record.persistent);
        assert_eq!(record.health, Some(Health::unchecked()));
        let probe = record.probe.clone().unwrap();
        store
            .set_health(&record.key, &record.check, &probe, down("HTTP 500"))
            .unwrap();
        let view = &store.snapshot(&demo()).unwrap().publishers[0];
        assert_eq!(view.client_version, 2);
        assert_eq!(view.health, Some(down("HTTP 500")));
        assert_eq!(
            store.check_counts(),
            CheckCounts {
                persistent: 1,
                healthy: 0,
                unhealthy: 1
            }
        );
    }
}
