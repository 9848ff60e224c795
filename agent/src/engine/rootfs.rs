//! A container's root filesystem: an overlay of the image's layers.
//!
//! The image store's unpacked layers are the read-only lower directories
//! (top layer first in the mount options), and the container's own
//! `upper/` and `work/` directories take its writes, so that any number of
//! containers share one copy of an image.
//!
//! The kernel takes mount options of at most one page. An image with many
//! layers under a long data directory can exceed that; then the lower
//! directories are given relative to their common parent and the mount is
//! done by a forked child that first `chdir`s there (containerd's trick).
//! Only the child changes directory, so a multithreaded caller is safe: the
//! child makes nothing but async-signal-safe system calls.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors of rootfs mounting.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The mount or unmount failed.
    #[error("{operation} {target}: {source}")]
    Mount {
        /// `mount overlay` or `unmount`.
        operation: &'static str,
        /// The mount point.
        target: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A layer path cannot be written in overlayfs options.
    #[error("layer path {0} contains ',' or ':' which overlayfs options cannot carry")]
    BadPath(PathBuf),
    /// The options do not fit in a page even with relative paths.
    #[error(
        "overlay options for {target} are {len} bytes, over the kernel's {max}: too many layers"
    )]
    TooLong {
        /// The mount point.
        target: PathBuf,
        /// Their length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// The longest mount data the kernel accepts (one page, with its NUL).
pub fn max_options_len() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 { page as usize - 1 } else { 4095 }
}

/// The overlayfs options for `layers` given bottom first, as the image
/// store returns them (overlayfs wants the top layer first).
pub fn overlay_options(layers_bottom_first: &[String], upper: &Path, work: &Path) -> String {
    let lower: Vec<&str> = layers_bottom_first
        .iter()
        .rev()
        .map(String::as_str)
        .collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    )
}

/// Mounts the overlay of `layers` (bottom first) with `upper` and `work` at
/// `target`. All paths must be absolute.
pub fn mount_overlay(
    layers_bottom_first: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    for path in layers_bottom_first
        .iter()
        .chain([&upper.to_path_buf(), &work.to_path_buf()])
    {
        let s = path.as_os_str().as_bytes();
        if s.contains(&b',') || s.contains(&b':') {
            return Err(RootfsError::BadPath(path.clone()));
        }
    }
    let absolute: Vec<String> = layers_bottom_first
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let options = overlay_options(&absolute, upper, work);
    let max = max_options_len();
    if options.len() <= max {
        return nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|source| mount_error(target, source));
    }
    let parent = common_parent(layers_bottom_first);
    let relative: Vec<String> = layers_bottom_first
        .iter()
        .map(|p| {
            p.strip_prefix(&parent)
                .map(|r| r.display().to_string())
                .unwrap_or_else(|_| p.display().to_string())
        })
        .collect();
    let options = overlay_options(&relative, upper, work);
    if options.len() > max {
        return Err(RootfsError::TooLong {
            target: target.to_path_buf(),
            len: options.len(),
            max,
        });
    }
    mount_in_dir(&parent, target, &options)
}

/// Unmounts the rootfs at `target` (lazily if busy); not mounted is fine.
pub fn unmount(target: &Path) -> Result<(), RootfsError> {
    match nix::mount::umount2(target, nix::mount::MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
                RootfsError::Mount {
                    operation: "unmount",
                    target: target.to_path_buf(),
                    source,
                }
            })
        }
        Err(source) => Err(RootfsError::Mount {
            operation: "unmount",
            target: target.to_path_buf(),
            source,
        }),
    }
}

/// Whether something is mounted at `target` (it is a different device
/// from its parent, or the overlay the engine put there).
pub fn is_mounted(target: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = target.display().to_string();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mount_point| unescape_mountinfo(mount_point) == wanted)
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn mount_error(target: &Path, source: nix::Error) -> RootfsError {
    RootfsError::Mount {
        operation: "mount overlay",
        target: target.to_path_buf(),
        source,
    }
}

/// The deepest directory that contains every path.
fn common_parent(paths: &[PathBuf]) -> PathBuf {
    let mut parent = match paths.first().and_then(|p| p.parent()) {
        Some(p) => p.to_path_buf(),
        None => return PathBuf::from("/"),
    };
    for path in paths {
        while !path.starts_with(&parent) {
            match parent.parent() {
                Some(p) => parent = p.to_path_buf(),
                None => return PathBuf::from("/"),
            }
        }
    }
    parent
}

