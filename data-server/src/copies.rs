//! Keeping this server's copies of followed slots in step with their leaders: fetching slots it
//! lacks or lost track of, and comparing digests every `repair_interval` (drift, lost batches).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use roster_common::proto::{ClusterView, DataRequest, DataResponse};
use roster_common::{Error, NodeId, Result, SlotId};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::shared::{STEP, Shared};

/// Slots fetched at once.
pub(crate) const FETCH_CONCURRENCY: usize = 8;

/// Keeps this server's copies of the slots it follows: fetches slots it has no copy of (new, or a
/// gap in replication), and every `repair_interval` compares digests with the leaders to catch
/// drift and a lost last batch ([`check_drift`]).
pub(crate) async fn keep_copies(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut step = tokio::time::interval(STEP * 2);
    step.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = Instant::now();
    let mut fetching: HashSet<SlotId> = HashSet::new();
    let mut fetches: JoinSet<(SlotId, Result<()>)> = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(done) = fetches.join_next() => {
                if let Ok((slot, result)) = done {
                    fetching.remove(&slot);
                    if let Err(e) = result {
                        debug!(slot, error = %e, "could not fetch a slot yet");
                    }
                }
                continue;
            }
            _ = step.tick() => {}
        }
        let Some(view) = shared.view() else { continue };
        let wanted = shared.store.lock().out_of_sync();
        for slot in wanted {
            if fetching.len() >= FETCH_CONCURRENCY || fetching.contains(&slot) {
                continue;
            }
            let Some(addr) = view
                .table
                .leader(slot)
                .and_then(|l| view.data_addr(l))
                .map(str::to_owned)
            else {
                continue;
            };
            fetching.insert(slot);
            let shared = shared.clone();
            fetches.spawn(async move { (slot, fetch_slot(&shared, slot, &addr).await) });
        }
        if last_check.elapsed() >= shared.config.repair_interval {
            last_check = Instant::now();
            check_drift(&shared, &view).await;
        }
    }
}

pub(crate) async fn fetch_slot(shared: &Shared, slot: SlotId, addr: &str) -> Result<()> {
    let answer = shared
        .pool
        .call(
            addr,
            &DataRequest::SlotDump { slot },
            shared.config.max_frame,
            shared.config.request_timeout,
        )
        .await?;
    let DataResponse::Slot(dump) = answer else {
        return Err(Error::UnexpectedMessage(format!(
            "expected a slot, got {answer:?}"
        )));
    };
    let publishers = dump.publishers.len();
    if shared.store.lock().install_dump(dump) {
        shared.repaired("slot_fetch");
        debug!(slot, publishers, "fetched a followed slot");
    }
    Ok(())
}

/// Compares the digests of followed slots with their leaders; a slot that differs at the same
/// version has drifted, and one still behind what its leader had at the previous check has lost a
/// replication batch: either is fetched again (see `Store::compare_with_leader`). A follower
/// whose last batch was lost while its leader then stays quiet sees no gap in replication, so this
/// check is what repairs it: the first check after the loss notes the leader's version, the next
/// one finds the copy still below it, so it is fetched again within about two `repair_interval`s.
pub(crate) async fn check_drift(shared: &Shared, view: &ClusterView) {
    let slots = shared.store.lock().followed_in_sync();
    let mut by_leader: HashMap<NodeId, Vec<SlotId>> = HashMap::new();
    for slot in slots {
        if let Some(leader) = view.table.leader(slot) {
            by_leader.entry(leader).or_default().push(slot);
        }
    }
    for (leader, slots) in by_leader {
        let Some(addr) = view.data_addr(leader) else {
            continue;
        };
        let request = DataRequest::SlotDigests { slots };
        let answer = shared.pool.call::<_, DataResponse>(
            addr,
            &request,
            shared.config.max_frame,
            shared.config.request_timeout,
        );
        let Ok(DataResponse::Digests { digests }) = answer.await else {
            continue;
        };
        let mut store = shared.store.lock();
        for theirs in digests {
            let Some(why) = store.compare_with_leader(&theirs) else {
                continue;
            };
            warn!(
                slot = theirs.slot,
                leader, why, "a followed slot is not what its leader holds; fetching it again"
            );
            shared.repaired(why);
            store.mark_out_of_sync(theirs.slot);
        }
    }
}
