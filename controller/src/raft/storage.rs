//! raft-rs's `Storage` over the controller's durable [`WalLog`].
//!
//! The log's entries, snapshot and hard state are the ones the single-node
//! store used; Raft adds the entry kind and context (stored in the same
//! entry record) and the membership (voters and their addresses) with each
//! snapshot. The conf state is not stored on its own: like the rest of the
//! state it is rebuilt on start from the latest snapshot and the committed
//! entries after it, and handed to raft-rs by `initial_state`.
//!
//! Reads serve raft-rs; writes go through [`RaftStorage::persist`], one
//! fsynced transaction per Ready.

use std::collections::VecDeque;

use raft::eraftpb::{ConfState, Entry as RaftEntry, EntryType, HardState as RaftHardState};
use raft::eraftpb::{Snapshot as RaftSnapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::store::{
    Entry, EntryKind, HardState, Log, LogBatch, LogError, Membership, SnapshotRecord, WalLog,
};

/// How many of the latest entries stay in memory. raft-rs asks for terms
/// and entries near the end of the log all the time (matching appends,
/// applying, replicating); reading them back from redb each time would cost
/// a read transaction each. TiKV keeps an entry cache for the same reason.
const CACHE_ENTRIES: usize = 4096;

/// raft-rs's view of the log: a [`WalLog`] plus the in-memory hard state
/// and conf state raft-rs starts from, and a cache of the latest entries.
#[derive(Debug)]
pub struct RaftStorage {
    log: WalLog,
    hard_state: HardState,
    conf_state: ConfState,
    /// Set when raft-rs asked for a snapshot newer than the stored one.
    snapshot_wanted: std::sync::atomic::AtomicBool,
    /// The latest persisted entries, consecutive, ending at the last index
    /// (or empty).
    cache: VecDeque<RaftEntry>,
}

impl RaftStorage {
    /// Wraps `log`, starting from its stored hard state and `conf_state`
    /// (rebuilt by the caller from the snapshot and committed entries).
    pub fn new(log: WalLog, conf_state: ConfState) -> Result<RaftStorage, LogError> {
        let hard_state = log.hard_state()?;
        Ok(RaftStorage {
            log,
            hard_state,
            conf_state,
            snapshot_wanted: std::sync::atomic::AtomicBool::new(false),
            cache: VecDeque::new(),
        })
    }

    /// Raises the in-memory commit index to at least `commit` (recovery
    /// clamps it to the snapshot; raft-rs refuses a commit below it).
    pub fn set_commit_floor(&mut self, commit: u64) {
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    /// The underlying log.
    pub fn log(&self) -> &WalLog {
        &self.log
    }

    /// The hard state as last persisted or set.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// Sets the conf state raft-rs reads at start (before building the
    /// `RawNode`) and that snapshots carry.
    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    /// Whether raft-rs asked for a snapshot newer than the stored one since
    /// the last call (the loop then takes one at once).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes `batch` durably in one write (a WAL record and its
    /// `fdatasync`, see [`crate::store::wal`]), remembering its hard state.
    pub fn persist(&mut self, batch: LogBatch) -> Result<(), LogError> {
        let hard_state = batch.hard_state;
        let snapshot = batch.snapshot.is_some();
        let compact_to = batch.compact_to;
        let first_new = batch.entries.first().map(|e| e.index);
        self.log.write_batch(batch)?;
        if let Some(hs) = hard_state {
            self.hard_state = hs;
        }
        if snapshot {
            // A snapshot that did not follow on from the log reset it.
            let index = self.log.first_index()? - 1;
            if self.log.last_index()? == index {
                self.cache.clear();
            }
            while self.cache.front().is_some_and(|e| e.index <= index) {
                self.cache.pop_front();
            }
        }
        if let Some(upto) = compact_to {
            while self.cache.front().is_some_and(|e| e.index <= upto) {
                self.cache.pop_front();
            }
        }
        if let Some(first) = first_new {
            // Appending replaced everything from `first` on.
            while self.cache.back().is_some_and(|e| e.index >= first) {
                self.cache.pop_back();
            }
        }
        Ok(())
    }

    /// Writes what a Ready asks to persist (a snapshot, raft-rs's entries,
    /// the hard state) in one durable write, and keeps the entries in
    /// the cache.
    pub fn persist_ready(
        &mut self,
        snapshot: Option<SnapshotRecord>,
        entries: Vec<RaftEntry>,
        hard_state: Option<HardState>,
    ) -> Result<(), LogError> {
        self.persist(LogBatch {
            snapshot,
            entries: entries.iter().map(entry_from_raft).collect(),
            hard_state,
            ..LogBatch::default()
        })?;
        let Some(first) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        if self.cache.back().is_some_and(|e| e.index + 1 != first) {
            self.cache.clear();
        }
        self.cache.extend(entries);
        while self.cache.len() > CACHE_ENTRIES {
            self.cache.pop_front();
        }
        Ok(())
    }

    fn cached(&self, index: u64) -> Option<&RaftEntry> {
        let first = self.cache.front()?.index;
        self.cache
            .get(usize::try_from(index.checked_sub(first)?).ok()?)
    }
}

/// A raft-rs hard state as the log stores it.
pub fn hard_state_from_raft(hs: &RaftHardState) -> HardState {
    HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    }
}

fn hard_state_to_raft(hs: HardState) -> RaftHardState {
    RaftHardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
        ..RaftHardState::default()
    }
}

