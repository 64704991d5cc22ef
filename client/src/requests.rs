//! Requests sent side by side on one connection: registering everything on a new connection,
//! asking again after held publications.

use futures_util::StreamExt;
use quinn::Connection;
use roster_common::proto::{ClientRequest, ClientResponse};
use roster_common::{Result, rpc};

use crate::Inner;

/// Registrations sent at once on a new connection, besides the application's `max_in_flight`.
pub(crate) const REGISTER_CONCURRENCY: usize = 16;

/// Sends every request on `conn`, [`REGISTER_CONCURRENCY`] at a time; each answer comes back with
/// its request's tag.
pub(crate) async fn call_all<T>(
    inner: &Inner,
    conn: &Connection,
    requests: Vec<(T, ClientRequest)>,
) -> Vec<(T, Result<ClientResponse>)> {
    futures_util::stream::iter(requests.into_iter().map(|(tag, request)| async move {
        let answer = rpc::call(
            conn,
            &request,
            inner.config.max_frame,
            inner.config.request_timeout(),
        )
        .await;
        (tag, answer)
    }))
    .buffer_unordered(REGISTER_CONCURRENCY)
    .collect()
    .await
}
