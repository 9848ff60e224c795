//! Container logs in Docker's `json-file` format, rotated by size.
//!
//! Each line a container writes becomes one JSON object on one line of
//! `<container dir>/container.log`:
//! `{"log":"hello\n","stream":"stdout","time":"2026-11-22T14:41:01.123456789Z"}`
//! (times in UTC with nine fraction digits, which is valid RFC 3339). A line
//! longer than [`MAX_LINE`] is cut into several records, the first ones
//! without the trailing newline, as Docker does with its 16 KiB buffer.
//!
//! Rotation: before a record would make the file exceed `max_size`, the
//! file is renamed `container.log.1` (older ones shift to `.2`, …) and a new
//! one started; at most `max_files` files are kept. Defaults: 10 MiB × 3.
//!
//! The writer ([`LogWriter`]) runs in the shim and so allocates little: one
//! bounded partial-line buffer per stream. The reader ([`read_logs`]) serves
//! `logs`, `--tail`, `--follow` (across rotations) and stream filtering.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The log file's name inside the container directory.
pub const LOG_FILE: &str = "container.log";

/// The longest piece of a line stored in one record (Docker's buffer size).
pub const MAX_LINE: usize = 16 * 1024;

/// How often `--follow` looks for new records once it reached the end.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of the log writer and reader.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A log file could not be opened, written, read or rotated.
    #[error("log {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The reader's consumer failed (e.g. a closed stdout).
    #[error("writing logs out: {0}")]
    Sink(#[source] std::io::Error),
}

/// Size-based rotation of a container's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// Rotate before the file grows past this many bytes.
    pub max_size: u64,
    /// Keep this many files, the live one included (at least 1).
    pub max_files: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_size: 10 << 20,
            max_files: 3,
        }
    }
}

/// Which output of the container a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The text, with its trailing newline unless it is a cut-off piece.
    pub log: String,
    /// The stream it was written to.
    pub stream: Stream,
    /// When the shim read it, RFC 3339 in UTC with nanoseconds.
    pub time: String,
}

/// Appends a container's output to its log file, rotating it.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
    config: LogConfig,
    partial: [Vec<u8>; 2],
}

impl LogWriter {
    /// Opens (appending to) `path`.
    pub fn open(path: impl Into<PathBuf>, config: LogConfig) -> Result<LogWriter, LogError> {
        let path = path.into();
        let file = open_append(&path)?;
        let size = file
            .metadata()
            .map_err(|source| LogError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        Ok(LogWriter {
            path,
            file,
            size,
            config,
            partial: [Vec::new(), Vec::new()],
        })
    }

    /// Records `data` read from `stream`: every complete line becomes a
    /// record, the rest waits for more (at most [`MAX_LINE`] bytes).
    pub fn write(&mut self, stream: Stream, mut data: &[u8]) -> Result<(), LogError> {
        let index = stream as usize;
        while !data.is_empty() {
            let room = MAX_LINE - self.partial[index].len();
            match data.iter().take(room).position(|b| *b == b'\n') {
                Some(newline) => {
                    let mut line = std::mem::take(&mut self.partial[index]);
                    line.extend_from_slice(&data[..=newline]);
                    data = &data[newline + 1..];
                    self.record(stream, &line)?;
                }
                None if data.len() >= room => {
                    let mut line = std::mem::take(&mut self.partial[index]);
                    line.extend_from_slice(&data[..room]);
                    data = &data[room..];
                    self.record(stream, &line)?;
                }
                None => {
                    self.partial[index].extend_from_slice(data);
                    data = &[];
                }
            }
        }
        Ok(())
    }

    /// Records what is left of unfinished lines (at the end of a stream).
    pub fn flush_partial(&mut self, stream: Stream) -> Result<(), LogError> {
        let line = std::mem::take(&mut self.partial[stream as usize]);
        if !line.is_empty() {
            self.record(stream, &line)?;
        }
        Ok(())
    }

    fn record(&mut self, stream: Stream, line: &[u8]) -> Result<(), LogError> {
        let entry = LogEntry {
            log: String::from_utf8_lossy(line).into_owned(),
            stream,
            time: rfc3339_nano(SystemTime::now()),
        };
        let mut bytes = serde_json::to_vec(&entry).map_err(|e| LogError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        bytes.push(b'\n');
        if self.size > 0 && self.size + bytes.len() as u64 > self.config.max_size {
            self.rotate()?;
        }
        self.file.write_all(&bytes).map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LogError::Io { path, source }
        };
        let keep = self.config.max_files.max(1);
        if keep == 1 {
            self.file.set_len(0).map_err(io(&self.path))?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..keep).rev() {
            let from = rotated_path(&self.path, n - 1);
            let to = rotated_path(&self.path, n);
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&from)(e)),
            }
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// `container.log` for 0, `container.log.N` for N.
fn rotated_path(path: &Path, n: u32) -> PathBuf {
    if n == 0 {
        path.to_path_buf()
    } else {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }
}

/// Formats a time as RFC 3339 in UTC with nanoseconds.
pub fn rfc3339_nano(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// well-known algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// What [`read_logs`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep reading as the container writes, until `still_running` says no.
    pub follow: bool,
    /// Only the last N records (after stream filtering).
    pub tail: Option<usize>,
    /// Include stdout records.
    pub stdout: bool,
    /// Include stderr records.
    pub stderr: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            follow: false,
            tail: None,
            stdout: true,
            stderr: true,
        }
    }
}

