//! Replicating to followers: one task per follower sends the slot ops this leader applied, in
//! order and in batches; a follower that cannot keep up is cut off and fetches whole slots.

use std::sync::Arc;

use roster_common::NodeId;
use roster_common::peers::PeerPool;
use roster_common::proto::{DataRequest, DataResponse, ReplicatedOp};
use tokio::sync::mpsc;
use tracing::debug;

use crate::DataConfig;

/// Changes queued per follower. When full, changes are dropped: the follower sees the gap and
/// fetches the slot whole.
pub const REPLICATION_QUEUE: usize = 65_536;
/// Changes sent to a follower in one message at most.
pub(crate) const REPLICATION_BATCH: usize = 1_024;
/// The queue of changes for one follower, drained by its own task.
pub(crate) struct Replicator {
    pub(crate) addr: String,
    pub(crate) tx: mpsc::Sender<ReplicatedOp>,
}

/// Starts the task that sends queued changes to follower `id` at `addr`.
pub(crate) fn spawn_replicator(
    pool: Arc<PeerPool>,
    config: DataConfig,
    id: NodeId,
    addr: String,
) -> Replicator {
    let (tx, mut rx) = mpsc::channel::<ReplicatedOp>(REPLICATION_QUEUE);
    let target = addr.clone();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut ops = vec![first];
            while ops.len() < REPLICATION_BATCH
                && let Ok(op) = rx.try_recv()
            {
                ops.push(op);
            }
            let sent = async {
                pool.call::<_, DataResponse>(
                    &target,
                    &DataRequest::Replicate { ops },
                    config.max_frame,
                    config.request_timeout,
                )
                .await
            };
            if let Err(e) = sent.await {
                // The follower notices the gap with the next change it gets, and fetches the slot.
                debug!(follower = id, error = %e, "replication failed");
            }
        }
    });
    Replicator { addr, tx }
}
