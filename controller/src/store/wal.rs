//! The Raft log's entries and hard state in an append-only, fdatasync'd
//! file (etcd's WAL, simplified), beside the redb file that keeps the
//! snapshot: [`WalLog`].
//!
//! Why: a Raft `Ready` written as one redb transaction costs about ten
//! scattered page writes and an fsync (0.4–0.5 ms on this project's disk,
//! measured against 0.1 ms for one appended record and `fdatasync`), and a
//! follower's write is on every proposal's critical path.
//!
//! Layout: `<dir>/wal/<seq>.wal`, one live segment. Each record is
//! `[length u32 LE][CRC-32 u32 LE][payload]`; a segment starts with a
//! *base* record (the hard state, the snapshot the log follows, and every
//! entry after it) and goes on with *batch* records (a hard state and/or
//! entries, appended: entries at an index already held replace it and
//! everything after, as raft's append does). One `write_batch` is one
//! record and one `fdatasync`, so a crash leaves all of it or none.
//!
//! - **Torn tail**: records are written in order and each is fsynced before
//!   the next is written, so only the last can be incomplete. Opening stops
//!   at the first record that is incomplete or fails its CRC, truncates the
//!   file there and fsyncs it (that record was never acknowledged). A bad
//!   record with valid ones after it is corruption, not a tear: an error.
//! - **Preallocation**: the live segment grows in [`GROW_BYTES`] steps of
//!   written zeros (then a full fsync), so the `fdatasync` of an append
//!   changes no file size and writes no metadata. A zero length ends the
//!   records.
//! - **Snapshots and compaction** rewrite: the snapshot goes to redb first
//!   (fsynced), then a new segment with a base record of what remains is
//!   written as `<seq>.tmp`, fsynced, renamed into place, the directory
//!   fsynced, and the old segment deleted. A crash in between leaves the
//!   old segment, which opening reconciles with redb's newer snapshot (the
//!   same rule as installing it). A segment that fills up rolls over the
//!   same way.
//! - **Memory**: every entry after the snapshot is kept in memory (etcd's
//!   `MemoryStorage` does the same); snapshots every `snapshot_every`
//!   entries bound them.
//! - A directory from before the WAL (entries in redb) is imported into a
//!   first segment on open; redb's entries are not read again.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::disk::RedbLog;
use super::log::{Entry, EntryKind, HardState, Log, LogBatch, LogError, SnapshotRecord};

/// The WAL's directory under the data directory.
pub const WAL_DIR: &str = "wal";
/// A segment rolls over once it would grow past this.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Zeros written ahead of the end at a time.
pub const GROW_BYTES: u64 = if cfg!(test) { 64 << 10 } else { 4 << 20 };
/// Bytes of a record's header (length, CRC).
const HEADER: usize = 8;
/// A length above this is garbage, not a record.
const MAX_RECORD: u32 = 1 << 30;

const BASE: u8 = 2;
const BATCH: u8 = 1;

/// CRC-32 (IEEE, reflected), table-driven.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// One decoded record.
#[derive(Debug, Default, PartialEq)]
struct Record {
    base: bool,
    hard_state: Option<HardState>,
    /// Base records only: the snapshot (index, term) the entries follow.
    snapshot: (u64, u64),
    entries: Vec<Entry>,
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// The framed record: header and payload.
fn encode(r: &Record) -> Vec<u8> {
    let mut p = Vec::with_capacity(
        HEADER + 64 + r.entries.iter().map(|e| 32 + e.data.len()).sum::<usize>(),
    );
    p.extend_from_slice(&[0; HEADER]);
    p.push(if r.base { BASE } else { BATCH });
    match r.hard_state {
        Some(hs) => {
            p.push(1);
            put_u64(&mut p, hs.term);
            put_u64(&mut p, hs.vote);
            put_u64(&mut p, hs.commit);
        }
        None => p.push(0),
    }
    put_u64(&mut p, r.snapshot.0);
    put_u64(&mut p, r.snapshot.1);
    p.extend_from_slice(&(r.entries.len() as u32).to_le_bytes());
    for e in &r.entries {
        put_u64(&mut p, e.index);
        put_u64(&mut p, e.term);
        p.push(match e.kind {
            EntryKind::Normal => 0,
            EntryKind::ConfChange => 1,
            EntryKind::ConfChangeV2 => 2,
        });
        put_bytes(&mut p, &e.context);
        put_bytes(&mut p, &e.data);
    }
    let len = (p.len() - HEADER) as u32;
    let crc = crc32(&p[HEADER..]);
    p[0..4].copy_from_slice(&len.to_le_bytes());
    p[4..8].copy_from_slice(&crc.to_le_bytes());
    p
}

/// A cursor over a payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
}

