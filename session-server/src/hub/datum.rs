//! One service's cached datum: its publishers, encoded as they are pushed, the recent history of
//! changes that led to them, and the push frames built from both (see the hub's essay for how
//! they are used and bounded); and a datum as it arrives whole from the slot leader.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use roster_common::proto::Snapshot;
use roster_common::push::{delta_frame, encode_publisher, snapshot_frame};
use roster_common::{Result, ServiceId, Version};

use super::healthy::HealthIndex;
use super::{MAX_STEPS, MIN_STEPS, Op, PubKey, PushKind};

/// A datum fetched whole from the slot leader, its publishers encoded.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub service: ServiceId,
    pub version: Version,
    pub entries: BTreeMap<PubKey, Bytes>,
}

impl Fetched {
    /// Encodes a fetched snapshot's publishers (done outside the hub's lock).
    pub fn encode(snapshot: Snapshot) -> Fetched {
        let entries = snapshot
            .publishers
            .into_iter()
            .map(|p| {
                let bytes = encode_publisher(&p);
                ((p.client_id, p.register_id), bytes)
            })
            .collect();
        Fetched {
            service: snapshot.service,
            version: snapshot.version,
            entries,
        }
    }
}

/// One recorded change of a datum (several ops when it stands for a fetched datum).
#[derive(Debug)]
struct Step {
    prev: Version,
    version: Version,
    at: Instant,
    ops: Vec<Op>,
    bytes: usize,
}

#[derive(Debug)]
pub(super) struct Datum {
    version: Version,
    entries: BTreeMap<PubKey, Bytes>,
    /// Encoded size of every publisher.
    bytes: usize,
    /// Oldest first; each step's `prev` is the previous step's `version`, the last's `version` is
    /// the datum's.
    history: VecDeque<Step>,
    history_bytes: usize,
    /// Frames taking a subscription to this version, by the version it starts from (`None`: the
    /// full snapshot).
    frames: HashMap<Option<Version>, (Bytes, PushKind)>,
    /// Which publishers are unhealthy: kept from the first healthy-only push on.
    health: Option<HealthIndex>,
    /// The snapshot healthy-only subscribers are shown at this version, once built.
    healthy_frame: Option<Bytes>,
}

impl Datum {
    /// Steps of history held.
    #[cfg(test)]
    pub(super) fn steps(&self) -> usize {
        self.history.len()
    }

    /// Every publisher, encoded, in key order.
    pub(super) fn encoded(&self) -> impl Iterator<Item = &Bytes> {
        self.entries.values()
    }

    /// The version of the publishers held.
    pub(super) fn version(&self) -> Version {
        self.version
    }

    pub(super) fn new(version: Version, entries: BTreeMap<PubKey, Bytes>) -> Self {
        let bytes = entries.values().map(Bytes::len).sum();
        Datum {
            version,
            entries,
            bytes,
            history: VecDeque::new(),
            history_bytes: 0,
            frames: HashMap::new(),
            health: None,
            healthy_frame: None,
        }
    }

    /// Applies `ops` as the step from the current version to `version`.
    pub(super) fn step(&mut self, version: Version, ops: Vec<Op>, at: Instant) {
        debug_assert!(
            self.history
                .back()
                .is_none_or(|s| s.version == self.version),
            "the history ends at the datum's version"
        );
        let mut weight = 0;
        for op in &ops {
            weight += op.weight();
            if let Some(index) = &mut self.health {
                index.note(op);
            }
            match op {
                Op::Put(key, bytes) => {
                    self.bytes += bytes.len();
                    if let Some(old) = self.entries.insert(key.clone(), bytes.clone()) {
                        self.bytes -= old.len();
                    }
                }
                Op::Removed(key) => {
                    if let Some(old) = self.entries.remove(key) {
                        self.bytes -= old.len();
                    }
                }
            }
        }
        self.history.push_back(Step {
            prev: self.version,
            version,
            at,
            ops,
            bytes: weight,
        });
        self.history_bytes += weight;
        self.version = version;
        self.frames.clear();
        self.healthy_frame = None;
        while self.history.len() > MAX_STEPS
            || (self.history.len() > MIN_STEPS && self.history_bytes > 2 * self.bytes)
        {
            let old = self.history.pop_front().expect("not empty");
            self.history_bytes -= old.bytes;
        }
    }

