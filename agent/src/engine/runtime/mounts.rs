//! The container's filesystem view: mount options, config mounts, pivot_root,
//! masked and read-only paths.
//!
//! Runs in the container init (after `clone`, in the new mount namespace),
//! except the option parsing and path resolution, which are pure and tested
//! on their own. Mount targets are resolved inside the rootfs without ever
//! following a symlink out of it.

use super::init::{SetupError, StepResult, sys};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Mount options split the way `mount(2)` wants them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Propagation flags, applied by a separate `mount(2)` call.
    pub propagation: MsFlags,
    /// Filesystem-specific data, comma separated (e.g. `mode=755,size=64k`).
    pub data: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            propagation: MsFlags::empty(),
            data: String::new(),
        }
    }
}

impl MountOptions {
    /// Whether this is a bind mount (`bind` or `rbind`).
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
}

/// The flag of a propagation option (`rprivate`, `slave`...).
pub fn propagation_flag(option: &str) -> Option<MsFlags> {
    Some(match option {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// Parses OCI mount options as runc does: known flags become flags, anything
/// else is passed to the filesystem as data.
pub fn parse_options<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut out = MountOptions::default();
    let mut data = Vec::new();
    for option in options {
        let option = option.as_ref();
        if let Some(p) = propagation_flag(option) {
            out.propagation |= p;
            continue;
        }
        let (set, flag) = match option {
            "defaults" => continue,
            "ro" => (true, MsFlags::MS_RDONLY),
            "rw" => (false, MsFlags::MS_RDONLY),
            "suid" => (false, MsFlags::MS_NOSUID),
            "nosuid" => (true, MsFlags::MS_NOSUID),
            "dev" => (false, MsFlags::MS_NODEV),
            "nodev" => (true, MsFlags::MS_NODEV),
            "exec" => (false, MsFlags::MS_NOEXEC),
            "noexec" => (true, MsFlags::MS_NOEXEC),
            "sync" => (true, MsFlags::MS_SYNCHRONOUS),
            "async" => (false, MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (true, MsFlags::MS_DIRSYNC),
            "remount" => (true, MsFlags::MS_REMOUNT),
            "mand" => (true, MsFlags::MS_MANDLOCK),
            "nomand" => (false, MsFlags::MS_MANDLOCK),
            "atime" => (false, MsFlags::MS_NOATIME),
            "noatime" => (true, MsFlags::MS_NOATIME),
            "diratime" => (false, MsFlags::MS_NODIRATIME),
            "nodiratime" => (true, MsFlags::MS_NODIRATIME),
            "relatime" => (true, MsFlags::MS_RELATIME),
            "norelatime" => (false, MsFlags::MS_RELATIME),
            "strictatime" => (true, MsFlags::MS_STRICTATIME),
            "nostrictatime" => (false, MsFlags::MS_STRICTATIME),
            "lazytime" => (true, MsFlags::MS_LAZYTIME),
            "nolazytime" => (false, MsFlags::MS_LAZYTIME),
            "bind" => (true, MsFlags::MS_BIND),
            "rbind" => (true, MsFlags::MS_BIND | MsFlags::MS_REC),
            other => {
                data.push(other);
                continue;
            }
        };
        if set {
            out.flags |= flag;
        } else {
            out.flags &= !flag;
        }
    }
    out.data = data.join(",");
    out
}

/// Resolves `path` (absolute, as seen inside the container) under `root`,
/// following symlinks as if `root` were `/`: the result never leaves `root`.
/// Components that do not exist yet are kept as they are.
pub fn secure_join(root: &Path, path: &Path) -> PathBuf {
    // Bounded like the kernel's own symlink limit, so a loop cannot hang us.
    let mut budget = 40;
    let mut resolved = PathBuf::new();
    // Components still to walk; a symlink's target is pushed in front.
    let mut queue: std::collections::VecDeque<std::ffi::OsString> = Default::default();
    for c in path.components() {
        push_component(&mut queue, c, false);
    }
    while let Some(part) = queue.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "/" {
            resolved = PathBuf::new();
            continue;
        }
        let candidate = root.join(&resolved).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() && budget > 0 => {
                budget -= 1;
                let Ok(target) = std::fs::read_link(&candidate) else {
                    resolved.push(&part);
                    continue;
                };
                let mut front = std::collections::VecDeque::new();
                for c in target.components() {
                    push_component(&mut front, c, true);
                }
                while let Some(c) = front.pop_back() {
                    queue.push_front(c);
                }
            }
            _ => resolved.push(&part),
        }
    }
    root.join(resolved)
}

fn push_component(
    queue: &mut std::collections::VecDeque<std::ffi::OsString>,
    c: Component<'_>,
    keep_root: bool,
) {
    match c {
        Component::RootDir if keep_root => queue.push_back("/".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        Component::ParentDir => queue.push_back("..".into()),
        Component::Normal(n) => queue.push_back(n.to_os_string()),
    }
}

/// `mount(2)` with the step named in the error.
pub fn do_mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> StepResult<()> {
    mount(source, target, fstype, flags, data)
        .map_err(|e| SetupError::sys(format!("mount {}", display_in_container(target)), e))
}

/// How a path is named in error messages: as the container sees it where
/// possible, since that is what the config says.
fn display_in_container(path: &Path) -> String {
    path.display().to_string()
}

/// Makes sure `target` exists as a directory, or as a file when `file` is
/// set (bind mounts of files need a file to mount on).
pub fn ensure_target(target: &Path, file: bool) -> StepResult<()> {
    if std::fs::symlink_metadata(target).is_ok() {
        return Ok(());
    }
    if file {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| SetupError::io(format!("mkdir {}", parent.display()), e))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)
            .map_err(|e| SetupError::io(format!("create {}", target.display()), e))?;
    } else {
        std::fs::create_dir_all(target)
            .map_err(|e| SetupError::io(format!("mkdir {}", target.display()), e))?;
    }
    Ok(())
}

