//! Taking a slot over: a new leader counts each live session as heard once the session's digest
//! of its records in the slot matches (or a sync made them match), and opens the slot when every
//! live session has been heard or the takeover timeout passed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use roster_common::proto::{Digest, Publisher, SlotDigest, WriteOp};
use roster_common::{Error, InstanceId, Result, SlotId};

use super::{Applied, Role, Store, remove_op};

impl Store {
    /// Compares a session's digests with the records it owns in the slots this server leads.
    /// Matching slots count the session as heard; the others are returned, to be synced.
    pub fn session_digests(&mut self, instance: InstanceId, digests: &[SlotDigest]) -> Vec<SlotId> {
        let mut mismatched = Vec::new();
        for d in digests {
            let Some(slot) = self.slots.get_mut(d.slot as usize) else {
                continue;
            };
            if slot.role != Role::Leader {
                continue;
            }
            let ours = Digest::of(slot.publishers().filter(|p| p.session_instance == instance));
            if ours == d.digest {
                slot.heard.insert(instance);
            } else {
                mismatched.push(d.slot);
            }
        }
        mismatched
    }

    /// Makes this leader's records of session `instance` in `slot` exactly `publishers`, except
    /// that a record another client owns is never replaced, nor one another `live` session holds
    /// under a registration at least as recent: a sync does not take a publisher back from the
    /// session its client moved to (the session it left may still list it until it notices), but
    /// does take one whose registration on this session never reached the slot (a write lost with
    /// the old leader) from the session the client left.
    pub fn session_sync(
        &mut self,
        instance: InstanceId,
        slot: SlotId,
        publishers: Vec<Publisher>,
        live: &HashSet<InstanceId>,
    ) -> Result<Applied> {
        let index = slot as usize;
        if self.slots.get(index).is_none_or(|s| s.role != Role::Leader) {
            return Err(Error::NotLeader { leader: None });
        }
        let mut ops: Vec<WriteOp> = Vec::new();
        let wanted: HashSet<(&str, &str)> = publishers
            .iter()
            .map(|p| (p.client_id.as_str(), p.register_id.as_str()))
            .collect();
        for p in self.slots[index].publishers() {
            if p.session_instance == instance
                && !p.persistent
                && !wanted.contains(&(p.client_id.as_str(), p.register_id.as_str()))
            {
                ops.push(remove_op(p));
            }
        }
        for p in publishers {
            if p.session_instance != instance
                || roster_common::slot::slot_of(&p.service, self.slot_count) != slot
            {
                return Err(Error::InvalidArgument(format!(
                    "publisher {}/{} does not belong to session {instance:x} in slot {slot}",
                    p.client_id, p.register_id
                )));
            }
            let held_elsewhere = self.claim_elsewhere(index, &p).is_some_and(|r| {
                live.contains(&r.session_instance) && r.registered_ms >= p.registered_ms
            });
            if !held_elsewhere {
                ops.push(self.admit_session_op(index, WriteOp::Put { publisher: p })?);
            }
        }
        let mut applied = Applied::default();
        for op in ops {
            // A record another client owns is skipped, not replaced.
            if let Ok(Some(led)) = self.lead(index, op) {
                applied.push(led);
            }
        }
        self.slots[index].heard.insert(instance);
        Ok(applied)
    }

    /// Whether `op` puts a claim on a record older than the one another session holds on it (by
    /// `registered_ms`): a write from a session the client has since left — held there and
    /// retried, or slow on its way — that arrives after the client registered where it went. It
    /// must not take the record back: that session removes it once its connection's grace ends,
    /// and subscribers would see the publisher gone. Such a write changes nothing (and is answered
    /// as applied). Claims without a time (older session servers) are never outclaimed.
    pub(super) fn outclaimed(&self, index: usize, op: &WriteOp) -> bool {
        let WriteOp::Put { publisher } = op else {
            return false;
        };
        publisher.registered_ms != 0
            && self
                .claim_elsewhere(index, publisher)
                .is_some_and(|r| r.registered_ms > publisher.registered_ms)
    }

    /// The record of `publisher` in slot `index` when another session instance holds it.
    fn claim_elsewhere(&self, index: usize, publisher: &Publisher) -> Option<&Publisher> {
        self.slots[index]
            .record_of(publisher)
            .filter(|r| r.session_instance != publisher.session_instance)
    }

    /// Opens the slots whose takeover is complete: every `live` session heard from, or `timeout`
    /// passed. Returns the slots opened.
    pub fn open_ready(
        &mut self,
        live: &HashSet<InstanceId>,
        now: Instant,
        timeout: Duration,
    ) -> Vec<SlotId> {
        let mut opened = Vec::new();
        for (id, slot) in self.slots.iter_mut().enumerate() {
            let Some(since) = slot.moving_since else {
                continue;
            };
            if live.is_subset(&slot.heard) || now.duration_since(since) >= timeout {
                slot.moving_since = None;
                opened.push(id as SlotId);
            }
        }
        opened
    }

    /// Slots this server leads that are still being taken over.
    pub fn moving(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.moving_since.is_some())
            .count()
    }
}