/// Mounts the overlay from a forked child whose working directory is `dir`.
fn mount_in_dir(dir: &Path, target: &Path, options: &str) -> Result<(), RootfsError> {
    let cstr = |b: &[u8], path: &Path| {
        CString::new(b).map_err(|_| RootfsError::BadPath(path.to_path_buf()))
    };
    let c_dir = cstr(dir.as_os_str().as_bytes(), dir)?;
    let c_target = cstr(target.as_os_str().as_bytes(), target)?;
    let c_options = cstr(options.as_bytes(), target)?;
    let c_overlay = c"overlay";
    // SAFETY: the child only calls chdir, mount and _exit, which are
    // async-signal-safe, on buffers prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(mount_error(target, nix::errno::Errno::last()));
    }
    if pid == 0 {
        // SAFETY: see above; the child never returns.
        unsafe {
            if libc::chdir(c_dir.as_ptr()) != 0 {
                libc::_exit(*libc::__errno_location() & 0xff);
            }
            let rc = libc::mount(
                c_overlay.as_ptr(),
                c_target.as_ptr(),
                c_overlay.as_ptr(),
                0,
                c_options.as_ptr().cast(),
            );
            libc::_exit(if rc == 0 {
                0
            } else {
                *libc::__errno_location() & 0xff
            });
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
        .map_err(|e| mount_error(target, e))?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, errno) => {
            Err(mount_error(target, nix::errno::Errno::from_raw(errno)))
        }
        _ => Err(mount_error(target, nix::errno::Errno::EINTR)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_put_the_top_layer_first() {
        let layers = vec!["/l/a".to_string(), "/l/b".to_string()];
        assert_eq!(
            overlay_options(&layers, Path::new("/c/upper"), Path::new("/c/work")),
            "lowerdir=/l/b:/l/a,upperdir=/c/upper,workdir=/c/work"
        );
    }

    #[test]
    fn common_parent_of_layers() {
        let paths = vec![
            PathBuf::from("/data/images/layers/aaa/fs"),
            PathBuf::from("/data/images/layers/bbb/fs"),
        ];
        assert_eq!(common_parent(&paths), Path::new("/data/images/layers"));
        assert_eq!(common_parent(&[PathBuf::from("/x/y")]), Path::new("/x"));
    }

    /// Mounts an overlay whose options need the relative-path trick, for real.
    #[test]
    fn long_lowerdir_mounts_with_relative_paths() {
        if !nix::unistd::Uid::effective().is_root() {
            println!("SKIPPED: mounting overlayfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir
            .path()
            .join("a-rather-long-directory-name-for-the-layer-store-of-images");
        let mut layers = Vec::new();
        // 60 layers × ~130 bytes of absolute path is well over a page.
        for i in 0..60 {
            let layer = base.join(format!("{i:064x}"));
            std::fs::create_dir_all(&layer).unwrap();
            std::fs::write(layer.join(format!("file{i}")), format!("{i}")).unwrap();
            layers.push(layer);
        }
        // The top layer overrides a file of the bottom one.
        std::fs::write(layers[59].join("file0"), "top").unwrap();
        let absolute: Vec<String> = layers.iter().map(|p| p.display().to_string()).collect();
        let upper = dir.path().join("upper");
        let work = dir.path().join("work");
        let target = dir.path().join("rootfs");
        for d in [&upper, &work, &target] {
            std::fs::create_dir(d).unwrap();
        }
        assert!(overlay_options(&absolute, &upper, &work).len() > max_options_len());
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = unmount(&self.0);
            }
        }
        mount_overlay(&layers, &upper, &work, &target).unwrap();
        let _guard = Unmount(target.clone());
        assert!(is_mounted(&target));
        assert_eq!(
            std::fs::read_to_string(target.join("file0")).unwrap(),
            "top"
        );
        assert_eq!(
            std::fs::read_to_string(target.join("file30")).unwrap(),
            "30"
        );
        std::fs::write(target.join("new"), "w").unwrap();
        assert!(upper.join("new").exists());
        unmount(&target).unwrap();
        assert!(!is_mounted(&target));
    }
}