/// Opens the rootfs (`O_PATH`) as the base of every [`open_in_root`]: once
/// per container, after the rootfs was bind-mounted onto itself, so that
/// lookups through it see that bind mount and everything mounted under it.
pub fn open_rootfs(rootfs: &Path) -> StepResult<OwnedFd> {
    nix::fcntl::open(
        rootfs,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SetupError::sys(format!("open rootfs {}", rootfs.display()), e))
}

/// A path relative to the rootfs descriptor: `/dev/pts` → `dev/pts`, `/` → `.`.
fn relative_in_root(path: &Path) -> StepResult<std::ffi::CString> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    std::ffi::CString::new(relative.as_os_str().as_bytes())
        .map_err(|_| SetupError::other(format!("open {}", path.display()), "NUL in path"))
}

/// `openat2(root, path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
/// the kernel resolves every symlink of `path` as if `root` were `/`.
fn openat2_in_root(root: BorrowedFd<'_>, path: &std::ffi::CStr) -> nix::Result<OwnedFd> {
    // The kernel's `struct open_how` (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: valid descriptor, NUL-terminated path and an open_how of the
    // size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens `path` (as seen in the container) relative to `root` (the rootfs,
/// from [`open_rootfs`]) with the kernel resolving every symlink as if the
/// rootfs were `/` (`openat2` with `RESOLVE_IN_ROOT`), and returns the
/// descriptor with its `/proc/self/fd/N` path. Mounting onto that path
/// mounts onto exactly what was resolved, so a symlink swapped in after the
/// lookup cannot send a mount out of the rootfs.
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path) -> StepResult<(OwnedFd, String)> {
    let c_path = relative_in_root(path)?;
    let fd = openat2_in_root(root, &c_path)
        .map_err(|e| SetupError::sys(format!("open {} in the rootfs", path.display()), e))?;
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok((fd, proc_path))
}

