//! Control groups: resource limits and usage for one container.
//!
//! One enum over the two kernel interfaces, detected at run time: cgroup v1
//! (one hierarchy per controller, as on this project's Debian machines in
//! hybrid mode) and cgroup v2 (the unified hierarchy of most modern hosts).
//! Paths given to [`Cgroup`] are relative to the cgroup mount root, e.g.
//! `gantry/<container-id>`, the way OCI's `linux.cgroupsPath` is read.
//!
//! Layout: `limits` validates OCI resources once (pure, no I/O), so a bad
//! spec is refused before anything is created; `v1` and `v2` write them with
//! plain file I/O, touching only the files whose values are set; `devices`
//! assembles the v2 device eBPF program; `fs` holds the shared file helpers.
//!
//! Invariant: every resource field Gantry cannot apply is either refused
//! (`InvalidResource`, naming the OCI field) or logged as ignored, never
//! dropped silently.
//!
//! The signatures of the pinned items below are what the runtime codes against.

mod devices;
mod fs;
mod limits;
mod v1;
mod v2;

pub use limits::shares_to_weight;

use limits::Limits;
use oci_spec::runtime::LinuxResources;
use std::path::{Path, PathBuf};

/// `statfs` magic of a cgroup2 filesystem (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// `statfs` magic of a cgroup v1 filesystem (`CGROUP_SUPER_MAGIC`).
const CGROUP1_MAGIC: i64 = 0x0027_e0eb;
/// `statfs` magic of tmpfs (`TMPFS_MAGIC`), what v1 and hybrid hosts mount at the root.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Where cgroup filesystems live on every mainstream distribution.
const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

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
    /// A v1 controller file is in none of the group's hierarchies (controller not mounted).
    #[error("cgroup file {file} not found in any hierarchy of {group}")]
    MissingFile {
        /// The file, e.g. `pids.max`.
        file: &'static str,
        /// One of the group's directories.
        group: PathBuf,
    },
    /// A signal could not be sent to a process of the group.
    #[error("signal {signal} to pid {pid}: {source}")]
    Signal {
        /// The process.
        pid: i32,
        /// The signal.
        signal: nix::sys::signal::Signal,
        /// What the kernel said.
        #[source]
        source: nix::Error,
    },
    /// The v2 device-access eBPF program could not be loaded or attached.
    #[error("cgroup {path}: device program: {reason}")]
    DeviceProgram {
        /// The group directory.
        path: PathBuf,
        /// What failed.
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
        /// The group's directory in each hierarchy (co-mounted controllers
        /// such as `cpu,cpuacct` share one); a controller's files are found in
        /// whichever directory has them.
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
        CgroupRoot::detect_at(Path::new(DEFAULT_ROOT))
    }

    /// Detects the cgroup layout mounted at `path`: a cgroup2 filesystem is
    /// v2; a tmpfs holding v1 controller mounts is v1, hybrid hosts included
    /// (their cgroup2 mount at `unified` holds none of Gantry's controllers).
    pub fn detect_at(path: &Path) -> Result<CgroupRoot, CgroupError> {
        let version = match fs_magic(path)? {
            CGROUP2_MAGIC => CgroupVersion::V2,
            TMPFS_MAGIC if fs_magic(&path.join("memory")).ok() == Some(CGROUP1_MAGIC) => {
                CgroupVersion::V1
            }
            // Some hosts co-mount everything or name things differently: any
            // v1 mount of a controller Gantry uses will do.
            TMPFS_MAGIC
                if v1::hierarchies(path, false)
                    .unwrap_or_default()
                    .iter()
                    .any(|m| fs_magic(m).ok() == Some(CGROUP1_MAGIC)) =>
            {
                CgroupVersion::V1
            }
            _ => return Err(CgroupError::NoHierarchy(path.to_path_buf())),
        };
        Ok(CgroupRoot {
            path: path.to_path_buf(),
            version,
        })
    }

    /// The v1 hierarchy mount directories a group of this root may use
    /// (cpuset included); empty on v2, whose one hierarchy is the root.
    pub fn v1_hierarchies(&self) -> Result<Vec<PathBuf>, CgroupError> {
        match self.version {
            CgroupVersion::V1 => v1::hierarchies(&self.path, true),
            CgroupVersion::V2 => Ok(Vec::new()),
        }
    }
}

/// The filesystem type magic of the mount holding `path`.
fn fs_magic(path: &Path) -> Result<i64, CgroupError> {
    let st =
        nix::sys::statfs::statfs(path).map_err(|e| fs::io_err(path, std::io::Error::from(e)))?;
    // The field's integer type differs between libc targets.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    Ok(st.filesystem_type().0 as i64)
}

