//! The records a slot leader keeps on the cluster's behalf: persistent instances, merged from the
//! meta group's set of the slot ([`Store::merge_persistent`], [`persistent_diff`]), and the rule
//! that keeps sessions away from them and from the health the leader records
//! ([`Store::admit_session_op`]).
//!
//! A persistent record is held by no session: `session_instance` 0 (no session ever has it), owner
//! [`PERSISTENT_OWNER`], client id [`PERSISTENT_CLIENT_ID`]. So the dead-session sweep, a
//! session's sync and its digests never see it; only the merge puts or removes one.

use std::collections::{BTreeMap, HashMap};

use roster_common::health::{CheckSpec, Health};
use roster_common::ids::{PERSISTENT_CLIENT_ID, PERSISTENT_OWNER, is_reserved_client_id};
use roster_common::proto::{PersistentInstance, Publisher, WriteOp};
use roster_common::{Error, RegisterId, Result, ServiceId, SlotId, Version};

use super::{Applied, Role, Store};

impl Store {
    /// Checks a session's change before it is applied: a session may not create, replace or
    /// remove a persistent record (reserved client id, `persistent`, or the persistent owner:
    /// `InvalidArgument`), and the health of a record is the leader's to set, so a put's is
    /// replaced by what the leader recorded (kept while the check is unchanged; unchecked for a
    /// new check; none without one).
    pub(super) fn admit_session_op(&self, index: usize, op: WriteOp) -> Result<WriteOp> {
        match op {
            WriteOp::Put { mut publisher } => {
                if is_reserved_client_id(&publisher.client_id)
                    || publisher.persistent
                    || publisher.owner == PERSISTENT_OWNER
                {
                    return Err(reserved(&publisher.client_id, &publisher.register_id));
                }
                let recorded = self.slots[index].record_of(&publisher);
                publisher.health = kept_health(recorded, publisher.check.as_ref());
                Ok(WriteOp::Put { publisher })
            }
            WriteOp::Remove {
                ref client_id,
                ref register_id,
                owner,
                ..
            } => {
                if is_reserved_client_id(client_id) || owner == Some(PERSISTENT_OWNER) {
                    return Err(reserved(client_id, register_id));
                }
                Ok(op)
            }
        }
    }

    /// The led slots whose persistent set must be merged, with the version to merge at least:
    /// the version `versions` (the view's) gives, when it is past what was merged or nothing
    /// was merged since this server took the slot. A slot absent from `versions` never held a
    /// persistent instance: version 0, the empty set.
    pub fn persistent_due(&self, versions: &BTreeMap<SlotId, Version>) -> Vec<(SlotId, Version)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.role == Role::Leader)
            .filter_map(|(index, s)| {
                let slot = index as SlotId;
                let wanted = versions.get(&slot).copied().unwrap_or(0);
                match s.persistent_merged {
                    Some(merged) if merged >= wanted => None,
                    _ => Some((slot, wanted)),
                }
            })
            .collect()
    }

    /// Makes the persistent records of `slot`, which this server leads, exactly `instances`
    /// (the meta group's set at `version`): puts the new and changed ones, removes the ones gone.
    /// A set older than one already merged is ignored.
    pub fn merge_persistent(
        &mut self,
        slot: SlotId,
        version: Version,
        instances: Vec<PersistentInstance>,
    ) -> Result<Applied> {
        let index = slot as usize;
        let s = self
            .slots
            .get(index)
            .filter(|s| s.role == Role::Leader)
            .ok_or(Error::NotLeader { leader: None })?;
        let mut applied = Applied::default();
        if s.persistent_merged.is_some_and(|merged| merged >= version) {
            return Ok(applied);
        }
        let slot_count = self.slot_count;
        let wanted: Vec<PersistentInstance> = instances
            .into_iter()
            .filter(|i| roster_common::slot::slot_of(&i.service, slot_count) == slot)
            .collect();
        let ops = persistent_diff(s.publishers().filter(|p| p.persistent), &wanted);
        for op in ops {
            // Only a record under the reserved client id with another owner could refuse a put,
            // and sessions cannot write one; skipping it keeps what did apply in `applied`.
            if let Ok(Some(led)) = self.lead(index, op) {
                applied.push(led);
            }
        }
        self.slots[index].persistent_merged = Some(version);
        Ok(applied)
    }

    /// The persistent records of the slots this server leads, in slot order.
    pub fn persistent_records(&self) -> Vec<(SlotId, &Publisher)> {
        let mut out: Vec<(SlotId, &Publisher)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.role == Role::Leader)
            .flat_map(|(index, s)| {
                s.publishers()
                    .filter(|p| p.persistent)
                    .map(move |p| (index as SlotId, p))
            })
            .collect();
        out.sort_by(|a, b| {
            (a.0, &a.1.service, &a.1.register_id).cmp(&(b.0, &b.1.service, &b.1.register_id))
        });
        out
    }
}

