//! Persistent instances as the meta group takes them: what a `RegisterPersistent` must satisfy
//! before it becomes a log entry, and how a slot's set is read back for its data-tier leader.
//!
//! The meta group stores them because it already is the cluster's replicated, fsynced store: an
//! acknowledged registration is on a quorum's disks, and a whole cluster restarted from its
//! directories finds them again in the log and snapshots. The data tier only serves them
//! (`docs/ARCHITECTURE.md`, *Persistent instances and health checks*).

use roster_common::ids::check_id;
use roster_common::proto::{PersistentInstance, publisher_size};
use roster_common::{Error, Result, SlotId, Version};

use crate::state::MetaState;

/// The most bytes of data items and attribute keys and values one instance may carry (the same
/// bound session servers apply to a publisher by default).
pub const MAX_INSTANCE_BYTES: usize = 65_536;
/// The longest `by` kept with an instance.
const MAX_BY: usize = 256;

/// Refuses an instance that could not be served: bad ids, too much data, a bad check. `by` is cut
/// to a printable name.
pub fn admit(instance: &mut PersistentInstance) -> Result<()> {
    check_id("instance id", &instance.id)?;
    if instance.data.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "persistent instance {:?} has no data",
            instance.id
        )));
    }
    let bytes = publisher_size(&instance.data, &instance.attributes);
    if bytes > MAX_INSTANCE_BYTES {
        return Err(Error::InvalidArgument(format!(
            "persistent instance {:?} carries {bytes} bytes; at most {MAX_INSTANCE_BYTES}",
            instance.id
        )));
    }
    if let Some(check) = &instance.check {
        check.validate(&instance.data)?;
    }
    instance.by = clean(&instance.by);
    Ok(())
}

/// A name for the log: printable and bounded.
pub fn clean(by: &str) -> String {
    by.chars()
        .filter(|c| !c.is_control())
        .take(MAX_BY)
        .collect()
}

/// Slot `slot`'s instances at its current version, or `Unavailable` while this node has not yet
/// applied version `at_least` (the caller saw it in a view from another node).
pub fn read_slot(
    state: &MetaState,
    slot: SlotId,
    at_least: Version,
) -> Result<(Version, Vec<PersistentInstance>)> {
    if slot >= state.table.slot_count {
        return Err(Error::InvalidArgument(format!(
            "slot {slot} does not exist (the cluster has {})",
            state.table.slot_count
        )));
    }
    let (version, instances) = match state.persistent.get(&slot) {
        Some(set) => (set.version, set.all().cloned().collect()),
        None => (0, Vec::new()),
    };
    if version < at_least {
        return Err(Error::Unavailable(format!(
            "this meta node has slot {slot}'s persistent instances at version {version}, not yet \
             {at_least}; retry"
        )));
    }
    Ok((version, instances))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use roster_common::health::CheckSpec;

    use super::*;
    use crate::state::Command;

    fn instance(service: &str, id: &str) -> PersistentInstance {
        PersistentInstance {
            service: service.parse().unwrap(),
            id: id.into(),
            data: vec![Bytes::from_static(b"10.0.0.1:5432")],
            attributes: Default::default(),
            check: Some(CheckSpec::new("tcp")),
            registered_ms: 1,
            by: "ops".into(),
        }
    }

    #[test]
    fn bad_instances_are_refused_before_the_log() {
        let mut empty = instance("db", "a");
        empty.data.clear();
        let mut big = instance("db", "a");
        big.data = vec![Bytes::from(vec![b'x'; MAX_INSTANCE_BYTES + 1])];
        let mut bad_check = instance("db", "a");
        bad_check.check = Some(CheckSpec::new("ftp://x:1"));
        let mut bad_id = instance("db", "a");
        bad_id.id = "a\0b".into();
        for mut i in [empty, big, bad_check, bad_id] {
            assert!(matches!(admit(&mut i), Err(Error::InvalidArgument(_))));
        }
        let mut ok = instance("db", "a");
        ok.by = "x\ny".into();
        admit(&mut ok).unwrap();
        assert_eq!(ok.by, "xy");
    }

    #[test]
    fn every_change_of_a_slot_bumps_its_version_and_the_view_carries_it() {
        let mut state = MetaState::new("c".into(), 16, 3);
        let db = instance("db", "a");
        let slot = state.table.slot_of(&db.service);
        assert_eq!(read_slot(&state, slot, 0).unwrap(), (0, vec![]));
        assert!(state.apply(Command::RegisterPersistent {
            instance: db.clone()
        }));
        // The same registration again, by someone else later, changes nothing.
        let mut again = db.clone();
        again.by = "other".into();
        again.registered_ms = 2;
        assert!(!state.apply(Command::RegisterPersistent { instance: again }));
        let mut moved = db.clone();
        moved.data = vec![Bytes::from_static(b"10.0.0.2:5432")];
        assert!(state.apply(Command::RegisterPersistent {
            instance: moved.clone()
        }));
        assert_eq!(state.view(None).persistent.get(&slot), Some(&2));
        assert_eq!(read_slot(&state, slot, 2).unwrap(), (2, vec![moved]));
        assert!(matches!(
            read_slot(&state, slot, 3),
            Err(Error::Unavailable(_))
        ));
        assert_eq!(state.persistent_count(), 1);

        let deregister = || Command::DeregisterPersistent {
            service: db.service.clone(),
            id: "a".into(),
            by: "ops".into(),
        };
        assert!(state.apply(deregister()));
        assert!(!state.apply(deregister()));
        // Emptied, the slot keeps its version: a leader that saw 3 never reads an older set.
        assert_eq!(read_slot(&state, slot, 3).unwrap(), (3, vec![]));
        assert_eq!(state.persistent_count(), 0);
        assert!(matches!(
            read_slot(&state, 16, 0),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn persistent_instances_survive_a_snapshot() {
        let mut state = MetaState::new("c".into(), 16, 3);
        for i in 0..50 {
            state.apply(Command::RegisterPersistent {
                instance: instance(&format!("svc-{}", i % 7), &format!("i{i}")),
            });
        }
        let bytes = rmp_serde::to_vec_named(&state).unwrap();
        let back: MetaState = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.persistent_count(), 50);
        assert_eq!(back.view(None).persistent, state.view(None).persistent);
    }
}
