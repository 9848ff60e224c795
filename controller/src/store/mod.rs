//! The controller's store: cluster state changed only by commands applied in
//! log order, persisted with fsync, and watched without polling.
//!
//! Four parts, each usable alone:
//! - [`command`]: the [`Command`]s and their versioned byte encoding;
//! - [`machine`]: the pure [`StateMachine`] that applies commands by index,
//!   snapshots and restores;
//! - [`log`] and [`disk`]: the [`Log`] trait (entries, snapshot, hard state)
//!   with the in-memory [`MemLog`] and the durable [`RedbLog`];
//! - [`watch`]: change [`Event`]s, the [`WatchHub`] and [`WatchStream`]s.
//!
//! [`Store`] ties them together for a single controller: propose = append
//! durably, then apply, then acknowledge. **API boundary:** Raft replaces
//! only `Store` next issue: it appends the same encoded commands to the same
//! `Log`, and applies committed entries to the same `StateMachine` with
//! [`StateMachine::apply_entry`], publishing the events to the same hub.
//!
//! **Invariant:** a command is acknowledged only after its entry is fsynced,
//! and state is only ever rebuilt from the log (latest snapshot, then the
//! entries after it), so a controller killed with -9 loses nothing it
//! acknowledged.

pub mod command;
pub mod disk;
pub mod log;
pub mod machine;
pub mod wal;
pub mod watch;

use std::path::Path;

pub use command::{Command, CommandError, DesiredStateChange, PendingTask};
pub use disk::RedbLog;
pub use log::{
    Entry, EntryKind, HardState, Log, LogBatch, LogError, MemLog, Membership, SnapshotRecord,
};
pub use machine::{ApplyError, ApplyOutcome, Snapshot, SnapshotError, StateMachine};
pub use wal::{WAL_DIR, WalLog};
pub use watch::{Event, EventKind, Object, WatchError, WatchHub, WatchStream};

/// The log file's name inside the store's directory.
pub const LOG_FILE: &str = "log.redb";

/// The term a single-node store writes its entries with: with one voter
/// there is only ever one leader, so one term. Raft supplies real terms.
pub const SINGLE_NODE_TERM: u64 = 1;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The command was durably logged at `index` and refused by the state
    /// machine: nothing changed (every replica refuses it the same way).
    #[error("command at index {index} refused: {source}")]
    Refused {
        /// The log index the command took.
        index: u64,
        /// Why it was refused.
        #[source]
        source: ApplyError,
    },
    /// The state machine could not apply a logged entry (out of order, or
    /// bytes it cannot decode). The store must be reopened.
    #[error("applying log index {index} failed: {source}")]
    Apply {
        /// The entry's index.
        index: u64,
        /// What failed.
        #[source]
        source: ApplyError,
    },
    /// The command could not be encoded; nothing was logged.
    #[error("command {command} could not be encoded: {source}")]
    Encode {
        /// The command's name.
        command: &'static str,
        /// What failed.
        #[source]
        source: CommandError,
    },
    /// The log failed; when appending, nothing was acknowledged.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The stored snapshot could not be read back.
    #[error("snapshot at index {index}: {source}")]
    Snapshot {
        /// The snapshot's log index.
        index: u64,
        /// What is wrong.
        #[source]
        source: SnapshotError,
    },
    /// The command was committed and applied at `index`, but writing the
    /// periodic snapshot afterwards failed. Do not re-propose the command;
    /// the next snapshot is tried after the next proposal.
    #[error("command at index {index} committed, but the snapshot after it failed: {message}")]
    SnapshotAfterCommit {
        /// The committed command's index.
        index: u64,
        /// What failed.
        message: String,
    },
    /// The store's directory could not be created.
    #[error("store directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// One logged command's result: what it changed, or why it was refused.
pub type Applied = Result<ApplyOutcome, ApplyError>;

/// Store settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Take a snapshot and compact the log once this many entries follow the
    /// last snapshot. 0 never snapshots. The default, 10 000, matches
    /// swarmkit's `SnapshotInterval` and keeps replay on restart well under
    /// a second.
    pub snapshot_every: u64,
    /// How many events watches can replay from (etcd keeps history until
    /// compaction; Kubernetes' watch cache keeps a bounded window like this).
    pub watch_history: usize,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            snapshot_every: 10_000,
            watch_history: 10_000,
        }
    }
}

/// The single-controller store: a [`Log`] and a [`StateMachine`] kept in
/// step, and the [`WatchHub`] they publish to.
///
/// One writer: share it behind a mutex; watches do not need the store's
/// lock. With a single voter every appended entry is committed, so this
/// driver does not write the Raft hard state (Raft will).
#[derive(Debug)]
pub struct Store<L: Log = RedbLog> {
    log: L,
    machine: StateMachine,
    hub: WatchHub,
    config: StoreConfig,
    /// The index of the latest stored snapshot (0: none).
    snapshot_index: u64,
}

impl Store<RedbLog> {
    /// Opens (or creates) the store in `dir` and recovers its state: the
    /// latest snapshot, then every entry after it.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Store<RedbLog>, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        Store::with_log(RedbLog::open(dir.join(LOG_FILE))?, config)
    }
}