/// Decodes a payload whose CRC matched; `None` when it is malformed.
fn decode(payload: &[u8]) -> Option<Record> {
    let mut c = Cursor(payload);
    let base = match c.u8()? {
        BASE => true,
        BATCH => false,
        _ => return None,
    };
    let hard_state = match c.u8()? {
        0 => None,
        1 => Some(HardState {
            term: c.u64()?,
            vote: c.u64()?,
            commit: c.u64()?,
        }),
        _ => return None,
    };
    let snapshot = (c.u64()?, c.u64()?);
    let n = c.u32()?;
    let mut entries = Vec::with_capacity(n.min(1 << 16) as usize);
    for _ in 0..n {
        let index = c.u64()?;
        let term = c.u64()?;
        let kind = match c.u8()? {
            0 => EntryKind::Normal,
            1 => EntryKind::ConfChange,
            2 => EntryKind::ConfChangeV2,
            _ => return None,
        };
        let context = c.bytes()?;
        let data = c.bytes()?;
        entries.push(Entry {
            index,
            term,
            data,
            kind,
            context,
        });
    }
    c.0.is_empty().then_some(Record {
        base,
        hard_state,
        snapshot,
        entries,
    })
}

/// The records of a segment's bytes, and where the valid ones end (a torn
/// or garbled record, or the zeros after the last, end them).
fn scan(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD || bytes.len() - at - HEADER < len as usize {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + len as usize];
        if crc32(payload) != crc {
            break;
        }
        let Some(record) = decode(payload) else {
            break;
        };
        records.push(record);
        at += HEADER + len as usize;
    }
    (records, at)
}

/// Whether the bad record at `end` is followed by a valid one: then it is
/// not a torn tail (a crash only tears the last record) but corruption in
/// the middle, and dropping what follows would lose acknowledged writes.
fn valid_record_after(bytes: &[u8], end: usize) -> bool {
    if bytes.len() - end < HEADER {
        return false;
    }
    let len = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD {
        return false;
    }
    let next = end + HEADER + len as usize;
    next < bytes.len() && !scan(&bytes[next..]).0.is_empty()
}

/// The Raft log: entries and hard state in the WAL, the snapshot in redb.
#[derive(Debug)]
pub struct WalLog {
    dir: PathBuf,
    snapshots: RedbLog,
    /// The snapshot's (index, term), cached.
    snapshot: (u64, u64),
    /// Every entry after the snapshot, consecutive.
    entries: VecDeque<Entry>,
    hard_state: HardState,
    file: File,
    seq: u64,
    /// Where the next record goes.
    end: u64,
    /// The file's length (zeros from `end` on).
    allocated: u64,
    /// The size of the segment's base record.
    base_len: u64,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> LogError {
    LogError::Storage {
        path: path.display().to_string(),
        message: format!("{what}: {e}"),
    }
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_suffix(".wal")?.parse().ok()
}

/// Fsyncs a directory (a rename or a new file in it).
fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync of the directory", e))
}

