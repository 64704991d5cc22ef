//! The follower's side of slot storage: applying the leader's replicated changes in order
//! (a gap marks the copy out of sync), the whole-slot dumps a leader gives and a follower
//! installs, and the comparison with the leader's digest that catches a copy that drifted or
//! lost its last replication batch (see `copies::check_drift`).

use roster_common::proto::{ReplicatedOp, SlotDigest, SlotDump};
use roster_common::{Error, Result, SlotId};

use super::{MOVING_RETRY, Role, Store, apply_op, set_version};

impl Store {
    /// Applies the leader's changes as follower. Returns how many applied, and the slots that
    /// showed a gap (not applied: to fetch whole).
    pub fn replicate(&mut self, ops: Vec<ReplicatedOp>) -> (usize, Vec<SlotId>) {
        let mut applied = 0;
        let mut gaps: Vec<SlotId> = Vec::new();
        for r in ops {
            let Some(slot) = self.slots.get_mut(r.slot as usize) else {
                continue;
            };
            if slot.role != Role::Follower || !slot.in_sync {
                if slot.role == Role::Follower && !gaps.contains(&r.slot) {
                    gaps.push(r.slot);
                }
                continue;
            }
            if r.version <= slot.version {
                // Already in the copy (a fetched dump covered it).
                continue;
            }
            if r.prev != slot.version {
                slot.in_sync = false;
                gaps.push(r.slot);
                continue;
            }
            let _ = apply_op(slot, &mut self.owners, &r.op, Some(r.version));
            slot.version = r.version;
            set_version(slot, r.op.service(), r.version);
            applied += 1;
        }
        gaps.sort_unstable();
        gaps.dedup();
        (applied, gaps)
    }

    /// A whole slot, for a follower. Only a ready leader gives one.
    pub fn dump(&self, slot: SlotId) -> Result<SlotDump> {
        let s = self
            .slots
            .get(slot as usize)
            .ok_or_else(|| Error::InvalidArgument(format!("no slot {slot}")))?;
        if s.role != Role::Leader {
            return Err(Error::NotLeader { leader: None });
        }
        if s.moving_since.is_some() {
            return Err(Error::SlotMoving {
                retry_after: MOVING_RETRY,
            });
        }
        Ok(SlotDump {
            slot,
            version: s.version,
            datums: s
                .services
                .iter()
                .map(|(k, d)| (k.clone(), d.version))
                .collect(),
            publishers: s.publishers().cloned().collect(),
        })
    }

    /// Replaces a followed slot with the leader's copy.
    pub fn install_dump(&mut self, dump: SlotDump) -> bool {
        let Some(slot) = self.slots.get_mut(dump.slot as usize) else {
            return false;
        };
        if slot.role != Role::Follower {
            return false;
        }
        slot.clear(&mut self.owners);
        for (service, version) in dump.datums {
            slot.services.entry(service).or_default().version = version;
        }
        for mut p in dump.publishers {
            *self.owners.entry(p.session_instance).or_default() += 1;
            // Every record of a service shares the datum key's service id allocation.
            if let Some((shared, _)) = slot.services.get_key_value(&p.service) {
                p.service = shared.clone();
            }
            let key = (p.client_id.clone(), p.register_id.clone());
            slot.services
                .entry(p.service.clone())
                .or_default()
                .publishers
                .insert(key, p);
        }
        slot.version = dump.version;
        slot.in_sync = true;
        true
    }

    /// Followed slots without a copy, to fetch.
    pub fn out_of_sync(&self) -> Vec<SlotId> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.role == Role::Follower && !s.in_sync)
            .map(|(i, _)| i as SlotId)
            .collect()
    }

    /// Followed slots with a copy, for the periodic drift check.
    pub fn followed_in_sync(&self) -> Vec<SlotId> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.role == Role::Follower && s.in_sync)
            .map(|(i, _)| i as SlotId)
            .collect()
    }

    /// Marks a followed slot as drifted: it is fetched whole again.
    pub fn mark_out_of_sync(&mut self, slot: SlotId) {
        if let Some(s) = self.slots.get_mut(slot as usize)
            && s.role == Role::Follower
        {
            s.in_sync = false;
        }
    }

    /// Compares a followed slot with its leader's digest: `Some(why)` when the copy must be fetched
    /// again — it differs at the same version (`"drift"`), or it is still behind a version the
    /// leader already had at the previous check (`"lag"`: a replication batch was lost and no later
    /// write brought it; plain replication lag catches up between two checks).
    pub fn compare_with_leader(&mut self, theirs: &SlotDigest) -> Option<&'static str> {
        let ours = self.slot_digest(theirs.slot)?;
        let slot = self.slots.get_mut(theirs.slot as usize)?;
        if slot.role != Role::Follower || !slot.in_sync {
            return None;
        }
        let was_behind = slot.behind.take();
        if ours.version == theirs.version {
            return (ours.digest != theirs.digest).then_some("drift");
        }
        if ours.version > theirs.version {
            return None;
        }
        if was_behind.is_some_and(|then| ours.version < then) {
            return Some("lag");
        }
        slot.behind = Some(theirs.version);
        None
    }
}
