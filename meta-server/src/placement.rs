//! Slot placement: which data servers hold each slot, and which of them leads it.
//!
//! [`place`] runs each time the set of live data servers changes, with the last committed table as
//! `previous`. It depends only on its arguments (no randomness, no hash-map iteration order, and a
//! ring hash with fixed keys), so the same input gives the same table wherever it is computed.
//!
//! # Algorithm
//!
//! 1. **Ring.** Every live server is put on a consistent-hash ring ([`hashring`]) as
//!    [`VIRTUAL_NODES`] virtual nodes. Walking the ring from a slot's hash and keeping each server
//!    the first time it is met gives the slot's order of preference. A server's positions depend
//!    only on its id, so these preferences barely change as others come and go.
//! 2. **Quotas.** With `n` live servers and `w = min(replicas, n)` replicas per slot, the
//!    `slot_count × w` seats are split as evenly as possible: every server gets
//!    `⌊slot_count × w / n⌋` or one more. The extra seats go to the servers that already hold the
//!    most, so a balanced table keeps its shape.
//! 3. **Keep what survives.** Each slot starts from its previous replicas that are still live, in
//!    their previous order (leader first), at most `w` of them. A server holding more than its
//!    quota gives up its surplus, choosing slots where it follows rather than leads, where it
//!    ranks worst on the ring, and where no other server has left a gap yet.
//! 4. **Fill the gaps** (consistent hashing with bounded loads). Every slot short of `w` replicas
//!    walks its ring preference, skipping servers that are full or already in the slot; all slots
//!    get their best-ranked candidate before any gets its next one. A slot still short after that
//!    (every server with room already holds it) gets a seat through a chain of moves: a full
//!    server moves into the slot and is replaced where it was by another, and so on until a server
//!    with room is reached. The chain chosen is the one that makes the fewest extra copies: moving
//!    a server out of a slot it only just joined costs nothing. As the quotas add up to the seats,
//!    such a chain always exists, so every server ends exactly at its quota.
//! 5. **Leaders.** Only a server that held the slot in the previous table may lead it, if any of
//!    those remains; a newcomer may lead only a slot that kept none of its previous holders. Each
//!    slot starts with its previous leader, or else its first surviving previous follower
//!    (promotion before copying). Leader quotas split `slot_count` evenly (`⌊slot_count / n⌋` or
//!    one more) over the servers that may lead somewhere, the extra leaderships going to servers
//!    that hold more replicas, so that follower counts come out even too. Servers under their
//!    leader quota then take over slots they may lead from servers over it, along chains of such
//!    hand-overs that displace as few kept leaders as possible (re-pointing a slot whose leader
//!    was only just promoted is free). Leadership only moves within a slot's replica set, so this
//!    step copies nothing.
//!
//! # Guarantees
//!
//! - Every slot gets `min(replicas, n)` distinct live servers (a `replicas` of 0 counts as 1);
//!   with no live server every slot is empty. The result is the same for the same input, whatever
//!   the order of `nodes`.
//! - Every server holds `⌊slot_count × w / n⌋` replicas or one more.
//! - When every server may lead somewhere (always so on a fresh placement, after a leave, and on
//!   the second call after a join), each leads `⌊slot_count / n⌋` slots or one more, and follows
//!   `⌊slot_count × (w − 1) / n⌋` or one more. Should the replica sets make those numbers
//!   unreachable, the leader step stops at the most even split its chains can find.
//! - Starting from a balanced table, little more than what must move moves: on a join, the
//!   joiner's seats are taken from the others; on a leave, the leaver's seats are refilled.
//!   Other replicas stay put unless a chain in step 4 needs them to, and chains avoid extra
//!   copies when they can. Leaders stay unless promotion or balance needs them to move.
//! - Placing again with the same servers and the result as `previous` changes nothing once
//!   leaders are balanced.
//!
//! # Caveats
//!
//! - A server that has just joined holds no slot yet, so (with `w` ≥ 2) the call that admits it
//!   makes it a follower only, and it leads nothing: leader counts are uneven until [`place`] is
//!   called again with the same servers, which hands it its share of leaderships without moving
//!   any replica. Nothing here makes that second call happen.
//! - The result depends on `previous`, not only on the live set: the same servers with different
//!   histories can be placed differently, and slots drift from their ring preference over time.
//! - Balance is counted in slots, not load: every slot is assumed to cost the same.
//! - The chain searches cost up to about `slot_count` steps per chain, so the worst case is
//!   quadratic in `slot_count`: a leave among 5 servers with 65,536 slots and 3 replicas takes a
//!   few hundred milliseconds in a release build, while 256 slots take under a millisecond.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use hashring::HashRing;
use roster_common::NodeId;
use roster_common::proto::SlotTable;

