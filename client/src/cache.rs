//! The on-disk cache of the last snapshot of every subscribed service.
//!
//! One file per service, named by a hash of the service id and holding the MessagePack of the
//! snapshot (which names its service, checked on load). A healthy-only subscription's snapshots
//! are filtered by the session, so they are kept apart, under a hash that also says so: a plain
//! subscriber must not start from a set with the unhealthy publishers left out. Files are replaced
//! by writing a temporary file and renaming it; a torn or foreign file is ignored.
//!
//! Writing a file costs the size of the service, so it is not done on every change: services
//! whose snapshot changed are marked, and [`keep`] writes the marked ones every [`FLUSH_EVERY`]
//! (and once more when the client closes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use roster_common::ServiceId;
use roster_common::proto::{self, Digest};
use tracing::debug;

use crate::Inner;
use crate::snapshot::Snapshot;

/// How often changed snapshots are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn open(dir: &Path) -> roster_common::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            roster_common::Error::InvalidArgument(format!(
                "cannot create the snapshot cache {}: {e}",
                dir.display()
            ))
        })?;
        Ok(Cache {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, service: &ServiceId, healthy_only: bool) -> PathBuf {
        let kind = if healthy_only { "healthy-only" } else { "" };
        let hash = Digest::entry(service.as_str(), kind, 0);
        self.dir.join(format!("{hash:016x}.snapshot"))
    }

    /// The cached snapshot of `service` (as a healthy-only subscription saw it, or not), if a
    /// valid one is there.
    pub fn load(&self, service: &ServiceId, healthy_only: bool) -> Option<Snapshot> {
        let bytes = std::fs::read(self.path(service, healthy_only)).ok()?;
        let snapshot: proto::Snapshot = rmp_serde::from_slice(&bytes).ok()?;
        (snapshot.service == *service).then(|| Snapshot::from_wire(snapshot))
    }

    /// Stores `snapshot` as the last of its service. Failures are logged and otherwise ignored:
    /// the cache is a convenience, never a reason to fail.
    pub fn store(&self, snapshot: &proto::Snapshot, healthy_only: bool) {
        let path = self.path(&snapshot.service, healthy_only);
        let tmp = path.with_extension("tmp");
        let result = rmp_serde::to_vec_named(snapshot)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            debug!(service = %snapshot.service, error = %e, "could not cache a snapshot");
        }
    }
}

/// Writes the snapshots of the services marked as changed.
pub(crate) fn flush(inner: &Inner) {
    let Some(cache) = &inner.cache else { return };
    let dirty: Vec<ServiceId> = inner.cache_dirty.lock().drain().collect();
    for service in dirty {
        let snapshot = inner
            .registry
            .lock()
            .subscriptions
            .get(&service)
            .and_then(|s| Some((s.tx.borrow().clone()?, s.healthy_only)));
        // Copied out of the shared snapshot outside the registry's lock.
        if let Some((snapshot, healthy_only)) = snapshot {
            cache.store(&snapshot.to_wire(), healthy_only);
        }
    }
}

/// Flushes changed snapshots every [`FLUSH_EVERY`] until the client closes.
pub(crate) async fn keep(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if inner.cache_dirty.lock().is_empty() {
            continue;
        }
        let inner = inner.clone();
        // File writes block: off the I/O threads' async work.
        let _ = tokio::task::spawn_blocking(move || flush(&inner)).await;
    }
}
