//! Healthy-only subscriptions (`Subscribe { healthy_only: true }`): which publishers they are
//! shown, and how that is kept cheap.
//!
//! Such a subscription is shown the publishers of its service that are not marked unhealthy —
//! unless more than the protection threshold (`--protection-threshold`, a share) of them are, when
//! it is shown every one, each carrying its health ([`healthy_view`]): a checker cut off from the
//! instances it checks must not empty a service. Unchecked publishers count as healthy.
//!
//! It is pushed the full snapshot of that set at every version, never a delta. Which publishers
//! are shown depends on all of them (one more failure can switch the protection on and bring every
//! hidden one back), so a delta would have to be worked out against what each subscriber was last
//! shown; a snapshot is right whatever that was. The price is O(publishers of the service) per
//! change for these subscribers; plain subscribers of the same service keep their deltas and see
//! every publisher with its health. The snapshot is assembled from the datum's encoded publishers,
//! once per version, and shared by every healthy-only subscriber of the service; while none is
//! unhealthy, or the protection is on, it is the very frame plain snapshots use.
//!
//! Which publishers are unhealthy is read from their encoded bytes (only the `health` field is
//! decoded) when the service is first asked for this snapshot, then kept up to date with each
//! change: one decode per change, not one per publisher per change.
//!
//! Caveat: a change to a publisher that is hidden still pushes the (unchanged) set at the new
//! version.

use bytes::Bytes;
use roster_common::health::{Health, healthy_view};
use roster_common::{ServiceId, frame};
use rustc_hash::FxHashSet;
use serde::Deserialize;
use tracing::info;

use super::{Hub, Op, PubKey};

/// What [`healthy_view`] is told of a publisher marked unhealthy (only `healthy` is read).
const UNHEALTHY: Health = Health {
    healthy: false,
    checked_ms: 0,
    failure: None,
};

/// The publishers of one datum that are marked unhealthy, and whether healthy-only subscribers
/// were last shown all of them.
#[derive(Debug, Default)]
pub(super) struct HealthIndex {
    unhealthy: FxHashSet<PubKey>,
    protected: bool,
}

impl HealthIndex {
    /// Reads which of `entries` are unhealthy.
    pub(super) fn new<'a>(entries: impl IntoIterator<Item = (&'a PubKey, &'a Bytes)>) -> Self {
        let unhealthy = entries
            .into_iter()
            .filter(|(_, bytes)| is_unhealthy(bytes))
            .map(|(key, _)| key.clone())
            .collect();
        HealthIndex {
            unhealthy,
            protected: false,
        }
    }

    /// Follows one change of the datum.
    pub(super) fn note(&mut self, op: &Op) {
        match op {
            Op::Put(key, bytes) if is_unhealthy(bytes) => {
                self.unhealthy.insert(key.clone());
            }
            Op::Put(key, _) | Op::Removed(key) => {
                self.unhealthy.remove(key);
            }
        }
    }

    /// The encoded publishers a healthy-only subscriber of `service` is shown, out of `entries`
    /// (the datum's, in its order); `None` when that is all of them. Logs when the protection
    /// switches on or off.
    pub(super) fn shown<'a>(
        &mut self,
        service: &ServiceId,
        entries: impl ExactSizeIterator<Item = (&'a PubKey, &'a Bytes)> + Clone,
        threshold: f64,
    ) -> Option<Vec<&'a Bytes>> {
        let total = entries.len();
        let health = entries
            .clone()
            .map(|(key, _)| self.unhealthy.contains(key).then_some(&UNHEALTHY));
        let (protected, shown) = healthy_view(health, threshold);
        if protected != self.protected {
            self.protected = protected;
            let unhealthy = self.unhealthy.len();
            if protected {
                info!(%service, unhealthy, total, threshold,
                    "too many instances unhealthy: healthy-only subscribers are shown all of them");
            } else {
                info!(%service, unhealthy, total, threshold,
                    "healthy-only subscribers are shown only healthy instances again");
            }
        }
        if shown.len() == total {
            return None;
        }
        let mut shown = shown.into_iter().peekable();
        Some(
            entries
                .enumerate()
                .filter(|(i, _)| shown.next_if_eq(i).is_some())
                .map(|(_, (_, bytes))| bytes)
                .collect(),
        )
    }

    #[cfg(test)]
    pub(super) fn unhealthy(&self) -> &FxHashSet<PubKey> {
        &self.unhealthy
    }
}

impl Hub {
    /// Sets the share of a service's publishers that may be unhealthy before its healthy-only
    /// subscribers are shown all of them (`--protection-threshold`; 0.5 unless set).
    pub fn set_protection_threshold(&mut self, threshold: f64) {
        self.protection_threshold = threshold;
    }
}

/// The one field of an encoded publisher this module reads.
#[derive(Deserialize)]
struct HealthOnly {
    #[serde(default)]
    health: Option<Health>,
}

/// Whether an encoded publisher is marked unhealthy. One that cannot be read (never expected: the
/// hub encoded it) counts as healthy, as an unchecked one does.
fn is_unhealthy(bytes: &[u8]) -> bool {
    frame::decode::<HealthOnly>(bytes)
        .ok()
        .and_then(|p| p.health)
        .is_some_and(|h| !h.healthy)
}

#[cfg(test)]
mod tests;
