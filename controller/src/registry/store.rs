//! The registry's files: content-addressed blobs, upload sessions, and per
//! repository manifest links and tags. Synchronous on purpose: the HTTP
//! handlers call it from `spawn_blocking`, and tests call it directly.
//!
//! On disk, under the store root (`<data_dir>/controller/registry/`):
//!
//! - `blobs/sha256/<hex>`: layers, configs and manifests, each renamed into
//!   place only after its content hashed to its name;
//! - `uploads/<id>`: one file per upload session, appended to by `PATCH`;
//! - `repositories/<name>/_manifests/<hex>`: the manifest `<hex>` belongs to
//!   the repository; the file holds its media type;
//! - `repositories/<name>/_tags/<tag>`: the tag's manifest digest.
//!
//! The `_` prefix keeps the bookkeeping directories apart from repository
//! path components, which must start with a letter or digit: `a/_tags` can
//! never be the repository `a`'s child `_tags`.
//!
//! Invariant: everything a reader can observe changes by rename only, so a
//! crash leaves a blob, tag or link either absent or complete.

use super::RegistryError;
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The media type of a Docker image manifest (schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The media type of a Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The largest manifest accepted or served, as distribution's default.
pub const MANIFEST_LIMIT: usize = 4 << 20;

/// The longest repository name, as the distribution spec's reference grammar.
const NAME_LIMIT: usize = 255;

/// A validated `sha256:<64 lowercase hex>` digest (the only algorithm the
/// registry accepts, as the rest of Gantry).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<hex>`; other algorithms are refused.
    pub fn parse(input: &str) -> Result<Digest, RegistryError> {
        let invalid = |reason: &str| RegistryError::DigestInvalid {
            digest: input.to_string(),
            reason: reason.to_string(),
        };
        let hex = input
            .strip_prefix("sha256:")
            .ok_or_else(|| invalid("only sha256 digests are supported"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("want 64 lowercase hex digits after sha256:"));
        }
        Ok(Digest(input.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The hex part, which names the blob's file.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The digest as `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated repository name.
///
/// Decision: the registry accepts every name the agents' reference parser
/// (`gantry_agent::image::Reference`) produces, so a mirror lookup of any
/// valid image answers 404 and the puller falls back to the origin, never a
/// 400 that stops it. So path components are `[a-z0-9]` at both ends with
/// `.`, `_` and `-` between (the distribution grammar, slightly widened),
/// and the first component may also be a registry host with a port
/// (`127.0.0.1:5000`, `[::1]:5000`), because agents name mirror
/// repositories by the full reference, host included (`127.0.0.1:5000/app`
/// → `GET /v2/127.0.0.1:5000/app/manifests/v1`), as containerd's mirrors
/// do. The host is kept verbatim as the first directory under
/// `repositories/`: Linux paths may hold colons, and a verbatim name never
/// maps onto another's directory. No component can be `.`, `..` or start
/// with `_`, so names never escape `repositories/` or meet its `_tags` and
/// `_manifests` bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryName(String);

impl RepositoryName {
    /// Validates `input`.
    pub fn parse(input: &str) -> Result<RepositoryName, RegistryError> {
        let invalid = |reason: &str| RegistryError::NameInvalid {
            name: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(invalid("empty"));
        }
        if input.len() > NAME_LIMIT {
            return Err(invalid("longer than 255 characters"));
        }
        for (i, component) in input.split('/').enumerate() {
            let ok = is_path_component(component) || (i == 0 && is_host_component(component));
            if !ok {
                return Err(invalid(if component.is_empty() {
                    "empty path component"
                } else {
                    "path components are [a-z0-9._-], starting and ending with a letter or digit"
                }));
            }
        }
        Ok(RepositoryName(input.to_string()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-z0-9]` at both ends, `[a-z0-9._-]` between.
fn is_path_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            alnum(first)
                && alnum(last)
                && bytes
                    .iter()
                    .all(|&b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
        }
        _ => false,
    }
}

/// A registry host as the reference parser allows it: `[A-Za-z0-9.:[]-]`,
/// starting with a letter, digit or `[` (which also rules out `.` and `..`).
fn is_host_component(s: &str) -> bool {
    s.as_bytes()
        .first()
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'[')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// What a manifest is asked for by: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestRef {
    /// A tag, `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
    Tag(String),
    /// A manifest digest.
    Digest(Digest),
}

impl ManifestRef {
    /// Parses a tag or a digest (anything with a `:` is a digest).
    pub fn parse(input: &str) -> Result<ManifestRef, RegistryError> {
        if input.contains(':') {
            return Digest::parse(input).map(ManifestRef::Digest);
        }
        let b = input.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(RegistryError::TagInvalid {
                tag: input.to_string(),
            });
        }
        Ok(ManifestRef::Tag(input.to_string()))
    }
}

impl fmt::Display for ManifestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestRef::Tag(tag) => f.write_str(tag),
            ManifestRef::Digest(digest) => digest.fmt(f),
        }
    }
}

/// A stored manifest, as a `GET` or `HEAD` serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// Its digest.
    pub digest: Digest,
    /// Its media type (the `Content-Type` to serve).
    pub media_type: String,
    /// The blob file holding its bytes.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// The registry's storage directory. Cheap to clone; every method works on
/// files only, so several clones (or processes) may share one directory.
#[derive(Debug, Clone)]
pub struct RegistryStore {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RegistryStore {
    /// Opens (creating if needed) the store under `dir`.
    ///
    /// Decision: upload sessions left by an earlier run are deleted, the way
    /// distribution's upload purger does, since no client can resume them
    /// across a controller restart that lost their state anyway; so `open`
    /// belongs at start-up, not on every request.
    pub fn open(dir: impl Into<PathBuf>) -> Result<RegistryStore, RegistryError> {
        let store = RegistryStore { root: dir.into() };
        for dir in [store.blobs_dir(), store.repositories_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let uploads = store.uploads_dir();
        if uploads.exists() {
            fs::remove_dir_all(&uploads).map_err(io_err(&uploads))?;
        }
        fs::create_dir_all(&uploads).map_err(io_err(&uploads))?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    fn repositories_dir(&self) -> PathBuf {
        self.root.join("repositories")
    }

    fn repository_dir(&self, name: &RepositoryName) -> PathBuf {
        self.repositories_dir().join(name.as_str())
    }

    /// The file of blob `digest` (which may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// The size of blob `digest`, or `None` when the store lacks it.
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RegistryError::Io { path, source }),
        }
    }

    /// Starts an upload session and returns its id.
    pub fn start_upload(&self) -> Result<String, RegistryError> {
        let dir = self.uploads_dir();
        // The temp file's random name is the session id: unguessable enough
        // for ids that only separate concurrent clients (there is no auth in
        // this issue), and unique by construction.
        let file = tempfile::Builder::new()
            .prefix("u")
            .rand_bytes(24)
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        let (_, path) = file.keep().map_err(|e| RegistryError::Io {
            path: dir.clone(),
            source: e.error,
        })?;
        Ok(path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default())
    }

    /// The file of upload session `id`; unknown or malformed ids are
    /// `BlobUploadUnknown`.
    pub fn upload_path(&self, id: &str) -> Result<PathBuf, RegistryError> {
        let unknown = || RegistryError::BlobUploadUnknown { id: id.to_string() };
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(unknown());
        }
        let path = self.uploads_dir().join(id);
        if !path.is_file() {
            return Err(unknown());
        }
        Ok(path)
    }

    /// Bytes received so far by upload `id`.
    pub fn upload_size(&self, id: &str) -> Result<u64, RegistryError> {
        let path = self.upload_path(id)?;
        fs::metadata(&path).map(|m| m.len()).map_err(io_err(&path))
    }

    /// Ends upload `id` without storing anything.
    pub fn cancel_upload(&self, id: &str) -> Result<(), RegistryError> {
        let path = self.upload_path(id)?;
        fs::remove_file(&path).map_err(io_err(&path))
    }

    /// Completes upload `id` as blob `digest`: the content is hashed and
    /// must match, then it is synced and renamed into place. On a mismatch
    /// the session's data is deleted and nothing becomes visible. Returns
    /// the blob's size.
    pub fn finish_upload(&self, id: &str, digest: &Digest) -> Result<u64, RegistryError> {
        let path = self.upload_path(id)?;
        let result = self.commit_file(&path, digest);
        if result.is_err() {
            // A failed commit ends the session, as distribution does; a
            // cleanup error must not hide why the commit failed.
            let _ = fs::remove_file(&path);
        }
        result
    }

    /// Hashes `path`, checks it against `digest`, and renames it to the
    /// blob's place (or drops it when the blob is already there).
    fn commit_file(&self, path: &Path, digest: &Digest) -> Result<u64, RegistryError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest.as_str() {
            return Err(RegistryError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        let target = self.blob_path(digest);
        if target.exists() {
            fs::remove_file(path).map_err(io_err(path))?;
            return Ok(size);
        }
        file.sync_all().map_err(io_err(path))?;
        fs::rename(path, &target).map_err(io_err(&target))?;
        sync_dir(&self.blobs_dir())?;
        Ok(size)
    }

    /// Stores `bytes` as a blob (used for manifests); returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        if self.blob_path(&digest).exists() {
            return Ok(digest);
        }
        let dir = self.uploads_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("m")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
        let path = tmp.path().to_path_buf();
        let (_, path) = tmp.keep().map_err(|e| RegistryError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        let result = self.commit_file(&path, &digest);
        if result.is_err() {
            let _ = fs::remove_file(&path);
        }
        result.map(|_| digest)
    }

    /// Stores a manifest pushed to `name` under `reference`: it must parse
    /// as an image manifest or index whose every referenced blob (or child
    /// manifest, for an index) is already in the store, with the size the
    /// manifest says. `content_type` is the request's, used when the
    /// document does not name its own media type. Returns its digest.
    pub fn put_manifest(
        &self,
        name: &RepositoryName,
        reference: &ManifestRef,
        bytes: &[u8],
        content_type: Option<&str>,
    ) -> Result<Digest, RegistryError> {
        if bytes.len() > MANIFEST_LIMIT {
            return Err(RegistryError::ManifestTooLarge {
                limit: MANIFEST_LIMIT,
            });
        }
        let digest = Digest::of(bytes);
        if let ManifestRef::Digest(wanted) = reference
            && *wanted != digest
        {
            return Err(RegistryError::DigestMismatch {
                expected: wanted.to_string(),
                actual: digest.to_string(),
            });
        }
        let media_type = self.check_manifest(name, bytes, content_type)?;
        self.write_blob(bytes)?;
        let repo = self.repository_dir(name);
        let manifests = repo.join("_manifests");
        write_atomic(&manifests, digest.hex(), media_type.as_bytes())?;
        if let ManifestRef::Tag(tag) = reference {
            write_atomic(&repo.join("_tags"), tag, digest.as_str().as_bytes())?;
        }
        Ok(digest)
    }

    /// Validates a pushed manifest; returns its media type.
    fn check_manifest(
        &self,
        name: &RepositoryName,
        bytes: &[u8],
        content_type: Option<&str>,
    ) -> Result<String, RegistryError> {
        let invalid = |reason: String| RegistryError::ManifestInvalid { reason };
        let doc: Document =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a manifest: {e}")))?;
        let header = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| !c.is_empty() && *c != "application/json");
        let media_type = match (&doc.media_type, header) {
            (Some(own), Some(header)) if own != header => {
                return Err(invalid(format!(
                    "mediaType {own} does not match Content-Type {header}"
                )));
            }
            (Some(own), _) => own.clone(),
            (None, Some(header)) => header.to_string(),
            // OCI allows manifests without mediaType: tell them by shape.
            (None, None) if doc.manifests.is_some() => OCI_INDEX.to_string(),
            (None, None) => OCI_MANIFEST.to_string(),
        };
        if doc.schema_version != Some(2) {
            return Err(invalid(format!(
                "schemaVersion {:?}: only schema version 2 is supported",
                doc.schema_version
            )));
        }
        match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => {
                let config = doc
                    .config
                    .as_ref()
                    .ok_or_else(|| invalid("image manifest without config".to_string()))?;
                if doc.manifests.is_some() {
                    return Err(invalid("image manifest with manifests".to_string()));
                }
                for descriptor in std::iter::once(config).chain(doc.layers.iter().flatten()) {
                    self.check_blob(descriptor)?;
                }
            }
            OCI_INDEX | DOCKER_LIST => {
                let children = doc
                    .manifests
                    .as_ref()
                    .ok_or_else(|| invalid("index without manifests".to_string()))?;
                for child in children {
                    let digest = Digest::parse(&child.digest)?;
                    // A child must have been pushed to this repository first,
                    // as distribution requires; a blob alone is not enough.
                    let link = self
                        .repository_dir(name)
                        .join("_manifests")
                        .join(digest.hex());
                    if !link.is_file() {
                        return Err(RegistryError::ManifestBlobUnknown {
                            digest: digest.to_string(),
                        });
                    }
                    self.check_blob(child)?;
                }
            }
            other => {
                return Err(RegistryError::ManifestUnsupported {
                    media_type: other.to_string(),
                });
            }
        }
        Ok(media_type)
    }

    /// A referenced blob must exist and have the size its descriptor says.
    fn check_blob(&self, descriptor: &DocDescriptor) -> Result<(), RegistryError> {
        let digest = Digest::parse(&descriptor.digest)?;
        match self.blob_size(&digest)? {
            None => Err(RegistryError::ManifestBlobUnknown {
                digest: digest.to_string(),
            }),
            Some(size) if size != descriptor.size => Err(RegistryError::ManifestInvalid {
                reason: format!(
                    "descriptor of {digest} says {} bytes, the blob has {size}",
                    descriptor.size
                ),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Finds the manifest `reference` of repository `name`.
    pub fn manifest(
        &self,
        name: &RepositoryName,
        reference: &ManifestRef,
    ) -> Result<StoredManifest, RegistryError> {
        let unknown = || RegistryError::ManifestUnknown {
            name: name.to_string(),
            reference: reference.to_string(),
        };
        let repo = self.repository_dir(name);
        let digest = match reference {
            ManifestRef::Digest(digest) => digest.clone(),
            ManifestRef::Tag(tag) => {
                let path = repo.join("_tags").join(tag);
                match fs::read_to_string(&path) {
                    Ok(text) => Digest::parse(text.trim())?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(unknown()),
                    Err(source) => return Err(RegistryError::Io { path, source }),
                }
            }
        };
        let link = repo.join("_manifests").join(digest.hex());
        let media_type = match fs::read_to_string(&link) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(unknown()),
            Err(source) => return Err(RegistryError::Io { path: link, source }),
        };
        let size = self.blob_size(&digest)?.ok_or_else(unknown)?;
        Ok(StoredManifest {
            path: self.blob_path(&digest),
            digest,
            media_type,
            size,
        })
    }

    /// The tags of repository `name`, sorted; `NameUnknown` when the
    /// repository has never had a manifest pushed.
    pub fn tags(&self, name: &RepositoryName) -> Result<Vec<String>, RegistryError> {
        let repo = self.repository_dir(name);
        if !repo.join("_manifests").is_dir() {
            return Err(RegistryError::NameUnknown {
                name: name.to_string(),
            });
        }
        let dir = repo.join("_tags");
        let mut tags = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(io_err(&dir))?;
                    let tag = entry.file_name().to_string_lossy().into_owned();
                    // Temp files of a tag being written are not tags.
                    if !tag.starts_with('.') {
                        tags.push(tag);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(RegistryError::Io { path: dir, source }),
        }
        tags.sort();
        Ok(tags)
    }
}

/// The parts of a manifest or index the registry checks.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<DocDescriptor>,
    layers: Option<Vec<DocDescriptor>>,
    manifests: Option<Vec<DocDescriptor>>,
}

#[derive(serde::Deserialize)]
struct DocDescriptor {
    digest: String,
    size: u64,
}

/// Writes `dir/name` by temp file and rename, creating `dir`. Temp files
/// start with '.', which no tag or digest hex does.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), RegistryError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    let target = dir.join(name);
    tmp.persist(&target).map_err(|e| RegistryError::Io {
        path: target.clone(),
        source: e.error,
    })?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename into it is durable.
fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_with_a_host_first() {
        for ok in [
            "app",
            "library/busybox",
            "gantry.test/web",
            "127.0.0.1:5000/app",
            "localhost:5000/a/b",
            "[::1]:5000/app",
            "docker.io/library/busybox",
            "a__b/c-d/e--f/g.h",
            "Registry.Example.com/app",
        ] {
            assert!(RepositoryName::parse(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "", "/app", "app/", "a//b", "../x", "./x", "a/../b", "a/./b", "a/_tags", "a/B",
            "a/b:1", "a/b c", "-a/b", "a/b-",
        ] {
            assert!(
                RepositoryName::parse(bad).is_err(),
                "{bad} should be invalid"
            );
        }
    }

    #[test]
    fn references_are_tags_or_sha256_digests() {
        assert_eq!(
            ManifestRef::parse("latest").expect("tag"),
            ManifestRef::Tag("latest".into())
        );
        let hex = "a".repeat(64);
        assert!(matches!(
            ManifestRef::parse(&format!("sha256:{hex}")),
            Ok(ManifestRef::Digest(_))
        ));
        assert!(ManifestRef::parse("sha512:abc").is_err());
        assert!(ManifestRef::parse(".hidden").is_err());
        assert!(ManifestRef::parse("a/b").is_err());
        assert!(ManifestRef::parse(&"t".repeat(129)).is_err());
    }

    #[test]
    fn a_wrong_digest_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RegistryStore::open(dir.path()).expect("open");
        let id = store.start_upload().expect("start");
        fs::write(store.upload_path(&id).expect("path"), b"hello").expect("write");
        let wrong = Digest::of(b"other");
        assert!(matches!(
            store.finish_upload(&id, &wrong),
            Err(RegistryError::DigestMismatch { .. })
        ));
        assert!(store.blob_size(&wrong).expect("size").is_none());
        assert!(
            store
                .blob_size(&Digest::of(b"hello"))
                .expect("size")
                .is_none()
        );
        assert!(matches!(
            store.upload_path(&id),
            Err(RegistryError::BlobUploadUnknown { .. })
        ));
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .expect("blobs")
                .count(),
            0
        );
    }

    #[test]
    fn manifests_need_their_blobs_and_tags_point_at_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RegistryStore::open(dir.path()).expect("open");
        let name = RepositoryName::parse("gantry.test/app").expect("name");
        let config = store.write_blob(b"{}").expect("config");
        let layer = Digest::of(b"layer");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.as_str(), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.as_str(), "size": 5}],
        }))
        .expect("json");
        let tag = ManifestRef::Tag("v1".into());
        match store.put_manifest(&name, &tag, &manifest, None) {
            Err(RegistryError::ManifestBlobUnknown { digest }) => {
                assert_eq!(digest, layer.as_str())
            }
            other => panic!("want ManifestBlobUnknown, got {other:?}"),
        }
        assert!(matches!(
            store.manifest(&name, &tag),
            Err(RegistryError::ManifestUnknown { .. })
        ));
        assert_eq!(store.write_blob(b"layer").expect("layer"), layer);
        let digest = store
            .put_manifest(&name, &tag, &manifest, Some(OCI_MANIFEST))
            .expect("put");
        let found = store.manifest(&name, &tag).expect("by tag");
        assert_eq!(found.digest, digest);
        assert_eq!(found.media_type, OCI_MANIFEST);
        assert_eq!(fs::read(&found.path).expect("read"), manifest);
        assert_eq!(
            store
                .manifest(&name, &ManifestRef::Digest(digest.clone()))
                .expect("by digest")
                .digest,
            digest
        );
        assert_eq!(store.tags(&name).expect("tags"), vec!["v1".to_string()]);
        // The layer is a blob, not a manifest of the repository.
        assert!(matches!(
            store.manifest(&name, &ManifestRef::Digest(layer)),
            Err(RegistryError::ManifestUnknown { .. })
        ));
    }

    #[test]
    fn an_index_needs_its_children_in_the_repository() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RegistryStore::open(dir.path()).expect("open");
        let name = RepositoryName::parse("app").expect("name");
        let config = store.write_blob(b"{}").expect("config");
        let child = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.as_str(), "size": 2},
            "layers": [],
        }))
        .expect("json");
        let child_digest = Digest::of(&child);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child_digest.as_str(), "size": child.len()}],
        }))
        .expect("json");
        let latest = ManifestRef::Tag("latest".into());
        assert!(matches!(
            store.put_manifest(&name, &latest, &index, None),
            Err(RegistryError::ManifestBlobUnknown { .. })
        ));
        store
            .put_manifest(
                &name,
                &ManifestRef::Digest(child_digest.clone()),
                &child,
                None,
            )
            .expect("child");
        // Without mediaType, a manifest is told by its shape.
        assert_eq!(
            store
                .manifest(&name, &ManifestRef::Digest(child_digest))
                .expect("child")
                .media_type,
            OCI_MANIFEST
        );
        store
            .put_manifest(&name, &latest, &index, None)
            .expect("index");
        assert_eq!(
            store.manifest(&name, &latest).expect("index").media_type,
            OCI_INDEX
        );
    }
}
