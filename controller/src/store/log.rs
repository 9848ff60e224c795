//! The command log: entries (index, term, opaque bytes), the latest
//! snapshot, and Raft's hard state, behind one [`Log`] trait.
//!
//! The shape follows raft-rs's `Storage` so that the next issue can put Raft
//! on top without changing it: entries are opaque bytes with an index and a
//! term; appending at an index that already holds entries replaces them and
//! everything after (a new leader overwriting a follower's uncommitted
//! tail); a snapshot covers a prefix that can then be compacted away.
//!
//! Index conventions (raft-rs's): the first index is the snapshot index plus
//! one; an empty log with no snapshot has first index 1 and last index 0.
//!
//! [`MemLog`] is the in-memory implementation for tests;
//! [`RedbLog`](super::RedbLog) is the durable one.

use serde::{Deserialize, Serialize};

/// Errors from a command log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Appended entries do not follow on from the log (a gap, or indexes not
    /// consecutive within the batch).
    #[error("log append at index {index} does not follow on from last index {last}")]
    Gap {
        /// The first out-of-place index.
        index: u64,
        /// The log's last index (or the previous entry's in the batch).
        last: u64,
    },
    /// The requested index lies before the first retained entry.
    #[error("log index {index} compacted: the first retained index is {first}")]
    Compacted {
        /// The requested index.
        index: u64,
        /// The first index still in the log.
        first: u64,
    },
    /// The requested index lies after the last entry.
    #[error("log index {index} not available: the last index is {last}")]
    Unavailable {
        /// The requested index.
        index: u64,
        /// The last index in the log.
        last: u64,
    },
    /// A snapshot older than the one stored was offered.
    #[error("snapshot at index {index} is older than the stored one at {stored}")]
    StaleSnapshot {
        /// The offered snapshot's index.
        index: u64,
        /// The stored snapshot's index.
        stored: u64,
    },
    /// Compaction past the stored snapshot was asked for.
    #[error("cannot compact up to index {index}: the snapshot only covers up to {snapshot}")]
    CompactPastSnapshot {
        /// The requested index.
        index: u64,
        /// The snapshot's index.
        snapshot: u64,
    },
    /// The on-disk database failed.
    #[error("log database {path}: {message}")]
    Storage {
        /// The database file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A stored record could not be read back.
    #[error("log database {path}: corrupt {record}: {message}")]
    Corrupt {
        /// The database file.
        path: String,
        /// Which record (`entry 42`, `hard state`, `snapshot`).
        record: String,
        /// What is wrong with it.
        message: String,
    },
}

/// One log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its position in the log, from 1.
    pub index: u64,
    /// The Raft term it was proposed in (1 for a single-node store).
    pub term: u64,
    /// The encoded command; empty for a no-op entry. For a membership
    /// change, the encoded Raft conf change.
    pub data: Vec<u8>,
    /// What `data` holds: a command, or a Raft membership change.
    #[serde(default)]
    pub kind: EntryKind,
    /// Raft's entry context (the proposal id that routes the result back to
    /// its proposer; a joining member's address); empty for the
    /// single-node store.
    #[serde(default)]
    pub context: Vec<u8>,
}

/// What a log entry's bytes hold (raft-rs's `EntryType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// An encoded [`Command`](super::Command), or empty for a no-op.
    #[default]
    Normal,
    /// A Raft `ConfChange` (one member added or removed).
    ConfChange,
    /// A Raft `ConfChangeV2`.
    ConfChangeV2,
}

/// The replicated controller membership: Raft's voters with the address
/// each one serves on (the conf state and the address book, kept together
/// so that every member, and every member that joins from a snapshot,
/// knows every address), and the next Raft id to hand out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Voter id → address.
    pub voters: std::collections::BTreeMap<u64, String>,
    /// The next id to allocate: one more than the highest ever used, so a
    /// removed member's id is never reused (etcd does the same).
    pub next_id: u64,
}

/// Writes that must become durable together, in one fsynced transaction
/// (everything one Raft `Ready` asks to persist), applied in this order:
/// snapshot, entries, hard state, compaction.
#[derive(Clone, Debug, Default)]
pub struct LogBatch {
    /// A snapshot to install (see [`Log::save_snapshot`]).
    pub snapshot: Option<SnapshotRecord>,
    /// Entries to append (see [`Log::append`]).
    pub entries: Vec<Entry>,
    /// A new hard state.
    pub hard_state: Option<HardState>,
    /// Drop entries up to this index, which the (possibly new) snapshot must
    /// cover.
    pub compact_to: Option<u64>,
}

impl LogBatch {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.compact_to.is_none()
    }
}

/// Raft's persistent per-replica state (raft-rs `HardState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The current term.
    pub term: u64,
    /// Who this replica voted for in `term` (0: nobody).
    pub vote: u64,
    /// The highest index known committed.
    pub commit: u64,
}

/// A stored snapshot: the state machine's encoded state at `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The last log index the snapshot includes.
    pub index: u64,
    /// That entry's term.
    pub term: u64,
    /// The encoded [`Snapshot`](super::Snapshot).
    pub data: Vec<u8>,
    /// The membership at `index` (empty for the single-node store).
    pub membership: Membership,
}

/// A command log. Every mutating method is durable when it returns (for the
/// on-disk implementation: fsynced).
pub trait Log {
    /// Appends `entries`, which must have consecutive indexes starting at
    /// most one past the last index and after the snapshot. Entries already
    /// at those indexes, and everything after them, are replaced.
    fn append(&mut self, entries: &[Entry]) -> Result<(), LogError>;

    /// The entries with `lo <= index < hi`.
    fn entries(&self, lo: u64, hi: u64) -> Result<Vec<Entry>, LogError>;

