//! The peer OCI runtimes, runc and crun, that `gantry runtime` is checked and
//! benchmarked against: finding (or installing) them, running a bundle under
//! each the same way, and putting the calling thread in a mount namespace
//! where all three see the same cgroup layout.
//!
//! crun 1.8.1 refuses a hybrid cgroup layout ("cgroups in hybrid mode not
//! supported"), which is what Debian 12 hosts with v1 controllers have: cgroup2
//! mounted at `/sys/fs/cgroup/unified` next to the v1 controllers. Unmounting
//! that one mount in a private mount namespace makes the host look pure v1 to
//! every runtime started from there. [`isolate_cgroup_layout`] does that for
//! the calling thread, so that gantry, runc and crun run under the same
//! conditions rather than crun alone under a wrapper.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where cgroup2 sits on a hybrid host.
pub const UNIFIED_MOUNT: &str = "/sys/fs/cgroup/unified";

/// Errors of finding and preparing the peer runtimes.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    /// The runtime's binary is not installed and could not be installed.
    #[error("{binary} is not installed and `apt-get install {package}` failed: {reason}")]
    NotInstalled {
        /// The binary looked for, e.g. `crun`.
        binary: String,
        /// The Debian package that provides it.
        package: String,
        /// Why the install did not happen or failed.
        reason: String,
    },
    /// A mount-namespace step failed.
    #[error("{step}: {source}")]
    Namespace {
        /// The step, e.g. `unshare(CLONE_NEWNS)`.
        step: &'static str,
        /// What the kernel said.
        #[source]
        source: nix::Error,
    },
    /// `/proc/self/mountinfo` could not be read.
    #[error("/proc/thread-self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
}

/// The three runtimes compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuntimeKind {
    /// `gantry runtime`, this project's own.
    Gantry,
    /// runc, the reference implementation (Go).
    Runc,
    /// crun, the fast C implementation.
    Crun,
}

impl RuntimeKind {
    /// All three, Gantry first.
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Gantry, RuntimeKind::Runc, RuntimeKind::Crun];

    /// The lowercase name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Gantry => "gantry",
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One runtime binary with its own state root (`--root`), so that tests and
/// benchmarks never touch `/run/runc` or `/run/crun` of the host.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    /// Which runtime this is.
    pub kind: RuntimeKind,
    /// Its executable.
    pub binary: PathBuf,
    /// The state root passed as `--root`.
    pub root: PathBuf,
}

impl OciRuntime {
    /// A runtime named by `kind`, run from `binary`, keeping state under `root`.
    pub fn new(kind: RuntimeKind, binary: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        OciRuntime {
            kind,
            binary: binary.into(),
            root: root.into(),
        }
    }

