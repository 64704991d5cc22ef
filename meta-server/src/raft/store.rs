//! The meta node's storage: the Raft log, vote and snapshots in one redb file, and the state machine
//! in memory.
//!
//! Every write to redb is a transaction committed with `Durability::Immediate` — fsynced — before
//! openraft is told it is done: an appended entry is durable when `LogFlushed` fires, a vote when
//! `save_vote` returns. Blocking redb calls run on tokio's blocking pool.
//!
//! The state machine ([`MetaState`]) lives in memory and is rebuilt on start from the last snapshot
//! plus the committed log after it. A snapshot is the MessagePack of the whole state machine; it is
//! stored in redb too, so the log before it can be purged.

// openraft's storage traits return its `StorageError`, which is large; the helpers here return the
// same type rather than box and unbox it at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{MetaNode, NodeId, TypeConfig};
use crate::state::{Applied, MetaState};

/// Log entries by index, each the MessagePack of an openraft `Entry`.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Small named values: see the `KEY_*` constants.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT: &str = "snapshot";
const KEY_CLUSTER_ID: &str = "cluster_id";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("meta storage values always encode")
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// The name of the store's file in a meta node's data directory.
pub const DB_FILE: &str = "meta.redb";

/// The redb file every part of the store shares.
#[derive(Clone)]
pub struct Disk {
    db: Arc<Database>,
}

impl Disk {
    /// Opens (or creates) `meta.redb` in `dir`.
    pub fn open(dir: &Path) -> roster_common::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            roster_common::Error::InvalidArgument(format!(
                "cannot create data dir {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| {
            roster_common::Error::InvalidArgument(format!("cannot open {}: {e}", path.display()))
        })?;
        let disk = Disk { db: Arc::new(db) };
        // Create both tables so readers never meet a missing one.
        disk.write(|txn| {
            txn.open_table(LOG)?;
            txn.open_table(META)?;
            Ok(())
        })
        .map_err(|e| {
            roster_common::Error::Internal(format!("cannot initialise {}: {e}", path.display()))
        })?;
        Ok(disk)
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, redb::Error> {
        let txn = self.db.begin_write()?;
        let value = f(&txn)?;
        txn.commit()?;
        Ok(value)
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, redb::Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), redb::Error> {
        self.write(|txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    /// The cluster this node belongs to, once known.
    pub fn cluster_id(&self) -> roster_common::Result<Option<String>> {
        self.get_meta(KEY_CLUSTER_ID)
            .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(|e| roster_common::Error::Internal(format!("cannot read the cluster id: {e}")))
    }

    /// Records the cluster this node belongs to (fsynced).
    pub fn set_cluster_id(&self, id: &str) -> roster_common::Result<()> {
        self.put_meta(KEY_CLUSTER_ID, id.as_bytes())
            .map_err(|e| roster_common::Error::Internal(format!("cannot save the cluster id: {e}")))
    }

    /// Whether this directory holds any Raft state (a vote, a log or a snapshot).
    pub fn has_raft_state(&self) -> roster_common::Result<bool> {
        let check = || -> Result<bool, redb::Error> {
            let txn = self.db.begin_read()?;
            let log = txn.open_table(LOG)?;
            let meta = txn.open_table(META)?;
            Ok(log.first()?.is_some()
                || meta.get(KEY_VOTE)?.is_some()
                || meta.get(KEY_SNAPSHOT)?.is_some())
        };
        check()
            .map_err(|e| roster_common::Error::Internal(format!("cannot read the meta store: {e}")))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Disk) -> StorageResult<T> + Send + 'static,
    ) -> StorageResult<T> {
        let disk = self.clone();
        match tokio::task::spawn_blocking(move || f(disk)).await {
            Ok(result) => result,
            Err(e) => Err(write_err(std::io::Error::other(e.to_string()))),
        }
    }
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    disk: Disk,
}

impl LogStore {
    pub fn new(disk: Disk) -> Self {
        LogStore { disk }
    }

    fn read_entries(&self, range: impl RangeBounds<u64>) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let txn = self.disk.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let mut out = Vec::new();
        for item in table.range::<u64>((start, end)).map_err(read_err)? {
            let (_, value) = item.map_err(read_err)?;
            out.push(rmp_serde::from_slice(value.value()).map_err(read_err)?);
        }
        Ok(out)
    }