    /// The first index still held (snapshot index plus one).
    fn first_index(&self) -> Result<u64, LogError>;

    /// The last index held, or the snapshot index when no entry follows it.
    fn last_index(&self) -> Result<u64, LogError>;

    /// The term of the entry at `index` (the snapshot's term at its index).
    fn term(&self, index: u64) -> Result<u64, LogError>;

    /// Removes the entries with index `>= from`.
    fn truncate_suffix(&mut self, from: u64) -> Result<(), LogError>;

    /// Stores `snapshot` as the latest one. Entries it covers stay until
    /// [`Log::compact`]; entries after it are kept only if they follow on
    /// from it (otherwise the log is reset to the snapshot, as a follower
    /// installing a leader's snapshot must).
    fn save_snapshot(&mut self, snapshot: SnapshotRecord) -> Result<(), LogError>;

    /// The latest stored snapshot, if any.
    fn snapshot(&self) -> Result<Option<SnapshotRecord>, LogError>;

    /// Drops the entries with index `<= upto`, which the snapshot must cover.
    fn compact(&mut self, upto: u64) -> Result<(), LogError>;

    /// The stored hard state (all zero if never set).
    fn hard_state(&self) -> Result<HardState, LogError>;

    /// Stores the hard state.
    fn set_hard_state(&mut self, state: HardState) -> Result<(), LogError>;

    /// Writes `batch`. The durable implementation does it in one fsynced
    /// transaction, so a crash leaves all of it or none; this default runs
    /// the single steps in the same order.
    fn write_batch(&mut self, batch: LogBatch) -> Result<(), LogError> {
        if let Some(snapshot) = batch.snapshot {
            self.save_snapshot(snapshot)?;
        }
        self.append(&batch.entries)?;
        if let Some(state) = batch.hard_state {
            self.set_hard_state(state)?;
        }
        if let Some(upto) = batch.compact_to {
            self.compact(upto)?;
        }
        Ok(())
    }
}

/// Checks that `entries` can be appended to a log whose snapshot ends at
/// `snapshot_index` and whose last index is `last`.
pub(crate) fn check_append(
    entries: &[Entry],
    snapshot_index: u64,
    last: u64,
) -> Result<(), LogError> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    if first.index > last + 1 {
        return Err(LogError::Gap {
            index: first.index,
            last,
        });
    }
    if first.index <= snapshot_index {
        return Err(LogError::Compacted {
            index: first.index,
            first: snapshot_index + 1,
        });
    }
    for pair in entries.windows(2) {
        if pair[1].index != pair[0].index + 1 {
            return Err(LogError::Gap {
                index: pair[1].index,
                last: pair[0].index,
            });
        }
    }
    Ok(())
}

/// An in-memory [`Log`] for tests and for the state machine's property tests.
#[derive(Clone, Debug, Default)]
pub struct MemLog {
    entries: Vec<Entry>,
    snapshot: Option<SnapshotRecord>,
    hard_state: HardState,
}

impl MemLog {
    /// An empty log.
    pub fn new() -> MemLog {
        MemLog::default()
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }
}

impl Log for MemLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        let last = self.last_index()?;
        check_append(entries, self.snapshot_index(), last)?;
        if let Some(first) = entries.first() {
            self.truncate_suffix(first.index)?;
            self.entries.extend_from_slice(entries);
        }
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
        Ok(self
            .entries
            .iter()
            .filter(|e| e.index >= lo && e.index < hi)
            .cloned()
            .collect())
    }

    fn first_index(&self) -> Result<u64, LogError> {
        Ok(self.snapshot_index() + 1)
    }

    fn last_index(&self) -> Result<u64, LogError> {
        Ok(self
            .entries
            .last()
            .map_or(self.snapshot_index(), |e| e.index)
            .max(self.snapshot_index()))
    }

    fn term(&self, index: u64) -> Result<u64, LogError> {
        if let Some(s) = &self.snapshot
            && s.index == index
        {
            return Ok(s.term);
        }
        if let Some(e) = self.entries.iter().find(|e| e.index == index) {
            return Ok(e.term);
        }
        let first = self.first_index()?;
        if index < first {
            return Err(LogError::Compacted { index, first });
        }
        Err(LogError::Unavailable {
            index,
            last: self.last_index()?,
        })
    }

    fn truncate_suffix(&mut self, from: u64) -> Result<(), LogError> {
        self.entries.retain(|e| e.index < from);
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: SnapshotRecord) -> Result<(), LogError> {
        let stored = self.snapshot_index();
        if snapshot.index < stored {
            return Err(LogError::StaleSnapshot {
                index: snapshot.index,
                stored,
            });
        }
        let follows = self
            .entries
            .iter()
            .any(|e| e.index == snapshot.index && e.term == snapshot.term);
        if !follows {
            self.entries.clear();
        }
        self.snapshot = Some(snapshot);
        Ok(())
    }

    fn snapshot(&self) -> Result<Option<SnapshotRecord>, LogError> {
        Ok(self.snapshot.clone())
    }

    fn compact(&mut self, upto: u64) -> Result<(), LogError> {
        let snapshot = self.snapshot_index();
        if upto > snapshot {
            return Err(LogError::CompactPastSnapshot {
                index: upto,
                snapshot,
            });
        }
        self.entries.retain(|e| e.index > upto);
        Ok(())
    }

    fn hard_state(&self) -> Result<HardState, LogError> {
        Ok(self.hard_state)
    }

    fn set_hard_state(&mut self, state: HardState) -> Result<(), LogError> {
        self.hard_state = state;
        Ok(())
    }
}
