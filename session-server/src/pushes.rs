//! A client connection's push stream: its writer, and the push metrics it keeps.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quinn::{Connection, SendStream};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::CLOSE_SLOW_CONSUMER;
use crate::hub::{ConnId, Outgoing, PushKind};
use crate::shared::Shared;

/// Writes the connection's pushes: whenever it is woken (something became due) it takes from the
/// hub what is due and writes it, so changes that arrive while it writes are merged into its next
/// take; the hub paces each service by how late the client answers ([`crate::hub::Pacing`]). A
/// write that makes no progress for `push_stall_timeout` — the client reads nothing and flow
/// control holds the stream — closes the connection with [`CLOSE_SLOW_CONSUMER`]. Ends when the
/// connection does or the hub forgets it.
pub(crate) async fn write_pushes(
    shared: Arc<Shared>,
    id: ConnId,
    conn: Connection,
    mut push: SendStream,
    wake: Arc<Notify>,
) {
    let stall = shared.config().push_stall_timeout;
    let metrics = PushMetrics::new();
    loop {
        let path = conn.stats().path;
        let late = path.rtt.saturating_sub(path.min_rtt);
        let Some(pull) = shared.hub().take_pushes(id, Instant::now(), late) else {
            return;
        };
        if pull.frames.is_empty() {
            let deadline = pull.wake_at.map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = wake.notified() => {}
                _ = conn.closed() => return,
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {}
            }
            continue;
        }
        // One write for the whole take; the stall timer restarts with every bit of progress.
        let mut chunks: Vec<Bytes> = pull.frames.iter().map(|o| o.frame.clone()).collect();
        let mut rest = &mut chunks[..];
        while !rest.is_empty() {
            match tokio::time::timeout(stall, push.write_chunks(rest)).await {
                Ok(Ok(written)) => rest = &mut rest[written.chunks..],
                Ok(Err(e)) => {
                    debug!(error = %e, "push stream failed");
                    return;
                }
                Err(_) => {
                    warn!(stalled = ?stall, "the client read none of its pushes; disconnecting it");
                    metrics::counter!("roster_session_slow_consumers_total").increment(1);
                    conn.close(CLOSE_SLOW_CONSUMER, b"push stream stalled");
                    return;
                }
            }
        }
        for out in pull.frames {
            metrics.count(&out);
        }
    }
}

/// The push metrics, looked up once per connection rather than once per push.
struct PushMetrics {
    /// `roster_session_pushes_total` by kind: snapshot, delta, goaway.
    pushes: [metrics::Counter; 3],
    bytes: metrics::Counter,
    seconds: metrics::Histogram,
}

impl PushMetrics {
    fn new() -> Self {
        let kind = |kind: PushKind| metrics::counter!("roster_session_pushes_total", "kind" => kind.name());
        PushMetrics {
            pushes: [
                kind(PushKind::Snapshot),
                kind(PushKind::Delta),
                kind(PushKind::GoAway),
            ],
            bytes: metrics::counter!("roster_session_push_bytes_total"),
            seconds: metrics::histogram!("roster_session_push_seconds"),
        }
    }

    fn count(&self, out: &Outgoing) {
        let kind = match out.kind {
            PushKind::Snapshot => 0,
            PushKind::Delta => 1,
            PushKind::GoAway => 2,
        };
        self.pushes[kind].increment(1);
        self.bytes.increment(out.frame.len() as u64);
        if let Some(since) = out.since {
            self.seconds.record(since.elapsed());
        }
    }
}
