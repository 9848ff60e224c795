//! The durable [`Log`]: one redb database file.
//!
//! Every mutating call is one redb write transaction committed with redb's
//! default `Durability::Immediate`, which fsyncs before `commit` returns (with
//! checksummed double commit slots, so a crash mid-commit leaves the previous
//! commit intact). So when a method returns `Ok`, what it wrote survives
//! `kill -9` and power loss.
//!
//! Layout: table `entries` maps index → term (8 bytes, little-endian) then
//! the entry's bytes; table `meta` holds `hard_state` (JSON),
//! `snapshot_meta` (JSON index and term) and `snapshot_data` (bytes).

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::log::{Entry, HardState, Log, LogError, SnapshotRecord, check_append};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HARD_STATE: &str = "hard_state";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct SnapshotMeta {
    index: u64,
    term: u64,
}

/// A [`Log`] in a redb file.
#[derive(Debug)]
pub struct RedbLog {
    db: Database,
    path: PathBuf,
    /// Cached so that index queries need no read transaction.
    snapshot: SnapshotMeta,
    /// Cached last entry index (0 when there is none).
    last_entry: u64,
}

impl RedbLog {
    /// Opens the log at `path`, creating the file if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<RedbLog, LogError> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|e| storage(&path, e))?;
        let mut log = RedbLog {
            db,
            path,
            snapshot: SnapshotMeta::default(),
            last_entry: 0,
        };
        // Create both tables up front so that readers never meet a missing one.
        log.write(|_| Ok(()))?;
        let txn = log.db.begin_read().map_err(|e| log.storage(e))?;
        let entries = txn.open_table(ENTRIES).map_err(|e| log.storage(e))?;
        log.last_entry = match entries.last().map_err(|e| log.storage(e))? {
            Some((k, _)) => k.value(),
            None => 0,
        };
        let meta = txn.open_table(META).map_err(|e| log.storage(e))?;
        if let Some(raw) = meta.get(SNAPSHOT_META).map_err(|e| log.storage(e))? {
            log.snapshot = serde_json::from_slice(raw.value())
                .map_err(|e| log.corrupt("snapshot metadata", e))?;
        }
        Ok(log)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn storage(&self, e: impl Into<redb::Error>) -> LogError {
        storage(&self.path, e)
    }

    fn corrupt(&self, record: &str, e: impl std::fmt::Display) -> LogError {
        LogError::Corrupt {
            path: self.path.display().to_string(),
            record: record.to_string(),
            message: e.to_string(),
        }
    }

    /// Runs `f` in one write transaction and commits it (fsync).
    fn write(
        &mut self,
        f: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), LogError> {
        let txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        {
            txn.open_table(ENTRIES).map_err(|e| self.storage(e))?;
            txn.open_table(META).map_err(|e| self.storage(e))?;
        }
        f(&txn).map_err(|e| self.storage(e))?;
        txn.commit().map_err(|e| self.storage(e))
    }

    fn read_last_entry(&self) -> Result<u64, LogError> {
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let entries = txn.open_table(ENTRIES).map_err(|e| self.storage(e))?;
        Ok(match entries.last().map_err(|e| self.storage(e))? {
            Some((k, _)) => k.value(),
            None => 0,
        })
    }
}

fn storage(path: &Path, e: impl Into<redb::Error>) -> LogError {
    LogError::Storage {
        path: path.display().to_string(),
        message: e.into().to_string(),
    }
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + e.data.len());
    v.extend_from_slice(&e.term.to_le_bytes());
    v.extend_from_slice(&e.data);
    v
}

fn decode_entry(index: u64, raw: &[u8]) -> Option<Entry> {
    let (term, data) = raw.split_first_chunk::<8>()?;
    Some(Entry {
        index,
        term: u64::from_le_bytes(*term),
        data: data.to_vec(),
    })
}