impl<L: Log> Store<L> {
    /// Builds a store over `log`, recovering the state it holds.
    pub fn with_log(log: L, config: StoreConfig) -> Result<Store<L>, StoreError> {
        let mut machine = StateMachine::new();
        let mut snapshot_index = 0;
        if let Some(record) = log.snapshot()? {
            let snapshot =
                Snapshot::decode(&record.data).map_err(|source| StoreError::Snapshot {
                    index: record.index,
                    source,
                })?;
            machine.restore(snapshot);
            snapshot_index = record.index;
        }
        let hub = WatchHub::new(snapshot_index, config.watch_history);
        let last = log.last_index()?;
        // Replay in bounded chunks so that a long log is not read at once.
        let mut lo = log.first_index()?;
        while lo <= last {
            let hi = last.saturating_add(1).min(lo.saturating_add(1024));
            for entry in log.entries(lo, hi)? {
                match machine.apply_entry(entry.index, &entry.data) {
                    Ok(outcome) => hub.publish(entry.index, &outcome.events),
                    // A refusal is part of the history: it was refused when
                    // first applied and is refused the same way now.
                    Err(e) if e.is_refusal() => hub.publish(entry.index, &[]),
                    Err(source) => {
                        return Err(StoreError::Apply {
                            index: entry.index,
                            source,
                        });
                    }
                }
            }
            lo = hi;
        }
        Ok(Store {
            log,
            machine,
            hub,
            config,
            snapshot_index,
        })
    }

    /// Logs `command` durably, applies it, and returns its index and what it
    /// changed. A refused command is logged too (it has an index every
    /// replica agrees on) and comes back as [`StoreError::Refused`].
    pub fn propose(&mut self, command: &Command) -> Result<(u64, ApplyOutcome), StoreError> {
        let index = self.append(std::slice::from_ref(command))?;
        let applied = self.apply_logged(index, command)?;
        self.snapshot_if_due(index)?;
        applied
            .map(|outcome| (index, outcome))
            .map_err(|source| StoreError::Refused { index, source })
    }

    /// Logs `commands` with one fsync (group commit), then applies each in
    /// order. Returns, per command, its index and its outcome or refusal;
    /// refusals do not stop the batch (each command stands alone, as if
    /// proposed one by one).
    pub fn propose_batch(
        &mut self,
        commands: &[Command],
    ) -> Result<Vec<(u64, Applied)>, StoreError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let first = self.append(commands)?;
        let mut results = Vec::with_capacity(commands.len());
        for (index, command) in (first..).zip(commands) {
            results.push((index, self.apply_logged(index, command)?));
        }
        self.snapshot_if_due(first + commands.len() as u64 - 1)?;
        Ok(results)
    }

    /// Appends `commands` durably after the last entry; returns the first
    /// one's index.
    fn append(&mut self, commands: &[Command]) -> Result<u64, StoreError> {
        let first = self.log.last_index()? + 1;
        let mut entries = Vec::with_capacity(commands.len());
        for (index, command) in (first..).zip(commands) {
            let data = command::encode(command).map_err(|source| StoreError::Encode {
                command: command.name(),
                source,
            })?;
            entries.push(Entry {
                index,
                term: SINGLE_NODE_TERM,
                data,
                ..Entry::default()
            });
        }
        self.log.append(&entries)?;
        Ok(first)
    }

    /// Applies a logged command and publishes its events. The outer error
    /// is fatal (the state machine and the log disagree); the inner one is a
    /// refusal.
    fn apply_logged(&mut self, index: u64, command: &Command) -> Result<Applied, StoreError> {
        match self.machine.apply(index, command) {
            Ok(outcome) => {
                self.hub.publish(index, &outcome.events);
                Ok(Ok(outcome))
            }
            Err(source) if source.is_refusal() => {
                self.hub.publish(index, &[]);
                Ok(Err(source))
            }
            Err(source) => Err(StoreError::Apply { index, source }),
        }
    }

    /// Runs [`Store::maybe_snapshot`] after the commands up to `index` were
    /// committed, saying so if it fails.
    fn snapshot_if_due(&mut self, index: u64) -> Result<(), StoreError> {
        self.maybe_snapshot()
            .map_err(|e| StoreError::SnapshotAfterCommit {
                index,
                message: e.to_string(),
            })
    }

    /// Snapshots and compacts when `snapshot_every` entries have piled up.
    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        let every = self.config.snapshot_every;
        if every > 0 && self.machine.applied_index() - self.snapshot_index >= every {
            self.snapshot_now()?;
        }
        Ok(())
    }

    /// Stores a snapshot of the current state and drops the log entries it
    /// covers.
    pub fn snapshot_now(&mut self) -> Result<(), StoreError> {
        let snapshot = self.machine.snapshot();
        let index = snapshot.applied_index;
        if index == 0 || index == self.snapshot_index {
            return Ok(());
        }
        let data = snapshot
            .encode()
            .map_err(|source| StoreError::Snapshot { index, source })?;
        let term = self.log.term(index)?;
        self.log.save_snapshot(SnapshotRecord {
            index,
            term,
            data,
            membership: Default::default(),
        })?;
        // Saved first, compacted second: a crash in between leaves entries
        // the snapshot already covers, which recovery skips.
        self.log.compact(index)?;
        self.snapshot_index = index;
        Ok(())
    }

    /// The current state.
    pub fn state(&self) -> &StateMachine {
        &self.machine
    }

    /// The applied index, which is also the current revision.
    pub fn revision(&self) -> u64 {
        self.machine.applied_index()
    }

    /// The latest snapshot's index (0: none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// Watches every change from revision `from` (inclusive).
    pub fn watch(&self, from: u64) -> Result<WatchStream, WatchError> {
        self.hub.watch(from)
    }

    /// The hub, for watching from threads that do not hold the store.
    pub fn hub(&self) -> &WatchHub {
        &self.hub
    }

    /// The underlying log.
    pub fn log(&self) -> &L {
        &self.log
    }
}

impl<L: Log> Drop for Store<L> {
    fn drop(&mut self) {
        // Watchers learn that no more events will come instead of waiting
        // forever.
        self.hub.close();
    }
}