/// Virtual nodes per data server on the ring. More make ring preferences smoother; balance comes
/// from the quotas either way.
pub const VIRTUAL_NODES: u32 = 64;

/// How many servers beyond a slot's replica count its ring preference lists. Filling a gap looks
/// this deep before falling back to a search over all servers.
const PREFERENCE_SLACK: usize = 8;

/// The replica lists of every slot for the live data servers `nodes`, given the previous table.
/// `slots[s]` is `[leader, followers...]`.
pub fn place(
    nodes: &[NodeId],
    slot_count: u32,
    replicas: u32,
    previous: &SlotTable,
) -> Vec<Vec<NodeId>> {
    let slot_count = slot_count as usize;
    let live = distinct_sorted(nodes);
    if live.is_empty() {
        return vec![Vec::new(); slot_count];
    }
    let width = (replicas.max(1) as usize).min(live.len());

    let holders = previous_holders(previous, &live, slot_count);
    let previous_leaders = previous_leaders(previous, &live, slot_count);
    let preferences = Ring::new(&live).preferences(slot_count, width + PREFERENCE_SLACK);

    let mut members: Vec<Vec<usize>> = holders
        .iter()
        .map(|held| held.iter().copied().take(width).collect())
        .collect();
    let quotas = replica_quotas(&members, live.len(), slot_count * width);
    shed_surplus(&mut members, &quotas, &preferences);
    fill_gaps(&mut members, &holders, width, &quotas, &preferences);
    let leaders = choose_leaders(&members, &holders, previous_leaders, live.len());

    members
        .iter()
        .zip(leaders)
        .map(|(slot_members, leader)| leader_first(slot_members, leader, &live))
        .collect()
}

/// The ids of `members` with `leader` (if it is one of them) first, the rest in their order.
fn leader_first(members: &[usize], leader: usize, live: &[NodeId]) -> Vec<NodeId> {
    let leading = members.iter().filter(|&&m| m == leader);
    let following = members.iter().filter(|&&m| m != leader);
    leading.chain(following).map(|&index| live[index]).collect()
}

/// The distinct ids of `nodes`, sorted. Servers are referred to by their index in this list.
fn distinct_sorted(nodes: &[NodeId]) -> Vec<NodeId> {
    let mut distinct = nodes.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    distinct
}

/// For each slot, the live servers that held it in `previous`, in their previous order (leader
/// first), as indices into `live`.
fn previous_holders(previous: &SlotTable, live: &[NodeId], slot_count: usize) -> Vec<Vec<usize>> {
    (0..slot_count)
        .map(|slot| {
            let mut held: Vec<usize> = Vec::new();
            for id in previous.slots.get(slot).into_iter().flatten() {
                if let Ok(index) = live.binary_search(id)
                    && !held.contains(&index)
                {
                    held.push(index);
                }
            }
            held
        })
        .collect()
}

/// For each slot, its leader in `previous` if that server is live, as an index into `live`.
fn previous_leaders(
    previous: &SlotTable,
    live: &[NodeId],
    slot_count: usize,
) -> Vec<Option<usize>> {
    (0..slot_count)
        .map(|slot| {
            let leader = previous.slots.get(slot)?.first()?;
            live.binary_search(leader).ok()
        })
        .collect()
}