/// Sends `signal` to each of `pids`; one that already exited is fine.
fn signal_pids(pids: &[i32], signal: nix::sys::signal::Signal) -> Result<(), CgroupError> {
    for &pid in pids {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(source) => {
                return Err(CgroupError::Signal {
                    pid,
                    signal,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// A group made by [`Cgroup::create_unlimited`] whose limits are still to
/// be written.
#[derive(Debug)]
pub struct UnlimitedCgroup {
    cgroup: Cgroup,
    limits: Limits,
    created: bool,
}

impl UnlimitedCgroup {
    /// The group (processes may join it already).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Whether this call made the group (false: it existed already).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Writes the limits; on error the group stays as it is.
    pub fn apply(self) -> Result<Cgroup, CgroupError> {
        self.cgroup.apply(&self.limits)?;
        Ok(self.cgroup)
    }
}

impl Cgroup {
    /// Creates (or reuses) the group at `relative` and applies `resources`.
    ///
    /// Resources are validated before anything is created, so bad input
    /// changes nothing; if writing a limit fails, a group this call created
    /// is removed again.
    pub fn create(
        root: &CgroupRoot,
        relative: &Path,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        let pending = Cgroup::create_unlimited(root, relative, resources)?;
        if let Err(e) = pending.cgroup.apply(&pending.limits) {
            if pending.created
                && let Err(cleanup) = pending.cgroup.delete()
            {
                // The limit error is what the caller needs; the leftover is logged.
                tracing::warn!(error = %cleanup, "removing a half-made cgroup failed");
            }
            return Err(e);
        }
        Ok(pending.cgroup)
    }

    /// [`Cgroup::create`]'s first half: validates `resources` and makes (or
    /// reuses) the group, with `cpuset` ready to take tasks, but writes no
    /// limit yet ([`UnlimitedCgroup::apply`] does).
    ///
    /// Why: a container's init may join its group while its parent writes
    /// the limits, as long as it runs nothing of the user's before they are
    /// written. A failed `apply` leaves the group to the caller's cleanup.
    pub fn create_unlimited(
        root: &CgroupRoot,
        relative: &Path,
        resources: Option<&LinuxResources>,
    ) -> Result<UnlimitedCgroup, CgroupError> {
        let relative = clean_relative(relative)?;
        let limits = match resources {
            Some(r) => Limits::from_resources(r)?,
            None => Limits::default(),
        };
        let (cgroup, created) = match root.version {
            CgroupVersion::V1 => {
                let (dirs, created) = v1::create_dirs(&root.path, relative, &limits)?;
                (Cgroup::V1 { dirs }, created)
            }
            CgroupVersion::V2 => {
                let (dir, created) = v2::create_dir(&root.path, relative, &limits)?;
                (Cgroup::V2 { dir }, created)
            }
        };
        Ok(UnlimitedCgroup {
            cgroup,
            limits,
            created,
        })
    }

    /// Opens an existing group without changing it.
    pub fn open(root: &CgroupRoot, relative: &Path) -> Result<Cgroup, CgroupError> {
        let relative = clean_relative(relative)?;
        match root.version {
            CgroupVersion::V1 => Ok(Cgroup::V1 {
                dirs: v1::open_dirs(&root.path, relative)?,
            }),
            CgroupVersion::V2 => {
                let dir = root.path.join(relative);
                std::fs::metadata(&dir).map_err(|e| fs::io_err(&dir, e))?;
                Ok(Cgroup::V2 { dir })
            }
        }
    }

    /// Moves process `pid` (and, in v1, into every hierarchy) into the group.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        match self {
            Cgroup::V1 { dirs } => v1::add_process(dirs, pid),
            Cgroup::V2 { dir } => v2::add_process(dir, pid),
        }
    }

    /// The `cgroup.procs` files a process joins the group through: writing a
    /// PID (or `0`, meaning the writer itself) to each moves it in. For a
    /// runtime whose child joins before `exec`, e.g. `exec` into a container.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V1 { dirs } => dirs.iter().map(|d| d.join("cgroup.procs")).collect(),
            Cgroup::V2 { dir } => vec![dir.join("cgroup.procs")],
        }
    }

    /// The group's directories: one on v2, one per hierarchy on v1.
    pub fn dirs(&self) -> Vec<&Path> {
        match self {
            Cgroup::V1 { dirs } => dirs.iter().map(PathBuf::as_path).collect(),
            Cgroup::V2 { dir } => vec![dir.as_path()],
        }
    }

    /// Applies new limits to a live group.
    ///
    /// Only fields set in `resources` are written. cpuset limits need the
    /// group to have been created with cpuset limits (v1 hierarchy, v2
    /// controller).
    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.apply(&Limits::from_resources(resources)?)
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        match self {
            Cgroup::V1 { dirs } => v1::apply(dirs, limits),
            Cgroup::V2 { dir } => v2::apply(dir, limits),
        }
    }

    /// The processes now in the group.
    pub fn processes(&self) -> Result<Vec<i32>, CgroupError> {
        match self {
            Cgroup::V1 { dirs } => v1::processes(dirs),
            Cgroup::V2 { dir } => v2::processes(dir),
        }
    }

    /// Usage figures, OOM kills included.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        match self {
            Cgroup::V1 { dirs } => v1::stats(dirs),
            Cgroup::V2 { dir } => v2::stats(dir),
        }
    }

    /// Sends `signal` to every process in the group (used by `delete --force`).
    ///
    /// The group is frozen while it is signalled so that no process escapes
    /// by forking; on v2, SIGKILL uses `cgroup.kill` instead. It returns once
    /// signals are sent, not once processes are gone: [`Cgroup::delete`]
    /// waits for that.
    pub fn kill_all(&self, signal: nix::sys::signal::Signal) -> Result<(), CgroupError> {
        match self {
            Cgroup::V1 { dirs } => v1::kill_all(dirs, signal),
            Cgroup::V2 { dir } => v2::kill_all(dir, signal),
        }
    }

    /// Removes the group from every hierarchy; it must hold no process.
    ///
    /// Child groups are removed first; a group already gone is fine; a group
    /// still busy with exiting processes is retried for a bounded time.
    pub fn delete(&self) -> Result<(), CgroupError> {
        match self {
            Cgroup::V1 { dirs } => v1::delete(dirs),
            Cgroup::V2 { dir } => v2::delete(dir),
        }
    }
}

