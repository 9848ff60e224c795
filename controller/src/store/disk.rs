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
//! `snapshot_meta` (JSON index, term and membership) and `snapshot_data`
//! (bytes). A Raft entry that is not a plain command or has a context
//! (proposal id, member address) sets the term's top bit (terms never get
//! near 2^63) and puts its kind (1 byte) and context (4-byte little-endian
//! length, bytes) between the term and the data, so entries the single-node
//! store wrote read back unchanged.
//!
//! [`Log::write_batch`] commits a whole Raft `Ready` (snapshot, entries,
//! hard state, compaction) in one transaction: one fsync, all or nothing.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::log::{
    Entry, EntryKind, HardState, Log, LogBatch, LogError, Membership, SnapshotRecord, check_append,
};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HARD_STATE: &str = "hard_state";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SnapshotMeta {
    index: u64,
    term: u64,
    #[serde(default)]
    membership: Membership,
}

/// The term's top bit: the entry carries a kind and a context.
const EXTENDED: u64 = 1 << 63;

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
    let mut v = Vec::with_capacity(8 + 5 + e.context.len() + e.data.len());
    if e.kind == EntryKind::Normal && e.context.is_empty() {
        v.extend_from_slice(&e.term.to_le_bytes());
    } else {
        v.extend_from_slice(&(e.term | EXTENDED).to_le_bytes());
        v.push(match e.kind {
            EntryKind::Normal => 0,
            EntryKind::ConfChange => 1,
            EntryKind::ConfChangeV2 => 2,
        });
        v.extend_from_slice(&(e.context.len() as u32).to_le_bytes());
        v.extend_from_slice(&e.context);
    }
    v.extend_from_slice(&e.data);
    v
}

fn decode_entry(index: u64, raw: &[u8]) -> Option<Entry> {
    let (term, rest) = raw.split_first_chunk::<8>()?;
    let term = u64::from_le_bytes(*term);
    if term & EXTENDED == 0 {
        return Some(Entry {
            index,
            term,
            data: rest.to_vec(),
            ..Entry::default()
        });
    }
    let (&kind, rest) = rest.split_first()?;
    let kind = match kind {
        0 => EntryKind::Normal,
        1 => EntryKind::ConfChange,
        2 => EntryKind::ConfChangeV2,
        _ => return None,
    };
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return None;
    }
    let (context, data) = rest.split_at(len);
    Some(Entry {
        index,
        term: term & !EXTENDED,
        data: data.to_vec(),
        kind,
        context: context.to_vec(),
    })
}

impl Log for RedbLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        self.write_batch(LogBatch {
            entries: entries.to_vec(),
            ..LogBatch::default()
        })
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
            let entry = decode_entry(index, v.value()).ok_or_else(|| {
                self.corrupt(&format!("entry {index}"), "truncated or unknown kind")
            })?;
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
        self.write_batch(LogBatch {
            snapshot: Some(snapshot),
            ..LogBatch::default()
        })
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
            membership: self.snapshot.membership.clone(),
        }))
    }

    fn compact(&mut self, upto: u64) -> Result<(), LogError> {
        self.write_batch(LogBatch {
            compact_to: Some(upto),
            ..LogBatch::default()
        })
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
        self.write_batch(LogBatch {
            hard_state: Some(state),
            ..LogBatch::default()
        })
    }

    fn write_batch(&mut self, batch: LogBatch) -> Result<(), LogError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Plan against the cached indexes, then write everything in one
        // transaction, then update the caches: a failed commit changes
        // neither the file nor the caches.
        let mut snapshot = self.snapshot.clone();
        let mut last_entry = self.last_entry;
        let mut clear_entries = false;
        let mut snapshot_write = None;
        if let Some(record) = &batch.snapshot {
            if record.index < snapshot.index {
                return Err(LogError::StaleSnapshot {
                    index: record.index,
                    stored: snapshot.index,
                });
            }
            // Keep the entries after the snapshot only if the log agrees
            // with it at its index; otherwise (a follower installing a
            // leader's snapshot) the whole log is stale.
            let follows = if record.index == snapshot.index {
                record.term == snapshot.term
            } else {
                last_entry >= record.index
                    && record.index > snapshot.index
                    && self.term(record.index)? == record.term
            };
            if !follows {
                clear_entries = true;
                last_entry = 0;
            }
            snapshot = SnapshotMeta {
                index: record.index,
                term: record.term,
                membership: record.membership.clone(),
            };
            let meta_json =
                serde_json::to_vec(&snapshot).map_err(|e| self.corrupt("snapshot metadata", e))?;
            snapshot_write = Some((meta_json, record.data.as_slice()));
        }
        check_append(
            &batch.entries,
            snapshot.index,
            last_entry.max(snapshot.index),
        )?;
        let truncate_from = batch
            .entries
            .first()
            .map(|e| e.index)
            .filter(|&from| from <= last_entry);
        if let Some(e) = batch.entries.last() {
            last_entry = e.index;
        }
        if let Some(upto) = batch.compact_to {
            if upto > snapshot.index {
                return Err(LogError::CompactPastSnapshot {
                    index: upto,
                    snapshot: snapshot.index,
                });
            }
            if last_entry <= upto {
                last_entry = 0;
            }
        }
        let hard_state = match &batch.hard_state {
            Some(state) => {
                Some(serde_json::to_vec(state).map_err(|e| self.corrupt("hard state", e))?)
            }
            None => None,
        };
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let mut entries = txn.open_table(ENTRIES)?;
            if let Some((meta_json, data)) = &snapshot_write {
                meta.insert(SNAPSHOT_META, meta_json.as_slice())?;
                meta.insert(SNAPSHOT_DATA, *data)?;
            }
            if clear_entries {
                entries.retain(|_, _| false)?;
            }
            if let Some(from) = truncate_from {
                entries.retain_in(from.., |_, _| false)?;
            }
            for e in &batch.entries {
                entries.insert(e.index, encode_entry(e).as_slice())?;
            }
            if let Some(json) = &hard_state {
                meta.insert(HARD_STATE, json.as_slice())?;
            }
            if let Some(upto) = batch.compact_to {
                entries.retain_in(..=upto, |_, _| false)?;
            }
            Ok(())
        })?;
        self.snapshot = snapshot;
        self.last_entry = last_entry;
        Ok(())
    }
}
