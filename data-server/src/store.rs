//! Slot storage: the publishers of every service in the slots this server holds, their versions,
//! and each slot's role and readiness.
//!
//! Plain data and functions, no I/O; time is passed in. The server adopts each committed table with
//! [`Store::apply_table`], applies sessions' changes as leader ([`Store::write`],
//! [`Store::session_sync`], [`Store::drop_owner`]) — each returning the [`ReplicatedOp`]s to send to
//! the slot's followers and the changes to notify — and applies the leader's changes as follower
//! ([`Store::replicate`], [`Store::install_dump`]).
//!
//! Versions: when this server takes the lead of a slot it records the table epoch as the slot's
//! term; every change in the slot gets `(term << 32) | counter`. Terms only grow, so versions of a
//! service only grow, across leaders too. A follower takes the leader's versions as they come; an
//! op whose `prev` is not the follower's current version reveals a gap, and the slot is fetched
//! whole.
//!
//! Readiness: a slot this server has just taken over is `moving` until every live session has
//! reported its publishers in the slot (digest, then sync if they differ), or `takeover_timeout`
//! has passed; meanwhile it refuses reads and writes with `SlotMoving`, so no session pushes a
//! snapshot of a slot that is still being rebuilt.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use roster_common::proto::{
    Digest, Publisher, PublisherChange, PublisherId, ReplicatedOp, ServiceSummary, SlotDigest,
    SlotDump, SlotTable, Snapshot, WriteOp,
};
use roster_common::{
    ClientId, Epoch, Error, InstanceId, NodeId, RegisterId, Result, ServiceId, SlotId, Version,
};

type PublisherKey = (ClientId, RegisterId);

/// How long a slot stays `moving` before a caller retries, as told in `SlotMoving`.
pub const MOVING_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct Datum {
    version: Version,
    publishers: BTreeMap<PublisherKey, Publisher>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Role {
    #[default]
    None,
    Leader,
    Follower,
}

#[derive(Debug, Default)]
struct Slot {
    role: Role,
    /// Leader: taking over, since when; sessions heard from so far.
    moving_since: Option<Instant>,
    heard: HashSet<InstanceId>,
    /// Follower: holds a copy consistent with the leader up to `version`.
    in_sync: bool,
    /// Follower: the leader's version at the last drift check, when this copy was behind it.
    behind: Option<Version>,
    term: Epoch,
    counter: u32,
    /// The version of the slot's last change.
    version: Version,
    services: HashMap<ServiceId, Datum>,
}

impl Slot {
    fn state(&self) -> SlotState {
        match self.role {
            Role::Leader if self.moving_since.is_some() => SlotState::Moving,
            Role::Leader => SlotState::Leading,
            Role::Follower if self.in_sync => SlotState::Following,
            Role::Follower => SlotState::Fetching,
            Role::None => SlotState::None,
        }
    }

    fn next_version(&mut self) -> Version {
        // A slot would need 2^32 changes within one term to exhaust the counter; saturating keeps
        // versions from wrapping backwards should that ever happen.
        self.counter = self.counter.saturating_add(1);
        (self.term << 32) | u64::from(self.counter)
    }

    fn clear(&mut self, owners: &mut HashMap<InstanceId, usize>) {
        for datum in std::mem::take(&mut self.services).into_values() {
            for publisher in datum.publishers.values() {
                release(owners, publisher.session_instance);
            }
        }
    }

    fn publishers(&self) -> impl Iterator<Item = &Publisher> {
        self.services.values().flat_map(|d| d.publishers.values())
    }
}

/// What this server does with a slot: leads it (`Moving` while taking it over), follows it with a
/// copy in step (`Following`) or without one yet (`Fetching`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    None,
    Leading,
    Moving,
    Following,
    Fetching,
}

impl SlotState {
    pub const ALL: [SlotState; 4] = [
        SlotState::Leading,
        SlotState::Moving,
        SlotState::Following,
        SlotState::Fetching,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SlotState::None => "none",
            SlotState::Leading => "leading",
            SlotState::Moving => "moving",
            SlotState::Following => "following",
            SlotState::Fetching => "fetching",
        }
    }
}

