//! The meta state on disk: one MessagePack file, replaced atomically and fsynced on every change.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use roster_common::{Error, Result};

use crate::state::MetaState;

const STATE_FILE: &str = "meta-state.msgpack";

/// Where a meta node keeps its state.
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// Opens `dir`, creating it if needed.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| {
            Error::InvalidArgument(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        Ok(StateFile {
            dir: dir.to_owned(),
        })
    }

    /// The saved state, if this directory has one.
    pub fn load(&self) -> Result<Option<MetaState>> {
        let path = self.dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => rmp_serde::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Internal(format!("{} is corrupt: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Internal(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Replaces the saved state: write a temporary file, fsync it, rename it over, fsync the directory.
    pub fn save(&self, state: &MetaState) -> Result<()> {
        let bytes = rmp_serde::to_vec_named(state)
            .map_err(|e| Error::Internal(format!("cannot encode meta state: {e}")))?;
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let path = self.dir.join(STATE_FILE);
        let fail =
            |e: std::io::Error| Error::Internal(format!("cannot save {}: {e}", path.display()));
        let mut file = fs::File::create(&tmp).map_err(fail)?;
        file.write_all(&bytes).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        fs::rename(&tmp, &path).map_err(fail)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)?;
        Ok(())
    }
}