/// How many slots each server is in.
fn loads(members: &[Vec<usize>], node_count: usize) -> Vec<usize> {
    let mut loads = vec![0; node_count];
    for &node in members.iter().flatten() {
        loads[node] += 1;
    }
    loads
}

/// Splits `total` as evenly as possible over the servers in `order`: each gets `total / len`, and
/// the first `total % len` one more. Servers not in `order` get nothing.
fn even_split(total: usize, order: &[usize], node_count: usize) -> Vec<usize> {
    let mut quotas = vec![0; node_count];
    if order.is_empty() {
        return quotas;
    }
    let (base, extra) = (total / order.len(), total % order.len());
    for (rank, &node) in order.iter().enumerate() {
        quotas[node] = base + usize::from(rank < extra);
    }
    quotas
}

/// Each server's share of the `seats`, the larger shares going to the servers holding the most.
fn replica_quotas(members: &[Vec<usize>], node_count: usize, seats: usize) -> Vec<usize> {
    let held = loads(members, node_count);
    let mut order: Vec<usize> = (0..node_count).collect();
    order.sort_by_key(|&node| (Reverse(held[node]), node));
    even_split(seats, &order, node_count)
}

/// A virtual node: one of a server's positions on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VirtualNode {
    node: NodeId,
    replica: u32,
}

impl Hash for VirtualNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.node);
        state.write_u32(self.replica);
    }
}

/// The consistent-hash ring of the live servers.
struct Ring<'a> {
    live: &'a [NodeId],
    ring: HashRing<VirtualNode>,
    /// The server (index into `live`) at each ring position, in ring order.
    order: Vec<usize>,
    /// The ring position of each virtual node, at `server index × VIRTUAL_NODES + replica`.
    position: Vec<usize>,
}

impl<'a> Ring<'a> {
    fn new(live: &'a [NodeId]) -> Self {
        let mut ring = HashRing::new();
        ring.batch_add(
            live.iter()
                .flat_map(|&node| {
                    (0..VIRTUAL_NODES).map(move |replica| VirtualNode { node, replica })
                })
                .collect(),
        );
        let mut order = Vec::with_capacity(ring.len());
        let mut position = vec![0; live.len() * VIRTUAL_NODES as usize];
        // A `HashRing` iterates its virtual nodes in ring order; `ring_walk_matches_hashring`
        // checks that against `get_with_replicas`.
        for (at, vnode) in ring.clone().into_iter().enumerate() {
            if let Ok(index) = live.binary_search(&vnode.node) {
                order.push(index);
                position[Self::vnode_index(index, vnode.replica)] = at;
            }
        }
        Ring {
            live,
            ring,
            order,
            position,
        }
    }

    fn vnode_index(index: usize, replica: u32) -> usize {
        index * VIRTUAL_NODES as usize + replica as usize
    }

    /// The first `depth` distinct servers met walking the ring from `slot`'s hash.
    fn walk(&self, slot: u32, depth: usize) -> Vec<usize> {
        let start = self
            .ring
            .get(&slot)
            .and_then(|vnode| {
                let index = self.live.binary_search(&vnode.node).ok()?;
                self.position
                    .get(Self::vnode_index(index, vnode.replica))
                    .copied()
            })
            .unwrap_or(0);
        let mut seen = vec![false; self.live.len()];
        let mut servers = Vec::with_capacity(depth);
        let ring_order = self.order[start..].iter().chain(&self.order[..start]);
        for &server in ring_order {
            if servers.len() == depth {
                break;
            }
            if !seen[server] {
                seen[server] = true;
                servers.push(server);
            }
        }
        servers
    }

    fn preferences(&self, slot_count: usize, depth: usize) -> Preferences {
        Preferences {
            lists: (0..slot_count)
                .map(|slot| self.walk(slot as u32, depth))
                .collect(),
        }
    }
}

