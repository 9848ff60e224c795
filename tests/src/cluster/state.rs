//! The dev cluster's record on disk, so that separate CLI invocations (`up`,
//! then `kill n2`, then `down`) act on the same hosts and processes: the
//! state file `/run/gantry/dev/<name>/cluster.json`, the lock that serializes
//! them, and the CLI context file that points `gantry` at the cluster.
//!
//! State lives under `/run` on purpose: after a reboot the namespaces and
//! processes it describes are gone, and so is the record.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::net::Subnet;
use super::process::ProcessId;

/// Errors of reading and writing the cluster's files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or directory could not be read, written or removed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing, e.g. `write`.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io {
        action,
        path,
        source,
    }
}

/// A host's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs `gantry controller`.
    Controller,
    /// Runs `gantry agent`.
    Agent,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Controller => "controller",
            Role::Agent => "agent",
        })
    }
}

/// One host as recorded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostRecord {
    /// `c1`, `n1`, …
    pub name: String,
    /// Controller or agent.
    pub role: Role,
    /// Its address on the cluster bridge.
    pub address: Ipv4Addr,
    /// Its named network namespace.
    pub netns: String,
    /// The root-side veth.
    pub veth: String,
    /// Its data directory (`<base>/<host>`).
    pub data_dir: PathBuf,
    /// Where its process writes stdout and stderr.
    pub log: PathBuf,
    /// The command it runs, kept so `start` after `kill` runs the same one.
    pub argv: Vec<String>,
    /// Extra environment for that command.
    pub env: Vec<(String, String)>,
    /// The process, once started; `None` before the first start.
    pub process: Option<ProcessId>,
}

/// The whole cluster as recorded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterRecord {
    /// The cluster's name.
    pub name: String,
    /// Its subnet.
    pub subnet: Subnet,
    /// The root bridge (`gtd-<name>`).
    pub bridge: String,
    /// Where hosts keep their data.
    pub base_dir: PathBuf,
    /// The `gantry` binary the cluster runs and its CLI calls use.
    pub gantry_binary: PathBuf,
    /// The CLI context file this cluster wrote, if any.
    pub context_file: Option<PathBuf>,
    /// Controllers then agents.
    pub hosts: Vec<HostRecord>,
}

impl ClusterRecord {
    /// The first controller's API address, `addr:7070`.
    pub fn controller_endpoint(&self) -> Option<String> {
        self.hosts
            .iter()
            .find(|h| h.role == Role::Controller)
            .map(|h| format!("{}:{}", h.address, super::CONTROLLER_PORT))
    }
}

/// Reads a state file; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<ClusterRecord>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so
/// a reader sees the old or the new file, never half of one.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

/// The CLI context file's content.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Context {
    /// `host:port` of the first controller (what CLIs before replicated
    /// controllers read).
    pub controller: String,
    /// Every controller's `host:port`, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// Who wrote it, e.g. `dev cluster gantry`.
    pub source: String,
}

/// The context's `source` for a dev cluster.
pub fn context_source(name: &str) -> String {
    format!("dev cluster {name}")
}

/// Removes the context file if (and only if) `source` wrote it: a context
/// written since by `gantry up` or another cluster is left alone.
pub fn remove_context(path: &Path, source: &str) -> Result<(), StateError> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(());
    };
    match serde_json::from_slice::<Context>(&bytes) {
        Ok(ctx) if ctx.source == source => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", path)(e)),
        },
        _ => Ok(()),
    }
}

/// An exclusive `flock` held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Takes an exclusive lock on `path` (created if missing), waiting for
/// another holder to finish. Used to serialize CLI invocations on one cluster
/// and subnet choices between clusters.
pub fn lock(path: &Path) -> Result<Lock, StateError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io("open", path))?;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(Lock { _file: file });
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(io("lock", path)(err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_removed_only_by_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("context.json");
        let ctx = Context {
            controllers: Vec::new(),
            controller: "10.251.0.2:7070".into(),
            source: context_source("a"),
        };
        write_json(&path, &ctx).unwrap();
        remove_context(&path, &context_source("b")).unwrap();
        assert!(path.exists(), "another cluster's down keeps it");
        remove_context(&path, &context_source("a")).unwrap();
        assert!(!path.exists());
        remove_context(&path, &context_source("a")).unwrap();
    }

    #[test]
    fn a_missing_state_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&dir.path().join("cluster.json")).unwrap().is_none());
    }
}