/// One slot held by this server.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlotSummary {
    pub slot: SlotId,
    pub state: SlotState,
    pub version: Version,
    pub services: usize,
    pub publishers: usize,
}

/// One change of a service's datum, as interested sessions are told of it: the publisher change
/// that took the datum from version `prev` to `version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub service: ServiceId,
    pub prev: Version,
    pub version: Version,
    pub change: PublisherChange,
}

/// What a leader-side change produced: the ops for the followers and the changes to notify.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub ops: Vec<ReplicatedOp>,
    pub changes: Vec<Change>,
}

impl Applied {
    fn push(&mut self, (op, change): (ReplicatedOp, Change)) {
        self.changes.push(change);
        self.ops.push(op);
    }

    fn extend(&mut self, other: Applied) {
        self.ops.extend(other.ops);
        self.changes.extend(other.changes);
    }
}

/// How the slots this server holds changed with a table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableChange {
    /// Slots this server now leads and must take over.
    pub took: Vec<SlotId>,
    /// Slots this server now follows without a copy: to fetch from the leader.
    pub to_fetch: Vec<SlotId>,
    /// Slots this server no longer holds.
    pub dropped: Vec<SlotId>,
}

/// The records of every slot this server holds.
#[derive(Debug)]
pub struct Store {
    me: NodeId,
    epoch: Epoch,
    slot_count: u32,
    slots: Vec<Slot>,
    /// Publishers held per owning session instance, to find what a lost session owned.
    owners: HashMap<InstanceId, usize>,
}

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

    /// Adopts a committed table. Tables older than the current one are ignored.
    pub fn apply_table(&mut self, table: &SlotTable, now: Instant) -> TableChange {
        let mut change = TableChange::default();
        if table.epoch <= self.epoch && self.slot_count == table.slot_count {
            return change;
        }
        if self.slot_count != table.slot_count {
            self.slots = (0..table.slot_count).map(|_| Slot::default()).collect();
            self.slot_count = table.slot_count;
            self.owners.clear();
        }
        self.epoch = table.epoch;
        for (id, slot) in self.slots.iter_mut().enumerate() {
            let id = id as SlotId;
            let replicas = table
                .slots
                .get(id as usize)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let role = match replicas.iter().position(|n| *n == self.me) {
                Some(0) => Role::Leader,
                Some(_) => Role::Follower,
                None => Role::None,
            };
            match (slot.role, role) {
                (Role::Leader, Role::Leader) => {}
                (_, Role::Leader) => {
                    // A new term: versions continue above anything the previous leader issued.
                    slot.term = table.epoch;
                    slot.counter = 0;
                    slot.moving_since = Some(now);
                    slot.heard.clear();
                    change.took.push(id);
                }
                (Role::Leader, Role::Follower) => {
                    // Stepping down with an up-to-date copy.
                    slot.moving_since = None;
                    slot.in_sync = true;
                }
                (Role::Follower, Role::Follower) => {}
                (Role::None, Role::Follower) => {
                    slot.in_sync = false;
                    change.to_fetch.push(id);
                }
                (_, Role::None) => {
                    if slot.role != Role::None {
                        slot.clear(&mut self.owners);
                        slot.moving_since = None;
                        slot.in_sync = false;
                        change.dropped.push(id);
                    }
                }
            }
            slot.role = role;
        }
        change
    }

    fn slot_index(&self, service: &ServiceId) -> Result<usize> {
        if self.slot_count == 0 {
            return Err(Error::Unavailable(
                "this data server has no slot table yet".into(),
            ));
        }
        Ok(roster_common::slot::slot_of(service, self.slot_count) as usize)
    }

    /// The slot of `service` if this server leads it and it is ready.
    fn ready_slot(&self, service: &ServiceId) -> Result<usize> {
        let index = self.slot_index(service)?;
        let slot = &self.slots[index];
        if slot.role != Role::Leader {
            return Err(Error::NotLeader { leader: None });
        }
        if slot.moving_since.is_some() {
            return Err(Error::SlotMoving {
                retry_after: MOVING_RETRY,
            });
        }
        Ok(index)
    }

    /// Applies `op` to slot `index` as its leader; `None` if it changes nothing,
    /// `PermissionDenied` if it would replace a record another client owns.
    fn lead(&mut self, index: usize, op: WriteOp) -> Result<Option<(ReplicatedOp, Change)>> {
        let slot = &mut self.slots[index];
        let owners = &mut self.owners;
        let datum_prev = slot.services.get(op.service()).map_or(0, |d| d.version);
        let Some(change) = apply_op(slot, owners, &op, None)? else {
            return Ok(None);
        };
        let prev = slot.version;
        let version = slot.next_version();
        let service = set_version(slot, op.service(), version);
        Ok(Some((
            ReplicatedOp {
                slot: index as SlotId,
                prev,
                version,
                op,
            },
            Change {
                service,
                prev: datum_prev,
                version,
                change,
            },
        )))
    }

    /// Applies one session change as slot leader.
    pub fn write(&mut self, op: WriteOp) -> Result<Applied> {
        let index = self.ready_slot(op.service())?;
        let mut applied = Applied::default();
        if let Some(led) = self.lead(index, op)? {
            applied.push(led);
        }
        Ok(applied)
    }

    /// Applies session changes in order, each on its own: for each, the datum version it produced
    /// (or found, when it changed nothing) or why it was refused.
    pub fn write_batch(&mut self, ops: Vec<WriteOp>) -> (Vec<Result<Version>>, Applied) {
        let mut applied = Applied::default();
        let results = ops
            .into_iter()
            .map(|op| {
                let service = op.service().clone();
                let done = self.write(op)?;
                let version = match done.changes.first() {
                    Some(change) => change.version,
                    None => self.version(&service),
                };
                applied.extend(done);
                Ok(version)
            })
            .collect();
        (results, applied)
    }

    /// The current version of `service`'s datum, 0 if none.
    pub fn version(&self, service: &ServiceId) -> Version {
        self.slot_index(service)
            .ok()
            .and_then(|i| self.slots[i].services.get(service))
            .map_or(0, |d| d.version)
    }

    /// The current version of `service`'s datum in a ready slot this server leads.
    pub fn ready_version(&self, service: &ServiceId) -> Result<Version> {
        let slot = &self.slots[self.ready_slot(service)?];
        Ok(slot.services.get(service).map_or(0, |d| d.version))
    }

    /// The current datum of `service` (empty at version 0 if it never had a publisher).
    pub fn snapshot(&self, service: &ServiceId) -> Result<Snapshot> {
        let slot = &self.slots[self.ready_slot(service)?];
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

    /// Each session instance holding publishers here (any slot, any role), with how many.
    pub fn owner_counts(&self) -> impl Iterator<Item = (InstanceId, usize)> + '_ {
        self.owners.iter().map(|(instance, n)| (*instance, *n))
    }

    /// Drops every publisher owned by `instance` in the slots this server leads.
    pub fn drop_owner(&mut self, instance: InstanceId) -> Applied {
        let mut applied = Applied::default();
        for index in 0..self.slots.len() {
            if self.slots[index].role != Role::Leader {
                continue;
            }
            let doomed: Vec<WriteOp> = self.slots[index]
                .publishers()
                .filter(|p| p.session_instance == instance)
                .map(remove_op)
                .collect();
            // Removals: never refused.
            for op in doomed {
                if let Ok(Some(led)) = self.lead(index, op) {
                    applied.push(led);
                }
            }
        }
        applied
    }

    /// One line per slot this server holds, in slot order, for the admin view.
    pub fn slot_summaries(&self) -> Vec<SlotSummary> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.role != Role::None)
            .map(|(index, s)| SlotSummary {
                slot: index as SlotId,
                state: s.state(),
                version: s.version,
                services: s
                    .services
                    .values()
                    .filter(|d| !d.publishers.is_empty())
                    .count(),
                publishers: s.services.values().map(|d| d.publishers.len()).sum(),
            })
            .collect()
    }

    /// Every service with at least one publisher in the slots this server leads.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let mut out: Vec<ServiceSummary> = self
            .slots
            .iter()
            .filter(|s| s.role == Role::Leader)
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
    /// that a record another client owns is never replaced.
    pub fn session_sync(
        &mut self,
        instance: InstanceId,
        slot: SlotId,
        publishers: Vec<Publisher>,
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
            ops.push(WriteOp::Put { publisher: p });
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

    /// The digest of a whole slot, with its version, whatever this server's role in it.
    pub fn slot_digest(&self, slot: SlotId) -> Option<SlotDigest> {
        let s = self.slots.get(slot as usize)?;
        Some(SlotDigest {
            slot,
            digest: Digest::of(s.publishers()),
            version: s.version,
        })
    }

    /// Publishers held (every slot, any role), for reporting.
    pub fn publisher_count(&self) -> usize {
        self.owners.values().sum()
    }
}

