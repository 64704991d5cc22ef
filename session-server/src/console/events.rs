//! The console's event log: membership changes, slot moves, meta leader changes, lapsed leases
//! and self-preservation switches, derived by comparing each cluster view and each meta status
//! with the one before. Nothing in the cluster records these as events, so the log starts when
//! this session server does and holds what it saw; it is a bounded ring ([`EVENTS_KEPT`]): the
//! oldest event is dropped for each new one past it.
//!
//! Pure functions of two snapshots; the observer (`observe.rs`) feeds them and stamps the time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write;

use roster_common::NodeId;
use roster_common::proto::{ClusterStatus, ClusterView, MemberKey, Role};

/// Events kept; past it the oldest goes.
pub const EVENTS_KEPT: usize = 500;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Membership,
    Slots,
    Leader,
    Lease,
    Preservation,
    Access,
    Console,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Membership => "membership",
            Kind::Slots => "slots",
            Kind::Leader => "leader",
            Kind::Lease => "lease",
            Kind::Preservation => "self-preservation",
            Kind::Access => "access",
            Kind::Console => "console",
        }
    }
}

/// One change, as a sentence, with the details that do not fit in one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub text: String,
    pub detail: Option<String>,
}

fn change(kind: Kind, text: String) -> Change {
    Change {
        kind,
        text,
        detail: None,
    }
}

/// A change and when it was seen (Unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub at_ms: u64,
    pub change: Change,
}

/// The most recent events, oldest first.
#[derive(Debug, Default)]
pub struct EventLog {
    events: VecDeque<Event>,
    logged: u64,
}

impl EventLog {
    pub fn record(&mut self, at_ms: u64, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            self.events.push_back(Event { at_ms, change });
            self.logged += 1;
        }
    }

    /// Newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().rev()
    }

    /// How many events were ever recorded (including those dropped since).
    pub fn logged(&self) -> u64 {
        self.logged
    }
}

fn who(key: MemberKey) -> String {
    format!("{} {}", key.role, key.id)
}

/// What the first view says, as one event.
pub fn first_view(view: &ClusterView) -> Change {
    let count = |role| view.members_of(role).count();
    change(
        Kind::Console,
        format!(
            "Watching cluster {}: {} data and {} session servers, slot table epoch {}.",
            view.cluster_id,
            count(Role::Data),
            count(Role::Session),
            view.table.epoch
        ),
    )
}

/// What changed from view `prev` to view `next`: members that joined, restarted or left; slots
/// that changed leader or followers; tokens created or revoked.
pub fn view_changes(prev: &ClusterView, next: &ClusterView) -> Vec<Change> {
    let mut out = Vec::new();
    let before: BTreeMap<MemberKey, _> = prev.members.iter().map(|m| (m.key(), m)).collect();
    let after: BTreeMap<MemberKey, _> = next.members.iter().map(|m| (m.key(), m)).collect();
    for (key, m) in &after {
        match before.get(key) {
            None => out.push(change(
                Kind::Membership,
                format!("{} joined ({}).", who(*key), m.addr),
            )),
            Some(old) if old.instance != m.instance => out.push(change(
                Kind::Membership,
                format!(
                    "{} restarted: a new instance replaced the old one ({}).",
                    who(*key),
                    m.addr
                ),
            )),
            Some(_) => {}
        }
    }
    for key in before.keys().filter(|k| !after.contains_key(k)) {
        out.push(change(
            Kind::Membership,
            format!("{} left the cluster.", who(*key)),
        ));
    }
    if prev.table.epoch != next.table.epoch {
        out.push(table_change(prev, next));
    }
    let tokens = |v: &ClusterView| -> BTreeSet<String> {
        v.acl.tokens.iter().map(|t| t.id.clone()).collect()
    };
    let (old, new) = (tokens(prev), tokens(next));
    for id in new.difference(&old) {
        out.push(change(Kind::Access, format!("Token {id} was created.")));
    }
    for id in old.difference(&new) {
        out.push(change(
            Kind::Access,
            format!("Token {id} was revoked (or expired and was removed)."),
        ));
    }
    out
}

