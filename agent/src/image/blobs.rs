//! The content-addressed blob store: `blobs/sha256/<hex>`, each blob
//! verified against its digest and size before it becomes visible.
//!
//! Invariant: a blob file under `blobs/` is always complete and matches its
//! name. Writes go to a temporary file in the store's `tmp/` (same file
//! system), are fsynced and only then renamed into place, so a crash or a
//! refused blob never leaves a half-written file where readers look.

use sha2::{Digest as _, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A file of the blob store could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The digest string is not `sha256:` and 64 lowercase hex digits.
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    InvalidDigest(String),
    /// The content does not hash to the digest it was announced with.
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    DigestMismatch {
        /// The digest the blob should have.
        digest: String,
        /// The digest of what was actually read.
        actual: String,
    },
    /// The content is shorter or longer than announced.
    #[error("blob {digest} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The digest of the blob.
        digest: String,
        /// The announced size.
        expected: u64,
        /// The size actually read (reading stops just past `expected`).
        actual: u64,
    },
    /// The blob is not in the store.
    #[error("blob {0} is missing")]
    Missing(String),
}

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex.
pub fn digest_hex(digest: &str) -> Result<&str, BlobError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(BlobError::InvalidDigest(digest.to_string())),
    }
}

/// The `sha256:<hex>` digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A reader that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads `inner` to its end (so trailing padding is hashed too) and
    /// returns the `sha256:` digest and the byte count.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The blob directory of a store, with the store's `tmp/` for staging.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// A blob store in `dir` (`…/blobs/sha256`) staging in `tmp`.
    pub fn new(dir: PathBuf, tmp: PathBuf) -> Self {
        BlobStore { dir, tmp }
    }

    /// Where the blob with `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        Ok(self.dir.join(digest_hex(digest)?))
    }

    /// Whether the blob is present (presence implies it was verified).
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Opens a stored blob.
    pub fn open(&self, digest: &str) -> Result<File, BlobError> {
        let path = self.path(digest)?;
        File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BlobError::Missing(digest.to_string())
            } else {
                BlobError::Io { path, source }
            }
        })
    }

    /// Reads a whole stored blob (manifests, configs: small ones).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, BlobError> {
        let path = self.path(digest)?;
        let mut bytes = Vec::new();
        self.open(digest)?
            .read_to_end(&mut bytes)
            .map_err(|source| BlobError::Io { path, source })?;
        Ok(bytes)
    }

    /// The names (`sha256:<hex>`) and sizes of all stored blobs.
    pub fn list(&self) -> Result<Vec<(String, u64)>, BlobError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(BlobError::Io {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut blobs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| BlobError::Io {
                path: self.dir.clone(),
                source,
            })?;
            let name = format!("sha256:{}", entry.file_name().to_string_lossy());
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            blobs.push((name, size));
        }
        Ok(blobs)
    }

    /// Copies `reader` into the store as the blob `digest`, checking that it
    /// has exactly `size` bytes (when known) and hashes to `digest`. Nothing
    /// becomes visible unless both hold. Returns the byte count.
    pub fn write(
        &self,
        digest: &str,
        size: Option<u64>,
        reader: impl Read,
    ) -> Result<u64, BlobError> {
        let final_path = self.path(digest)?;
        let tmp_io = |source| BlobError::Io {
            path: self.tmp.clone(),
            source,
        };
        fs::create_dir_all(&self.tmp).map_err(tmp_io)?;
        fs::create_dir_all(&self.dir).map_err(|source| BlobError::Io {
            path: self.dir.clone(),
            source,
        })?;
        // NamedTempFile deletes the staging file on every early return.
        let mut tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&self.tmp)
            .map_err(tmp_io)?;
        // Read at most one byte past the announced size: enough to tell a
        // too-long blob without letting a hostile source fill the disk.
        let limit = size.map_or(u64::MAX, |s| s.saturating_add(1));
        let mut hashing = HashingReader::new(reader.take(limit));
        let tmp_path = tmp.path().to_path_buf();
        let io_tmp = |source| BlobError::Io {
            path: tmp_path.clone(),
            source,
        };
        io::copy(&mut hashing, tmp.as_file_mut()).map_err(io_tmp)?;
        let (actual, count) = (
            format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
            hashing.count,
        );
        if let Some(expected) = size
            && count != expected
        {
            return Err(BlobError::SizeMismatch {
                digest: digest.to_string(),
                expected,
                actual: count,
            });
        }
        if actual != digest {
            return Err(BlobError::DigestMismatch {
                digest: digest.to_string(),
                actual,
            });
        }
        tmp.as_file_mut().flush().map_err(io_tmp)?;
        tmp.as_file().sync_all().map_err(io_tmp)?;
        tmp.persist(&final_path).map_err(|e| BlobError::Io {
            path: final_path.clone(),
            source: e.error,
        })?;
        sync_dir(&self.dir).map_err(|source| BlobError::Io {
            path: self.dir.clone(),
            source,
        })?;
        Ok(count)
    }

    /// Stores `bytes` under their own digest and returns it.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<String, BlobError> {
        let digest = sha256_digest(bytes);
        if !self.contains(&digest) {
            self.write(&digest, Some(bytes.len() as u64), bytes)?;
        }
        Ok(digest)
    }

    /// Removes a blob; a missing one is not an error.
    pub fn remove(&self, digest: &str) -> Result<(), BlobError> {
        let path = self.path(digest)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }
}

/// fsyncs a directory so that a rename into it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("blobs/sha256"), dir.path().join("tmp"));
        (dir, store)
    }

    fn staged(dir: &Path) -> usize {
        fs::read_dir(dir.join("tmp")).map_or(0, |d| d.count())
    }

    #[test]
    fn verified_blob_is_stored_and_readable() {
        let (dir, store) = store();
        let digest = sha256_digest(b"hello");
        store.write(&digest, Some(5), &b"hello"[..]).unwrap();
        assert_eq!(store.read(&digest).unwrap(), b"hello");
        assert_eq!(staged(dir.path()), 0);
        assert_eq!(store.list().unwrap(), vec![(digest, 5)]);
    }

    #[test]
    fn digest_mismatch_is_refused_and_nothing_is_visible() {
        let (dir, store) = store();
        let digest = sha256_digest(b"hello");
        let err = store.write(&digest, Some(5), &b"jello"[..]).unwrap_err();
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&digest), "{err}");
        assert!(!store.contains(&digest));
        assert_eq!(staged(dir.path()), 0);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn truncated_and_overlong_blobs_are_refused() {
        let (dir, store) = store();
        let digest = sha256_digest(b"hello");
        let err = store.write(&digest, Some(5), &b"hell"[..]).unwrap_err();
        assert!(
            matches!(err, BlobError::SizeMismatch { actual: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&digest), "{err}");
        let err = store.write(&digest, Some(5), &b"hello!!"[..]).unwrap_err();
        assert!(
            matches!(err, BlobError::SizeMismatch { actual: 6, .. }),
            "{err}"
        );
        assert!(!store.contains(&digest));
        assert_eq!(staged(dir.path()), 0);
    }

    #[test]
    fn malformed_digests_are_refused() {
        let (_dir, store) = store();
        for bad in ["sha256:abc", "md5:00", "sha256:../../etc/passwd", ""] {
            assert!(matches!(store.path(bad), Err(BlobError::InvalidDigest(_))));
        }
    }
}
