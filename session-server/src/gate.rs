//! Orders this session's writes and slot syncs, slot by slot.
//!
//! A slot sync replaces the slot leader's records of this session with the session's copy as it
//! was when the sync was built. A write of the same slot applied by the leader between the build
//! and the sync's arrival would be undone by it: a live publisher would vanish (or a removed one
//! return) until the next repair. So a sync first closes its slot to new writes, waits for the
//! writes in flight to be answered, and only then builds its copy and sends it; writes of the slot
//! wait until the sync is answered. Writes waiting meanwhile are already in the copy (the session
//! records a change before forwarding it), so sending them afterwards changes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use roster_common::SlotId;
use tokio::sync::Notify;

#[derive(Default)]
struct State {
    writes: HashMap<SlotId, usize>,
    syncing: HashSet<SlotId>,
}

#[derive(Clone, Default)]
pub struct SlotGate {
    state: Arc<Mutex<State>>,
    /// Woken whenever a pass is given back: a waiting sync looks again.
    released: Arc<Notify>,
}

/// Held while a write of a slot is in flight.
pub struct WritePass {
    gate: SlotGate,
    slot: SlotId,
}

/// Held while a sync of a slot is built and in flight.
pub struct SyncPass {
    gate: SlotGate,
    slot: SlotId,
}

impl SlotGate {
    /// A pass for a write of `slot` now, unless a sync of it is under way.
    pub fn try_write(&self, slot: SlotId) -> Option<WritePass> {
        let mut state = self.state.lock();
        if state.syncing.contains(&slot) {
            return None;
        }
        *state.writes.entry(slot).or_default() += 1;
        Some(WritePass {
            gate: self.clone(),
            slot,
        })
    }

    /// Closes `slot` to new writes, waits for those in flight, and returns the pass for the sync.
    /// Syncs of one slot take turns.
    pub async fn sync(&self, slot: SlotId) -> SyncPass {
        self.until(|state| state.syncing.insert(slot)).await;
        let pass = SyncPass {
            gate: self.clone(),
            slot,
        };
        self.until(|state| state.writes.get(&slot).is_none_or(|n| *n == 0))
            .await;
        pass
    }

    /// Waits until `ready` holds of the state, looking again each time a pass is given back.
    async fn until(&self, mut ready: impl FnMut(&mut State) -> bool) {
        loop {
            // Registered before looking, so a pass given back in between is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if ready(&mut self.state.lock()) {
                return;
            }
            released.await;
        }
    }
}

impl Drop for WritePass {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock();
        if let Some(n) = state.writes.get_mut(&self.slot) {
            *n -= 1;
            if *n == 0 {
                state.writes.remove(&self.slot);
            }
        }
        drop(state);
        self.gate.released.notify_waiters();
    }
}

impl Drop for SyncPass {
    fn drop(&mut self) {
        self.gate.state.lock().syncing.remove(&self.slot);
        self.gate.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_sync_waits_for_writes_in_flight_and_holds_new_ones() {
        let gate = SlotGate::default();
        let write = gate.try_write(7).unwrap();
        let other_slot = gate.try_write(8).unwrap();

        let sync = tokio::spawn({
            let gate = gate.clone();
            async move { gate.sync(7).await }
        });
        // The slot is closed to new writes as soon as the sync asks, even before it may go.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gate.try_write(7).is_some_and(|p| {
            drop(p);
            true
        }) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sync never closed the slot"
            );
            tokio::task::yield_now().await;
        }
        assert!(
            !sync.is_finished(),
            "the sync waits for the write in flight"
        );
        drop(write);
        let pass = sync.await.unwrap();
        assert!(gate.try_write(7).is_none(), "writes wait for the sync");
        drop(other_slot);
        drop(pass);
        assert!(
            gate.try_write(7).is_some(),
            "the slot opens again after the sync"
        );
    }

    #[tokio::test]
    async fn syncs_of_one_slot_take_turns() {
        let gate = SlotGate::default();
        let first = gate.sync(3).await;
        let second = tokio::spawn({
            let gate = gate.clone();
            async move { gate.sync(3).await }
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the second waits for the first");
        drop(first);
        let pass = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("woken when the first is done")
            .unwrap();
        drop(pass);
    }
}