/// A `Remove` of `p`, as its owning session would send it.
fn remove_op(p: &Publisher) -> WriteOp {
    WriteOp::Remove {
        service: p.service.clone(),
        client_id: p.client_id.clone(),
        register_id: p.register_id.clone(),
        session_instance: p.session_instance,
        owner: None,
    }
}

/// Applies `op` to `slot`'s records and returns the change as subscribers see it; `None` when it
/// changes nothing. A put older (by `client_version`) than the record is ignored, and one that
/// would replace a record with another non-zero owner is refused (`PermissionDenied`): records are
/// replaced only by their owner, whichever session it speaks through — unless replayed from the
/// leader (`forced`), which decided already.
fn apply_op(
    slot: &mut Slot,
    owners: &mut HashMap<InstanceId, usize>,
    op: &WriteOp,
    forced: Option<Version>,
) -> Result<Option<PublisherChange>> {
    match op {
        WriteOp::Put { publisher } => {
            // Every record of a service shares the datum key's service id allocation.
            let service = match slot.services.get_key_value(&publisher.service) {
                Some((shared, _)) => shared.clone(),
                None => publisher.service.clone(),
            };
            let datum = slot.services.entry(service.clone()).or_default();
            let key = (publisher.client_id.clone(), publisher.register_id.clone());
            if let Some(current) = datum.publishers.get(&key) {
                if current == publisher {
                    return Ok(None);
                }
                if forced.is_none() && current.owner != 0 && current.owner != publisher.owner {
                    return Err(Error::PermissionDenied(format!(
                        "publisher {:?} of client {:?} in {} belongs to another client (same \
                         client_id, another secret)",
                        publisher.register_id, publisher.client_id, publisher.service
                    )));
                }
                if forced.is_none() && current.client_version > publisher.client_version {
                    return Ok(None);
                }
            }
            *owners.entry(publisher.session_instance).or_default() += 1;
            let mut record = publisher.clone();
            record.service = service;
            let view = record.view();
            if let Some(old) = datum.publishers.insert(key, record) {
                release(owners, old.session_instance);
            }
            Ok(Some(PublisherChange::Put(view)))
        }
        WriteOp::Remove {
            service,
            client_id,
            register_id,
            session_instance,
            owner,
        } => {
            let Some(datum) = slot.services.get_mut(service) else {
                return Ok(None);
            };
            let key = (client_id.clone(), register_id.clone());
            let held_by = match datum.publishers.get(&key) {
                Some(p) if p.session_instance == *session_instance => p.session_instance,
                // Its owner unpublishing through another session.
                Some(p) if p.owner != 0 && Some(p.owner) == *owner => p.session_instance,
                _ => return Ok(None),
            };
            datum.publishers.remove(&key);
            release(owners, held_by);
            Ok(Some(PublisherChange::Remove(PublisherId {
                client_id: key.0,
                register_id: key.1,
            })))
        }
    }
}

