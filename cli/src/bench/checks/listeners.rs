//! The HTTP servers the bench's health checks probe, and what they saw.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::LISTENERS;

/// Width of the buckets in which the time between two probes of an instance is counted.
pub(super) const GAP_BUCKET_MS: u64 = 10;
/// Gaps counted, up to this many buckets (the last one takes every longer gap).
pub(super) const GAP_BUCKETS: usize = 6_000;

/// What the HTTP servers saw.
pub(super) struct Probes {
    pub(super) started: Instant,
    /// Per instance: when its last probe arrived (milliseconds since `started`, 0: never).
    pub(super) last: Vec<AtomicU64>,
    /// Per instance: probes that arrived.
    pub(super) count: Vec<AtomicU32>,
    /// Per HTTP server: requests answered.
    pub(super) per_listener: Vec<AtomicU64>,
    /// Times between two probes of one instance, by [`GAP_BUCKET_MS`] bucket.
    pub(super) gaps: Vec<AtomicU64>,
    /// Requests in all, and those for no instance of the bench.
    pub(super) total: AtomicU64,
    pub(super) stray: AtomicU64,
}

impl Probes {
    pub(super) fn new(n: usize) -> Self {
        Probes {
            started: Instant::now(),
            last: (0..n).map(|_| AtomicU64::new(0)).collect(),
            count: (0..n).map(|_| AtomicU32::new(0)).collect(),
            per_listener: (0..LISTENERS).map(|_| AtomicU64::new(0)).collect(),
            gaps: (0..GAP_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            stray: AtomicU64::new(0),
        }
    }

    pub(super) fn record(&self, listener: usize, path: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.per_listener[listener].fetch_add(1, Ordering::Relaxed);
        let Some(index) = path
            .strip_prefix("/i/")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < self.last.len())
        else {
            self.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = self.started.elapsed().as_millis().max(1) as u64;
        self.count[index].fetch_add(1, Ordering::Relaxed);
        let previous = self.last[index].swap(now, Ordering::Relaxed);
        if previous != 0 {
            let bucket = (now.saturating_sub(previous) / GAP_BUCKET_MS) as usize;
            self.gaps[bucket.min(GAP_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Instances not probed since `since`.
    pub(super) fn unprobed_since(&self, since: Instant) -> usize {
        let since = since.duration_since(self.started).as_millis() as u64;
        self.last
            .iter()
            .filter(|t| {
                let t = t.load(Ordering::Relaxed);
                t == 0 || t < since
            })
            .count()
    }

    pub(super) fn tally(&self) -> Tally {
        let load = |v: &[AtomicU64]| v.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        Tally {
            total: self.total.load(Ordering::Relaxed),
            stray: self.stray.load(Ordering::Relaxed),
            per_listener: load(&self.per_listener),
            per_instance: self
                .count
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect(),
            gaps: load(&self.gaps),
        }
    }
}

/// The counters of [`Probes`] at one moment.
pub(super) struct Tally {
    pub(super) total: u64,
    pub(super) stray: u64,
    pub(super) per_listener: Vec<u64>,
    pub(super) per_instance: Vec<u32>,
    pub(super) gaps: Vec<u64>,
}

/// Starts HTTP server `index` on 127.0.0.1, answering every request with 200; returns its port.
pub(super) async fn http_server(
    index: usize,
    probes: Arc<Probes>,
    stop: CancellationToken,
) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let probes = probes.clone();
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(256);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                if let Some(path) = text.lines().next().and_then(|l| l.split(' ').nth(1)) {
                    probes.record(index, path);
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    Ok(port)
}
