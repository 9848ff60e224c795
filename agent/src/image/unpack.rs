//! Unpacking one layer tar into a directory that overlayfs can stack as a
//! lower dir: whiteouts become 0:0 character devices, opaque markers become
//! the `trusted.overlay.opaque=y` xattr.
//!
//! Invariant: nothing an entry says can write outside the layer root.
//! Absolute paths and `..` are refused outright (rather than cleaned, so a
//! hostile layer is reported, not half-applied); every parent directory is
//! checked with `lstat` so a symlink planted by an earlier entry cannot
//! redirect a later one; existing files are unlinked and recreated with
//! `O_EXCL` so a symlink at the final component is never followed; hard links
//! must point at something this layer already unpacked.

use super::blobs::HashingReader;
use super::manifest::Compression;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The overlayfs whiteout prefix of the OCI layer format.
const WHITEOUT_PREFIX: &str = ".wh.";
/// The opaque-directory marker of the OCI layer format.
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Errors of layer unpacking.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Writing into the layer directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The compressed stream or the tar itself is malformed.
    #[error("malformed layer stream: {0}")]
    Stream(#[source] io::Error),
    /// An entry tries to write outside the layer root, or is otherwise hostile.
    #[error("entry {entry:?}: {reason}")]
    Unsafe {
        /// The entry's path as written in the tar.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Unpacks the layer stream `blob` (compressed as `compression`) into the
/// empty directory `dest`. Returns the diff id: the digest of the
/// uncompressed tar, for the caller to check against the image config.
pub fn unpack_layer(
    blob: impl Read,
    compression: Compression,
    dest: &Path,
) -> Result<String, UnpackError> {
    let mut buffered = BufReader::new(blob);
    let compression = match compression {
        Compression::Sniff => sniff(&mut buffered).map_err(UnpackError::Stream)?,
        known => known,
    };
    let decompressed: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(buffered)
                .map_err(|e| UnpackError::Stream(io::Error::other(e.to_string())))?,
        ),
        Compression::None | Compression::Sniff => Box::new(buffered),
    };
    let mut archive = tar::Archive::new(HashingReader::new(decompressed));
    let mut dir_times = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Stream)? {
        let mut entry = entry.map_err(UnpackError::Stream)?;
        if let Some(dir) = unpack_entry(&mut entry, dest)? {
            dir_times.push(dir);
        }
    }
    // Directory times last: creating entries inside a directory moves its
    // mtime, which would make every image's timestamps depend on unpack order.
    for (path, mtime) in dir_times.into_iter().rev() {
        let _ = File::open(&path).and_then(|f| f.set_modified(mtime));
    }
    let (diff_id, _) = archive.into_inner().finish().map_err(UnpackError::Stream)?;
    Ok(diff_id)
}

/// Tells gzip and zstd from a plain tar by their magic bytes.
fn sniff(reader: &mut impl BufRead) -> io::Result<Compression> {
    let head = reader.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Turns an entry path into a clean relative path, refusing absolute paths
/// and `..`. Returns `None` for the root itself (`./`).
pub fn clean_entry_path(raw: &Path, entry: &str) -> Result<Option<PathBuf>, UnpackError> {
    let mut clean = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(entry, "absolute path"));
            }
            Component::ParentDir => {
                return Err(unsafe_entry(entry, "path contains '..'"));
            }
        }
    }
    Ok((!clean.as_os_str().is_empty()).then_some(clean))
}