fn reserved(client_id: &str, register_id: &str) -> Error {
    Error::InvalidArgument(format!(
        "publisher {register_id:?} of client {client_id:?}: persistent records and client ids \
         starting with '~' are kept by the cluster and cannot be written by a session"
    ))
}

/// The health a record keeps when it is rewritten with `check`: what `recorded` holds while the
/// check is unchanged, else unchecked (a new check has found nothing yet); none without a check.
fn kept_health(recorded: Option<&Publisher>, check: Option<&CheckSpec>) -> Option<Health> {
    let check = check?;
    match recorded {
        Some(r) if r.check.as_ref() == Some(check) && r.health.is_some() => r.health.clone(),
        _ => Some(Health::unchecked()),
    }
}

/// The record of a persistent instance.
pub fn persistent_record(
    instance: &PersistentInstance,
    client_version: u64,
    health: Option<Health>,
) -> Publisher {
    Publisher {
        client_id: PERSISTENT_CLIENT_ID.to_owned(),
        register_id: instance.id.clone(),
        service: instance.service.clone(),
        data: instance.data.clone(),
        attributes: instance.attributes.clone(),
        client_version,
        session: 0,
        session_instance: 0,
        owner: PERSISTENT_OWNER,
        persistent: true,
        check: instance.check.clone(),
        health,
        registered_ms: 0,
    }
}

