use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const SLOTS: u32 = 256;

fn table(slots: Vec<Vec<NodeId>>, replicas: u32) -> SlotTable {
    SlotTable {
        epoch: 1,
        slot_count: slots.len() as u32,
        replicas,
        slots,
    }
}

/// `min(replicas, distinct live servers)` distinct live servers per slot.
fn assert_valid(placed: &[Vec<NodeId>], nodes: &[NodeId], slot_count: u32, replicas: u32) {
    let live: BTreeSet<NodeId> = nodes.iter().copied().collect();
    let width = (replicas as usize).min(live.len());
    assert_eq!(placed.len(), slot_count as usize);
    for (slot, servers) in placed.iter().enumerate() {
        let distinct: BTreeSet<NodeId> = servers.iter().copied().collect();
        assert_eq!(servers.len(), width, "slot {slot}: {servers:?}");
        assert_eq!(distinct.len(), width, "slot {slot}: {servers:?}");
        assert!(distinct.is_subset(&live), "slot {slot}: {servers:?}");
    }
}

/// Slots each server leads and follows, zero for servers holding none.
fn role_counts(
    placed: &[Vec<NodeId>],
    nodes: &[NodeId],
) -> (BTreeMap<NodeId, u64>, BTreeMap<NodeId, u64>) {
    let mut leads: BTreeMap<NodeId, u64> = nodes.iter().map(|&n| (n, 0)).collect();
    let mut follows = leads.clone();
    for servers in placed {
        for (position, node) in servers.iter().enumerate() {
            let counts = if position == 0 {
                &mut leads
            } else {
                &mut follows
            };
            *counts.entry(*node).or_default() += 1;
        }
    }
    (leads, follows)
}

/// Whether `count` is within ±10% of `numerator / denominator`, read as
/// `floor(0.9 × ideal) ≤ count ≤ ceil(1.1 × ideal)`.
fn within_ten_percent(count: u64, numerator: u64, denominator: u64) -> bool {
    let low = 9 * numerator / (10 * denominator);
    let high = (11 * numerator).div_ceil(10 * denominator);
    (low..=high).contains(&count)
}

/// Balance: leader counts within ±10% of `slots / n`, follower counts within ±10% of
/// `slots × (w − 1) / n`.
fn assert_balanced(placed: &[Vec<NodeId>], nodes: &[NodeId], replicas: u32) {
    let n = nodes.len() as u64;
    let width = u64::from(replicas).min(n);
    let slots = placed.len() as u64;
    let (leads, follows) = role_counts(placed, nodes);
    for (node, &count) in &leads {
        assert!(
            within_ten_percent(count, slots, n),
            "server {node} leads {count} of {slots} slots over {n} servers: {leads:?}"
        );
    }
    for (node, &count) in &follows {
        assert!(
            within_ten_percent(count, slots * (width - 1), n),
            "server {node} follows {count} slots, {n} servers, {width} replicas: {follows:?}"
        );
    }
}

/// Every server holds `floor(slots × w / n)` replicas or one more.
fn assert_replicas_even(placed: &[Vec<NodeId>], nodes: &[NodeId]) {
    let (leads, follows) = role_counts(placed, nodes);
    let seats: u64 = placed.iter().map(|s| s.len() as u64).sum();
    let n = nodes.len() as u64;
    for node in nodes {
        let held = leads[node] + follows[node];
        assert!(
            held == seats / n || held == seats.div_ceil(n),
            "server {node} holds {held} of {seats} seats over {n} servers"
        );
    }
}

/// (slot, server) replica assignments in `after` that `before` did not have.
fn new_assignments(before: &[Vec<NodeId>], after: &[Vec<NodeId>]) -> usize {
    after
        .iter()
        .enumerate()
        .map(|(slot, servers)| {
            let old = before.get(slot).map(Vec::as_slice).unwrap_or(&[]);
            servers.iter().filter(|n| !old.contains(n)).count()
        })
        .sum()
}

/// New replica assignments that went to `node`.
fn new_assignments_of(node: NodeId, before: &[Vec<NodeId>], after: &[Vec<NodeId>]) -> usize {
    after
        .iter()
        .enumerate()
        .filter(|(slot, servers)| {
            servers.contains(&node) && !before.get(*slot).is_some_and(|old| old.contains(&node))
        })
        .count()
}