/// [`open_in_root`] of a mount target, which is made first if it is
/// missing: a directory, or an empty file when `file` says so (bind mounts
/// of files need a file to mount on).
///
/// Why the target is opened before anything checks it: on every start
/// nearly all targets exist (`/proc`, `/sys`, `/dev` in the image), and
/// the one `openat2` answers both "is it there" and "pin it". A missing
/// target whose parent exists (`/dev/pts`, `/dev/shm` in a fresh `/dev`
/// tmpfs) is made relative to the parent's descriptor; anything else (a
/// deeper missing path) takes [`secure_join`] and [`ensure_target`].
/// `file` is asked only when the target is missing (a bind mount's source
/// is stat'ed only then).
pub fn open_target(
    root: BorrowedFd<'_>,
    rootfs: &Path,
    path: &Path,
    file: impl FnOnce() -> StepResult<bool>,
) -> StepResult<(OwnedFd, String)> {
    let c_path = relative_in_root(path)?;
    match openat2_in_root(root, &c_path) {
        Ok(fd) => {
            let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            return Ok((fd, proc_path));
        }
        Err(nix::Error::ENOENT) => {}
        Err(e) => {
            return Err(SetupError::sys(
                format!("open {} in the rootfs", path.display()),
                e,
            ));
        }
    }
    let file = file()?;
    let made = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => make_in_parent(root, parent, name, file),
        _ => false,
    };
    if !made {
        ensure_target(&secure_join(rootfs, path), file)?;
    }
    open_in_root(root, path)
}

/// Makes `name` (a directory, or an empty file) in `parent`, opened in the
/// rootfs. False when the parent cannot be opened or `name` not made, so
/// that the caller takes the general path (and reports its error).
fn make_in_parent(root: BorrowedFd<'_>, parent: &Path, name: &OsStr, file: bool) -> bool {
    let Ok(c_parent) = relative_in_root(parent) else {
        return false;
    };
    let Ok(dir) = openat2_in_root(root, &c_parent) else {
        return false;
    };
    if file {
        nix::fcntl::openat(
            &dir,
            name,
            nix::fcntl::OFlag::O_WRONLY
                | nix::fcntl::OFlag::O_CREAT
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .is_ok()
    } else {
        nix::sys::stat::mkdirat(&dir, name, nix::sys::stat::Mode::from_bits_truncate(0o755)).is_ok()
    }
}

/// Mounts one config mount under the rootfs (`root` is its descriptor from
/// [`open_rootfs`], `rootfs` its path).
pub fn mount_one(
    root: BorrowedFd<'_>,
    rootfs: &Path,
    bundle: &Path,
    m: &oci_spec::runtime::Mount,
) -> StepResult<()> {
    let typ = m.typ().as_deref().unwrap_or("");
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let destination = m.destination();
    let dest = destination.display();
    if opts.is_bind() || typ == "bind" {
        let source = m.source().as_deref().unwrap_or(Path::new(""));
        let source = if source.is_absolute() {
            source.to_path_buf()
        } else {
            bundle.join(source)
        };
        let source_meta = || {
            std::fs::metadata(&source).map_err(|e| {
                SetupError::io(format!("bind mount {dest}: source {}", source.display()), e)
            })
        };
        let (_fd, pinned) =
            open_target(root, rootfs, destination, || Ok(!source_meta()?.is_dir()))?;
        let rec = opts.flags & MsFlags::MS_REC;
        if let Err(e) = mount(
            Some(&source),
            pinned.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | rec,
            None::<&str>,
        ) {
            // A missing source is named as such (it was not checked before).
            source_meta()?;
            return Err(SetupError::sys(format!("bind mount {dest}"), e));
        }
        // A bind mount ignores every other flag: they need a remount, on the
        // new mount (opened again: the first descriptor is below it).
        let rest = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !rest.is_empty() {
            let (_fd, pinned) = open_in_root(root, destination)?;
            mount(
                None::<&str>,
                pinned.as_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rest,
                None::<&str>,
            )
            .map_err(|e| SetupError::sys(format!("remount {dest}"), e))?;
        }
    } else {
        let source = m
            .source()
            .as_deref()
            .map(|s| s.as_os_str())
            .unwrap_or(OsStr::from_bytes(typ.as_bytes()));
        let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
        let (_fd, pinned) = open_target(root, rootfs, destination, || Ok(false))?;
        match mount(Some(source), pinned.as_str(), Some(typ), opts.flags, data) {
            Ok(()) => {}
            // Without its own network namespace a container may not mount a
            // fresh sysfs; runc falls back to the host's, read-only.
            Err(nix::Error::EPERM) if typ == "sysfs" => {
                mount(
                    Some("/sys"),
                    pinned.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| SetupError::sys(format!("bind mount {dest}"), e))?;
                let (_fd, pinned) = open_in_root(root, destination)?;
                mount(
                    None::<&str>,
                    pinned.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | opts.flags,
                    None::<&str>,
                )
                .map_err(|e| SetupError::sys(format!("remount {dest}"), e))?;
            }
            Err(e) => return Err(SetupError::sys(format!("mount {dest}"), e)),
        }
    }
    if !opts.propagation.is_empty() {
        // On the new mount, opened again like the remount above.
        let (_fd, pinned) = open_in_root(root, destination)?;
        mount(
            None::<&str>,
            pinned.as_str(),
            None::<&str>,
            opts.propagation,
            None::<&str>,
        )
        .map_err(|e| SetupError::sys(format!("set propagation of {dest}"), e))?;
    }
    Ok(())
}

/// One cgroup hierarchy of the host, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// The directory name under the cgroup root, e.g. `memory` or `unified`.
    pub name: String,
    /// `cgroup` or `cgroup2`.
    pub fstype: String,
    /// The mount data naming the controllers, e.g. `cpu,cpuacct` or
    /// `name=systemd` (empty for cgroup2).
    pub data: String,
    /// Whether it is mounted on the cgroup root itself (a pure v2 host).
    pub at_root: bool,
}