/// Accepts `a/b` and `/a/b` (OCI `cgroupsPath` is often absolute) and
/// refuses `..`, which would leave the cgroup tree.
fn clean_relative(relative: &Path) -> Result<&Path, CgroupError> {
    let stripped = relative.strip_prefix("/").unwrap_or(relative);
    let ok = stripped.components().count() > 0
        && stripped
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok {
        Ok(stripped)
    } else {
        Err(CgroupError::InvalidResource {
            field: "linux.cgroupsPath",
            reason: format!("{} is not a path below the cgroup root", relative.display()),
        })
    }
}

#[cfg(test)]
mod kernel_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxResourcesBuilder};

    #[test]
    fn relative_paths_stay_below_the_root() {
        assert_eq!(
            clean_relative(Path::new("/gantry/c1")).unwrap(),
            Path::new("gantry/c1")
        );
        assert_eq!(
            clean_relative(Path::new("gantry/c1")).unwrap(),
            Path::new("gantry/c1")
        );
        for bad in ["", "/", "../x", "gantry/../../x"] {
            assert!(clean_relative(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn detect_refuses_a_plain_directory() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            CgroupRoot::detect_at(tmp.path()),
            Err(CgroupError::NoHierarchy(_))
        ));
    }

    /// `create` on a fake v2 tree writes the limits and returns the leaf;
    /// a bad value is refused before anything is written.
    #[test]
    fn create_on_a_fake_v2_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = CgroupRoot {
            path: tmp.path().to_path_buf(),
            version: CgroupVersion::V2,
        };
        let leaf = tmp.path().join("gantry/c1");
        std::fs::create_dir_all(&leaf).unwrap();
        for dir in [tmp.path(), &tmp.path().join("gantry"), &leaf] {
            std::fs::write(dir.join("cgroup.controllers"), "cpu memory pids").unwrap();
            std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
            std::fs::write(dir.join("cgroup.procs"), "").unwrap();
            std::fs::write(dir.join("cpu.weight"), "100").unwrap();
        }
        let r = LinuxResourcesBuilder::default()
            .cpu(LinuxCpuBuilder::default().shares(2048u64).build().unwrap())
            .build()
            .unwrap();
        let cg = Cgroup::create(&root, Path::new("/gantry/c1"), Some(&r)).unwrap();
        assert!(matches!(&cg, Cgroup::V2 { dir } if *dir == leaf));
        assert_eq!(
            std::fs::read_to_string(leaf.join("cpu.weight")).unwrap(),
            "79"
        );
        assert_eq!(cg.procs_files(), vec![leaf.join("cgroup.procs")]);

        let bad = LinuxResourcesBuilder::default()
            .cpu(LinuxCpuBuilder::default().shares(1u64).build().unwrap())
            .build()
            .unwrap();
        std::fs::write(tmp.path().join("cgroup.subtree_control"), "").unwrap();
        let err = Cgroup::create(&root, Path::new("gantry/c1"), Some(&bad)).unwrap_err();
        assert!(
            err.to_string().contains("linux.resources.cpu.shares"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("cgroup.subtree_control")).unwrap(),
            "",
            "nothing may be written for a refused spec"
        );
    }
}
