//! Slot storage: the publishers of every service in the slots this server holds, their versions,
//! and each slot's role and readiness.
//!
//! Plain data and functions, no I/O; time is passed in. The server adopts each committed table with
//! [`Store::apply_table`], applies sessions' changes as leader ([`Store::write`],
//! [`Store::session_sync`], [`Store::drop_owner`]) — each returning the [`ReplicatedOp`]s to send to
//! the slot's followers and the changes to notify — and applies the leader's changes as follower
//! ([`Store::replicate`], [`Store::install_dump`]; the follower's side lives in `store/follower.rs`).
//! A leader also keeps records on the cluster's behalf, which no session may write: persistent
//! instances merged from the meta group ([`Store::merge_persistent`]) and the health its checks
//! find ([`Store::set_health`]); see `store/persistent.rs` and `store/checks.rs`.
//!
//! Versions: when this server takes the lead of a slot it records the table epoch as the slot's
//! term; every change in the slot gets `(term << 32) | counter`. Terms only grow, so versions of a
//! service only grow, across leaders too. A follower takes the leader's versions as they come; an
//! op whose `prev` is not the follower's current version reveals a gap, and the slot is fetched
//! whole.
//!
//! Readiness: a slot this server has just taken over is `moving` until every live session has
//! reported its publishers in the slot (digest, then sync if they differ), or `takeover_timeout`
//! has passed; meanwhile it refuses reads with `SlotMoving` and tells no session of its changes,
//! so no session pushes a snapshot of a slot that is still being rebuilt. Sessions' writes are
//! taken meanwhile: a write is the word of the record's owner, and refusing it would let an older
//! claim win — the sync of a session a client just left, which no longer lists the publisher the
//! client took along to another session.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use roster_common::proto::{
    DataStatus, Digest, HeldSlot, HeldState, Publisher, PublisherChange, PublisherId, ReplicatedOp,
    ServiceSummary, SlotDigest, SlotTable, Snapshot, WriteOp,
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
    /// Leader: the version of the meta group's persistent set merged since taking the lead.
    persistent_merged: Option<Version>,
    /// Moves whenever a record with a check changes or the role does, so the checker rescans
    /// only the slots that moved.
    check_stamp: u64,
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

    /// The record `publisher` would replace, if the slot holds one.
    fn record_of(&self, publisher: &Publisher) -> Option<&Publisher> {
        self.services
            .get(&publisher.service)?
            .publishers
            .get(&(publisher.client_id.clone(), publisher.register_id.clone()))
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

    /// After this server's membership lapsed: the cluster gave its slots to others meanwhile, so
    /// nothing it holds is led or in step any more. Each slot it held becomes a copy out of step,
    /// kept as the best it has: the next table takes over (new term, every live session heard)
    /// those it leads, and fetches those it follows, instead of leading on with the old term
    /// from what was true before the lapse. Returns how many slots were held.
    pub fn lapse(&mut self) -> usize {
        let mut held = 0;
        for slot in &mut self.slots {
            if slot.role != Role::None {
                held += 1;
                slot.role = Role::Follower;
                slot.in_sync = false;
                slot.moving_since = None;
                slot.persistent_merged = None;
                slot.check_stamp += 1;
            }
        }
        self.epoch = 0;
        held
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
            if slot.role != role {
                slot.check_stamp += 1;
                slot.persistent_merged = None;
            }
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

    /// Whether `service` is in a slot this server is still taking over: its changes are made out
    /// of sight, and sessions read the datum whole once the slot opens.
    pub fn is_moving(&self, service: &ServiceId) -> bool {
        self.slot_index(service)
            .is_ok_and(|i| self.slots[i].moving_since.is_some())
    }

    /// The slot of `service` if this server leads it, ready or still being taken over.
    fn led_slot(&self, service: &ServiceId) -> Result<usize> {
        let index = self.slot_index(service)?;
        if self.slots[index].role != Role::Leader {
            return Err(Error::NotLeader { leader: None });
        }
        Ok(index)
    }

    /// The slot of `service` if this server leads it and it is ready.
    fn ready_slot(&self, service: &ServiceId) -> Result<usize> {
        let index = self.led_slot(service)?;
        if self.slots[index].moving_since.is_some() {
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

    /// Applies one session change as slot leader. Sessions never write persistent records, nor
    /// the health a check found (see `admit_session_op`).
    pub fn write(&mut self, op: WriteOp) -> Result<Applied> {
        // Taken while the slot is still moving too: a session's write is the word of the owner of
        // the record, and refusing it would let an older claim win meanwhile — a sync from the
        // session a client just left, built without the publisher the client took along.
        let index = self.led_slot(op.service())?;
        let op = self.admit_session_op(index, op)?;
        let mut applied = Applied::default();
        if self.outclaimed(index, &op) {
            return Ok(applied);
        }
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

    /// The records of `service` in a ready slot this server leads, with the datum's version.
    pub fn records(&self, service: &ServiceId) -> Result<(Version, Vec<Publisher>)> {
        let slot = &self.slots[self.ready_slot(service)?];
        Ok(slot.services.get(service).map_or((0, Vec::new()), |d| {
            (d.version, d.publishers.values().cloned().collect())
        }))
    }

    /// What this server holds, as the console asks for it: `version` is the software's.
    pub fn status(&self, version: &str) -> DataStatus {
        let slots = self
            .slot_summaries()
            .into_iter()
            .filter_map(|s| {
                let state = match s.state {
                    SlotState::None => return None,
                    SlotState::Leading => HeldState::Leading,
                    SlotState::Moving => HeldState::Moving,
                    SlotState::Following => HeldState::Following,
                    SlotState::Fetching => HeldState::Fetching,
                };
                Some(HeldSlot {
                    slot: s.slot,
                    state,
                    publishers: s.publishers as u64,
                })
            })
            .collect();
        DataStatus {
            id: self.me,
            version: version.to_owned(),
            epoch: self.epoch,
            slots,
        }
    }

    /// Session instances that own at least one publisher here. Persistent records are held by
    /// no session (instance 0, which no session ever has) and are left out.
    pub fn owners(&self) -> impl Iterator<Item = InstanceId> + '_ {
        self.owners.keys().copied().filter(|i| *i != 0)
    }

    /// Each session instance holding publishers here (any slot, any role), with how many.
    pub fn owner_counts(&self) -> impl Iterator<Item = (InstanceId, usize)> + '_ {
        self.owners
            .iter()
            .filter(|(instance, _)| **instance != 0)
            .map(|(instance, n)| (*instance, *n))
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
                .filter(|p| p.session_instance == instance && !p.persistent)
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
            .map(|(service, d)| {
                let checked = d.publishers.values().filter(|p| p.health.is_some()).count();
                ServiceSummary {
                    service: service.clone(),
                    publishers: d.publishers.len() as u64,
                    version: d.version,
                    healthy: (checked > 0).then(|| {
                        d.publishers
                            .values()
                            .filter(|p| p.health.as_ref().is_none_or(|h| h.healthy))
                            .count() as u64
                    }),
                }
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
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
            let mut checked = record.check.is_some();
            if let Some(old) = datum.publishers.insert(key, record) {
                release(owners, old.session_instance);
                checked |= old.check.is_some();
            }
            slot.check_stamp += u64::from(checked);
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
            if let Some(old) = datum.publishers.remove(&key) {
                slot.check_stamp += u64::from(old.check.is_some());
            }
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

mod checks;
mod follower;
mod persistent;
mod takeover;
#[cfg(test)]
pub(crate) mod tests;

pub use checks::{CheckCounts, Checked, RecordKey};
pub use persistent::{persistent_diff, persistent_record};
