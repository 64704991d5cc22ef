//! What the client does with a push, decided from versions and contents alone: whether a snapshot
//! replaces the one held, whether a delta applies, is stale, or calls for a resync, and whether
//! readers are shown the result (`refuse_empty`). No locks, no channels, no cache: `driver.rs`
//! applies these verdicts.

use roster_common::Version;

use crate::snapshot::Snapshot;

/// What to do with a delta from `base` to `version` when the subscription holds `held`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaVerdict {
    /// It goes nowhere newer than what is held: ignore it.
    Stale,
    /// It starts exactly at the version held: apply it.
    Apply,
    /// It starts elsewhere (or nothing is held): ask for the full snapshot again.
    Resync,
}

/// A delta `base → version` against the version held, if any.
pub fn judge_delta(held: Option<Version>, base: Version, version: Version) -> DeltaVerdict {
    match held {
        Some(held) if version <= held => DeltaVerdict::Stale,
        Some(held) if held == base => DeltaVerdict::Apply,
        _ => DeltaVerdict::Resync,
    }
}

/// Whether a snapshot at `version` replaces the one held: only a newer one does.
pub fn snapshot_is_newer(held: Option<Version>, version: Version) -> bool {
    held.is_none_or(|held| version > held)
}

/// Whether readers who see `shown` are shown `next`: with `refuse_empty`, a snapshot that would
/// take them from some publishers to none is withheld (a registry fault must not drop every
/// address at once).
pub fn accept(shown: Option<&Snapshot>, next: &Snapshot, refuse_empty: bool) -> bool {
    let emptying = next.publishers.is_empty() && shown.is_some_and(|s| !s.publishers.is_empty());
    !(emptying && refuse_empty)
}

#[cfg(test)]
mod tests {
    use roster_common::proto::{self, PublisherView};

    use super::*;

    fn snapshot(version: Version, publishers: usize) -> Snapshot {
        Snapshot::from_wire(proto::Snapshot {
            service: "demo".parse().unwrap(),
            version,
            publishers: (0..publishers)
                .map(|i| PublisherView {
                    health: None,
                    persistent: false,
                    client_id: "c".into(),
                    register_id: format!("r{i}"),
                    data: vec![],
                    attributes: Default::default(),
                    client_version: 1,
                })
                .collect(),
        })
    }

    #[test]
    fn deltas_apply_only_on_the_version_they_start_from() {
        assert_eq!(judge_delta(Some(5), 5, 6), DeltaVerdict::Apply);
        assert_eq!(
            judge_delta(Some(6), 5, 6),
            DeltaVerdict::Stale,
            "already there"
        );
        assert_eq!(
            judge_delta(Some(9), 5, 6),
            DeltaVerdict::Stale,
            "older than held"
        );
        assert_eq!(judge_delta(Some(4), 5, 6), DeltaVerdict::Resync, "a gap");
        assert_eq!(
            judge_delta(None, 5, 6),
            DeltaVerdict::Resync,
            "nothing to apply it to"
        );
    }

    #[test]
    fn only_newer_snapshots_replace_what_is_held() {
        assert!(snapshot_is_newer(None, 0));
        assert!(snapshot_is_newer(Some(3), 4));
        assert!(!snapshot_is_newer(Some(4), 4));
        assert!(!snapshot_is_newer(Some(5), 4));
    }

    #[test]
    fn refuse_empty_withholds_only_a_snapshot_that_empties() {
        let full = snapshot(2, 3);
        let empty = snapshot(3, 0);
        assert!(!accept(Some(&full), &empty, true), "withheld");
        assert!(
            accept(Some(&full), &empty, false),
            "shown when not asked to refuse"
        );
        assert!(
            accept(None, &empty, true),
            "a first empty snapshot is the truth"
        );
        assert!(
            accept(Some(&snapshot(1, 0)), &empty, true),
            "empty to empty"
        );
        assert!(accept(Some(&full), &snapshot(4, 1), true));
    }
}