impl WalLog {
    /// Opens the log in `dir`: the snapshot from `dir/log.redb` (created if
    /// missing), entries and hard state from `dir/wal/` (imported from the
    /// redb file when there is no segment yet).
    pub fn open(dir: impl AsRef<Path>) -> Result<WalLog, LogError> {
        let dir = dir.as_ref();
        let snapshots = RedbLog::open(dir.join(super::LOG_FILE))?;
        let snap_index = snapshots.first_index()? - 1;
        let snap_term = if snap_index == 0 {
            0
        } else {
            snapshots.term(snap_index)?
        };
        let wal = dir.join(WAL_DIR);
        std::fs::create_dir_all(&wal).map_err(|e| io_err(&wal, "creating", e))?;
        let mut segments = Vec::new();
        for item in std::fs::read_dir(&wal).map_err(|e| io_err(&wal, "listing", e))? {
            let item = item.map_err(|e| io_err(&wal, "listing", e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if let Some(seq) = segment_seq(&name) {
                segments.push(seq);
            } else if name.ends_with(".tmp") {
                // A rewrite that did not finish; the old segment stands.
                let _ = std::fs::remove_file(item.path());
            }
        }
        segments.sort_unstable();
        let Some(&seq) = segments.last() else {
            // No WAL yet: import what redb holds (a directory from before
            // the WAL, or a new one).
            let hard_state = snapshots.hard_state()?;
            let last = snapshots.last_index()?;
            let entries = snapshots.entries(snap_index + 1, last + 1)?;
            let record = Record {
                base: true,
                hard_state: Some(hard_state),
                snapshot: (snap_index, snap_term),
                entries: entries.clone(),
            };
            let (file, end, allocated) = write_segment(&wal, 1, &record)?;
            return Ok(WalLog {
                base_len: end,
                dir: wal,
                snapshots,
                snapshot: (snap_index, snap_term),
                entries: entries.into(),
                hard_state,
                file,
                seq: 1,
                end,
                allocated,
            });
        };
        let path = wal.join(format!("{seq}.wal"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, "opening", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io_err(&path, "reading", e))?;
        let (records, end) = scan(&bytes);
        let corrupt = |message: String| LogError::Corrupt {
            path: path.display().to_string(),
            record: "wal segment".to_string(),
            message,
        };
        let mut records = records.into_iter();
        let base = records
            .next()
            .filter(|r| r.base)
            .ok_or_else(|| corrupt("no valid base record at its start".to_string()))?;
        super::log::check_append(&base.entries, base.snapshot.0, base.snapshot.0)
            .map_err(|e| corrupt(format!("base record: {e}")))?;
        let base_len = encode(&base).len() as u64;
        let mut log = Log2 {
            snapshot: base.snapshot,
            entries: base.entries.into(),
            hard_state: base.hard_state.unwrap_or_default(),
        };
        for r in records {
            if r.base {
                return Err(corrupt("a second base record".to_string()));
            }
            log.apply(r).map_err(|e| corrupt(e.to_string()))?;
        }
        if valid_record_after(&bytes, end) {
            return Err(corrupt(format!(
                "the record at offset {end} is garbled but valid records follow it \
                 (not a torn tail: refusing to drop acknowledged writes)"
            )));
        }
        if end < bytes.len() && bytes[end..].iter().any(|b| *b != 0) {
            tracing::warn!(
                path = %path.display(),
                offset = end,
                "wal: dropping a torn or garbled tail (a write that was never acknowledged)"
            );
        }
        // Whatever follows the valid records goes: new records must never
        // sit in front of stale bytes that could read as one.
        file.set_len(end as u64)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(&path, "truncating the tail", e))?;
        // Older segments are leftovers of a rewrite that was done.
        for old in segments.iter().filter(|s| **s != seq) {
            let _ = std::fs::remove_file(wal.join(format!("{old}.wal")));
        }
        // Redb's snapshot may be newer than the segment's (a crash between
        // saving it and rewriting the segment): install it the usual way,
        // and rewrite the segment so that it follows it.
        let reconcile = (snap_index, snap_term) != log.snapshot;
        if reconcile {
            if snap_index < log.snapshot.0 {
                return Err(corrupt(format!(
                    "the segment follows snapshot {} but the stored snapshot is {snap_index}",
                    log.snapshot.0
                )));
            }
            log.install(snap_index, snap_term);
        }
        let mut wal_log = WalLog {
            base_len,
            dir: wal,
            snapshots,
            snapshot: log.snapshot,
            entries: log.entries,
            hard_state: log.hard_state,
            file,
            seq,
            end: end as u64,
            allocated: end as u64,
        };
        if reconcile {
            let state = wal_log.state();
            wal_log.rewrite(state)?;
        }
        Ok(wal_log)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.wal", self.seq))
    }

    fn state(&self) -> Log2 {
        Log2 {
            snapshot: self.snapshot,
            entries: self.entries.clone(),
            hard_state: self.hard_state,
        }
    }

    /// Appends one checked batch record, fdatasynced, and applies it.
    fn append_record(&mut self, record: Record) -> Result<(), LogError> {
        let bytes = encode(&record);
        let len = bytes.len() as u64;
        // A base that is itself large (big entries since the snapshot)
        // lets the segment grow further: rolling over must not rewrite it
        // at every append.
        if self.end + len > SEGMENT_BYTES.max(4 * self.base_len) {
            // Roll over: a new segment holding everything, this included.
            let mut state = self.state();
            state.apply(record)?;
            return self.rewrite(state);
        }
        let path = self.path();
        if self.end + len > self.allocated {
            let grow = (self.end + len - self.allocated).max(GROW_BYTES);
            let zeros = vec![0u8; grow as usize];
            self.file
                .write_all_at(&zeros, self.allocated)
                .and_then(|()| self.file.sync_all())
                .map_err(|e| io_err(&path, "preallocating", e))?;
            self.allocated += grow;
        }
        self.file
            .write_all_at(&bytes, self.end)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&path, "appending", e))?;
        self.end += len;
        apply_record(&mut self.entries, &mut self.hard_state, record);
        Ok(())
    }

