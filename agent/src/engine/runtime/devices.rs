//! Device nodes and the standard symlinks of a fresh `/dev`.
//!
//! Runs in the container init, before pivot_root, when the config mounts a
//! tmpfs on `/dev`. Nodes are made with `mknod(2)`; where that is refused
//! (e.g. a `nodev` parent), the host's node is bind-mounted instead, as runc
//! does.

use super::init::{SetupError, StepResult};
use super::mounts::{ensure_target, secure_join};
use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};
use std::path::{Path, PathBuf};

/// A device node to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Its path inside the container, e.g. `/dev/null`.
    pub path: PathBuf,
    /// `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
    pub kind: SFlag,
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The devices every container gets (OCI's list).
pub fn default_devices() -> Vec<DeviceNode> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| DeviceNode {
        path: path.into(),
        kind: SFlag::S_IFCHR,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

/// Converts a `linux.devices` entry.
pub fn from_spec(d: &LinuxDevice) -> Result<DeviceNode, String> {
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => return Err("type a is only for cgroup rules".into()),
    };
    if !d.path().is_absolute() {
        return Err(format!("{} is not absolute", d.path().display()));
    }
    Ok(DeviceNode {
        path: d.path().clone(),
        kind,
        major: d.major().max(0) as u64,
        minor: d.minor().max(0) as u64,
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// Creates `dev` under `rootfs` (the init's umask is 0, so modes are exact).
pub fn create(rootfs: &Path, dev: &DeviceNode) -> StepResult<()> {
    let target = secure_join(rootfs, &dev.path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| SetupError::io(format!("mkdir {}", parent.display()), e))?;
    }
    let _ = std::fs::remove_file(&target);
    let mode = Mode::from_bits_truncate(dev.mode as libc::mode_t);
    match mknod(&target, dev.kind, mode, makedev(dev.major, dev.minor)) {
        Ok(()) => {
            nix::unistd::chown(
                &target,
                Some(nix::unistd::Uid::from_raw(dev.uid)),
                Some(nix::unistd::Gid::from_raw(dev.gid)),
            )
            .map_err(|e| SetupError::sys(format!("chown {}", dev.path.display()), e))?;
            Ok(())
        }
        Err(nix::Error::EPERM) => {
            ensure_target(&target, true)?;
            mount(
                Some(&dev.path),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| SetupError::sys(format!("bind device {}", dev.path.display()), e))
        }
        Err(e) => Err(SetupError::sys(format!("mknod {}", dev.path.display()), e)),
    }
}

/// Makes the default devices and the standard symlinks in a `/dev` that is
/// a tmpfs the init has just mounted.
///
/// Why not [`create`] and [`create_symlinks`] one by one: on a fresh tmpfs
/// there is no symlink to resolve, no parent to make and nothing to unlink,
/// so each node is one `mknodat` (and each link one `symlinkat`) relative to
/// one descriptor of `/dev`, instead of six path walks. This runs on the
/// critical path of every container start. An entry that is in the way
/// anyway (another mount put it there) takes the general path.
pub fn create_in_fresh_dev(rootfs: &Path, has_devpts: bool) -> StepResult<()> {
    let dev_dir = secure_join(rootfs, Path::new("/dev"));
    let dir = nix::fcntl::open(
        &dev_dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SetupError::sys(format!("open {}", dev_dir.display()), e))?;
    // Nodes are created with our fsuid and fsgid: chown only if the node's
    // owner differs (the default devices are root's).
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    for dev in default_devices() {
        let Some(name) = dev.path.file_name() else {
            continue;
        };
        let mode = Mode::from_bits_truncate(dev.mode as libc::mode_t);
        let made =
            nix::sys::stat::mknodat(&dir, name, dev.kind, mode, makedev(dev.major, dev.minor));
        if made.is_err() || dev.uid != uid.as_raw() || dev.gid != gid.as_raw() {
            create(rootfs, &dev)?;
        }
    }
    for (target, link) in standard_links(has_devpts) {
        let name = link.trim_start_matches("/dev/");
        if nix::unistd::symlinkat(target, &dir, name).is_err() {
            create_link(rootfs, target, link)?;
        }
    }
    Ok(())
}

fn standard_links(has_devpts: bool) -> Vec<(&'static str, &'static str)> {
    let mut links = vec![
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
        ("/proc/kcore", "/dev/core"),
    ];
    if has_devpts {
        links.push(("pts/ptmx", "/dev/ptmx"));
    }
    links
}

/// The standard `/dev` symlinks (fd, stdin, stdout, stderr, core, ptmx).
pub fn create_symlinks(rootfs: &Path, has_devpts: bool) -> StepResult<()> {
    for (target, link) in standard_links(has_devpts) {
        create_link(rootfs, target, link)?;
    }
    Ok(())
}

fn create_link(rootfs: &Path, target: &str, link: &str) -> StepResult<()> {
    let path = secure_join(rootfs, Path::new(link));
    let _ = std::fs::remove_file(&path);
    std::os::unix::fs::symlink(target, &path)
        .map_err(|e| SetupError::io(format!("symlink {link}"), e))
}
