//! Handing a connection over: after a move, the old connection stays until the publications the
//! new session server held on their way to the data tier have landed (see [`hand_over`]).

use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;
use roster_common::proto::{CLOSE_MOVED, ClientRequest, ClientResponse};
use roster_common::{Error, RegisterId};
use tracing::{info, warn};

use crate::requests::call_all;
use crate::{Inner, publish_request};

/// How long a client that moved keeps its old connection while the new session server holds some
/// of its publications on their way to the data tier.
const HANDOVER_LIMIT: Duration = Duration::from_secs(10);
/// The pause between asking again whether held publications have landed.
const HANDOVER_RETRY: Duration = Duration::from_millis(200);

/// Closes `old` (with `CLOSE_MOVED`) once every publication in `held` has landed through `new`.
///
/// The old session server removes what the connection held when it ends (after the client grace,
/// for a client that moved). A publication the new server answered `durable: false` is not yet at
/// its slot leader: removed there by the old server first, subscribers would see it gone until it
/// lands. So the old connection, which keeps it registered, stays until it has landed: each round
/// publishes it again, unchanged, on `new`, which answers once the server's own retry lands it.
/// Bounded by [`HANDOVER_LIMIT`], and over as soon as either connection ends or the client closes.
pub(crate) async fn hand_over(
    inner: Arc<Inner>,
    old: Connection,
    new: Connection,
    mut held: Vec<RegisterId>,
    why: &'static [u8],
) {
    let deadline = tokio::time::Instant::now() + HANDOVER_LIMIT;
    if !held.is_empty() {
        info!(
            held = held.len(),
            "keeping the old connection until the publications the new session server holds have landed"
        );
    }
    while !held.is_empty() {
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = old.closed() => break,
            _ = new.closed() => break,
            _ = tokio::time::sleep_until(deadline) => {
                warn!(held = held.len(), limit = ?HANDOVER_LIMIT, "publications held by the new session server have not landed; closing the old connection anyway");
                break;
            }
            still = ask_again(&inner, &new, std::mem::take(&mut held)) => {
                held = still;
                if !held.is_empty() {
                    tokio::time::sleep(HANDOVER_RETRY).await;
                }
            }
        }
    }
    // A client closing meanwhile leaves: its publishers go at once, as from any connection.
    if inner.shutdown.is_cancelled() {
        old.close(0u32.into(), b"client closed");
    } else {
        old.close(CLOSE_MOVED.into(), why);
    }
}

/// Publishes each of `held` again, unchanged, on `conn`; returns those still held (a publication
/// since unpublished, or refused, is no longer waited for).
async fn ask_again(inner: &Inner, conn: &Connection, held: Vec<RegisterId>) -> Vec<RegisterId> {
    let requests: Vec<(RegisterId, ClientRequest)> = {
        let registry = inner.registry.lock();
        held.into_iter()
            .filter_map(|id| {
                let state = registry.publications.get(&id)?;
                let request = publish_request(&id, state);
                Some((id, request))
            })
            .collect()
    };
    call_all(inner, conn, requests)
        .await
        .into_iter()
        .filter_map(|(id, answer)| match answer {
            Ok(ClientResponse::Accepted { durable: false })
            | Err(Error::Timeout(_) | Error::Unavailable(_)) => Some(id),
            _ => None,
        })
        .collect()
}
