//! Named volumes: directories under `<data dir>/volumes/<name>/_data` that
//! outlive the containers using them.
//!
//! A volume is created on first use (or by `gantry volume create`). When an
//! empty volume is mounted over a path where the image has content, that
//! content is copied in first, as Docker does, so that e.g. a database image's
//! default files appear in its data volume. Which containers use a volume is
//! not recorded here: the engine knows its containers and refuses to remove a
//! volume in use.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Errors of the volume store.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The name is not `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
    #[error("invalid volume name {0:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")]
    InvalidName(String),
    /// No volume has this name.
    #[error("volume {0} not found")]
    NotFound(String),
    /// The volume already exists (for an explicit create).
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    /// Containers use the volume.
    #[error("volume {name} is in use by container(s) {}", .containers.join(", "))]
    InUse {
        /// The volume name.
        name: String,
        /// The ids of the containers using it.
        containers: Vec<String>,
    },
    /// A file of the volume could not be created, read, copied or removed.
    #[error("volume {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// A volume, as `gantry volume ls/inspect` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// The volume's name.
    pub name: String,
    /// Its data directory on the host, mounted into containers.
    pub mountpoint: PathBuf,
    /// When it was created, RFC 3339.
    pub created: String,
    /// Ids of the containers using it (filled in by the engine).
    pub used_by: Vec<String>,
}

/// Checks a volume name.
pub fn validate_name(name: &str) -> Result<(), VolumeError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok && name.len() <= 255 {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(name.to_string()))
    }
}

/// The named volumes of a node.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    root: PathBuf,
}

impl VolumeStore {
    /// The store rooted at `root` (`DataDir::volumes()`); created lazily.
    pub fn new(root: impl Into<PathBuf>) -> VolumeStore {
        VolumeStore { root: root.into() }
    }

    /// The data directory of volume `name`.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.root.join(name).join("_data")
    }

    /// Creates volume `name`; an error if it exists.
    pub fn create(&self, name: &str) -> Result<VolumeInfo, VolumeError> {
        validate_name(name)?;
        if self.root.join(name).exists() {
            return Err(VolumeError::AlreadyExists(name.to_string()));
        }
        self.ensure(name)?;
        self.inspect(name)
    }

    /// Creates volume `name` unless it exists; true when it was created now.
    pub fn ensure(&self, name: &str) -> Result<bool, VolumeError> {
        validate_name(name)?;
        let dir = self.root.join(name);
        if dir.join("_data").is_dir() {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        // Build it aside and rename, so that a half-made volume is never seen.
        let tmp = self.root.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("_data")).map_err(io(&tmp))?;
        std::fs::set_permissions(tmp.join("_data"), std::fs::Permissions::from_mode(0o755))
            .map_err(io(&tmp))?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(true),
            Err(_) if dir.join("_data").is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(false)
            }
            Err(e) => Err(io(&dir)(e)),
        }
    }

    /// Volume `name`'s details (without `used_by`).
    pub fn inspect(&self, name: &str) -> Result<VolumeInfo, VolumeError> {
        validate_name(name)?;
        let data = self.data_dir(name);
        let meta = match std::fs::metadata(&data) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(name.to_string()));
            }
            Err(e) => return Err(io(&data)(e)),
        };
        let created = meta
            .created()
            .or_else(|_| meta.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(VolumeInfo {
            name: name.to_string(),
            mountpoint: data,
            created: crate::engine::logs::rfc3339_nano(created),
            used_by: Vec::new(),
        })
    }

    /// Every volume, sorted by name.
    pub fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.root)(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_name(n).is_ok())
            .collect();
        names.sort();
        names
            .iter()
            .filter(|n| self.data_dir(n).is_dir())
            .map(|n| self.inspect(n))
            .collect()
    }

    /// Removes volume `name` and its data. The caller checks it is unused.
    pub fn remove(&self, name: &str) -> Result<(), VolumeError> {
        validate_name(name)?;
        let dir = self.root.join(name);
        if !dir.exists() {
            return Err(VolumeError::NotFound(name.to_string()));
        }
        std::fs::remove_dir_all(&dir).map_err(io(&dir))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { path, source }
}