impl LogOptions {
    fn wants(&self, entry: &LogEntry) -> bool {
        match entry.stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        }
    }
}

/// Reads the log at `path` (and its rotated files), oldest first, handing
/// each record to `sink`. With `follow`, keeps going across rotations until
/// `still_running` returns false, then drains what is left.
pub fn read_logs(
    path: &Path,
    options: &LogOptions,
    still_running: &mut dyn FnMut() -> bool,
    sink: &mut dyn FnMut(&LogEntry) -> std::io::Result<()>,
) -> Result<(), LogError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| LogError::Io { path: p, source }
    };
    // Open the live file first: a rotation while we read the old ones then
    // shows up as an inode change instead of a gap.
    let mut live = match File::open(path) {
        Ok(f) => Some(BufReader::new(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(path)(e)),
    };
    let mut backlog: VecDeque<LogEntry> = VecDeque::new();
    let push = |entry: LogEntry, backlog: &mut VecDeque<LogEntry>| {
        if options.wants(&entry) {
            backlog.push_back(entry);
            if let Some(tail) = options.tail
                && backlog.len() > tail
            {
                backlog.pop_front();
            }
        }
    };
    // Rotated files, oldest first; a bounded scan since max_files is small.
    let mut rotated = Vec::new();
    for n in 1..1000 {
        let p = rotated_path(path, n);
        if !p.exists() {
            break;
        }
        rotated.push(p);
    }
    for p in rotated.iter().rev() {
        let file = match File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(p)(e)),
        };
        let mut reader = BufReader::new(file);
        let mut pending = Vec::new();
        while let Some(entry) = next_entry(&mut reader, &mut pending).map_err(io(p))? {
            push(entry, &mut backlog);
        }
    }
    let mut pending = Vec::new();
    if let Some(reader) = live.as_mut() {
        while let Some(entry) = next_entry(reader, &mut pending).map_err(io(path))? {
            push(entry, &mut backlog);
        }
    }
    for entry in backlog.drain(..) {
        sink(&entry).map_err(LogError::Sink)?;
    }
    if !options.follow {
        return Ok(());
    }
    // Follow: read new records; at the end, switch to a new file if the
    // path now names another one, else wait a little.
    let mut last_round = false;
    loop {
        if let Some(reader) = live.as_mut() {
            while let Some(entry) = next_entry(reader, &mut pending).map_err(io(path))? {
                if options.wants(&entry) {
                    sink(&entry).map_err(LogError::Sink)?;
                }
            }
        }
        let current_ino = std::fs::metadata(path).ok().map(|m| m.ino());
        let open_ino = match live.as_ref() {
            Some(r) => Some(r.get_ref().metadata().map_err(io(path))?.ino()),
            None => None,
        };
        if current_ino.is_some() && current_ino != open_ino {
            // Rotated: finish the old file, then any file rotated after it
            // (several rotations may happen between two looks), then the
            // new live file.
            if let Some(reader) = live.as_mut() {
                while let Some(entry) = next_entry(reader, &mut pending).map_err(io(path))? {
                    if options.wants(&entry) {
                        sink(&entry).map_err(LogError::Sink)?;
                    }
                }
            }
            pending.clear();
            let mut newer = Vec::new();
            for n in 1..1000 {
                let p = rotated_path(path, n);
                match std::fs::metadata(&p) {
                    Ok(m) if Some(m.ino()) == open_ino => break,
                    Ok(_) => newer.push(p),
                    Err(_) => {
                        // The old file is gone: nothing after it can be trusted.
                        newer.clear();
                        break;
                    }
                }
            }
            for p in newer.iter().rev() {
                let Ok(file) = File::open(p) else { continue };
                let mut reader = BufReader::new(file);
                let mut partial = Vec::new();
                while let Some(entry) = next_entry(&mut reader, &mut partial).map_err(io(p))? {
                    if options.wants(&entry) {
                        sink(&entry).map_err(LogError::Sink)?;
                    }
                }
            }
            match File::open(path) {
                Ok(f) => {
                    live = Some(BufReader::new(f));
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(path)(e)),
            }
        }
        if last_round {
            return Ok(());
        }
        if !still_running() {
            // One more pass: what the shim wrote just before exiting.
            last_round = true;
            continue;
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

/// The next complete record, `None` at the (current) end. An incomplete
/// last line stays in `pending` until the rest is written.
fn next_entry(
    reader: &mut BufReader<File>,
    pending: &mut Vec<u8>,
) -> std::io::Result<Option<LogEntry>> {
    loop {
        let n = reader.read_until(b'\n', pending)?;
        if n == 0 || pending.last() != Some(&b'\n') {
            return Ok(None);
        }
        let line = std::mem::take(pending);
        // A line that is not a record (a torn write after a crash) is skipped.
        if let Ok(entry) = serde_json::from_slice::<LogEntry>(&line) {
            return Ok(Some(entry));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(path: &Path, options: &LogOptions) -> Vec<LogEntry> {
        let mut out = Vec::new();
        read_logs(path, options, &mut || false, &mut |e| {
            out.push(e.clone());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn time_format_is_rfc3339_nano() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339_nano(t), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(rfc3339_nano(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(rfc3339_nano(leap).starts_with("2000-02-29T00:00:00"));
    }

    #[test]
    fn lines_become_json_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut w = LogWriter::open(&path, LogConfig::default()).unwrap();
        w.write(Stream::Stdout, b"hel").unwrap();
        w.write(Stream::Stderr, b"oops\n").unwrap();
        w.write(Stream::Stdout, b"lo\nwor").unwrap();
        w.write(Stream::Stdout, b"ld \"q\"\n").unwrap();
        w.write(Stream::Stdout, b"no newline").unwrap();
        w.flush_partial(Stream::Stdout).unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(raw.lines().next().unwrap()).unwrap();
        assert_eq!(first["log"], "oops\n");
        assert_eq!(first["stream"], "stderr");
        assert!(first["time"].as_str().unwrap().ends_with('Z'));
        let all = collect(&path, &LogOptions::default());
        let logs: Vec<_> = all.iter().map(|e| e.log.as_str()).collect();
        assert_eq!(logs, ["oops\n", "hello\n", "world \"q\"\n", "no newline"]);
        let stdout_only = LogOptions {
            stderr: false,
            tail: Some(2),
            ..Default::default()
        };
        let logs: Vec<_> = collect(&path, &stdout_only)
            .into_iter()
            .map(|e| e.log)
            .collect();
        assert_eq!(logs, ["world \"q\"\n", "no newline"]);
    }

    #[test]
    fn long_lines_are_cut_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut w = LogWriter::open(&path, LogConfig::default()).unwrap();
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        w.write(Stream::Stdout, &long).unwrap();
        w.write(Stream::Stdout, b"\n").unwrap();
        let all = collect(&path, &LogOptions::default());
        let lens: Vec<_> = all.iter().map(|e| e.log.len()).collect();
        assert_eq!(lens, [MAX_LINE, MAX_LINE, 11]);
    }

    #[test]
    fn rotation_keeps_max_files_and_reads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let config = LogConfig {
            max_size: 400,
            max_files: 3,
        };
        let mut w = LogWriter::open(&path, config).unwrap();
        for i in 0..100 {
            w.write(Stream::Stdout, format!("line {i}\n").as_bytes())
                .unwrap();
        }
        for n in 0..3 {
            let size = std::fs::metadata(rotated_path(&path, n)).unwrap().len();
            assert!(size <= 400, "file {n} has {size} bytes");
        }
        assert!(!rotated_path(&path, 3).exists());
        let all = collect(&path, &LogOptions::default());
        let numbers: Vec<usize> = all
            .iter()
            .map(|e| e.log.trim()["line ".len()..].parse().unwrap())
            .collect();
        assert_eq!(*numbers.last().unwrap(), 99);
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert!(numbers.len() < 100);
    }

    #[test]
    fn follow_crosses_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        // Small files, so the 31 lines rotate about eight times; enough of
        // them kept that a follower starved by a loaded machine cannot fall
        // behind the oldest file (lines rotated away are lost by design, as
        // in Docker's json-file driver, and would make this test flaky).
        let config = LogConfig {
            max_size: 300,
            max_files: 100,
        };
        let mut w = LogWriter::open(&path, config).unwrap();
        w.write(Stream::Stdout, b"first\n").unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..30 {
                w.write(Stream::Stdout, format!("line {i}\n").as_bytes())
                    .unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let mut seen = Vec::new();
        let mut polls = 0;
        let follow = LogOptions {
            follow: true,
            ..Default::default()
        };
        read_logs(
            &path,
            &follow,
            &mut || {
                polls += 1;
                !writer.is_finished() && polls < 400
            },
            &mut |e| {
                seen.push(e.log.clone());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen.first().map(String::as_str), Some("first\n"));
        assert_eq!(seen.last().map(String::as_str), Some("line 29\n"));
        assert_eq!(seen.len(), 31, "{seen:?}");
    }
}