/// Each slot's most preferred servers, best first.
struct Preferences {
    lists: Vec<Vec<usize>>,
}

impl Preferences {
    /// How far down `slot`'s preference `node` is; servers not listed rank last.
    fn rank(&self, slot: usize, node: usize) -> usize {
        let list = &self.lists[slot];
        list.iter().position(|&n| n == node).unwrap_or(list.len())
    }

    fn depth(&self) -> usize {
        self.lists.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// Makes every server over its quota leave slots until it is within it. It leaves slots it does
/// not lead first, then those where it ranks worst, and avoids slots that already lost a server so
/// a single newcomer can fill each gap.
fn shed_surplus(members: &mut [Vec<usize>], quotas: &[usize], preferences: &Preferences) {
    let held = loads(members, quotas.len());
    let mut opened = vec![false; members.len()];
    for (node, (&load, &quota)) in held.iter().zip(quotas).enumerate() {
        let surplus = load.saturating_sub(quota);
        if surplus == 0 {
            continue;
        }
        let mut slots: Vec<usize> = (0..members.len())
            .filter(|&slot| members[slot].contains(&node))
            .collect();
        slots.sort_by_key(|&slot| {
            (
                opened[slot],
                members[slot].first() == Some(&node),
                Reverse(preferences.rank(slot, node)),
                slot,
            )
        });
        for &slot in slots.iter().take(surplus) {
            members[slot].retain(|&m| m != node);
            opened[slot] = true;
        }
    }
}

/// Brings every slot up to `width` servers without taking any server past its quota.
fn fill_gaps(
    members: &mut [Vec<usize>],
    holders: &[Vec<usize>],
    width: usize,
    quotas: &[usize],
    preferences: &Preferences,
) {
    let held = loads(members, quotas.len());
    let mut room: Vec<usize> = quotas
        .iter()
        .zip(&held)
        .map(|(&quota, &load)| quota.saturating_sub(load))
        .collect();

    // Consistent hashing with bounded loads: every slot's best-ranked candidates first.
    for rank in 0..preferences.depth() {
        for (slot, slot_members) in members.iter_mut().enumerate() {
            if slot_members.len() >= width {
                continue;
            }
            if let Some(&candidate) = preferences.lists[slot].get(rank)
                && room[candidate] > 0
                && !slot_members.contains(&candidate)
            {
                slot_members.push(candidate);
                room[candidate] -= 1;
            }
        }
    }

    let mut search = ChainSearch {
        holders,
        preferences,
        scan_from: 0,
    };
    for slot in 0..members.len() {
        while members[slot].len() < width {
            if !search.free_a_seat(members, slot, &mut room) {
                // Unreachable while quotas add up to the seats; keeps the slot complete anyway.
                let Some(any) = (0..room.len()).find(|node| !members[slot].contains(node)) else {
                    break;
                };
                members[slot].push(any);
            }
        }
    }
}

/// Frees seats for slots that the ring walk could not fill.
struct ChainSearch<'a> {
    holders: &'a [Vec<usize>],
    preferences: &'a Preferences,
    /// Where scans over the slots start: at the slot the last chain went through, since the slots
    /// before it have usually been used up.
    scan_from: usize,
}

impl ChainSearch<'_> {
    /// Adds one server to `target` along the cheapest chain of moves: a server joins `target`,
    /// leaving a slot that another server joins, and so on until the server joining last has
    /// room. Every server in the chain keeps its load except the last, which takes one more. A
    /// step costs one extra copy when the server leaving a slot held it before (its replacement
    /// is a new copy), and nothing when it only just joined it. Returns whether a chain was found.
    fn free_a_seat(
        &mut self,
        members: &mut [Vec<usize>],
        target: usize,
        room: &mut [usize],
    ) -> bool {
        let node_count = room.len();
        let slot_count = members.len();
        // `joins[node] = (slot, leaving)`: in the chain, `node` joins `slot`, which `leaving`
        // leaves (nobody leaves `target`).
        let mut joins: Vec<Option<(usize, Option<usize>)>> = vec![None; node_count];
        let mut cost = vec![usize::MAX; node_count];
        let mut done = vec![false; node_count];
        let mut queue = VecDeque::new();

        let listed = &self.preferences.lists[target];
        let unlisted = (0..node_count).filter(|node| !listed.contains(node));
        let candidates: Vec<usize> = listed
            .iter()
            .copied()
            .chain(unlisted)
            .filter(|node| !members[target].contains(node))
            .collect();
        for &node in &candidates {
            joins[node] = Some((target, None));
            cost[node] = 0;
            if room[node] > 0 {
                apply_chain(members, &joins, node, room);
                return true;
            }
            queue.push_back(node);
        }

        while let Some(mover) = queue.pop_front() {
            if std::mem::replace(&mut done[mover], true) {
                continue;
            }
            if room[mover] > 0 {
                apply_chain(members, &joins, mover, room);
                return true;
            }
            for offset in 0..slot_count {
                let slot = (self.scan_from + offset) % slot_count;
                if slot == target || !members[slot].contains(&mover) {
                    continue;
                }
                let step = usize::from(self.holders[slot].contains(&mover));
                let reach = cost[mover] + step;
                for node in 0..node_count {
                    if reach >= cost[node] || members[slot].contains(&node) {
                        continue;
                    }
                    cost[node] = reach;
                    joins[node] = Some((slot, Some(mover)));
                    if step == 0 && room[node] > 0 {
                        // As cheap as any chain still to be found.
                        self.scan_from = slot;
                        apply_chain(members, &joins, node, room);
                        return true;
                    }
                    if step == 0 {
                        queue.push_front(node);
                    } else {
                        queue.push_back(node);
                    }
                }
            }
        }
        false
    }
}

