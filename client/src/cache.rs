//! The on-disk cache of the last snapshot of every subscribed service.
//!
//! One file per service, named by a hash of the service id and holding the MessagePack of the
//! snapshot (which names its service, checked on load). Files are replaced by writing a temporary
//! file and renaming it; a torn or foreign file is ignored.

use std::path::{Path, PathBuf};

use roster_common::ServiceId;
use roster_common::proto::{Digest, Snapshot};
use tracing::debug;

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

    fn path(&self, service: &ServiceId) -> PathBuf {
        let hash = Digest::entry(service.as_str(), "", 0);
        self.dir.join(format!("{hash:016x}.snapshot"))
    }

    /// The cached snapshot of `service`, if a valid one is there.
    pub fn load(&self, service: &ServiceId) -> Option<Snapshot> {
        let bytes = std::fs::read(self.path(service)).ok()?;
        let snapshot: Snapshot = rmp_serde::from_slice(&bytes).ok()?;
        (snapshot.service == *service).then_some(snapshot)
    }

    /// Stores `snapshot` as the last of its service. Failures are logged and otherwise ignored:
    /// the cache is a convenience, never a reason to fail.
    pub fn store(&self, snapshot: &Snapshot) {
        let path = self.path(&snapshot.service);
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