fn as_sets(placed: &[Vec<NodeId>]) -> Vec<BTreeSet<NodeId>> {
    placed.iter().map(|s| s.iter().copied().collect()).collect()
}

/// Where a slot kept any of its previous holders, one of them leads: a surviving follower is
/// promoted when the leader is gone, and a newcomer never leads.
fn assert_leaders_held_the_slot(before: &[Vec<NodeId>], after: &[Vec<NodeId>]) {
    for (slot, (old, new)) in before.iter().zip(after).enumerate() {
        if new.iter().any(|n| old.contains(n)) {
            assert!(
                old.contains(&new[0]),
                "slot {slot}: newcomer {} leads {new:?}, held by {old:?}",
                new[0]
            );
        }
    }
}

/// A set of `count` distinct server ids drawn from the whole id space.
fn servers(count: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<NodeId>> {
    proptest::collection::btree_set(any::<NodeId>(), count)
        .prop_map(|set| set.into_iter().collect())
}

/// Servers and a replica count from 1 up to how many servers there are.
fn servers_and_replicas(
    count: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = (Vec<NodeId>, u32)> {
    servers(count).prop_flat_map(|nodes| {
        let most = nodes.len() as u32;
        (Just(nodes), 1..=most)
    })
}

#[derive(Clone, Debug)]
enum Change {
    /// A server with this id joins (another id if it is taken).
    Join(NodeId),
    /// The server at this position (modulo the count) leaves, unless only 3 are left.
    Leave(u64),
}

fn changes() -> impl Strategy<Value = Vec<Change>> {
    let change = prop_oneof![
        any::<NodeId>().prop_map(Change::Join),
        any::<u64>().prop_map(Change::Leave),
    ];
    proptest::collection::vec(change, 1..=10)
}

/// Applies `change` to `nodes`; returns the server that joined or left and whether it joined.
fn apply(nodes: &mut Vec<NodeId>, change: &Change) -> (NodeId, bool) {
    match *change {
        Change::Leave(at) if nodes.len() > 3 => {
            let index = (at % nodes.len() as u64) as usize;
            (nodes.remove(index), false)
        }
        Change::Leave(at) | Change::Join(at) => {
            let mut id = at;
            while nodes.contains(&id) {
                id = id.wrapping_add(1);
            }
            nodes.push(id);
            (id, true)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Complete, distinct, live replica sets, deterministic results and leaders that held the
    /// slot, for any input: duplicate and unsorted ids, any replica count, and a previous
    /// table of another size naming servers that are gone.
    #[test]
    fn any_input_gives_distinct_live_replicas_deterministically(
        nodes in proptest::collection::vec(0..40u64, 0..12),
        slot_count in 0..300u32,
        replicas in 1..6u32,
        old_slots in proptest::collection::vec(
            proptest::collection::vec(0..60u64, 0..5),
            0..300,
        ),
    ) {
        let previous = table(old_slots, replicas);
        let placed = place(&nodes, slot_count, replicas, &previous);
        assert_valid(&placed, &nodes, slot_count, replicas);
        let mut reordered = nodes.clone();
        reordered.reverse();
        reordered.extend_from_slice(&nodes);
        prop_assert_eq!(&place(&reordered, slot_count, replicas, &previous), &placed);
        assert_leaders_held_the_slot(&previous.slots, &placed);
    }

    /// Balance on a fresh cluster: 3 to 24 servers, any replica count up to the server
    /// count.
    #[test]
    fn a_fresh_placement_is_balanced((nodes, replicas) in servers_and_replicas(3..=24)) {
        let placed = place(&nodes, SLOTS, replicas, &SlotTable::empty(SLOTS, replicas));
        assert_valid(&placed, &nodes, SLOTS, replicas);
        assert_replicas_even(&placed, &nodes);
        assert_balanced(&placed, &nodes, replicas);
        // Nothing to improve: placing again changes nothing.
        let again = place(&nodes, SLOTS, replicas, &table(placed.clone(), replicas));
        prop_assert_eq!(again, placed);
    }

    /// Balance, movement and leader continuity over a sequence of up to 10 single joins and
    /// leaves, starting from a fresh balanced table of 3 to 8 servers (never going below 3),
    /// with 1 to 3 replicas or as many replicas as there are servers at the start. Replica
    /// counts are even and leaders held their slot after every change; see `check_join`,
    /// `check_leave` and `check_settled` for the rest.
    #[test]
    fn joins_and_leaves_stay_balanced_and_move_little(
        (start, replicas) in servers_and_replicas(3..=8)
            .prop_flat_map(|(nodes, most)| (Just(nodes), prop_oneof![1..=3u32, Just(most)])),
        steps in changes(),
    ) {
        let mut nodes = start;
        let mut current = place(&nodes, SLOTS, replicas, &SlotTable::empty(SLOTS, replicas));
        assert_balanced(&current, &nodes, replicas);
        for change in &steps {
            let (changed, joined) = apply(&mut nodes, change);
            let placed = place(&nodes, SLOTS, replicas, &table(current.clone(), replicas));
            assert_valid(&placed, &nodes, SLOTS, replicas);
            assert_replicas_even(&placed, &nodes);
            assert_leaders_held_the_slot(&current, &placed);
            if joined {
                check_join(&current, &placed, changed, &nodes, replicas);
            } else {
                check_leave(&current, &placed, changed, &nodes, replicas);
            }
            current = check_settled(placed, &nodes, replicas, joined);
        }
    }
}

/// The unavoidable share of a change between `n - 1` and `n` servers: the seats one server
/// holds in the larger cluster, `slots × min(replicas, n) / n`.
fn fair_share(n: u64, replicas: u32) -> f64 {
    (u64::from(SLOTS) * u64::from(replicas).min(n)) as f64 / n as f64
}

/// Movement on a join to `n` servers: at most `ceil(1.25 × fair share)` new replica
/// assignments in all (the joiner takes its share and nothing else needs to move), of which
/// at most `ceil(0.05 × fair share)` go to servers other than the joiner.
fn check_join(
    before: &[Vec<NodeId>],
    after: &[Vec<NodeId>],
    joiner: NodeId,
    nodes: &[NodeId],
    replicas: u32,
) {
    let share = fair_share(nodes.len() as u64, replicas);
    let moved = new_assignments(before, after);
    let others = moved - new_assignments_of(joiner, before, after);
    assert!(
        moved as f64 <= (1.25 * share).ceil(),
        "join of {joiner}: {moved} moved, share {share}"
    );
    assert!(
        others as f64 <= (0.05 * share).ceil(),
        "join of {joiner}: {others} moved to others"
    );
}

/// Movement on a leave from `n` servers: at most `ceil(1.25 × fair share)` new replica
/// assignments in all, of which at most `ceil(0.05 × fair share)` in slots the leaver did not
/// hold. Leadership: slots whose previous leader is still a replica but no longer leads are at
/// most `ceil(slots / n)` (the leaver's share of leaderships) with 2 replicas, where each
/// promotion is forced onto the one surviving follower and evening that out displaces kept
/// leaders; with 3 or more, where promotions can go to whichever follower needs them, at most
/// half that. Balance holds at once.
fn check_leave(
    before: &[Vec<NodeId>],
    after: &[Vec<NodeId>],
    leaver: NodeId,
    nodes: &[NodeId],
    replicas: u32,
) {
    let n = nodes.len() as u64 + 1;
    let share = fair_share(n, replicas);
    let moved = new_assignments(before, after);
    assert!(
        moved as f64 <= (1.25 * share).ceil(),
        "leave of {leaver}: {moved} moved, share {share}"
    );
    let elsewhere: usize = before
        .iter()
        .zip(after)
        .filter(|(old, _)| !old.contains(&leaver))
        .map(|(old, new)| new.iter().filter(|n| !old.contains(n)).count())
        .sum();
    assert!(
        elsewhere as f64 <= (0.05 * share).ceil(),
        "leave of {leaver}: {elsewhere} moved in slots it did not hold"
    );
    let displaced = before
        .iter()
        .zip(after)
        .filter(|(old, new)| new.contains(&old[0]) && new[0] != old[0])
        .count() as u64;
    let width = u64::from(replicas).min(n - 1);
    let limit = if width >= 3 {
        u64::from(SLOTS).div_ceil(2 * n)
    } else {
        u64::from(SLOTS).div_ceil(n)
    };
    assert!(
        displaced <= limit,
        "leave of {leaver}: {displaced} kept leaders displaced"
    );
    assert_balanced(after, nodes, replicas);
}

/// Placing again with the same servers (as the meta leader would once a joiner holds its
/// slots) moves no replica, hands leadership only to servers that held the slot, changes at
/// most `ceil(1.5 × slots / n)` leaders after a join (the joiner's share plus a margin) and
/// none after a leave, and gives a balanced table that further placements leave alone.
fn check_settled(
    placed: Vec<Vec<NodeId>>,
    nodes: &[NodeId],
    replicas: u32,
    joined: bool,
) -> Vec<Vec<NodeId>> {
    let settled = place(nodes, SLOTS, replicas, &table(placed.clone(), replicas));
    assert_eq!(
        as_sets(&settled),
        as_sets(&placed),
        "settling moved replicas"
    );
    assert_leaders_held_the_slot(&placed, &settled);
    let changed = placed
        .iter()
        .zip(&settled)
        .filter(|(a, b)| a[0] != b[0])
        .count();
    let limit = if joined {
        (1.5 * f64::from(SLOTS) / nodes.len() as f64).ceil() as usize
    } else {
        0
    };
    assert!(changed <= limit, "settling changed {changed} leaders");
    assert_balanced(&settled, nodes, replicas);
    let again = place(nodes, SLOTS, replicas, &table(settled.clone(), replicas));
    assert_eq!(again, settled, "a settled table is a fixed point");
    settled
}

#[test]
fn ring_walk_matches_hashring() {
    let live: Vec<NodeId> = vec![3, 17, 99, 1000, u64::MAX];
    let ring = Ring::new(&live);
    for slot in 0..64u32 {
        let from_hashring: Vec<usize> = ring
            .ring
            .get_with_replicas(&slot, ring.order.len() - 1)
            .unwrap_or_default()
            .iter()
            .filter_map(|vnode| live.binary_search(&vnode.node).ok())
            .collect();
        let mut distinct = Vec::new();
        for server in from_hashring {
            if !distinct.contains(&server) {
                distinct.push(server);
            }
        }
        assert_eq!(ring.walk(slot, live.len()), distinct, "slot {slot}");
    }
}

#[test]
fn no_servers_leave_every_slot_empty() {
    let placed = place(&[], 16, 3, &SlotTable::empty(16, 3));
    assert_eq!(placed, vec![Vec::<NodeId>::new(); 16]);
}

#[test]
fn fewer_servers_than_replicas_uses_them_all() {
    let placed = place(&[7, 7], 16, 3, &SlotTable::empty(16, 3));
    assert!(placed.iter().all(|r| r == &vec![7]));
}

#[test]
fn a_surviving_follower_is_promoted_when_the_leader_leaves() {
    let before = place(&[1, 2, 3], 64, 2, &SlotTable::empty(64, 2));
    let after = place(&[2, 3], 64, 2, &table(before.clone(), 2));
    for (slot, replicas) in after.iter().enumerate() {
        let old = &before[slot];
        if old[0] == 1 {
            assert_eq!(replicas[0], old[1], "slot {slot}: the old follower leads");
        }
    }
}

#[test]
fn a_joiner_follows_first_and_leads_after_the_next_placement() {
    let nodes = [1, 2, 3, 4];
    let before = place(&nodes, SLOTS, 3, &SlotTable::empty(SLOTS, 3));
    let joined = place(&[1, 2, 3, 4, 5], SLOTS, 3, &table(before, 3));
    let (leads, follows) = role_counts(&joined, &[5]);
    assert_eq!(leads[&5], 0);
    assert!(follows[&5] > 0);
    let settled = place(&[1, 2, 3, 4, 5], SLOTS, 3, &table(joined, 3));
    let (leads, _) = role_counts(&settled, &[5]);
    assert!(within_ten_percent(leads[&5], u64::from(SLOTS), 5));
}