    fn read_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> StorageResult<Option<T>> {
        match self.disk.get_meta(key).map_err(read_err)? {
            Some(bytes) => Ok(Some(rmp_serde::from_slice(&bytes).map_err(read_err)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.read_meta(KEY_PURGED)?;
        let txn = self.disk.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((_, value)) => {
                let entry: Entry<TypeConfig> =
                    rmp_serde::from_slice(value.value()).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let bytes = encode(vote);
        self.disk
            .blocking(move |disk| {
                disk.put_meta(KEY_VOTE, &bytes)
                    .map_err(|e| StorageIOError::write_vote(&e).into())
            })
            .await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.read_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        if let Some(id) = &committed {
            metrics::gauge!("roster_raft_commit_index").set(id.index as f64);
        }
        let bytes = encode(&committed);
        self.disk
            .blocking(move |disk| disk.put_meta(KEY_COMMITTED, &bytes).map_err(write_err))
            .await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, encode(&e)))
            .collect();
        let started = std::time::Instant::now();
        let result = self
            .disk
            .blocking(move |disk| {
                disk.write(|txn| {
                    let mut table = txn.open_table(LOG)?;
                    for (index, bytes) in &encoded {
                        table.insert(*index, bytes.as_slice())?;
                    }
                    Ok(())
                })
                .map_err(|e| StorageIOError::write_logs(&e).into())
            })
            .await;
        // The transaction committed with an fsync before this point: the entries are durable.
        metrics::histogram!("roster_raft_append_seconds").record(started.elapsed());
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.disk
            .blocking(move |disk| {
                disk.write(|txn| {
                    let mut table = txn.open_table(LOG)?;
                    table.retain_in(log_id.index.., |_, _| false)?;
                    Ok(())
                })
                .map_err(write_err)
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let purged = encode(&log_id);
        self.disk
            .blocking(move |disk| {
                disk.write(|txn| {
                    txn.open_table(META)?
                        .insert(KEY_PURGED, purged.as_slice())?;
                    let mut table = txn.open_table(LOG)?;
                    table.retain_in(..=log_id.index, |_, _| false)?;
                    Ok(())
                })
                .map_err(write_err)
            })
            .await
    }
}

/// The applied state and what a snapshot of it holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineState {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, MetaNode>,
    pub state: MetaState,
}

/// A snapshot as stored: its metadata and the encoded [`MachineState`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, MetaNode>,
    data: Vec<u8>,
}

/// The state machine: the applied [`MetaState`], shared with the server for reads.
#[derive(Clone)]
pub struct StateMachine {
    disk: Disk,
    applied: Arc<RwLock<MachineState>>,
    /// Bumped after every change of the applied state, for watchers.
    changed_tx: Arc<watch::Sender<u64>>,
    snapshots_built: Arc<AtomicU64>,
    snapshots_installed: Arc<AtomicU64>,
}

impl StateMachine {
    /// The state machine, restored from the stored snapshot if there is one.
    pub fn open(disk: Disk) -> roster_common::Result<Self> {
        let stored: Option<StoredSnapshot> = disk
            .get_meta(KEY_SNAPSHOT)
            .map_err(|e| roster_common::Error::Internal(format!("cannot read the snapshot: {e}")))?
            .map(|bytes| rmp_serde::from_slice(&bytes))
            .transpose()
            .map_err(|e| {
                roster_common::Error::Internal(format!("the stored snapshot is corrupt: {e}"))
            })?;
        let applied = match stored {
            Some(snapshot) => rmp_serde::from_slice(&snapshot.data).map_err(|e| {
                roster_common::Error::Internal(format!("the stored snapshot is corrupt: {e}"))
            })?,
            None => MachineState::default(),
        };
        Ok(StateMachine {
            disk,
            applied: Arc::new(RwLock::new(applied)),
            changed_tx: Arc::new(watch::channel(0).0),
            snapshots_built: Arc::default(),
            snapshots_installed: Arc::default(),
        })
    }

    /// Reads the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&MachineState) -> T) -> T {
        f(&self.applied.read())
    }

    /// A receiver that changes whenever the applied state does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed_tx.subscribe()
    }

    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed.load(Ordering::Relaxed)
    }

    fn notify(&self) {
        self.changed_tx.send_modify(|n| *n += 1);
    }

    async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> StorageResult<()> {
        let bytes = encode(snapshot);
        let signature = snapshot.meta.signature();
        self.disk
            .blocking(move |disk| {
                disk.put_meta(KEY_SNAPSHOT, &bytes)
                    .map_err(|e| StorageIOError::write_snapshot(Some(signature), &e).into())
            })
            .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (data, last_applied, last_membership) = {
            let applied = self.applied.read();
            (
                encode(&*applied),
                applied.last_applied,
                applied.last_membership.clone(),
            )
        };
        let n = self.snapshots_built.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{n}", id.leader_id.term, id.index),
            None => format!("0-0-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.save_snapshot(&stored).await?;
        tracing::info!(snapshot = %meta, bytes = data.len(), "built a snapshot of the meta state");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, MetaNode>)> {
        let applied = self.applied.read();
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut outcomes = Vec::new();
        {
            let mut applied = self.applied.write();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let outcome = match entry.payload {
                    EntryPayload::Blank => Applied::default(),
                    EntryPayload::Normal(command) => Applied {
                        changed: applied.state.apply(command),
                    },
                    EntryPayload::Membership(membership) => {
                        applied.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        Applied::default()
                    }
                };
                outcomes.push(outcome);
            }
        }
        self.notify();
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Vec<u8>>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MetaNode>,
        snapshot: Box<Vec<u8>>,
    ) -> StorageResult<()> {
        let restored: MachineState = rmp_serde::from_slice(&snapshot)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: *snapshot,
        })
        .await?;
        *self.applied.write() = restored;
        self.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(snapshot = %meta, "installed a snapshot from the leader");
        self.notify();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> =
            match self.disk.get_meta(KEY_SNAPSHOT).map_err(read_err)? {
                Some(bytes) => Some(rmp_serde::from_slice(&bytes).map_err(read_err)?),
                None => None,
            };
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(s.data),
        }))
    }
}