fn unsafe_entry(entry: &str, reason: impl Into<String>) -> UnpackError {
    UnpackError::Unsafe {
        entry: entry.to_string(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Walks the parents of `rel` below `root`, refusing any that is a symlink
/// or not a directory, creating missing ones when `create` is set.
fn check_parents(root: &Path, rel: &Path, entry: &str, create: bool) -> Result<(), UnpackError> {
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    let mut current = root.to_path_buf();
    for component in parent.components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(unsafe_entry(
                    entry,
                    format!("parent {} is a symlink", display_rel(root, &current)),
                ));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(unsafe_entry(
                    entry,
                    format!("parent {} is not a directory", display_rel(root, &current)),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&current).map_err(io_err(&current))?;
                fs::set_permissions(&current, Permissions::from_mode(0o755))
                    .map_err(io_err(&current))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(unsafe_entry(
                    entry,
                    format!(
                        "{} does not exist in this layer",
                        display_rel(root, &current)
                    ),
                ));
            }
            Err(e) => return Err(io_err(&current)(e)),
        }
    }
    Ok(())
}

fn display_rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Removes whatever is at `path` (not following symlinks) so that the entry
/// can be created fresh; a directory is kept when `keep_dir` is set.
fn clear(path: &Path, keep_dir: bool) -> Result<bool, UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            if keep_dir {
                return Ok(true);
            }
            fs::remove_dir_all(path).map_err(io_err(path))?;
        }
        Ok(_) => fs::remove_file(path).map_err(io_err(path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    Ok(false)
}

/// Unpacks one entry; returns a directory and its mtime to set at the end.
fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    root: &Path,
) -> Result<Option<(PathBuf, SystemTime)>, UnpackError> {
    let raw = entry.path().map_err(UnpackError::Stream)?.into_owned();
    let name = raw.display().to_string();
    let Some(rel) = clean_entry_path(&raw, &name)? else {
        return Ok(None);
    };
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions() {
        return Ok(None);
    }
    check_parents(root, &rel, &name, true)?;
    let target = root.join(&rel);
    let file_name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    if file_name == OPAQUE_MARKER {
        let dir = target.parent().unwrap_or(root);
        set_xattr(dir, "trusted.overlay.opaque", b"y").map_err(io_err(dir))?;
        return Ok(None);
    }
    if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
        // Other `.wh..wh.` names are aufs bookkeeping with no meaning here.
        if hidden.starts_with(".wh.") || hidden.is_empty() {
            return Ok(None);
        }
        let whiteout = target.with_file_name(hidden);
        clear(&whiteout, false)?;
        mknod(&whiteout, nix::sys::stat::SFlag::S_IFCHR, 0o000, 0, 0)?;
        return Ok(None);
    }

    let header = entry.header();
    let mode = header.mode().map_err(UnpackError::Stream)? & 0o7777;
    let uid = header.uid().map_err(UnpackError::Stream)? as u32;
    let gid = header.gid().map_err(UnpackError::Stream)? as u32;
    let mtime =
        SystemTime::UNIX_EPOCH + Duration::from_secs(header.mtime().map_err(UnpackError::Stream)?);

    use tar::EntryType;
    match kind {
        EntryType::Directory => {
            if !clear(&target, true)? {
                fs::create_dir(&target).map_err(io_err(&target))?;
            }
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(io_err(&target))?;
            fs::set_permissions(&target, Permissions::from_mode(mode)).map_err(io_err(&target))?;
            apply_xattrs(entry, &target)?;
            return Ok(Some((target, mtime)));
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            clear(&target, false)?;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map_err(io_err(&target))?;
            io::copy(entry, &mut file).map_err(UnpackError::Stream)?;
            // chown before chmod: chown clears set-id bits.
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io_err(&target))?;
            file.set_permissions(Permissions::from_mode(mode))
                .map_err(io_err(&target))?;
            file.set_modified(mtime).map_err(io_err(&target))?;
        }
        EntryType::Symlink => {
            let link = entry
                .link_name()
                .map_err(UnpackError::Stream)?
                .ok_or_else(|| unsafe_entry(&name, "symlink without a target"))?
                .into_owned();
            clear(&target, false)?;
            std::os::unix::fs::symlink(&link, &target).map_err(io_err(&target))?;
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(io_err(&target))?;
        }
        EntryType::Link => {
            let link = entry
                .link_name()
                .map_err(UnpackError::Stream)?
                .ok_or_else(|| unsafe_entry(&name, "hardlink without a target"))?
                .into_owned();
            let link_rel = clean_entry_path(&link, &name)
                .map_err(|e| match e {
                    UnpackError::Unsafe { entry, reason } => UnpackError::Unsafe {
                        entry,
                        reason: format!("hardlink target {}: {reason}", link.display()),
                    },
                    other => other,
                })?
                .ok_or_else(|| unsafe_entry(&name, "hardlink to the layer root"))?;
            check_parents(root, &link_rel, &name, false)?;
            let source = root.join(&link_rel);
            match fs::symlink_metadata(&source) {
                Ok(meta) if !meta.is_dir() => {}
                Ok(_) => return Err(unsafe_entry(&name, "hardlink to a directory")),
                Err(_) => {
                    return Err(unsafe_entry(
                        &name,
                        format!("hardlink target {} is not in this layer", link.display()),
                    ));
                }
            }
            if source != target {
                clear(&target, false)?;
                // link(2) does not follow a symlink source: the new name is
                // another link to the symlink itself, which stays inside.
                fs::hard_link(&source, &target).map_err(io_err(&target))?;
            }
            return Ok(None);
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let major = header
                .device_major()
                .map_err(UnpackError::Stream)?
                .unwrap_or(0);
            let minor = header
                .device_minor()
                .map_err(UnpackError::Stream)?
                .unwrap_or(0);
            let kind_flag = match kind {
                EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                _ => nix::sys::stat::SFlag::S_IFIFO,
            };
            clear(&target, false)?;
            mknod(&target, kind_flag, mode, major, minor)?;
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(io_err(&target))?;
            fs::set_permissions(&target, Permissions::from_mode(mode)).map_err(io_err(&target))?;
        }
        other => {
            return Err(unsafe_entry(
                &name,
                format!("unsupported entry type {other:?}"),
            ));
        }
    }
    apply_xattrs(entry, &target)?;
    Ok(None)
}

fn mknod(
    path: &Path,
    kind: nix::sys::stat::SFlag,
    mode: u32,
    major: u32,
    minor: u32,
) -> Result<(), UnpackError> {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(mode),
        nix::sys::stat::makedev(major.into(), minor.into()),
    )
    .map_err(|errno| UnpackError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(errno),
    })
}

/// Applies `SCHILY.xattr.*` PAX records (file capabilities, mostly). The
/// `trusted.overlay.*` namespace is refused: it would let a layer forge
/// overlayfs metadata (redirects, metacopy) for the stacked mount.
fn apply_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<(), UnpackError> {
    let Some(extensions) = entry.pax_extensions().map_err(UnpackError::Stream)? else {
        return Ok(());
    };
    for extension in extensions {
        let extension = extension.map_err(UnpackError::Stream)?;
        let Ok(key) = extension.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
            continue;
        };
        if name.starts_with("trusted.overlay.") {
            continue;
        }
        if let Err(err) = set_xattr(path, name, extension.value_bytes()) {
            tracing::warn!(path = %path.display(), xattr = name, %err, "xattr not applied");
        }
    }
    Ok(())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let c_name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the value
    // pointer and length describe a live slice.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an xattr (tests and `inspect` use it).
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let c_name = CString::new(name).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes for the call.
    let n = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}