/// Carries out the chain of moves ending with `last` (a server with room) joining its slot.
fn apply_chain(
    members: &mut [Vec<usize>],
    joins: &[Option<(usize, Option<usize>)>],
    last: usize,
    room: &mut [usize],
) {
    room[last] -= 1;
    let mut joining = last;
    while let Some((slot, leaving)) = joins[joining] {
        members[slot].push(joining);
        let Some(leaving) = leaving else {
            break;
        };
        members[slot].retain(|&m| m != leaving);
        joining = leaving;
    }
}

/// What the leader step works with; servers are indices into the live list.
struct LeaderBalance {
    /// For each server, the slots it may lead.
    eligible: Vec<Vec<usize>>,
    /// Each slot's leader in the previous table, if it is live.
    previous_leaders: Vec<Option<usize>>,
    /// How many slots each server leads so far.
    leads: Vec<usize>,
    /// How many slots each server should lead.
    quotas: Vec<usize>,
}

/// Picks each slot's leader among its `members`.
fn choose_leaders(
    members: &[Vec<usize>],
    holders: &[Vec<usize>],
    previous_leaders: Vec<Option<usize>>,
    node_count: usize,
) -> Vec<usize> {
    // `members` lists surviving previous holders first, previous leader first: that is the
    // continuity choice, and it is always eligible.
    let mut leaders: Vec<usize> = members
        .iter()
        .map(|slot_members| slot_members.first().copied().unwrap_or(0))
        .collect();
    let mut leads = vec![0; node_count];
    for &leader in &leaders {
        leads[leader] += 1;
    }
    let eligible = eligible_leaders(members, holders, node_count);
    let quotas = leader_quotas(members, &eligible, &leads);
    let mut balance = LeaderBalance {
        eligible,
        previous_leaders,
        leads,
        quotas,
    };
    balance_leaders(&mut leaders, &mut balance);
    leaders
}