/// The cgroup hierarchies mounted under `cgroup_root` (`/sys/fs/cgroup`).
pub fn parse_cgroup_mounts(mountinfo: &str, cgroup_root: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split_whitespace().nth(4).unwrap_or("");
        let mut rf = right.split_whitespace();
        let fstype = rf.next().unwrap_or("");
        let options = rf.nth(1).unwrap_or("");
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let at_root = point == cgroup_root;
        let Some(name) = point
            .strip_prefix(cgroup_root)
            .map(|rest| rest.trim_start_matches('/'))
            .filter(|rest| at_root || (!rest.is_empty() && !rest.contains('/')))
        else {
            continue;
        };
        let data: Vec<&str> = options
            .split(',')
            .filter(|o| {
                !matches!(
                    *o,
                    "rw" | "ro" | "xattr" | "nsdelegate" | "memory_recursiveprot"
                )
            })
            .collect();
        out.push(Hierarchy {
            name: name.to_string(),
            fstype: fstype.to_string(),
            data: if fstype == "cgroup" {
                data.join(",")
            } else {
                String::new()
            },
            at_root,
        });
    }
    out
}

/// Mounts the container's view of its cgroups at a `cgroup` mount's
/// destination, as runc does: on a v2 host one cgroup2 mount; on a v1 host a
/// tmpfs with one mount per hierarchy, named as on the host. Must run in
/// the container's cgroup namespace (so each mount shows the container's
/// own group as its root) and before pivot_root (the host's mountinfo is
/// read).
pub fn mount_cgroups(rootfs: &Path, m: &oci_spec::runtime::Mount) -> StepResult<()> {
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let target = secure_join(rootfs, m.destination());
    let dest = m.destination().display();
    ensure_target(&target, false)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SetupError::io("read /proc/self/mountinfo", e))?;
    let hierarchies = parse_cgroup_mounts(&info, "/sys/fs/cgroup");
    let flags = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
    if let Some(unified) = hierarchies.iter().find(|h| h.at_root) {
        return mount(
            Some("cgroup2"),
            &target,
            Some(unified.fstype.as_str()),
            flags,
            None::<&str>,
        )
        .map_err(|e| SetupError::sys(format!("mount {dest}"), e));
    }
    let base = flags & !MsFlags::MS_RDONLY;
    mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        base,
        Some("mode=755"),
    )
    .map_err(|e| SetupError::sys(format!("mount {dest}"), e))?;
    for h in &hierarchies {
        let dir = target.join(&h.name);
        ensure_target(&dir, false)?;
        let data = (!h.data.is_empty()).then_some(h.data.as_str());
        mount(
            Some(h.fstype.as_str()),
            &dir,
            Some(h.fstype.as_str()),
            flags,
            data,
        )
        .map_err(|e| SetupError::sys(format!("mount {dest}/{}", h.name), e))?;
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_REMOUNT | flags,
            Some("mode=755"),
        )
        .map_err(|e| SetupError::sys(format!("remount {dest} read-only"), e))?;
    }
    Ok(())
}