    /// Makes `state` the log's: a new segment with it as the base, durable
    /// before it replaces the old one.
    fn rewrite(&mut self, state: Log2) -> Result<(), LogError> {
        let record = Record {
            base: true,
            hard_state: Some(state.hard_state),
            snapshot: state.snapshot,
            entries: state.entries.iter().cloned().collect(),
        };
        let seq = self.seq + 1;
        let (file, end, allocated) = write_segment(&self.dir, seq, &record)?;
        let old = self.path();
        self.file = file;
        self.seq = seq;
        self.end = end;
        self.base_len = end;
        self.allocated = allocated;
        self.snapshot = state.snapshot;
        self.entries = state.entries;
        self.hard_state = state.hard_state;
        let _ = std::fs::remove_file(old);
        Ok(())
    }

    fn check(&self, index: u64) -> Result<(), LogError> {
        if index <= self.snapshot.0 {
            return Err(LogError::Compacted {
                index,
                first: self.snapshot.0 + 1,
            });
        }
        let last = self.last();
        if index > last {
            return Err(LogError::Unavailable { index, last });
        }
        Ok(())
    }

    fn last(&self) -> u64 {
        self.entries.back().map_or(self.snapshot.0, |e| e.index)
    }
}

/// Writes segment `seq` in `dir` holding `record` (a base): as a `.tmp`,
/// fsynced, renamed into place, the directory fsynced. Returns the file,
/// the end of the record and the file's length.
fn write_segment(dir: &Path, seq: u64, record: &Record) -> Result<(File, u64, u64), LogError> {
    let tmp = dir.join(format!("{seq}.tmp"));
    let path = dir.join(format!("{seq}.wal"));
    let bytes = encode(record);
    let end = bytes.len() as u64;
    let allocated = end + GROW_BYTES;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, "creating", e))?;
    file.write_all(&bytes)
        .and_then(|()| file.write_all(&vec![0u8; GROW_BYTES as usize]))
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(&tmp, "writing", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, "renaming into place", e))?;
    sync_dir(dir)?;
    Ok((file, end, allocated))
}

/// Applies a checked batch record: its entries replace those from the
/// first one's index on; then its hard state.
fn apply_record(entries: &mut VecDeque<Entry>, hard_state: &mut HardState, r: Record) {
    if let Some(first) = r.entries.first().map(|e| e.index) {
        while entries.back().is_some_and(|e| e.index >= first) {
            entries.pop_back();
        }
        entries.extend(r.entries);
    }
    if let Some(hs) = r.hard_state {
        *hard_state = hs;
    }
}

/// The log's state in memory, as records change it.
#[derive(Debug)]
struct Log2 {
    snapshot: (u64, u64),
    entries: VecDeque<Entry>,
    hard_state: HardState,
}

impl Log2 {
    fn last(&self) -> u64 {
        self.entries.back().map_or(self.snapshot.0, |e| e.index)
    }

