//! raft-rs's `Storage` over the controller's durable [`RedbLog`].
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

use raft::eraftpb::{ConfState, Entry as RaftEntry, EntryType, HardState as RaftHardState};
use raft::eraftpb::{Snapshot as RaftSnapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::store::{
    Entry, EntryKind, HardState, Log, LogBatch, LogError, Membership, RedbLog, SnapshotRecord,
};

/// raft-rs's view of the log: a [`RedbLog`] plus the in-memory hard state
/// and conf state raft-rs starts from.
#[derive(Debug)]
pub struct RaftStorage {
    log: RedbLog,
    hard_state: HardState,
    conf_state: ConfState,
}

impl RaftStorage {
    /// Wraps `log`, starting from its stored hard state and `conf_state`
    /// (rebuilt by the caller from the snapshot and committed entries).
    pub fn new(log: RedbLog, conf_state: ConfState) -> Result<RaftStorage, LogError> {
        let hard_state = log.hard_state()?;
        Ok(RaftStorage {
            log,
            hard_state,
            conf_state,
        })
    }

    /// Raises the in-memory commit index to at least `commit` (recovery
    /// clamps it to the snapshot; raft-rs refuses a commit below it).
    pub fn set_commit_floor(&mut self, commit: u64) {
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    /// The underlying log.
    pub fn log(&self) -> &RedbLog {
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

    /// Writes `batch` in one fsynced transaction, remembering its hard state.
    pub fn persist(&mut self, batch: LogBatch) -> Result<(), LogError> {
        let hard_state = batch.hard_state;
        self.log.write_batch(batch)?;
        if let Some(hs) = hard_state {
            self.hard_state = hs;
        }
        Ok(())
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
        self.log.term(idx).map_err(raft_err)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.log.first_index().map_err(raft_err)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.log.last_index().map_err(raft_err)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<RaftSnapshot> {
        let record = match self.log.snapshot().map_err(raft_err)? {
            Some(record) if record.index >= request_index => record,
            // Snapshots are taken by the loop every `snapshot_every`
            // entries; raft-rs asks again later.
            _ => {
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