/// Swaps the root for `rootfs` with the `pivot_root(".", ".")` trick: no
/// temporary directory, the old root is stacked on the new one and then
/// lazily unmounted.
///
/// The unmount is started here and finished by [`OldRoot::detach`]: it is
/// a container start's longest single step (0.4-1.1 ms measured), nearly
/// all of it the kernel waiting for an RCU grace period after the mounts
/// are taken out of the namespace, so a helper process does it while the
/// init goes on with masked paths, read-only paths, the process and its
/// cgroup. Nothing of the old root is reachable meanwhile: lookups start at
/// the new root, below the stacked old one, and the init waits for the
/// helper before it reports ready, so no user code runs with it mounted.
pub fn pivot_root(rootfs: &Path) -> StepResult<OldRoot> {
    nix::unistd::chdir(rootfs).map_err(|e| SetupError::sys("chdir rootfs", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| SetupError::sys("pivot_root", e))?;
    let helper = detach_old_root_async();
    sys("chdir /", nix::unistd::chdir("/"))?;
    Ok(OldRoot { helper })
}

/// Unmounts the old root stacked on the current directory (right after
/// `pivot_root(".", ".")`).
fn detach_old_root_sync() -> StepResult<()> {
    // The old root must not propagate the unmount back to the host.
    sys(
        "make old root private",
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    sys("unmount old root", umount2(".", MntFlags::MNT_DETACH))
}

/// The old root after [`pivot_root`]: unmounted by a helper, or still to be
/// unmounted by [`OldRoot::detach`].
#[derive(Debug)]
pub struct OldRoot {
    helper: Option<DetachHelper>,
}

impl OldRoot {
    /// Returns once the old root is unmounted: waits for the helper, or
    /// unmounts it here if there is none or it failed (so that the error
    /// named is the kernel's, which the helper cannot report).
    ///
    /// Must run while the current directory is still the new root's `/`
    /// when the helper failed or was never started (`chdir /` has made it
    /// so).
    pub fn detach(mut self) -> StepResult<()> {
        if self.helper.take().is_some_and(DetachHelper::wait) {
            return Ok(());
        }
        detach_old_root_sync()
    }
}

/// A helper process sharing the init's memory (`CLONE_VM`, its own small
/// stack) that unmounts the old root; see [`pivot_root`].
type DetachHelper = super::vmhelper::VmHelper;

/// Starts the helper that unmounts the old root; None if it cannot be
/// started (the caller then unmounts it itself).
#[cfg(target_arch = "x86_64")]
fn detach_old_root_async() -> Option<DetachHelper> {
    // SAFETY: `detach_old_root_helper` follows vmhelper's rules (raw system
    // calls on a static path, no argument); it shares our descriptor table,
    // not our cwd, which is the old root it unmounts.
    unsafe { DetachHelper::start(detach_old_root_helper, std::ptr::null_mut(), true) }
}

#[cfg(not(target_arch = "x86_64"))]
fn detach_old_root_async() -> Option<DetachHelper> {
    None
}

/// The helper's body: `mount(NULL, ".", NULL, MS_SLAVE|MS_REC)` then
/// `umount2(".", MNT_DETACH)`, in the old root it inherited as its current
/// directory. Exits 0 on success, 1 otherwise (the init then retries both
/// and names the error).
#[cfg(target_arch = "x86_64")]
extern "C" fn detach_old_root_helper(_: *mut libc::c_void) -> libc::c_int {
    const DOT: &[u8; 2] = b".\0";
    // SAFETY: raw system calls with a NUL-terminated path and integer
    // flags; no memory of ours is written.
    unsafe {
        let flags = (libc::MS_SLAVE | libc::MS_REC) as usize;
        if raw_syscall5(libc::SYS_mount, 0, DOT.as_ptr() as usize, 0, flags, 0) < 0 {
            return 1;
        }
        if raw_syscall5(
            libc::SYS_umount2,
            DOT.as_ptr() as usize,
            libc::MNT_DETACH as usize,
            0,
            0,
            0,
        ) < 0
        {
            return 1;
        }
    }
    0
}

/// A system call without libc: the helper shares the init's thread-local
/// `errno`, which libc's wrappers would write on failure.
///
/// # Safety
/// The arguments must be valid for system call `nr`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn raw_syscall5(
    nr: libc::c_long,
    a1: usize,
    a2: usize,
    a3: usize,
    a4: usize,
    a5: usize,
) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 Linux system call convention; rcx and r11 are
    // clobbered by `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Hides `path` (already inside the new root): `/dev/null` over a file, an
/// empty read-only tmpfs over a directory. Missing paths are fine.
pub fn mask_path(path: &Path) -> StepResult<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(|e| SetupError::sys(format!("mask {}", path.display()), e))
}

