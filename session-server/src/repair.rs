//! Keeping the data tier repaired from this session's source copy: after every table change, every
//! new link and every `repair_interval`, the session tells each data server the digest of its
//! publishers in each slot that server leads; the server answers with the slots that differ, and the
//! session sends each of them whole (a sync), one slot at a time per gate (see `gate`). This is how
//! a new slot leader learns what it lacks, and how drift is repaired. `links` decides when.

use std::sync::Arc;

use futures_util::StreamExt;
use roster_common::proto::{DataRequest, DataResponse};
use roster_common::{Error, Result, SlotId};

use crate::shared::Shared;

/// Slot syncs sent to one data server at once.
const SYNC_CONCURRENCY: usize = 16;

/// Sends this session's digests of `slots` to the data server at `addr`, then a full sync of every
/// slot that differs. Returns how many slots were synced.
pub(crate) async fn report(
    shared: Arc<Shared>,
    addr: String,
    epoch: u64,
    slots: Vec<SlotId>,
    slot_count: u32,
) -> Result<usize> {
    let digests = shared.owned().digests(&slots, slot_count);
    let request = DataRequest::SessionDigests {
        instance: shared.instance(),
        epoch,
        digests,
    };
    let mismatched = match shared.call_data(&addr, &request).await? {
        DataResponse::Mismatched { slots } => slots,
        other => {
            return Err(Error::UnexpectedMessage(format!(
                "expected mismatched slots, got {other:?}"
            )));
        }
    };
    // Several slots at once: a data server that restarted empty needs every slot synced, and it
    // waits for this session before it opens them.
    let syncs = futures_util::stream::iter(mismatched.clone().into_iter().map(|slot| {
        let (shared, addr) = (shared.clone(), addr.clone());
        async move {
            // Built and sent while no write of the slot is in flight (see `gate`).
            let _pass = shared.slot_gate().sync(slot).await;
            let publishers = shared.owned().in_slot(slot, slot_count);
            let sync = DataRequest::SessionSync {
                instance: shared.instance(),
                slot,
                publishers,
            };
            shared.call_data(&addr, &sync).await
        }
    }))
    .buffer_unordered(SYNC_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    for result in syncs {
        result?;
    }
    Ok(mismatched.len())
}
