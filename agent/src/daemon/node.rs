//! What this node tells the controller about itself: its id (made once and
//! kept), hostname, resources and platform.

use crate::paths::DataDir;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Errors of the node description.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kept node id is not a valid id.
    #[error("{path}: invalid node id {value:?}: must be non-empty without whitespace")]
    InvalidId {
        /// The file.
        path: PathBuf,
        /// What it holds.
        value: String,
    },
    /// `/proc/meminfo` has no `MemTotal` line.
    #[error("/proc/meminfo: no MemTotal line")]
    NoMemTotal,
    /// The CPU affinity mask could not be read.
    #[error("sched_getaffinity: {0}")]
    Affinity(#[source] nix::Error),
    /// An override is out of range.
    #[error("invalid --{flag} {value}: {reason}")]
    InvalidOverride {
        /// `cpus` or `memory`.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
}

/// CPU and memory a node offers to tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeResources {
    /// Billionths of a CPU (Docker's NanoCPUs).
    pub nano_cpus: u64,
    /// Bytes.
    pub memory_bytes: u64,
}

/// What the operator says the node offers, instead of what it detects
/// (`gantry agent --cpus N --memory BYTES`): useful to carve several agents
/// out of one machine, as the dev cluster does.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResourceOverride {
    /// CPUs (fractions allowed).
    pub cpus: Option<f64>,
    /// Bytes.
    pub memory_bytes: Option<u64>,
}

/// The node id file under the data directory.
pub fn node_id_path(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join("agent").join("node-id")
}

/// The node's id: read from `<data_dir>/agent/node-id`, or made (128 random
/// bits, hex) and kept there on first use. Written to a temporary file and
/// renamed, so that a crash never leaves a half-written id that would make
/// the node join again as a different one.
pub fn load_or_create_node_id(data_dir: &DataDir) -> Result<String, NodeError> {
    let path = node_id_path(data_dir);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| NodeError::Io { path: p, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_string();
            if id.is_empty() || id.chars().any(char::is_whitespace) {
                return Err(NodeError::InvalidId { path, value: text });
            }
            return Ok(id);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    let dir = path.parent().unwrap_or(data_dir.root()).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let urandom = Path::new("/dev/urandom");
    let mut bytes = [0u8; 16];
    File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io(urandom))?;
    let id = hex::encode(bytes);
    let tmp = dir.join("node-id.tmp");
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(format!("{id}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // The rename is durable only once the directory is synced.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir))?;
    Ok(id)
}

/// The host's name (the kernel's nodename).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// What the node offers: the CPUs this process may run on (its affinity
/// mask, so a `taskset` or cpuset-limited agent advertises what it really
/// has) and `MemTotal`, nothing held back for the system (Swarm does the
/// same); each replaced by `overrides` where given.
pub fn resources(overrides: &ResourceOverride) -> Result<NodeResources, NodeError> {
    let nano_cpus = match overrides.cpus {
        Some(cpus) => cpus_to_nano(cpus)?,
        None => affinity_cpus()? * 1_000_000_000,
    };
    let memory_bytes = match overrides.memory_bytes {
        Some(0) => {
            return Err(NodeError::InvalidOverride {
                flag: "memory",
                value: "0".into(),
                reason: "must be more than 0".into(),
            });
        }
        Some(bytes) => bytes,
        None => {
            let path = Path::new("/proc/meminfo");
            let text = std::fs::read_to_string(path).map_err(|source| NodeError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            mem_total(&text).ok_or(NodeError::NoMemTotal)?
        }
    };
    Ok(NodeResources {
        nano_cpus,
        memory_bytes,
    })
}

/// `--cpus` as nano CPUs.
pub fn cpus_to_nano(cpus: f64) -> Result<u64, NodeError> {
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 1e6 {
        return Err(NodeError::InvalidOverride {
            flag: "cpus",
            value: cpus.to_string(),
            reason: "must be a number of CPUs more than 0".into(),
        });
    }
    Ok((cpus * 1e9).round() as u64)
}

/// The number of CPUs in this process's affinity mask.
fn affinity_cpus() -> Result<u64, NodeError> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map_err(NodeError::Affinity)?;
    let count = (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .count() as u64;
    Ok(count.max(1))
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let mut words = rest.split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") | None => value.checked_mul(1024),
            _ => None,
        }
    })
}

/// The node's platform, OCI names (`linux`, `amd64`).
pub fn platform() -> (String, String) {
    let p = crate::image::manifest::host_platform();
    (p.os, p.architecture)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let first = load_or_create_node_id(&data).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(load_or_create_node_id(&data).unwrap(), first);
        assert!(!dir.path().join("agent/node-id.tmp").exists());
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            load_or_create_node_id(&DataDir::new(other.path())).unwrap(),
            first
        );
    }

    #[test]
    fn a_corrupt_node_id_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join("agent")).unwrap();
        std::fs::write(node_id_path(&data), "two words\n").unwrap();
        let err = load_or_create_node_id(&data).unwrap_err().to_string();
        assert!(err.contains("agent/node-id"), "{err}");
    }

    #[test]
    fn mem_total_reads_kilobytes() {
        let text = "MemTotal:        8048576 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total(text), Some(8_048_576 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn overrides_replace_what_is_detected() {
        let r = resources(&ResourceOverride {
            cpus: Some(1.5),
            memory_bytes: Some(1 << 30),
        })
        .unwrap();
        assert_eq!(r.nano_cpus, 1_500_000_000);
        assert_eq!(r.memory_bytes, 1 << 30);
        let detected = resources(&ResourceOverride::default()).unwrap();
        assert!(detected.nano_cpus >= 1_000_000_000);
        assert!(detected.memory_bytes > 0);
        let err = cpus_to_nano(0.0).unwrap_err().to_string();
        assert!(err.contains("--cpus"), "{err}");
    }
}