    fn term(&self, index: u64) -> Option<u64> {
        if index == self.snapshot.0 {
            return Some(self.snapshot.1);
        }
        let first = self.entries.front()?.index;
        self.entries
            .get(index.checked_sub(first)? as usize)
            .map(|e| e.term)
    }

    /// A batch record: entries (replacing from the first one's index on),
    /// then the hard state.
    fn apply(&mut self, r: Record) -> Result<(), LogError> {
        super::log::check_append(&r.entries, self.snapshot.0, self.last())?;
        apply_record(&mut self.entries, &mut self.hard_state, r);
        Ok(())
    }

    /// A snapshot at (index, term): the entries after it stay if the log
    /// agrees with it there, else the log is reset to it.
    fn install(&mut self, index: u64, term: u64) {
        if self.term(index) == Some(term) {
            while self.entries.front().is_some_and(|e| e.index <= index) {
                self.entries.pop_front();
            }
        } else {
            self.entries.clear();
        }
        self.snapshot = (index, term);
    }
}

impl Log for WalLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        self.write_batch(LogBatch {
            entries: entries.to_vec(),
            ..LogBatch::default()
        })
    }

    fn entries(&self, lo: u64, hi: u64) -> Result<Vec<Entry>, LogError> {
        if lo >= hi {
            return Ok(Vec::new());
        }
        self.check(lo)?;
        self.check(hi - 1)?;
        let first = self.snapshot.0 + 1;
        Ok(self
            .entries
            .range((lo - first) as usize..(hi - first) as usize)
            .cloned()
            .collect())
    }

    fn first_index(&self) -> Result<u64, LogError> {
        Ok(self.snapshot.0 + 1)
    }

    fn last_index(&self) -> Result<u64, LogError> {
        Ok(self.last())
    }

    fn term(&self, index: u64) -> Result<u64, LogError> {
        if index == self.snapshot.0 {
            return Ok(self.snapshot.1);
        }
        self.check(index)?;
        Ok(self.entries[(index - self.snapshot.0 - 1) as usize].term)
    }

    fn truncate_suffix(&mut self, from: u64) -> Result<(), LogError> {
        let mut state = self.state();
        while state.entries.back().is_some_and(|e| e.index >= from) {
            state.entries.pop_back();
        }
        self.rewrite(state)
    }

    fn save_snapshot(&mut self, snapshot: SnapshotRecord) -> Result<(), LogError> {
        self.write_batch(LogBatch {
            snapshot: Some(snapshot),
            ..LogBatch::default()
        })
    }

    fn snapshot(&self) -> Result<Option<SnapshotRecord>, LogError> {
        self.snapshots.snapshot()
    }

    fn compact(&mut self, upto: u64) -> Result<(), LogError> {
        self.write_batch(LogBatch {
            compact_to: Some(upto),
            ..LogBatch::default()
        })
    }

    fn hard_state(&self) -> Result<HardState, LogError> {
        Ok(self.hard_state)
    }

    fn set_hard_state(&mut self, state: HardState) -> Result<(), LogError> {
        self.write_batch(LogBatch {
            hard_state: Some(state),
            ..LogBatch::default()
        })
    }

    /// Entries and hard state alone: one appended record, one
    /// `fdatasync`. With a snapshot or a compaction: the snapshot into
    /// redb (its own fsync), then the segment rewritten.
    fn write_batch(&mut self, batch: LogBatch) -> Result<(), LogError> {
        if batch.is_empty() {
            return Ok(());
        }
        let record = Record {
            base: false,
            hard_state: batch.hard_state,
            snapshot: (0, 0),
            entries: batch.entries,
        };
        if batch.snapshot.is_none() && batch.compact_to.is_none() {
            // Checked before writing: a refused append changes nothing.
            super::log::check_append(&record.entries, self.snapshot.0, self.last())?;
            return self.append_record(record);
        }
        let mut state = self.state();
        if let Some(s) = &batch.snapshot {
            if s.index < self.snapshot.0 {
                return Err(LogError::StaleSnapshot {
                    index: s.index,
                    stored: self.snapshot.0,
                });
            }
            state.install(s.index, s.term);
        }
        state.apply(record)?;
        // Entries up to the snapshot are already gone with it.
        if let Some(upto) = batch.compact_to
            && upto > state.snapshot.0
        {
            return Err(LogError::CompactPastSnapshot {
                index: upto,
                snapshot: state.snapshot.0,
            });
        }
        if let Some(s) = batch.snapshot {
            let index = s.index;
            self.snapshots.write_batch(LogBatch {
                snapshot: Some(s),
                compact_to: Some(index),
                ..LogBatch::default()
            })?;
        }
        self.rewrite(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("command {index}").into_bytes(),
            kind: EntryKind::Normal,
            context: vec![index as u8; 3],
        }
    }

    fn hs(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote: 1,
            commit,
        }
    }

    /// Hard state, entries, first index.
    type State = (HardState, Vec<Entry>, u64);

    fn state(log: &WalLog) -> State {
        let first = log.first_index().unwrap();
        let last = log.last_index().unwrap();
        (
            log.hard_state().unwrap(),
            log.entries(first, last + 1).unwrap(),
            first,
        )
    }

    fn segment(dir: &Path) -> PathBuf {
        let wal = dir.join(WAL_DIR);
        let mut names: Vec<_> = std::fs::read_dir(&wal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        assert_eq!(names.len(), 1, "one live segment: {names:?}");
        names.pop().unwrap()
    }

    /// Writes three batches after the base; returns each state after every
    /// record and the segment's bytes up to each record's end.
    fn three_batches(dir: &Path) -> Vec<(usize, State)> {
        let mut log = WalLog::open(dir).unwrap();
        let mut ends = Vec::new();
        let end = |log: &WalLog| log.end as usize;
        ends.push((end(&log), state(&log)));
        log.write_batch(LogBatch {
            entries: vec![entry(1, 1), entry(2, 1)],
            hard_state: Some(hs(1, 0)),
            ..LogBatch::default()
        })
        .unwrap();
        ends.push((end(&log), state(&log)));
        log.write_batch(LogBatch {
            entries: vec![entry(3, 1)],
            hard_state: Some(hs(1, 2)),
            ..LogBatch::default()
        })
        .unwrap();
        ends.push((end(&log), state(&log)));
        // A new leader overwrites index 3.
        log.write_batch(LogBatch {
            entries: vec![entry(3, 2), entry(4, 2)],
            hard_state: Some(hs(2, 3)),
            ..LogBatch::default()
        })
        .unwrap();
        ends.push((end(&log), state(&log)));
        ends
    }

    #[test]
    fn batches_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ends = three_batches(dir.path());
        let log = WalLog::open(dir.path()).unwrap();
        assert_eq!(state(&log), ends.last().unwrap().1);
        assert_eq!(log.term(3).unwrap(), 2);
        assert_eq!(log.last_index().unwrap(), 4);
    }

    /// A crash can leave any prefix of the last record: reopening at every
    /// cut keeps exactly the records that were whole, and the log takes
    /// (and keeps) new records after it.
    #[test]
    fn a_torn_tail_at_every_offset_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ends = three_batches(dir.path());
        let path = segment(dir.path());
        let full = std::fs::read(&path).unwrap();
        let total = ends.last().unwrap().0;
        for cut in ends[0].0..=total {
            std::fs::write(&path, &full[..cut]).unwrap();
            let mut log = WalLog::open(dir.path()).unwrap();
            let want = &ends.iter().rev().find(|(end, _)| *end <= cut).unwrap().1;
            assert_eq!(&state(&log), want, "cut at {cut}");
            let next = log.last_index().unwrap() + 1;
            log.write_batch(LogBatch {
                entries: vec![entry(next, 3)],
                hard_state: Some(hs(3, 0)),
                ..LogBatch::default()
            })
            .unwrap();
            drop(log);
            let log = WalLog::open(dir.path()).unwrap();
            assert_eq!(log.last_index().unwrap(), next, "cut at {cut}");
            assert_eq!(log.hard_state().unwrap(), hs(3, 0), "cut at {cut}");
        }
    }

    /// A garbled byte anywhere in the last record drops that record (its
    /// CRC fails), never more, never a wrong entry.
    #[test]
    fn a_garbled_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ends = three_batches(dir.path());
        let path = segment(dir.path());
        let full = std::fs::read(&path).unwrap();
        let (last_start, total) = (ends[ends.len() - 2].0, ends.last().unwrap().0);
        for at in last_start..total {
            let mut bytes = full.clone();
            bytes[at] ^= 0x5a;
            std::fs::write(&path, &bytes).unwrap();
            let log = WalLog::open(dir.path()).unwrap();
            assert_eq!(state(&log), ends[ends.len() - 2].1, "garbled at {at}");
        }
    }

    /// A garbled record with whole records after it is not a torn tail:
    /// opening refuses instead of dropping acknowledged writes.
    #[test]
    fn a_garbled_record_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ends = three_batches(dir.path());
        let path = segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        // A payload byte of the first batch record (two follow it).
        bytes[ends[0].0 + HEADER + 2] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        let err = WalLog::open(dir.path()).unwrap_err();
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_garbled_base_is_an_error_not_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        three_batches(dir.path());
        let path = segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 1] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = WalLog::open(dir.path()).unwrap_err();
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    }

    fn snapshot(index: u64, term: u64) -> SnapshotRecord {
        SnapshotRecord {
            index,
            term,
            data: b"state".to_vec(),
            membership: Default::default(),
        }
    }

    #[test]
    fn a_snapshot_compacts_into_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        three_batches(dir.path());
        let mut log = WalLog::open(dir.path()).unwrap();
        let before = segment(dir.path());
        log.write_batch(LogBatch {
            snapshot: Some(snapshot(3, 2)),
            hard_state: Some(hs(2, 4)),
            compact_to: Some(3),
            ..LogBatch::default()
        })
        .unwrap();
        assert_ne!(segment(dir.path()), before);
        drop(log);
        let log = WalLog::open(dir.path()).unwrap();
        assert_eq!(log.first_index().unwrap(), 4);
        assert_eq!(log.term(3).unwrap(), 2);
        assert_eq!(state(&log).1, vec![entry(4, 2)]);
        assert_eq!(log.snapshot().unwrap().unwrap().index, 3);
        // A leader's snapshot the log does not agree with resets it.
        let mut log = log;
        log.write_batch(LogBatch {
            snapshot: Some(snapshot(6, 5)),
            ..LogBatch::default()
        })
        .unwrap();
        drop(log);
        let log = WalLog::open(dir.path()).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (7, 6)
        );
    }

    /// A crash after redb took a snapshot but before the segment was
    /// rewritten: opening installs the snapshot over the old segment.
    #[test]
    fn a_crash_between_snapshot_and_rewrite_is_reconciled() {
        let dir = tempfile::tempdir().unwrap();
        three_batches(dir.path());
        {
            let mut redb = RedbLog::open(dir.path().join(super::super::LOG_FILE)).unwrap();
            redb.write_batch(LogBatch {
                snapshot: Some(snapshot(3, 2)),
                compact_to: Some(3),
                ..LogBatch::default()
            })
            .unwrap();
        }
        let log = WalLog::open(dir.path()).unwrap();
        assert_eq!(log.first_index().unwrap(), 4);
        assert_eq!(state(&log).1, vec![entry(4, 2)]);
        assert_eq!(log.hard_state().unwrap(), hs(2, 3));
        drop(log);
        let log = WalLog::open(dir.path()).unwrap();
        assert_eq!(state(&log).1, vec![entry(4, 2)]);
    }

    /// A data directory from before the WAL keeps its entries.
    #[test]
    fn a_redb_log_is_imported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut redb = RedbLog::open(dir.path().join(super::super::LOG_FILE)).unwrap();
            redb.write_batch(LogBatch {
                entries: vec![entry(1, 1), entry(2, 1)],
                hard_state: Some(hs(1, 2)),
                ..LogBatch::default()
            })
            .unwrap();
        }
        let log = WalLog::open(dir.path()).unwrap();
        assert_eq!(state(&log), (hs(1, 2), vec![entry(1, 1), entry(2, 1)], 1));
    }

    #[test]
    fn a_refused_append_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        three_batches(dir.path());
        let mut log = WalLog::open(dir.path()).unwrap();
        let err = log.append(&[entry(9, 2)]).unwrap_err();
        assert!(matches!(err, LogError::Gap { .. }), "{err}");
        drop(log);
        assert_eq!(WalLog::open(dir.path()).unwrap().last_index().unwrap(), 4);
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
