//! Control groups: resource limits and usage for one container.
//!
//! One enum over the two kernel interfaces, detected at run time: cgroup v1
//! (one hierarchy per controller, as on this project's Debian machines in
//! hybrid mode) and cgroup v2 (the unified hierarchy of most modern hosts).
//! Paths given to [`Cgroup`] are relative to the cgroup mount root, e.g.
//! `gantry/<container-id>`, the way OCI's `linux.cgroupsPath` is read.
//!
//! INTERFACE PINNED FOR PARALLEL WORK: the signatures below are what the
//! runtime codes against; the bodies are filled in by the cgroups work.

use oci_spec::runtime::LinuxResources;
use std::path::{Path, PathBuf};

/// Errors of the cgroup layer.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file or directory could not be read, written or removed.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// No usable cgroup hierarchy was found on this host.
    #[error("no usable cgroup hierarchy under {0}")]
    NoHierarchy(PathBuf),
    /// A resource value cannot be expressed for this cgroup version.
    #[error("invalid cgroup resource {field}: {reason}")]
    InvalidResource {
        /// The OCI field, e.g. `linux.resources.cpu.quota`.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
}

/// Which kernel interface a host uses for the controllers Gantry needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (also hybrid hosts, whose v2 mount holds none of them).
    V1,
    /// The unified hierarchy.
    V2,
}

/// Where the cgroup filesystems are mounted; `/sys/fs/cgroup` on a real host,
/// a temporary directory laid out like it in unit tests.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    /// The mount root, e.g. `/sys/fs/cgroup`.
    pub path: PathBuf,
    /// The interface found there.
    pub version: CgroupVersion,
}

/// Usage figures of one cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupStats {
    /// CPU time used by all processes, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory in use, in bytes.
    pub memory_usage_bytes: u64,
    /// The memory limit in bytes, if any.
    pub memory_limit_bytes: Option<u64>,
    /// Processes and threads now in the cgroup.
    pub pids_current: u64,
    /// How many times the kernel's OOM killer killed a process in this cgroup.
    pub oom_kills: u64,
}

/// One container's cgroup, in every hierarchy it needs.
#[derive(Debug, Clone)]
pub enum Cgroup {
    /// A cgroup v1 group: a directory under each controller's hierarchy.
    V1 {
        /// `(controller mount dir, group dir)` pairs.
        dirs: Vec<PathBuf>,
    },
    /// A cgroup v2 group: one directory.
    V2 {
        /// The group's directory.
        dir: PathBuf,
    },
}

impl CgroupRoot {
    /// Detects the host's cgroup layout under `/sys/fs/cgroup`.
    pub fn detect() -> Result<CgroupRoot, CgroupError> {
        unimplemented!("filled in by the cgroups work")
    }
}

impl Cgroup {
    /// Creates (or reuses) the group at `relative` and applies `resources`.
    pub fn create(
        root: &CgroupRoot,
        relative: &Path,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        let _ = (root, relative, resources);
        unimplemented!("filled in by the cgroups work")
    }

    /// Opens an existing group without changing it.
    pub fn open(root: &CgroupRoot, relative: &Path) -> Result<Cgroup, CgroupError> {
        let _ = (root, relative);
        unimplemented!("filled in by the cgroups work")
    }

    /// Moves process `pid` (and, in v1, into every hierarchy) into the group.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        let _ = pid;
        unimplemented!("filled in by the cgroups work")
    }

    /// Applies new limits to a live group.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let _ = resources;
        unimplemented!("filled in by the cgroups work")
    }

    /// The processes now in the group.
    pub fn processes(&self) -> Result<Vec<i32>, CgroupError> {
        unimplemented!("filled in by the cgroups work")
    }

    /// Usage figures, OOM kills included.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        unimplemented!("filled in by the cgroups work")
    }

    /// Sends `signal` to every process in the group (used by `delete --force`).
    pub fn kill_all(&self, signal: nix::sys::signal::Signal) -> Result<(), CgroupError> {
        let _ = signal;
        unimplemented!("filled in by the cgroups work")
    }

    /// Removes the group from every hierarchy; it must hold no process.
    pub fn delete(&self) -> Result<(), CgroupError> {
        unimplemented!("filled in by the cgroups work")
    }
}
