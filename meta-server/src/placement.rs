//! Slot placement: which data servers hold each slot.
//!
//! Each live data server is put on a consistent-hash ring ([`hashring`]) as [`VIRTUAL_NODES`]
//! virtual nodes. A slot's replicas are the first `replicas` distinct servers met walking the ring
//! from the slot's hash (the ring may return one server several times in a row, so the walk skips
//! servers already chosen). Only the meta leader runs this; everyone else receives the committed
//! table, so the ring needs no stability across versions or processes.
//!
//! Leadership prefers continuity: when the previous leader of a slot is still among its replicas it
//! stays leader; otherwise a previous follower that is still a replica is promoted, since it already
//! holds the data. Only when neither exists does the ring's first choice lead.

use std::hash::{Hash, Hasher};

use hashring::HashRing;
use roster_common::NodeId;
use roster_common::proto::SlotTable;

/// Virtual nodes per data server on the ring.
pub const VIRTUAL_NODES: u32 = 64;

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

/// The replica lists of every slot for the live data servers `nodes`, given the previous table.
pub fn place(
    nodes: &[NodeId],
    slot_count: u32,
    replicas: u32,
    previous: &SlotTable,
) -> Vec<Vec<NodeId>> {
    let mut distinct: Vec<NodeId> = nodes.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.is_empty() {
        return vec![Vec::new(); slot_count as usize];
    }
    let want = (replicas.max(1) as usize).min(distinct.len());

    let mut ring = HashRing::new();
    ring.batch_add(
        distinct
            .iter()
            .flat_map(|&node| (0..VIRTUAL_NODES).map(move |replica| VirtualNode { node, replica }))
            .collect(),
    );
    let ring_len = ring.len();

    (0..slot_count)
        .map(|slot| {
            let walk = ring.get_with_replicas(&slot, ring_len).unwrap_or_default();
            let mut chosen: Vec<NodeId> = Vec::with_capacity(want);
            for vnode in walk {
                if !chosen.contains(&vnode.node) {
                    chosen.push(vnode.node);
                    if chosen.len() == want {
                        break;
                    }
                }
            }
            let before = previous
                .slots
                .get(slot as usize)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if let Some(pos) = before
                .iter()
                .find_map(|old| chosen.iter().position(|n| n == old))
            {
                // `before` lists the old leader first, so this keeps it, or else promotes the first
                // old follower still chosen.
                let leader = chosen.remove(pos);
                chosen.insert(0, leader);
            }
            chosen
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(slots: Vec<Vec<NodeId>>) -> SlotTable {
        SlotTable {
            epoch: 1,
            slot_count: slots.len() as u32,
            replicas: 3,
            slots,
        }
    }

    #[test]
    fn every_slot_gets_distinct_replicas() {
        let empty = SlotTable::empty(256, 3);
        let placed = place(&[1, 2, 3, 4], 256, 3, &empty);
        assert_eq!(placed.len(), 256);
        for replicas in &placed {
            assert_eq!(replicas.len(), 3);
            let mut sorted = replicas.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 3, "{replicas:?}");
        }
    }

    #[test]
    fn fewer_servers_than_replicas_uses_them_all() {
        let placed = place(&[7], 16, 3, &SlotTable::empty(16, 3));
        assert!(placed.iter().all(|r| r == &vec![7]));
        assert!(
            place(&[], 16, 3, &SlotTable::empty(16, 3))
                .iter()
                .all(Vec::is_empty)
        );
    }

    #[test]
    fn a_surviving_follower_is_promoted_when_the_leader_leaves() {
        let before = table(place(&[1, 2, 3], 64, 2, &SlotTable::empty(64, 2)));
        let after = place(&[2, 3], 64, 2, &before);
        for (slot, replicas) in after.iter().enumerate() {
            let old = &before.slots[slot];
            if old[0] == 1 {
                assert_eq!(replicas[0], old[1], "slot {slot}: the old follower leads");
            } else {
                assert_eq!(replicas[0], old[0], "slot {slot}: the old leader stays");
            }
        }
    }

    #[test]
    fn placement_is_deterministic() {
        let empty = SlotTable::empty(256, 3);
        assert_eq!(
            place(&[3, 1, 2], 256, 3, &empty),
            place(&[1, 2, 3], 256, 3, &empty)
        );
    }
}