/// One event for a new slot table: how many slots changed leader, from whom to whom, and how
/// many follower seats changed.
fn table_change(prev: &ClusterView, next: &ClusterView) -> Change {
    let mut moves: BTreeMap<(Option<NodeId>, Option<NodeId>), Vec<usize>> = BTreeMap::new();
    let mut seats = 0;
    for (slot, holders) in next.table.slots.iter().enumerate() {
        let old = prev.table.slots.get(slot).map_or(&[][..], |h| &h[..]);
        let (from, to) = (old.first().copied(), holders.first().copied());
        if from != to {
            moves.entry((from, to)).or_default().push(slot);
        }
        let old_followers: BTreeSet<_> = old.iter().skip(1).collect();
        let new_followers: BTreeSet<_> = holders.iter().skip(1).collect();
        seats += new_followers.difference(&old_followers).count();
    }
    let name = |n: Option<NodeId>| n.map_or_else(|| "nobody".to_owned(), |n| format!("data {n}"));
    let moved: usize = moves.values().map(Vec::len).sum();
    let mut text = format!(
        "Slot table epoch {} → {}: ",
        prev.table.epoch, next.table.epoch
    );
    if moved == 0 {
        text.push_str("no slot changed leader");
    } else {
        let parts: Vec<String> = moves
            .iter()
            .map(|((from, to), slots)| {
                format!("{} from {} to {}", slots.len(), name(*from), name(*to))
            })
            .collect();
        let _ = write!(text, "{moved} slots changed leader ({})", parts.join(", "));
    }
    let _ = write!(text, "; {seats} new follower seats.");
    let detail = (!moves.is_empty()).then(|| {
        moves
            .iter()
            .map(|((from, to), slots)| {
                format!("{} → {}: slots {}", name(*from), name(*to), ranges(slots))
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Change {
        kind: Kind::Slots,
        text,
        detail,
    }
}

/// `[0, 1, 2, 5, 7, 8]` as `0-2, 5, 7-8`.
pub fn ranges(slots: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < slots.len() {
        let start = slots[i];
        let mut end = start;
        while i + 1 < slots.len() && slots[i + 1] == end + 1 {
            i += 1;
            end = slots[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

/// What changed from meta status `prev` to `next`: the leader or term, the voters and learners,
/// self-preservation, and leases that lapsed (the last two only between statuses from the leader).
pub fn status_changes(prev: &ClusterStatus, next: &ClusterStatus) -> Vec<Change> {
    let mut out = Vec::new();
    if prev.leader != next.leader || prev.term != next.term {
        let leader = |s: &ClusterStatus| {
            s.leader
                .map_or_else(|| "no leader".to_owned(), |l| format!("meta {l}"))
        };
        out.push(change(
            Kind::Leader,
            format!(
                "Meta group: {} in term {} (was {} in term {}).",
                leader(next),
                next.term,
                leader(prev),
                prev.term
            ),
        ));
    }
    let nodes = |s: &ClusterStatus| -> BTreeMap<NodeId, bool> {
        s.nodes.iter().map(|n| (n.id, n.voter)).collect()
    };
    let (old, new) = (nodes(prev), nodes(next));
    for (id, voter) in &new {
        let role = if *voter { "voter" } else { "learner" };
        match old.get(id) {
            None => out.push(change(
                Kind::Membership,
                format!("Meta node {id} joined the group as a {role}."),
            )),
            Some(was) if was != voter => out.push(change(
                Kind::Membership,
                format!("Meta node {id} is now a {role}."),
            )),
            Some(_) => {}
        }
    }
    for id in old.keys().filter(|id| !new.contains_key(id)) {
        out.push(change(
            Kind::Membership,
            format!("Meta node {id} left the group."),
        ));
    }
    if prev.self_preservation != next.self_preservation {
        out.push(change(
            Kind::Preservation,
            if next.self_preservation {
                "Self-preservation switched on: lapsed session servers are kept until their \
                 leases come back."
                    .to_owned()
            } else {
                "Self-preservation switched off: lapsed session servers are expired again."
                    .to_owned()
            },
        ));
    }
    if prev.from_leader && next.from_leader {
        let held: BTreeSet<(Role, NodeId)> = prev
            .leases
            .iter()
            .filter(|l| l.remaining_ms > 0)
            .map(|l| (l.role, l.id))
            .collect();
        for lease in next.leases.iter().filter(|l| l.remaining_ms == 0) {
            if held.contains(&(lease.role, lease.id)) {
                out.push(change(
                    Kind::Lease,
                    format!(
                        "The lease of {} {} ({}) lapsed.",
                        lease.role, lease.id, lease.addr
                    ),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use roster_common::proto::{LeaseStatus, Member, MetaNodeStatus, SlotTable};

    use super::*;

    fn member(role: Role, id: NodeId, instance: u64) -> Member {
        Member {
            role,
            id,
            instance,
            addr: format!("127.0.0.1:{}", 7000 + id),
            zone: String::new(),
            joined_at_ms: 0,
            version: String::new(),
        }
    }

    fn view(epoch: u64, members: Vec<Member>, slots: Vec<Vec<NodeId>>) -> ClusterView {
        ClusterView {
            cluster_id: "c1".into(),
            members,
            table: SlotTable {
                epoch,
                slot_count: slots.len() as u32,
                replicas: 2,
                slots,
            },
            meta_leader: None,
            acl: Default::default(),
            persistent: Default::default(),
        }
    }

    fn status(leader: Option<NodeId>, term: u64, preservation: bool) -> ClusterStatus {
        ClusterStatus {
            cluster_id: "c1".into(),
            answered_by: 1,
            from_leader: true,
            leader,
            term,
            nodes: vec![MetaNodeStatus {
                id: 1,
                addr: "a".into(),
                voter: true,
                matched_index: Some(1),
                lag: Some(0),
            }],
            leases: Vec::new(),
            table_epoch: 1,
            self_preservation: preservation,
            last_log_index: None,
            last_applied: None,
            snapshot_index: None,
            purged_index: None,
            snapshots_installed: 0,
            version: String::new(),
        }
    }

    #[test]
    fn a_dead_data_server_shows_as_leaving_and_its_slots_moving() {
        let prev = view(
            4,
            vec![member(Role::Data, 1, 10), member(Role::Data, 2, 20)],
            vec![vec![1, 2], vec![2, 1], vec![2, 1], vec![1, 2]],
        );
        let next = view(
            5,
            vec![member(Role::Data, 1, 10)],
            vec![vec![1], vec![1], vec![1], vec![1]],
        );
        let changes = view_changes(&prev, &next);
        let texts: Vec<&str> = changes.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "data 2 left the cluster.",
                "Slot table epoch 4 → 5: 2 slots changed leader (2 from data 2 to data 1); 0 new follower seats.",
            ]
        );
        assert_eq!(
            changes[1].detail.as_deref(),
            Some("data 2 → data 1: slots 1-2")
        );
    }

    #[test]
    fn joins_and_restarts_are_told_apart() {
        let prev = view(1, vec![member(Role::Session, 1, 5)], vec![]);
        let next = view(
            1,
            vec![member(Role::Session, 1, 6), member(Role::Session, 2, 7)],
            vec![],
        );
        let texts: Vec<String> = view_changes(&prev, &next)
            .into_iter()
            .map(|c| c.text)
            .collect();
        assert_eq!(
            texts,
            [
                "session 1 restarted: a new instance replaced the old one (127.0.0.1:7001).",
                "session 2 joined (127.0.0.1:7002).",
            ]
        );
    }

    #[test]
    fn leader_terms_preservation_and_lapsed_leases_are_events() {
        let mut prev = status(Some(1), 3, false);
        let lease = |remaining_ms| LeaseStatus {
            role: Role::Data,
            id: 2,
            instance: 1,
            addr: "x".into(),
            remaining_ms,
            connections: None,
            subscribers: None,
        };
        prev.leases = vec![lease(2_000)];
        let mut next = status(Some(2), 4, true);
        next.leases = vec![lease(0)];
        let kinds: Vec<Kind> = status_changes(&prev, &next)
            .into_iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(kinds, [Kind::Leader, Kind::Preservation, Kind::Lease]);
        assert!(status_changes(&next, &next).is_empty(), "nothing changed");
    }

    #[test]
    fn the_log_keeps_the_newest() {
        let mut log = EventLog::default();
        for i in 0..EVENTS_KEPT + 3 {
            log.record(i as u64, [change(Kind::Console, i.to_string())]);
        }
        assert_eq!(log.logged(), EVENTS_KEPT as u64 + 3);
        assert_eq!(log.newest_first().count(), EVENTS_KEPT);
        assert_eq!(
            log.newest_first().next().unwrap().change.text,
            (EVENTS_KEPT + 2).to_string()
        );
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
    }
}