/// A raft-rs entry as the log stores it.
pub fn entry_from_raft(e: &RaftEntry) -> Entry {
    Entry {
        index: e.index,
        term: e.term,
        data: e.data.to_vec(),
        kind: match e.entry_type {
            EntryType::EntryNormal => EntryKind::Normal,
            EntryType::EntryConfChange => EntryKind::ConfChange,
            EntryType::EntryConfChangeV2 => EntryKind::ConfChangeV2,
        },
        context: e.context.to_vec(),
    }
}

/// A stored entry as raft-rs wants it.
pub fn entry_to_raft(e: Entry) -> RaftEntry {
    RaftEntry {
        index: e.index,
        term: e.term,
        entry_type: match e.kind {
            EntryKind::Normal => EntryType::EntryNormal,
            EntryKind::ConfChange => EntryType::EntryConfChange,
            EntryKind::ConfChangeV2 => EntryType::EntryConfChangeV2,
        },
        data: e.data.into(),
        context: e.context.into(),
        ..RaftEntry::default()
    }
}

/// The conf state of a membership (voters only: Gantry has no learners).
pub fn conf_state_of(membership: &Membership) -> ConfState {
    ConfState {
        voters: membership.voters.keys().copied().collect(),
        ..ConfState::default()
    }
}

/// Packs a snapshot for the wire: the membership (JSON, behind its 4-byte
/// little-endian length), then the state machine's snapshot bytes. raft-rs
/// carries the conf state in the metadata; the addresses travel here.
pub fn encode_snapshot_data(record: &SnapshotRecord) -> Vec<u8> {
    // Serializing a map of integers to strings cannot fail.
    let membership = serde_json::to_vec(&record.membership).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + membership.len() + record.data.len());
    out.extend_from_slice(&(membership.len() as u32).to_le_bytes());
    out.extend_from_slice(&membership);
    out.extend_from_slice(&record.data);
    out
}

/// Unpacks [`encode_snapshot_data`].
pub fn decode_snapshot_data(bytes: &[u8]) -> Result<(Membership, Vec<u8>), String> {
    let (len, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or("shorter than its membership length")?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(format!(
            "membership of {len} bytes but only {} follow",
            rest.len()
        ));
    }
    let (membership, data) = rest.split_at(len);
    let membership = serde_json::from_slice(membership).map_err(|e| format!("membership: {e}"))?;
    Ok((membership, data.to_vec()))
}

fn raft_err(e: LogError) -> raft::Error {
    match e {
        LogError::Compacted { .. } => raft::Error::Store(StorageError::Compacted),
        LogError::Unavailable { .. } => raft::Error::Store(StorageError::Unavailable),
        other => raft::Error::Store(StorageError::Other(Box::new(other))),
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            hard_state_to_raft(self.hard_state),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<RaftEntry>> {
        if low < high
            && let (Some(first), Some(_)) = (self.cached(low), self.cached(high - 1))
        {
            let start = (first.index - self.cache[0].index) as usize;
            let mut out: Vec<RaftEntry> = self
                .cache
                .range(start..start + (high - low) as usize)
                .cloned()
                .collect();
            raft::util::limit_size(&mut out, max_size.into());
            return Ok(out);
        }
        let mut out: Vec<RaftEntry> = self
            .log
            .entries(low, high)
            .map_err(raft_err)?
            .into_iter()
            .map(entry_to_raft)
            .collect();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if let Some(e) = self.cached(idx) {
            return Ok(e.term);
        }
        self.log.term(idx).map_err(raft_err)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.log.first_index().map_err(raft_err)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.log.last_index().map_err(raft_err)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<RaftSnapshot> {
        let record = match self.log.snapshot().map_err(raft_err)? {
            // A snapshot whose configuration lacks `to` is useless to it:
            // raft-rs on the receiver ignores a snapshot that does not
            // name it as a member (a member added after the last snapshot
            // would be sent that one forever).
            Some(record)
                if record.index >= request_index
                    && (to == 0 || record.membership.voters.contains_key(&to)) =>
            {
                record
            }
            // Ask the loop for a fresh snapshot now (not only every
            // `snapshot_every` entries); raft-rs asks again later.
            _ => {
                self.snapshot_wanted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ));
            }
        };
        let meta = SnapshotMetadata {
            index: record.index,
            term: record.term,
            conf_state: Some(conf_state_of(&record.membership)).into(),
            ..SnapshotMetadata::default()
        };
        Ok(RaftSnapshot {
            data: encode_snapshot_data(&record).into(),
            metadata: Some(meta).into(),
            ..RaftSnapshot::default()
        })
    }
}
