//! The accept side shared by every server: connections, then request streams, until shutdown.

use std::future::Future;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use crate::peers::PeerPool;

/// How long a QUIC handshake may take before the attempt is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `endpoint` until `shutdown`, running `on_conn` for each established
/// connection as a task on `tracker`. The handshake runs inside that task, so a slow peer cannot
/// stall accepting; handshakes that fail are logged at debug level and dropped.
pub async fn accept_loop<H, Fut>(
    endpoint: &Endpoint,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    on_conn: H,
) where
    H: Fn(Connection) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let on_conn = on_conn.clone();
        tracker.spawn(async move {
            let remote = incoming.remote_address();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => on_conn(conn).await,
                Ok(Err(e)) => debug!(%remote, error = %e, "handshake failed"),
                Err(_) => debug!(%remote, "handshake timed out"),
            }
        });
    }
}

/// Runs `on_stream` for every bidirectional stream the peer opens on `conn`, each as a task on
/// `tracker`, until the connection closes or `shutdown` fires.
pub async fn serve_streams<H, Fut>(
    conn: &Connection,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    on_stream: H,
) where
    H: Fn(SendStream, RecvStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    tracker.spawn(on_stream(send, recv));
                }
                Err(e) => {
                    debug!(remote = %conn.remote_address(), reason = %e, "connection ended");
                    break;
                }
            },
        }
    }
}

/// Serves a peer endpoint: accepts connections until `shutdown` and runs `on_stream` for every
/// request stream of each, as tasks on `tracker`. Each connection gets a span naming the peer.
pub async fn serve_requests<H, Fut>(
    endpoint: &Endpoint,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    on_stream: H,
) where
    H: Fn(SendStream, RecvStream) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let conn_shutdown = shutdown.clone();
    let conn_tracker = tracker.clone();
    accept_loop(endpoint, shutdown, tracker, move |conn| {
        let shutdown = conn_shutdown.clone();
        let tracker = conn_tracker.clone();
        let on_stream = on_stream.clone();
        let span = tracing::info_span!("peer", remote = %conn.remote_address());
        async move { serve_streams(&conn, &shutdown, &tracker, on_stream).await }.instrument(span)
    })
    .await;
}

/// Waits for `tracker`'s tasks (up to `grace`), closes the connections to peers in `pool`, then
/// closes `endpoint` and waits for its closes to be sent.
pub async fn drain(
    endpoint: &Endpoint,
    tracker: &TaskTracker,
    pool: Option<&PeerPool>,
    grace: Duration,
) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        debug!(left = tracker.len(), "tasks still running at shutdown");
    }
    if let Some(pool) = pool {
        pool.close_all();
    }
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(grace, endpoint.wait_idle()).await;
}