/// The ops that turn a slot's persistent records (`current`) into the meta group's set
/// (`wanted`): a put for each new instance and each one whose data, attributes or check changed
/// (its `client_version` one above the record's; its health kept while the check is unchanged),
/// a remove for each record no longer wanted. Ops come in `(service, id)` order, puts first.
pub fn persistent_diff<'a>(
    current: impl IntoIterator<Item = &'a Publisher>,
    wanted: &[PersistentInstance],
) -> Vec<WriteOp> {
    let mut held: HashMap<(&ServiceId, &RegisterId), &Publisher> = current
        .into_iter()
        .map(|p| ((&p.service, &p.register_id), p))
        .collect();
    let mut ops = Vec::new();
    let mut sorted: Vec<&PersistentInstance> = wanted.iter().collect();
    sorted.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
    for instance in sorted {
        let recorded = held.remove(&(&instance.service, &instance.id));
        if let Some(r) = recorded
            && r.data == instance.data
            && r.attributes == instance.attributes
            && r.check == instance.check
        {
            continue;
        }
        let health = kept_health(recorded, instance.check.as_ref());
        let client_version = recorded.map_or(1, |r| r.client_version + 1);
        ops.push(WriteOp::Put {
            publisher: persistent_record(instance, client_version, health),
        });
    }
    let mut gone: Vec<&Publisher> = held.into_values().collect();
    gone.sort_by(|a, b| (&a.service, &a.register_id).cmp(&(&b.service, &b.register_id)));
    ops.extend(gone.into_iter().map(|p| WriteOp::Remove {
        service: p.service.clone(),
        client_id: p.client_id.clone(),
        register_id: p.register_id.clone(),
        session_instance: p.session_instance,
        owner: None,
    }));
    ops
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use roster_common::proto::PublisherChange;

    use super::super::tests::{demo, leader, publisher, put, slot_of_demo, table};
    use super::*;

    fn instance(id: &str, data: &str, check: Option<&str>) -> PersistentInstance {
        PersistentInstance {
            service: demo(),
            id: id.into(),
            data: vec![Bytes::copy_from_slice(data.as_bytes())],
            attributes: Default::default(),
            check: check.map(CheckSpec::new),
            registered_ms: 1,
            by: "ops".into(),
        }
    }

    fn down() -> Health {
        Health {
            healthy: false,
            checked_ms: 9,
            failure: Some("connection refused".into()),
        }
    }

    fn ids_of(ops: &[WriteOp]) -> Vec<(&'static str, String)> {
        ops.iter()
            .map(|op| match op {
                WriteOp::Put { publisher } => ("put", publisher.register_id.clone()),
                WriteOp::Remove { register_id, .. } => ("remove", register_id.clone()),
            })
            .collect()
    }

    #[test]
    fn the_diff_puts_new_and_changed_instances_and_removes_the_gone() {
        let same = persistent_record(&instance("same", "10.0.0.1:80", None), 3, None);
        let mut moved = persistent_record(&instance("moved", "10.0.0.2:80", Some("tcp")), 4, None);
        moved.health = Some(down());
        let gone = persistent_record(&instance("gone", "10.0.0.3:80", None), 1, None);
        let wanted = [
            instance("same", "10.0.0.1:80", None),
            instance("new", "10.0.0.4:80", Some("tcp")),
            instance("moved", "10.0.0.9:80", Some("tcp")),
        ];
        let ops = persistent_diff([&same, &moved, &gone], &wanted);
        assert_eq!(
            ids_of(&ops),
            [
                ("put", "moved".into()),
                ("put", "new".into()),
                ("remove", "gone".into())
            ]
        );
        let WriteOp::Put { publisher: changed } = &ops[0] else {
            unreachable!()
        };
        assert_eq!(changed.client_version, 5, "bumped on every change");
        assert_eq!(
            changed.health,
            Some(down()),
            "same check: the recorded health stays"
        );
        let WriteOp::Put { publisher: new } = &ops[1] else {
            unreachable!()
        };
        assert_eq!(
            (
                new.client_id.as_str(),
                new.owner,
                new.session,
                new.session_instance
            ),
            (PERSISTENT_CLIENT_ID, PERSISTENT_OWNER, 0, 0)
        );
        assert!(new.persistent);
        assert_eq!(
            (new.client_version, new.health.clone()),
            (1, Some(Health::unchecked()))
        );
        assert!(
            persistent_diff([&same], &wanted[..1]).is_empty(),
            "nothing changed"
        );
    }

    #[test]
    fn a_changed_check_resets_the_health_and_no_check_means_no_health() {
        let mut held = persistent_record(&instance("a", "10.0.0.1:80", Some("tcp")), 2, None);
        held.health = Some(down());
        let recheck = instance("a", "10.0.0.1:80", Some("tcp://10.0.0.1:81"));
        let ops = persistent_diff([&held], std::slice::from_ref(&recheck));
        let [WriteOp::Put { publisher }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(publisher.health, Some(Health::unchecked()));

        let unchecked = instance("a", "10.0.0.1:80", None);
        let ops = persistent_diff([&held], std::slice::from_ref(&unchecked));
        let [WriteOp::Put { publisher }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(
            (publisher.check.clone(), publisher.health.clone()),
            (None, None)
        );

        let mut attributed = instance("a", "10.0.0.1:80", Some("tcp"));
        attributed.attributes.insert("zone".into(), "b".into());
        assert_eq!(persistent_diff([&held], &[attributed]).len(), 1);
    }

    #[test]
    fn a_merge_goes_through_the_leader_and_is_not_repeated_for_an_older_set() {
        let mut store = leader(1, 1, &[1, 2]);
        let slot = slot_of_demo();
        let due = store.persistent_due(&BTreeMap::from([(slot, 4)]));
        assert!(due.contains(&(slot, 4)) && due.contains(&((slot + 1) % 8, 0)));

        let applied = store
            .merge_persistent(slot, 4, vec![instance("db", "10.0.0.1:5432", None)])
            .unwrap();
        assert_eq!(applied.ops.len(), 1, "replicated like any change");
        assert!(matches!(applied.changes[0].change, PublisherChange::Put(ref v) if v.persistent));
        assert!(
            !store
                .persistent_due(&BTreeMap::from([(slot, 4)]))
                .contains(&(slot, 4))
        );
        assert!(
            store
                .merge_persistent(slot, 3, Vec::new())
                .unwrap()
                .ops
                .is_empty(),
            "older"
        );
        let removed = store.merge_persistent(slot, 5, Vec::new()).unwrap();
        assert_eq!(removed.ops.len(), 1);
        assert!(store.snapshot(&demo()).unwrap().publishers.is_empty());

        // Taking the slot over again merges again, whatever was merged before.
        let now = Instant::now();
        store.apply_table(&table(2, &[2, 1]), now);
        assert!(matches!(
            store.merge_persistent(slot, 6, Vec::new()),
            Err(Error::NotLeader { .. })
        ));
        store.apply_table(&table(3, &[1, 2]), now);
        assert!(
            store
                .persistent_due(&BTreeMap::from([(slot, 5)]))
                .contains(&(slot, 5))
        );
    }

    #[test]
    fn sessions_can_neither_write_nor_remove_persistent_records() {
        let mut store = leader(1, 1, &[1]);
        let slot = slot_of_demo();
        store
            .merge_persistent(slot, 1, vec![instance("db", "10.0.0.1:5432", None)])
            .unwrap();
        let mut forged = persistent_record(&instance("db", "evil:1", None), 99, None);
        forged.session_instance = 9;
        let mut flagged = publisher("c", "r", "x", 9);
        flagged.persistent = true;
        let mut owned = publisher("c", "r", "x", 9);
        owned.owner = PERSISTENT_OWNER;
        let remove = |client_id: &str, owner| WriteOp::Remove {
            service: demo(),
            client_id: client_id.into(),
            register_id: "db".into(),
            session_instance: 0,
            owner,
        };
        for op in [
            put(forged.clone()),
            put(flagged),
            put(owned),
            remove(PERSISTENT_CLIENT_ID, None),
            remove("c", Some(PERSISTENT_OWNER)),
        ] {
            let err = store.write(op.clone()).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{op:?}: {err:?}");
        }
        let err = store
            .session_sync(9, slot, vec![forged], &HashSet::new())
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));

        // Neither the dead-session sweep nor a session's sync touches them.
        assert_eq!(
            store.owners().count(),
            0,
            "no session holds a persistent record"
        );
        assert!(store.drop_owner(0).ops.is_empty());
        store.write(put(publisher("c", "r", "x", 9))).unwrap();
        assert_eq!(
            store
                .session_sync(9, slot, Vec::new(), &HashSet::new())
                .unwrap()
                .ops
                .len(),
            1
        );
        let left = store.snapshot(&demo()).unwrap().publishers;
        assert_eq!(left.len(), 1);
        assert!(left[0].persistent);
    }

    #[test]
    fn a_session_put_never_sets_health_and_keeps_the_recorded_one_while_its_check_stands() {
        let mut store = leader(1, 1, &[1]);
        let mut p = publisher("c", "r", "10.0.0.1:80", 9);
        p.check = Some(CheckSpec::new("tcp"));
        p.health = Some(down());
        store.write(put(p.clone())).unwrap();
        assert_eq!(
            store_health(&store),
            Some(Health::unchecked()),
            "a session's health is ignored"
        );

        let key = (demo(), "c".to_owned(), "r".to_owned());
        let probe = p.check.as_ref().unwrap().probe(&p.data).unwrap();
        store
            .set_health(&key, p.check.as_ref().unwrap(), &probe, down())
            .unwrap();
        assert_eq!(store_health(&store), Some(down()));

        // Re-published with new data and the same check: the recorded health stays.
        let mut again = p.clone();
        again.data = vec![Bytes::from_static(b"10.0.0.1:80"), Bytes::from_static(b"x")];
        again.client_version = 2;
        again.health = None;
        store.write(put(again.clone())).unwrap();
        assert_eq!(store_health(&store), Some(down()));
        // The same put again changes nothing.
        assert!(store.write(put(again.clone())).unwrap().ops.is_empty());

        // Another check starts over; no check, no health.
        again.check = Some(CheckSpec::new("tcp://10.0.0.1:81"));
        again.client_version = 3;
        store.write(put(again.clone())).unwrap();
        assert_eq!(store_health(&store), Some(Health::unchecked()));
        again.check = None;
        again.client_version = 4;
        store.write(put(again)).unwrap();
        assert_eq!(store_health(&store), None);
    }

    fn store_health(store: &Store) -> Option<Health> {
        store.snapshot(&demo()).unwrap().publishers[0]
            .health
            .clone()
    }

    #[test]
    fn a_slot_taken_over_is_merged_while_it_is_still_moving() {
        let now = Instant::now();
        let mut store = Store::new(1);
        store.apply_table(&table(1, &[1]), now);
        let slot = slot_of_demo();
        assert!(
            store
                .merge_persistent(slot, 2, vec![instance("db", "h:1", None)])
                .is_ok()
        );
        store.open_ready(&HashSet::new(), now, Duration::ZERO);
        assert_eq!(store.snapshot(&demo()).unwrap().publishers.len(), 1);
    }
}