/// Copies the content of `from` (a directory of an image's rootfs) into
/// `to` (a new, empty volume), keeping modes, owners, times of files and
/// symlinks as they are (never following them). The volume directory takes
/// `from`'s mode and owner, as Docker's copy-up does.
pub fn copy_up(from: &Path, to: &Path) -> Result<(), VolumeError> {
    // The top is followed (it may be a /proc/self/fd link); nothing below is.
    let meta = match std::fs::metadata(from) {
        Ok(m) if m.is_dir() => m,
        // Nothing (or not a directory) at the mount point: nothing to copy.
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(from)(e)),
    };
    copy_dir(from, to, 0)?;
    set_owner_mode(to, &meta)
}

/// Whether `dir` has no entries.
pub fn is_empty_dir(dir: &Path) -> Result<bool, VolumeError> {
    Ok(std::fs::read_dir(dir).map_err(io(dir))?.next().is_none())
}

/// [`copy_up`] from `destination` inside `rootfs`, resolving symlinks of
/// the image inside the rootfs, so that an image whose `/data` is a link to
/// `/etc` copies its own `/etc`, never the host's.
pub fn copy_up_from_rootfs(rootfs: &Path, destination: &str, to: &Path) -> Result<(), VolumeError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let root = std::fs::File::open(rootfs).map_err(io(rootfs))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let relative = destination.trim_start_matches('/');
    let dir = match openat2(&root, relative, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => return Ok(()),
        Err(e) => return Err(io(&rootfs.join(relative))(e.into())),
    };
    // The fd's /proc link names the directory found inside the rootfs;
    // everything below it is read without following symlinks.
    let from = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ));
    copy_up(&from, to)
}

/// Deeper trees than this are refused rather than recursed into.
const MAX_DEPTH: usize = 128;

fn copy_dir(from: &Path, to: &Path, depth: usize) -> Result<(), VolumeError> {
    if depth > MAX_DEPTH {
        return Err(io(from)(std::io::Error::other("directory tree too deep")));
    }
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src).map_err(io(&src))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir(&dst).map_err(io(&dst))?;
            copy_dir(&src, &dst, depth + 1)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io(&src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io(&dst))?;
            std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))
                .map_err(io(&dst))?;
            continue;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).map_err(io(&dst))?;
        } else {
            // Device nodes, fifos and sockets in an image directory that is
            // turned into a volume are not worth the mknod: skip them.
            continue;
        }
        set_owner_mode(&dst, &meta)?;
    }
    Ok(())
}

fn set_owner_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), VolumeError> {
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid())).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["a", "data", "my_vol.1-x", "9"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "..", "_x"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_list_inspect_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::new(dir.path().join("volumes"));
        assert!(store.list().unwrap().is_empty());
        store.create("b").unwrap();
        assert!(store.ensure("a").unwrap());
        assert!(!store.ensure("a").unwrap());
        assert!(matches!(
            store.create("a"),
            Err(VolumeError::AlreadyExists(_))
        ));
        let names: Vec<_> = store.list().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["a", "b"]);
        let info = store.inspect("a").unwrap();
        assert_eq!(info.mountpoint, dir.path().join("volumes/a/_data"));
        store.remove("a").unwrap();
        assert!(matches!(store.inspect("a"), Err(VolumeError::NotFound(_))));
        assert!(matches!(store.remove("a"), Err(VolumeError::NotFound(_))));
    }

    #[test]
    fn copy_up_keeps_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("img");
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("sub/f"), "x").unwrap();
        std::fs::set_permissions(from.join("sub/f"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", from.join("link")).unwrap();
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o700)).unwrap();
        let to = dir.path().join("vol");
        std::fs::create_dir(&to).unwrap();
        copy_up(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(to.join("sub/f")).unwrap(), "x");
        let mode = std::fs::metadata(to.join("sub/f")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(
            std::fs::read_link(to.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(std::fs::metadata(&to).unwrap().mode() & 0o777, 0o700);
        // Nothing at the source: nothing happens.
        copy_up(&dir.path().join("missing"), &to).unwrap();
    }
}