impl Log for RedbLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        let last = self.last_index()?;
        check_append(entries, self.snapshot.index, last)?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let from = first.index;
        self.write(|txn| {
            let mut table = txn.open_table(ENTRIES)?;
            if from <= last {
                table.retain_in(from.., |_, _| false)?;
            }
            for e in entries {
                table.insert(e.index, encode_entry(e).as_slice())?;
            }
            Ok(())
        })?;
        self.last_entry = entries.last().map_or(self.last_entry, |e| e.index);
        Ok(())
    }

    fn entries(&self, lo: u64, hi: u64) -> Result<Vec<Entry>, LogError> {
        let first = self.first_index()?;
        let last = self.last_index()?;
        if lo < first {
            return Err(LogError::Compacted { index: lo, first });
        }
        if hi > last + 1 {
            return Err(LogError::Unavailable {
                index: hi - 1,
                last,
            });
        }
        if lo >= hi {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = txn.open_table(ENTRIES).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for row in table.range(lo..hi).map_err(|e| self.storage(e))? {
            let (k, v) = row.map_err(|e| self.storage(e))?;
            let index = k.value();
            let entry = decode_entry(index, v.value())
                .ok_or_else(|| self.corrupt(&format!("entry {index}"), "shorter than its term"))?;
            out.push(entry);
        }
        Ok(out)
    }

    fn first_index(&self) -> Result<u64, LogError> {
        Ok(self.snapshot.index + 1)
    }

    fn last_index(&self) -> Result<u64, LogError> {
        Ok(self.last_entry.max(self.snapshot.index))
    }

    fn term(&self, index: u64) -> Result<u64, LogError> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        let mut found = self.entries(index, index + 1)?;
        found
            .pop()
            .map(|e| e.term)
            .ok_or_else(|| self.corrupt(&format!("entry {index}"), "missing inside the log"))
    }

    fn truncate_suffix(&mut self, from: u64) -> Result<(), LogError> {
        self.write(|txn| {
            let mut table = txn.open_table(ENTRIES)?;
            table.retain_in(from.., |_, _| false)?;
            Ok(())
        })?;
        self.last_entry = self.read_last_entry()?;
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: SnapshotRecord) -> Result<(), LogError> {
        if snapshot.index < self.snapshot.index {
            return Err(LogError::StaleSnapshot {
                index: snapshot.index,
                stored: self.snapshot.index,
            });
        }
        // Keep the entries after the snapshot only if the log agrees with it
        // at its index; otherwise (a follower installing a leader's
        // snapshot) the whole log is stale.
        let follows = self.last_entry >= snapshot.index
            && snapshot.index >= self.first_index()?
            && self.term(snapshot.index)? == snapshot.term;
        let meta = SnapshotMeta {
            index: snapshot.index,
            term: snapshot.term,
        };
        let meta_json =
            serde_json::to_vec(&meta).map_err(|e| self.corrupt("snapshot metadata", e))?;
        self.write(|txn| {
            let mut table = txn.open_table(META)?;
            table.insert(SNAPSHOT_META, meta_json.as_slice())?;
            table.insert(SNAPSHOT_DATA, snapshot.data.as_slice())?;
            if !follows {
                let mut entries = txn.open_table(ENTRIES)?;
                entries.retain(|_, _| false)?;
            }
            Ok(())
        })?;
        self.snapshot = meta;
        if !follows {
            self.last_entry = 0;
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<Option<SnapshotRecord>, LogError> {
        if self.snapshot.index == 0 {
            return Ok(None);
        }
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = txn.open_table(META).map_err(|e| self.storage(e))?;
        let data = table
            .get(SNAPSHOT_DATA)
            .map_err(|e| self.storage(e))?
            .ok_or_else(|| self.corrupt("snapshot", "metadata present but data missing"))?;
        Ok(Some(SnapshotRecord {
            index: self.snapshot.index,
            term: self.snapshot.term,
            data: data.value().to_vec(),
        }))
    }

    fn compact(&mut self, upto: u64) -> Result<(), LogError> {
        if upto > self.snapshot.index {
            return Err(LogError::CompactPastSnapshot {
                index: upto,
                snapshot: self.snapshot.index,
            });
        }
        self.write(|txn| {
            let mut table = txn.open_table(ENTRIES)?;
            table.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })?;
        self.last_entry = self.read_last_entry()?;
        Ok(())
    }

    fn hard_state(&self) -> Result<HardState, LogError> {
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = txn.open_table(META).map_err(|e| self.storage(e))?;
        match table.get(HARD_STATE).map_err(|e| self.storage(e))? {
            Some(raw) => {
                serde_json::from_slice(raw.value()).map_err(|e| self.corrupt("hard state", e))
            }
            None => Ok(HardState::default()),
        }
    }

    fn set_hard_state(&mut self, state: HardState) -> Result<(), LogError> {
        let json = serde_json::to_vec(&state).map_err(|e| self.corrupt("hard state", e))?;
        self.write(|txn| {
            let mut table = txn.open_table(META)?;
            table.insert(HARD_STATE, json.as_slice())?;
            Ok(())
        })
    }
}
