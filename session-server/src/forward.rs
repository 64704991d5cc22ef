//! Forwarding publisher changes to slot leaders: the task that sends what [`crate::batching`]
//! decides.
//!
//! One task owns every change on its way to the data tier. It wakes when a change arrives, a batch
//! is answered, or something held back is due; each time it takes the batches ready to go and
//! sends each as one `WriteBatch` to its slot leader, holding the slot gate's passes until the
//! answer (so no slot sync overtakes a write, see `gate`).

use std::sync::Arc;
use std::time::Instant;

use roster_common::proto::{ClusterView, DataRequest, DataResponse, WriteOp};
use roster_common::{Error, Result};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batching::{Answered, Batch, Forward, Forwarder};
use crate::gate::WritePass;
use crate::shared::Shared;

/// Runs the forwarder until `shutdown`. Changes still waiting then are dropped: the session is going
/// away, and its clients re-register through another one.
pub async fn run(
    shared: Arc<Shared>,
    mut inbox: mpsc::Receiver<Forward>,
    shutdown: CancellationToken,
) {
    let mut forwarder = Forwarder::default();
    let mut sends: JoinSet<Answered> = JoinSet::new();
    let mut last_view = shared.view();
    loop {
        let due = forwarder.due().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = inbox.recv() => {
                let Some(change) = next else { break };
                forwarder.on_change(change);
                // Take whatever else is queued too, so it can share the batch.
                while let Ok(change) = inbox.try_recv() {
                    forwarder.on_change(change);
                }
            }
            Some(answered) = sends.join_next() => {
                let Ok(answered) = answered else { continue };
                forwarder.on_result(answered, Instant::now());
            }
            _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {}
        }
        let view = shared.view();
        if !same_view(&view, &last_view) {
            forwarder.routes_changed();
            last_view = view.clone();
        }
        let route = |service: &_| {
            let view = view.as_ref()?;
            let slot = view.table.slot_of(service);
            let leader = view.table.leader(slot)?;
            Some((view.data_addr(leader)?.to_owned(), slot))
        };
        let gate = shared.slot_gate();
        for batch in forwarder.take_batches(Instant::now(), route, |slot| gate.try_write(slot)) {
            sends.spawn(send(shared.clone(), batch));
        }
    }
}

fn same_view(a: &Option<Arc<ClusterView>>, b: &Option<Arc<ClusterView>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Sends one batch and hands back what came of it.
async fn send(shared: Arc<Shared>, batch: Batch<WritePass>) -> Answered {
    let Batch {
        addr,
        items,
        passes,
        ..
    } = batch;
    let ops: Vec<WriteOp> = items.iter().map(|item| item.op.clone()).collect();
    let results = write(&shared, &addr, ops).await;
    drop(passes);
    Answered {
        addr,
        items,
        results,
    }
}

async fn write(shared: &Shared, addr: &str, ops: Vec<WriteOp>) -> Result<Vec<Result<()>>> {
    match shared
        .call_data(addr, &DataRequest::WriteBatch { ops })
        .await?
    {
        DataResponse::WrittenBatch { results } => Ok(results
            .into_iter()
            .map(|r| r.map(|_| ()).map_err(Error::from_wire))
            .collect()),
        other => Err(Error::UnexpectedMessage(format!(
            "expected WrittenBatch, got {other:?}"
        ))),
    }
}