    /// Replaces the publishers with a fetched set at a newer `version`, recording the difference
    /// as one step.
    pub(super) fn replace(
        &mut self,
        version: Version,
        entries: BTreeMap<PubKey, Bytes>,
        at: Instant,
    ) {
        let mut ops = Vec::new();
        for (key, bytes) in &entries {
            if self.entries.get(key) != Some(bytes) {
                ops.push(Op::Put(key.clone(), bytes.clone()));
            }
        }
        for key in self.entries.keys() {
            if !entries.contains_key(key) {
                ops.push(Op::Removed(key.clone()));
            }
        }
        self.step(version, ops, at);
    }

    /// Forgets the steps no subscription needs: those before `oldest`, the earliest version a
    /// subscription still has to be taken from (all of them when none is behind).
    pub(super) fn forget_before(&mut self, oldest: Option<Version>) {
        while let Some(step) = self.history.front()
            && oldest.is_none_or(|base| step.prev < base)
        {
            self.history_bytes -= step.bytes;
            self.history.pop_front();
        }
    }

    /// Where the history continues from `base`, if it reaches back that far.
    fn steps_from(&self, base: Version) -> Option<usize> {
        let i = self.history.partition_point(|s| s.prev < base);
        (self.history.get(i)?.prev == base).then_some(i)
    }

    /// When the oldest change after `last` reached this server.
    pub(super) fn since(&self, last: Option<Version>) -> Option<Instant> {
        let i = self.steps_from(last?)?;
        Some(self.history[i].at)
    }

    /// The frame taking a subscription at `base` (`None`: nothing yet) to the current version:
    /// a delta when allowed, reachable and smaller than the snapshot, else the snapshot.
    pub(super) fn frame(
        &mut self,
        service: &ServiceId,
        base: Option<Version>,
        deltas: bool,
        max_frame: u32,
    ) -> Result<(Bytes, PushKind)> {
        let key = if deltas { base } else { None };
        if let Some(frame) = self.frames.get(&key) {
            return Ok(frame.clone());
        }
        // A delta too large for one frame falls back to the snapshot.
        if let Some(base) = key
            && let Ok(Some(frame)) = self.delta(service, base, max_frame)
        {
            // Cached under the base; the snapshot, when chosen instead, under `None`.
            self.frames
                .insert(Some(base), (frame.clone(), PushKind::Delta));
            return Ok((frame, PushKind::Delta));
        }
        let frame = snapshot_frame(service, self.version, self.entries.values(), max_frame)?;
        self.frames
            .insert(None, (frame.clone(), PushKind::Snapshot));
        if let Some(base) = key {
            self.frames
                .insert(Some(base), (frame.clone(), PushKind::Snapshot));
        }
        Ok((frame, PushKind::Snapshot))
    }

    /// The snapshot a healthy-only subscriber is shown at the current version (see
    /// [`super::healthy`]).
    pub(super) fn healthy_frame(
        &mut self,
        service: &ServiceId,
        threshold: f64,
        max_frame: u32,
    ) -> Result<(Bytes, PushKind)> {
        if let Some(frame) = &self.healthy_frame {
            return Ok((frame.clone(), PushKind::Snapshot));
        }
        let index = self
            .health
            .get_or_insert_with(|| HealthIndex::new(&self.entries));
        let frame = match index.shown(service, self.entries.iter(), threshold) {
            Some(shown) => snapshot_frame(service, self.version, shown.into_iter(), max_frame)?,
            None => self.frame(service, None, false, max_frame)?.0,
        };
        self.healthy_frame = Some(frame.clone());
        Ok((frame, PushKind::Snapshot))
    }

    /// The delta from `base`, or `None` when the history does not reach it or the snapshot would
    /// be smaller.
    fn delta(&self, service: &ServiceId, base: Version, max_frame: u32) -> Result<Option<Bytes>> {
        let Some(first) = self.steps_from(base) else {
            return Ok(None);
        };
        // Squash: the last op on each publisher wins.
        let mut last: BTreeMap<&PubKey, &Op> = BTreeMap::new();
        for step in self.history.range(first..) {
            for op in &step.ops {
                last.insert(op.key(), op);
            }
        }
        let weight: usize = last.values().map(|op| op.weight()).sum();
        if weight > self.bytes {
            return Ok(None);
        }
        let mut put = Vec::new();
        let mut removed = Vec::new();
        for op in last.values() {
            match op {
                Op::Put(_, bytes) => put.push(bytes),
                Op::Removed((c, r)) => removed.push((c.as_str(), r.as_str())),
            }
        }
        delta_frame(service, base, self.version, &put, &removed, max_frame).map(Some)
    }
}