/// Makes `path` (already inside the new root) read-only. Missing paths are fine.
pub fn readonly_path(path: &Path) -> StepResult<()> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Ok(()) => {}
        Err(nix::Error::ENOENT) => return Ok(()),
        Err(e) => {
            return Err(SetupError::sys(
                format!("bind {} read-only", path.display()),
                e,
            ));
        }
    }
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC;
    match mount(None::<&str>, path, None::<&str>, ro, None::<&str>) {
        // Locked flags (nosuid, nodev, noexec of the mount below) must be
        // kept on a remount where the kernel insists: retry with them, as
        // runc does.
        Err(nix::Error::EPERM) => {
            let kept = nix::sys::statvfs::statvfs(path)
                .map(|st| {
                    let f = st.flags();
                    let mut m = MsFlags::empty();
                    use nix::sys::statvfs::FsFlags;
                    for (from, to) in [
                        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                    ] {
                        if f.contains(from) {
                            m |= to;
                        }
                    }
                    m
                })
                .unwrap_or(MsFlags::empty());
            mount(None::<&str>, path, None::<&str>, ro | kept, None::<&str>)
        }
        other => other,
    }
    .map_err(|e| SetupError::sys(format!("remount {} read-only", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn parses_flags_data_and_propagation() {
        let o = parse_options(&["nosuid", "noexec", "mode=755", "size=64k", "rprivate", "ro"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(o.data, "mode=755,size=64k");
        let o = parse_options(&["rbind", "ro", "rw"]);
        assert!(o.is_bind());
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(parse_options::<&str>(&[]), MountOptions::default());
    }

    #[test]
    fn finds_cgroup_hierarchies() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 23 0:40 / /other rw - cgroup cgroup rw,memory";
        let h = parse_cgroup_mounts(info, "/sys/fs/cgroup");
        assert_eq!(h.len(), 3);
        assert_eq!(
            (h[0].name.as_str(), h[0].data.as_str()),
            ("cpu,cpuacct", "cpu,cpuacct")
        );
        assert_eq!(h[1].data, "name=systemd");
        assert_eq!((h[2].fstype.as_str(), h[2].data.as_str()), ("cgroup2", ""));
        assert!(h.iter().all(|x| !x.at_root));
        let v2 = parse_cgroup_mounts(
            "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate",
            "/sys/fs/cgroup",
        );
        assert!(v2[0].at_root);
    }

    #[test]
    fn secure_join_stays_inside_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../..", root.join("real/up")).unwrap();
        symlink("/etc/passwd", root.join("escape")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/abs/sub")),
            root.join("real/sub")
        );
        assert_eq!(secure_join(root, Path::new("/real/up/x")), root.join("x"));
        assert_eq!(
            secure_join(root, Path::new("/escape")),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x/./y")),
            root.join("x/y")
        );
        assert_eq!(
            secure_join(root, Path::new("/new/dir")),
            root.join("new/dir")
        );
        // A loop ends when the budget does, still inside the root.
        assert!(secure_join(root, Path::new("/loop")).starts_with(root));
    }
}