/// For each server, the slots it may lead: those it holds and held before, plus every slot it
/// holds where none of the slot's previous holders remains.
fn eligible_leaders(
    members: &[Vec<usize>],
    holders: &[Vec<usize>],
    node_count: usize,
) -> Vec<Vec<usize>> {
    let mut eligible = vec![Vec::new(); node_count];
    for (slot, (slot_members, held)) in members.iter().zip(holders).enumerate() {
        let kept_a_holder = slot_members.iter().any(|m| held.contains(m));
        for &member in slot_members {
            if !kept_a_holder || held.contains(&member) {
                eligible[member].push(slot);
            }
        }
    }
    eligible
}

/// How many slots each server should lead. Only servers that may lead somewhere get a share; the
/// larger shares go to servers holding more replicas (so follower counts even out too), then to
/// those leading more already (so fewer leaders change).
fn leader_quotas(members: &[Vec<usize>], eligible: &[Vec<usize>], leads: &[usize]) -> Vec<usize> {
    let node_count = eligible.len();
    let held = loads(members, node_count);
    let mut order: Vec<usize> = (0..node_count)
        .filter(|&node| !eligible[node].is_empty())
        .collect();
    order.sort_by_key(|&node| (Reverse(held[node]), Reverse(leads[node]), node));
    even_split(members.len(), &order, node_count)
}

/// Moves leaderships from servers over their quota to servers under it, until no server under its
/// quota can gain one.
fn balance_leaders(leaders: &mut [usize], balance: &mut LeaderBalance) {
    loop {
        let mut progressed = false;
        for node in 0..balance.quotas.len() {
            while balance.leads[node] < balance.quotas[node]
                && take_a_leadership(node, leaders, balance)
            {
                progressed = true;
            }
        }
        if !progressed {
            return;
        }
    }
}

/// Gives `taker` one more leadership along the cheapest chain of hand-overs: it takes a slot it
/// may lead from that slot's leader, who takes another, and so on until a server over its quota
/// gives one up. A hand-over costs one when the giver led the slot in the previous table, and
/// nothing when it was only just promoted, so kept leaders move last. Returns whether such a chain
/// exists.
fn take_a_leadership(taker: usize, leaders: &mut [usize], balance: &mut LeaderBalance) -> bool {
    let node_count = balance.quotas.len();
    // `gave[node] = (slot, to)`: in the chain, `node` hands `slot` over to `to`.
    let mut gave: Vec<Option<(usize, usize)>> = vec![None; node_count];
    let mut cost = vec![usize::MAX; node_count];
    let mut done = vec![false; node_count];
    cost[taker] = 0;
    let mut queue = VecDeque::from([taker]);
    while let Some(node) = queue.pop_front() {
        if std::mem::replace(&mut done[node], true) {
            continue;
        }
        if balance.leads[node] > balance.quotas[node] {
            hand_over(node, taker, &gave, leaders, balance);
            return true;
        }
        for &slot in &balance.eligible[node] {
            let giver = leaders[slot];
            let step = usize::from(balance.previous_leaders[slot] == Some(giver));
            let reach = cost[node] + step;
            if reach >= cost[giver] {
                continue;
            }
            cost[giver] = reach;
            gave[giver] = Some((slot, node));
            if step == 0 && balance.leads[giver] > balance.quotas[giver] {
                // As cheap as any chain still to be found.
                hand_over(giver, taker, &gave, leaders, balance);
                return true;
            }
            if step == 0 {
                queue.push_front(giver);
            } else {
                queue.push_back(giver);
            }
        }
    }
    false
}

/// Carries out the chain of hand-overs from `giver` (over its quota) back to `taker`.
fn hand_over(
    giver: usize,
    taker: usize,
    gave: &[Option<(usize, usize)>],
    leaders: &mut [usize],
    balance: &mut LeaderBalance,
) {
    balance.leads[giver] -= 1;
    balance.leads[taker] += 1;
    let mut from = giver;
    while let Some((slot, to)) = gave[from] {
        leaders[slot] = to;
        from = to;
    }
}

#[cfg(test)]
mod tests;