/// Sets the slot's and `service`'s datum version; returns the datum's (shared) service id.
fn set_version(slot: &mut Slot, service: &ServiceId, version: Version) -> ServiceId {
    slot.version = version;
    match slot.services.get_key_value(service) {
        Some((shared, _)) => {
            let shared = shared.clone();
            slot.services.get_mut(service).expect("present").version = version;
            shared
        }
        None => {
            slot.services.entry(service.clone()).or_default().version = version;
            service.clone()
        }
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

    fn table(epoch: Epoch, replicas: &[NodeId]) -> SlotTable {
        SlotTable {
            epoch,
            slot_count: 8,
            replicas: replicas.len() as u32,
            slots: vec![replicas.to_vec(); 8],
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
            owner: roster_common::ids::owner_of(client, b"the secret of this client"),
        }
    }

    fn demo() -> ServiceId {
        "demo".parse().unwrap()
    }

    fn slot_of_demo() -> SlotId {
        roster_common::slot::slot_of(&demo(), 8)
    }

    /// A leader whose slots are open.
    fn leader(me: NodeId, epoch: Epoch, replicas: &[NodeId]) -> Store {
        let mut store = Store::new(me);
        let now = Instant::now();
        store.apply_table(&table(epoch, replicas), now);
        store.open_ready(&HashSet::new(), now, Duration::ZERO);
        store
    }

    fn put(p: Publisher) -> WriteOp {
        WriteOp::Put { publisher: p }
    }

    #[test]
    fn versions_grow_with_every_change_and_carry_the_term() {
        let mut store = leader(1, 5, &[1]);
        let a = store.write(put(publisher("c", "r1", "a", 9))).unwrap();
        let v1 = a.changes[0].version;
        assert_eq!(a.changes[0].prev, 0, "a new datum starts from version 0");
        assert_eq!(v1 >> 32, 5);
        assert!(
            store
                .write(put(publisher("c", "r1", "a", 9)))
                .unwrap()
                .ops
                .is_empty(),
            "identical put"
        );
        let second = store.write(put(publisher("c", "r1", "b", 9))).unwrap();
        let v2 = second.changes[0].version;
        assert!(v2 > v1);
        assert_eq!(
            second.changes[0].prev, v1,
            "each change names the version it applies to"
        );
        assert_eq!(
            second.changes[0].change,
            PublisherChange::Put(publisher("c", "r1", "b", 9).view())
        );
        let snap = store.snapshot(&demo()).unwrap();
        assert_eq!(snap.version, v2);
        assert_eq!(snap.publishers[0].data[0], Bytes::from_static(b"b"));
    }

    #[test]
    fn an_older_client_version_does_not_overwrite_a_newer_one() {
        let mut store = leader(1, 1, &[1]);
        let mut newer = publisher("c", "r", "new", 9);
        newer.client_version = 5;
        store.write(put(newer)).unwrap();
        let mut older = publisher("c", "r", "old", 9);
        older.client_version = 4;
        assert!(store.write(put(older)).unwrap().ops.is_empty());
        assert_eq!(
            store.snapshot(&demo()).unwrap().publishers[0].data[0],
            Bytes::from_static(b"new")
        );
    }

    #[test]
    fn a_batch_applies_each_op_on_its_own_and_changes_chain() {
        let now = Instant::now();
        let mut store = Store::new(1);
        let mut t = table(1, &[1]);
        let other: ServiceId = (0..)
            .map(|i| format!("svc{i}").parse::<ServiceId>().unwrap())
            .find(|s| roster_common::slot::slot_of(s, 8) != slot_of_demo())
            .unwrap();
        t.slots[roster_common::slot::slot_of(&other, 8) as usize] = vec![2];
        store.apply_table(&t, now);
        store.open_ready(&HashSet::new(), now, Duration::ZERO);
        let mut elsewhere = publisher("c", "x", "1", 9);
        elsewhere.service = other;
        let (results, applied) = store.write_batch(vec![
            put(publisher("c", "a", "1", 9)),
            put(elsewhere),
            put(publisher("c", "b", "2", 9)),
            put(publisher("c", "a", "1", 9)),
        ]);
        assert!(matches!(results[1], Err(Error::NotLeader { .. })));
        let (v1, v2) = (*results[0].as_ref().unwrap(), *results[2].as_ref().unwrap());
        assert!(v2 > v1);
        assert_eq!(
            results[3].as_ref().unwrap(),
            &v2,
            "an op that changes nothing answers the current version"
        );
        assert_eq!(applied.ops.len(), 2);
        let chain: Vec<(Version, Version)> = applied
            .changes
            .iter()
            .map(|c| (c.prev, c.version))
            .collect();
        assert_eq!(chain, vec![(0, v1), (v1, v2)]);
    }

    #[test]
    fn only_the_owner_replaces_a_record_through_any_session() {
        let mut store = leader(1, 1, &[1]);
        let mine = publisher("c", "r1", "mine", 9);
        store.write(put(mine.clone())).unwrap();
        let slot = roster_common::slot::slot_of(&mine.service, store.slot_count);

        // Same ids, another secret: refused as a write and skipped in a sync, on any session.
        let mut impostor = publisher("c", "r1", "theirs", 8);
        impostor.owner = roster_common::ids::owner_of("c", b"not the secret of this client");
        impostor.client_version = u64::MAX;
        for session in [9, 8] {
            impostor.session_instance = session;
            let err = store.write(put(impostor.clone())).unwrap_err();
            assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
            let synced = store.session_sync(session, slot, vec![impostor.clone()]);
            assert!(synced.unwrap().ops.is_empty());
        }
        assert_eq!(
            store.snapshot(&mine.service).unwrap().publishers,
            vec![mine.view()]
        );

        // The owner, moved to another session server, replaces it.
        let mut moved = publisher("c", "r1", "moved", 8);
        moved.client_version = 2;
        assert_eq!(store.write(put(moved.clone())).unwrap().ops.len(), 1);
        assert_eq!(
            store.snapshot(&mine.service).unwrap().publishers,
            vec![moved.view()]
        );

        // A record from a session that predates ownership (owner 0) is anyone's to replace.
        let mut legacy = publisher("c", "r2", "legacy", 9);
        legacy.owner = 0;
        store.write(put(legacy)).unwrap();
        let mut claimed = publisher("c", "r2", "claimed", 9);
        claimed.client_version = 2;
        assert_eq!(store.write(put(claimed)).unwrap().ops.len(), 1);
    }

    #[test]
    fn removes_only_what_the_session_owns() {
        let mut store = leader(1, 1, &[1]);
        store.write(put(publisher("c", "r1", "a", 9))).unwrap();
        let remove = |instance| WriteOp::Remove {
            service: demo(),
            client_id: "c".into(),
            register_id: "r1".into(),
            session_instance: instance,
            owner: None,
        };
        assert!(
            store.write(remove(8)).unwrap().ops.is_empty(),
            "another session's remove is ignored"
        );
        assert_eq!(store.write(remove(9)).unwrap().ops.len(), 1);
        assert!(store.snapshot(&demo()).unwrap().publishers.is_empty());
        assert_eq!(store.owners().count(), 0);
    }

    #[test]
    fn an_owner_removes_its_record_through_another_session() {
        let mut store = leader(1, 1, &[1]);
        store.write(put(publisher("c", "r1", "a", 9))).unwrap();
        let remove = |owner: u128| WriteOp::Remove {
            service: demo(),
            client_id: "c".into(),
            register_id: "r1".into(),
            session_instance: 8,
            owner: Some(owner),
        };
        let impostor = roster_common::ids::owner_of("c", b"another secret entirely");
        assert!(
            store.write(remove(impostor)).unwrap().ops.is_empty(),
            "only the owner may"
        );
        let owner = roster_common::ids::owner_of("c", b"the secret of this client");
        assert_eq!(store.write(remove(owner)).unwrap().ops.len(), 1);
        assert!(store.snapshot(&demo()).unwrap().publishers.is_empty());
        assert_eq!(store.owners().count(), 0, "session 9's hold is released");
    }

    #[test]
    fn dropping_an_owner_removes_its_publishers_only() {
        let mut store = leader(1, 1, &[1]);
        store.write(put(publisher("c1", "r", "a", 7))).unwrap();
        store.write(put(publisher("c2", "r", "b", 8))).unwrap();
        let applied = store.drop_owner(7);
        assert_eq!(applied.ops.len(), 1);
        let snap = store.snapshot(&demo()).unwrap();
        assert_eq!(snap.publishers.len(), 1);
        assert_eq!(snap.publishers[0].client_id, "c2");
        assert_eq!(store.owners().collect::<Vec<_>>(), vec![8]);
    }

    #[test]
    fn a_new_slot_leader_is_moving_until_every_session_reported() {
        let now = Instant::now();
        let mut store = Store::new(1);
        let change = store.apply_table(&table(3, &[1]), now);
        assert_eq!(change.took.len(), 8);
        let err = store.write(put(publisher("c", "r", "a", 9))).unwrap_err();
        assert!(matches!(err, Error::SlotMoving { .. }));
        assert!(matches!(
            store.snapshot(&demo()),
            Err(Error::SlotMoving { .. })
        ));

        let live: HashSet<InstanceId> = [9, 10].into();
        // Session 9 has one publisher in the slot: its digest differs, so it syncs.
        let digests: Vec<SlotDigest> = (0..8)
            .map(|slot| SlotDigest {
                slot,
                digest: if slot == slot_of_demo() {
                    Digest::of([&publisher("c", "r", "a", 9)])
                } else {
                    Digest::default()
                },
                version: 0,
            })
            .collect();
        assert_eq!(store.session_digests(9, &digests), vec![slot_of_demo()]);
        let applied = store
            .session_sync(9, slot_of_demo(), vec![publisher("c", "r", "a", 9)])
            .unwrap();
        assert_eq!(applied.ops.len(), 1);
        assert!(
            store
                .open_ready(&live, now, Duration::from_secs(3))
                .is_empty(),
            "session 10 not heard yet"
        );
        let empty: Vec<SlotDigest> = (0..8)
            .map(|slot| SlotDigest {
                slot,
                digest: Digest::default(),
                version: 0,
            })
            .collect();
        assert!(store.session_digests(10, &empty).is_empty());
        assert_eq!(
            store.open_ready(&live, now, Duration::from_secs(3)).len(),
            8
        );
        assert_eq!(store.snapshot(&demo()).unwrap().publishers.len(), 1);
    }

    #[test]
    fn a_silent_session_delays_a_takeover_only_up_to_the_timeout() {
        let now = Instant::now();
        let mut store = Store::new(1);
        store.apply_table(&table(3, &[1]), now);
        let live: HashSet<InstanceId> = [9].into();
        assert!(
            store
                .open_ready(&live, now + Duration::from_secs(1), Duration::from_secs(3))
                .is_empty()
        );
        assert_eq!(
            store
                .open_ready(&live, now + Duration::from_secs(3), Duration::from_secs(3))
                .len(),
            8
        );
    }

    #[test]
    fn a_session_sync_replaces_what_that_session_owns() {
        let mut store = leader(1, 1, &[1]);
        store.write(put(publisher("c", "stale", "x", 9))).unwrap();
        store.write(put(publisher("d", "other", "y", 8))).unwrap();
        let applied = store
            .session_sync(9, slot_of_demo(), vec![publisher("c", "fresh", "z", 9)])
            .unwrap();
        assert_eq!(applied.ops.len(), 2, "one removal, one put");
        let snap = store.snapshot(&demo()).unwrap();
        let ids: Vec<&str> = snap
            .publishers
            .iter()
            .map(|p| p.register_id.as_str())
            .collect();
        assert_eq!(
            ids,
            ["fresh", "other"],
            "ordered by (client_id, register_id)"
        );
    }

    #[test]
    fn followers_apply_in_order_and_fetch_whole_after_a_gap() {
        let mut lead = leader(1, 1, &[1, 2]);
        let now = Instant::now();
        let mut follow = Store::new(2);
        let change = follow.apply_table(&table(1, &[1, 2]), now);
        assert_eq!(change.to_fetch.len(), 8);

        let first = lead.write(put(publisher("c", "a", "1", 9))).unwrap();
        // Without a copy the follower cannot apply: it must fetch the slot.
        let (_, gaps) = follow.replicate(first.ops.clone());
        assert_eq!(gaps, vec![slot_of_demo()]);
        assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
        let second = lead.write(put(publisher("c", "b", "2", 9))).unwrap();
        let third = lead.write(put(publisher("c", "c", "3", 9))).unwrap();
        // An op already covered by the dump is skipped; the next applies in order.
        let (applied, gaps) = follow.replicate([first.ops, second.ops].concat());
        assert!(gaps.is_empty());
        assert_eq!(applied, 1);
        assert_eq!(follow.slot_digest(slot_of_demo()).unwrap().digest.count, 2);
        // Skipping one op (the third) is a gap.
        let fourth = lead.write(put(publisher("c", "d", "4", 9))).unwrap();
        let (_, gaps) = follow.replicate(fourth.ops);
        assert_eq!(gaps, vec![slot_of_demo()]);
        assert!(follow.out_of_sync().contains(&slot_of_demo()));
        drop(third);
        assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
        assert_eq!(
            follow.slot_digest(slot_of_demo()),
            lead.slot_digest(slot_of_demo())
        );
    }

    #[test]
    fn a_lost_last_batch_is_caught_by_the_next_drift_check_but_lag_is_not() {
        let mut lead = leader(1, 1, &[1, 2]);
        let now = Instant::now();
        let mut follow = Store::new(2);
        follow.apply_table(&table(1, &[1, 2]), now);
        assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
        let check = |follow: &mut Store, lead: &Store| {
            follow.compare_with_leader(&lead.slot_digest(slot_of_demo()).unwrap())
        };
        assert_eq!(check(&mut follow, &lead), None, "the same copy");

        // A write whose replication is merely in flight at one check, and arrives before the next.
        let first = lead.write(put(publisher("c", "a", "1", 9))).unwrap();
        assert_eq!(check(&mut follow, &lead), None, "lag is not drift");
        follow.replicate(first.ops);
        assert_eq!(check(&mut follow, &lead), None, "caught up");

        // The last batch is lost and no later write comes: the second check catches it.
        let _lost = lead.write(put(publisher("c", "b", "2", 9))).unwrap();
        assert_eq!(check(&mut follow, &lead), None);
        assert_eq!(check(&mut follow, &lead), Some("lag"));

        // Different content at the same version is drift at once.
        assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
        let mut other = lead.slot_digest(slot_of_demo()).unwrap();
        other.digest.hash ^= 1;
        assert_eq!(follow.compare_with_leader(&other), Some("drift"));
    }

    #[test]
    fn a_promoted_follower_keeps_its_copy_and_versions_keep_growing() {
        let mut lead = leader(1, 1, &[1, 2]);
        let now = Instant::now();
        let mut follow = Store::new(2);
        follow.apply_table(&table(1, &[1, 2]), now);
        follow.install_dump(lead.dump(slot_of_demo()).unwrap());
        let applied = lead.write(put(publisher("c", "a", "1", 9))).unwrap();
        let v1 = applied.changes[0].version;
        follow.replicate(applied.ops);
        // Node 1 is gone: node 2 leads at epoch 2.
        follow.apply_table(&table(2, &[2]), now);
        let digests = [SlotDigest {
            slot: slot_of_demo(),
            digest: Digest::of([&publisher("c", "a", "1", 9)]),
            version: 0,
        }];
        assert!(
            follow.session_digests(9, &digests).is_empty(),
            "the copy matches the session"
        );
        follow.open_ready(&[9].into(), now, Duration::from_secs(3));
        assert_eq!(follow.snapshot(&demo()).unwrap().version, v1);
        let next = follow.write(put(publisher("c", "b", "2", 9))).unwrap();
        let v2 = next.changes[0].version;
        assert!(v2 > v1);
        assert_eq!(v2 >> 32, 2);
        assert_eq!(
            next.changes[0].prev, v1,
            "the promoted copy's versions chain on"
        );
    }

    #[test]
    fn slots_led_elsewhere_refuse_writes_and_old_tables_are_ignored() {
        let now = Instant::now();
        let mut store = Store::new(1);
        assert!(matches!(
            store.snapshot(&demo()),
            Err(Error::Unavailable(_))
        ));
        store.apply_table(&table(2, &[2]), now);
        assert!(matches!(
            store.write(put(publisher("c", "r", "a", 1))),
            Err(Error::NotLeader { .. })
        ));
        assert_eq!(
            store.apply_table(&table(1, &[1]), now),
            TableChange::default()
        );
    }
}
