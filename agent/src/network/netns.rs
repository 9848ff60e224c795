//! Persistent network namespaces: an empty file with a namespace
//! bind-mounted on it, the way `ip netns add` keeps one in `/run/netns`,
//! but under the data directory so that each data dir (each test) has its own.
//!
//! The namespace is made on a short-lived thread that `unshare(CLONE_NEWNET)`s
//! and bind-mounts its `/proc/thread-self/ns/net`: a thread's network
//! namespace is its own, so this is sound in a multithreaded process and
//! leaves the caller's namespace alone; the thread then exits and the bind
//! mount keeps the namespace alive.

use super::{NetworkError, io};
use nix::mount::{MntFlags, MsFlags};
use std::path::Path;

/// Creates a network namespace bound to `path` (a no-op if one is bound there).
pub fn create(path: &Path) -> Result<(), NetworkError> {
    if is_mounted(path) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::File::create(path).map_err(io(path))?;
    let step = format!("create netns {}", path.display());
    let target = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("gantry-netns".into())
        .spawn(move || -> nix::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .map_err(|e| NetworkError::Command {
            step: step.clone(),
            message: format!("cannot start a thread: {e}"),
        })?;
    let result = thread.join().map_err(|_| NetworkError::Command {
        step: step.clone(),
        message: "the namespace thread panicked".into(),
    })?;
    if let Err(source) = result {
        let _ = std::fs::remove_file(path);
        return Err(NetworkError::Sys { step, source });
    }
    Ok(())
}

/// Binds the network namespace of process `pid` to `path` (re-attaching a
/// running container whose namespace file was lost).
pub fn bind(pid: i32, path: &Path) -> Result<(), NetworkError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::File::create(path).map_err(io(path))?;
    let source = format!("/proc/{pid}/ns/net");
    nix::mount::mount(
        Some(source.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| {
        let _ = std::fs::remove_file(path);
        NetworkError::Sys {
            step: format!("bind netns of pid {pid} to {}", path.display()),
            source,
        }
    })
}

/// Whether a network namespace is bound at `path`: nsfs files have their own
/// filesystem magic, unlike the empty file a half-done create leaves.
pub fn is_mounted(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Unmounts and deletes the namespace file at `path`; what is already gone
/// is fine. The namespace itself ends when nothing else holds it.
pub fn remove(path: &Path) -> Result<(), NetworkError> {
    if is_mounted(path) {
        // Detached: a process still inside (a container being killed) must
        // not make the removal fail; the namespace goes with it.
        nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(|source| NetworkError::Sys {
            step: format!("unmount netns {}", path.display()),
            source,
        })?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}