    /// The command with the global arguments every subcommand needs:
    /// `runc --root R`, `crun --root R`, `gantry runtime --root R`.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        if self.kind == RuntimeKind::Gantry {
            cmd.arg("runtime");
        }
        cmd.arg("--root").arg(&self.root);
        cmd
    }

    /// `X run --bundle BUNDLE ID`: create, start, wait and delete in one
    /// command, exiting with the container's exit status. Stdio is inherited
    /// unless the caller changes it.
    pub fn run_command(&self, bundle: &Path, id: &str) -> Command {
        let mut cmd = self.command();
        cmd.arg("run").arg("--bundle").arg(bundle).arg(id);
        cmd
    }

    /// Best-effort `X delete --force ID`, for cleanup after a failed run; the
    /// outcome is ignored because the container usually no longer exists.
    pub fn force_delete(&self, id: &str) {
        let _ = self
            .command()
            .args(["delete", "--force", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The Debian package that provides `binary`, where it differs in name.
fn package_of(binary: &str) -> &str {
    match binary {
        "etcd" => "etcd-server",
        other => other,
    }
}

/// `binary` from `PATH` or the usual system directories (`runc` is in
/// `/usr/sbin`, which a non-login `PATH` may lack).
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `binary`, installing its Debian package with apt-get when it is missing
/// (the tests run as root on Debian). Fails when it is missing and cannot be
/// installed, e.g. on a host without apt or without network access; callers
/// then print `SKIPPED`.
pub fn find_or_install(binary: &str) -> Result<PathBuf, PeersError> {
    if let Some(path) = find_binary(binary) {
        return Ok(path);
    }
    let package = package_of(binary);
    let not_installed = |reason: String| PeersError::NotInstalled {
        binary: binary.to_string(),
        package: package.to_string(),
        reason,
    };
    let apt = find_binary("apt-get").ok_or_else(|| not_installed("no apt-get".into()))?;
    let apt_get = |args: &[&str]| {
        Command::new(&apt)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| not_installed(e.to_string()))
    };
    let install = ["install", "-y", "--no-install-recommends", package];
    let mut output = apt_get(&install)?;
    if !output.status.success() {
        // A fresh machine may have no package lists yet (what
        // deploy/lib.sh's `apt-get update` does for the scripts).
        apt_get(&["update", "-qq"])?;
        output = apt_get(&install)?;
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("").trim().to_string();
        return Err(not_installed(format!("{}: {last}", output.status)));
    }
    find_binary(binary).ok_or_else(|| not_installed("installed but not found".into()))
}

/// The peers that can be had here: runc and crun, installed when missing.
/// A peer that cannot be had is reported in the second list.
pub fn peers(root: &Path) -> (Vec<OciRuntime>, Vec<PeersError>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for kind in [RuntimeKind::Runc, RuntimeKind::Crun] {
        match find_or_install(kind.name()) {
            Ok(binary) => found.push(OciRuntime::new(kind, binary, root.join(kind.name()))),
            Err(err) => missing.push(err),
        }
    }
    (found, missing)
}

/// What [`isolate_cgroup_layout`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// This thread already was in its own mount namespace from an earlier call.
    AlreadyDone,
    /// A private mount namespace was made and the cgroup2 mount at
    /// [`UNIFIED_MOUNT`] detached in it: the host now looks pure v1.
    UnifiedUnmounted,
    /// A private mount namespace was made; there was no hybrid mount to hide
    /// (pure v1 or pure v2 host).
    NothingToHide,
}

thread_local! {
    static ISOLATED: Cell<bool> = const { Cell::new(false) };
}

/// Moves the calling thread into a private mount namespace (`/` made rslave,
/// so host mounts still propagate in but nothing leaks out) and detaches the
/// hybrid cgroup2 mount there. Processes the thread spawns afterwards inherit
/// that namespace, so gantry, runc and crun all see the same layout.
///
/// Mount namespaces are per thread: call this on every thread that spawns
/// runtimes (test threads each call it; a second call on a thread is a no-op).
/// The rest of the process and the host keep their mounts.
pub fn isolate_cgroup_layout() -> Result<Isolation, PeersError> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    use nix::sched::{CloneFlags, unshare};

    if ISOLATED.with(Cell::get) {
        return Ok(Isolation::AlreadyDone);
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(|source| PeersError::Namespace {
        step: "unshare(CLONE_NEWNS)",
        source,
    })?;
    ISOLATED.with(|flag| flag.set(true));
    mount::<str, str, str, str>(None, "/", None, MsFlags::MS_REC | MsFlags::MS_SLAVE, None)
        .map_err(|source| PeersError::Namespace {
            step: "mount --make-rslave /",
            source,
        })?;
    let mountinfo =
        std::fs::read_to_string("/proc/thread-self/mountinfo").map_err(PeersError::Mountinfo)?;
    if !is_cgroup2_mount_point(&mountinfo, UNIFIED_MOUNT) {
        return Ok(Isolation::NothingToHide);
    }
    umount2(UNIFIED_MOUNT, MntFlags::MNT_DETACH).map_err(|source| PeersError::Namespace {
        step: "umount /sys/fs/cgroup/unified",
        source,
    })?;
    Ok(Isolation::UnifiedUnmounted)
}

/// Whether `mountinfo` (the text of `/proc/*/mountinfo`) has a cgroup2 mount
/// at `mount_point`.
pub fn is_cgroup2_mount_point(mountinfo: &str, mount_point: &str) -> bool {
    mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|sep| fields.get(sep + 1));
        fields.get(4) == Some(&mount_point) && fstype == Some(&"cgroup2")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
38 35 0:33 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_the_hybrid_unified_mount() {
        assert!(is_cgroup2_mount_point(HYBRID, UNIFIED_MOUNT));
        assert!(!is_cgroup2_mount_point(HYBRID, "/sys/fs/cgroup/memory"));
        assert!(!is_cgroup2_mount_point(HYBRID, "/sys/fs/cgroup"));
    }

    #[test]
    fn pure_v2_has_no_unified_mount() {
        let v2 = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert!(!is_cgroup2_mount_point(v2, UNIFIED_MOUNT));
        assert!(is_cgroup2_mount_point(v2, "/sys/fs/cgroup"));
    }

    #[test]
    fn runtime_commands_put_root_first() {
        let rt = OciRuntime::new(RuntimeKind::Gantry, "/g", "/r");
        let cmd = rt.run_command(Path::new("/b"), "c1");
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            ["runtime", "--root", "/r", "run", "--bundle", "/b", "c1"]
        );
        let rt = OciRuntime::new(RuntimeKind::Crun, "/c", "/r");
        let args: Vec<_> = rt
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["--root", "/r"]);
    }

    #[test]
    fn isolation_hides_unified_only_in_this_thread() {
        if !nix::unistd::Uid::effective().is_root() {
            println!("SKIPPED: needs root for unshare(CLONE_NEWNS)");
            return;
        }
        let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let hybrid = is_cgroup2_mount_point(&host, UNIFIED_MOUNT);
        let result = std::thread::spawn(|| {
            let first = isolate_cgroup_layout().unwrap();
            let second = isolate_cgroup_layout().unwrap();
            let mine = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            (first, second, is_cgroup2_mount_point(&mine, UNIFIED_MOUNT))
        })
        .join()
        .unwrap();
        let expected = if hybrid {
            Isolation::UnifiedUnmounted
        } else {
            Isolation::NothingToHide
        };
        assert_eq!(result, (expected, Isolation::AlreadyDone, false));
        // The host (and this thread) keep the mount.
        let after = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        assert_eq!(is_cgroup2_mount_point(&after, UNIFIED_MOUNT), hybrid);
    }
}
