//! What the runtime remembers about a container between commands.
//!
//! `<root>/<id>/state.json` holds a [`Record`], written atomically (a temp
//! file, then rename). The status is never stored: it is derived each time from the
//! init process (alive, and the same process: its start time matches) and
//! the `exec.fifo` (present until `start`), so a crash can never leave a
//! stale status behind.

use oci_spec::runtime::{ContainerState, Hook};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The state file's name inside a container's directory.
pub const STATE_FILE: &str = "state.json";

/// The fifo the init blocks on until `start`.
pub const EXEC_FIFO: &str = "exec.fifo";

/// The temporary file [`save`] writes before it renames it to [`STATE_FILE`].
pub const TEMP_FILE: &str = ".state.json.tmp";

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not what this runtime writes.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One container, as stored.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The container id.
    pub id: String,
    /// The init's pid (host pid namespace).
    pub pid: i32,
    /// The init's start time in clock ticks since boot (field 22 of
    /// `/proc/PID/stat`), which tells a reused pid apart.
    pub start_time: u64,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The config's annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The cgroup, relative to the cgroup mount root.
    pub cgroup_path: PathBuf,
    /// When the container was created (seconds since the epoch).
    pub created: u64,
    /// The poststop hooks, kept so `delete` works even if the bundle is gone.
    #[serde(default)]
    pub poststop: Vec<Hook>,
    /// The poststart hooks, run by `start`.
    #[serde(default)]
    pub poststart: Vec<Hook>,
}

/// Writes `record` to `dir/state.json` atomically.
pub fn save(dir: &Path, record: &Record) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(TEMP_FILE);
    let data = serde_json::to_vec(record).map_err(|e| StateError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, data).map_err(|source| StateError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| StateError::Io { path, source })
}

/// Reads `dir/state.json`; `Ok(None)` when there is no such container.
pub fn load(dir: &Path) -> Result<Option<Record>, StateError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io { path, source }),
    }
}

/// A process's start time and whether it is a zombie, from `/proc/PID/stat`;
/// `None` when there is no such process.
pub fn proc_start_time(pid: i32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`: (start time, zombie). The command name may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<(u64, bool)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    let state = fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, *state == "Z" || *state == "X"))
}

/// Whether the record's init is still the same live process.
pub fn init_alive(record: &Record) -> bool {
    matches!(proc_start_time(record.pid), Some((start, false)) if start == record.start_time)
}

/// The container's status now.
pub fn status(dir: &Path, record: &Record) -> ContainerState {
    if !init_alive(record) {
        ContainerState::Stopped
    } else if dir.join(EXEC_FIFO).exists() {
        ContainerState::Created
    } else {
        ContainerState::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "4242 (we ird) name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(line), Some((987654, false)));
        let zombie = "7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert_eq!(parse_stat(zombie), Some((55, true)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn our_own_process_is_alive() {
        let pid = std::process::id() as i32;
        let (start, zombie) = proc_start_time(pid).unwrap();
        assert!(!zombie);
        let record = Record {
            id: "x".into(),
            pid,
            start_time: start,
            bundle: "/b".into(),
            annotations: HashMap::new(),
            cgroup_path: "gantry/x".into(),
            created: 0,
            poststop: vec![],
            poststart: vec![],
        };
        assert!(init_alive(&record));
        let reused = Record {
            start_time: start + 1,
            ..record
        };
        assert!(!init_alive(&reused));
    }

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let record = Record {
            id: "c".into(),
            pid: 1,
            start_time: 2,
            bundle: "/b".into(),
            annotations: HashMap::from([("k".into(), "v".into())]),
            cgroup_path: "gantry/c".into(),
            created: 3,
            poststop: vec![],
            poststart: vec![],
        };
        save(dir.path(), &record).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        assert_eq!(back.annotations["k"], "v");
        assert_eq!(back.start_time, 2);
    }
}
