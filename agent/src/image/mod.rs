//! The image store: content-addressed blobs, image records, unpacked layers.
//!
//! On disk, under the store root (`<data dir>/images`):
//!
//! - `blobs/sha256/<hex>`: manifests, configs and layer blobs, each verified
//!   against its digest and size before it is renamed into place;
//! - `snapshots/<16 hex of the chain id>/`: one unpacked layer each, ready to
//!   be an overlayfs lower dir (the names are short so that 50 lower dirs fit
//!   in the one page overlayfs allows for mount options);
//! - `index.json`: image records and leases, replaced by atomic rename;
//! - `lock`: flock'd around every read-modify-write of `index.json`;
//! - `gc.lock`: held shared by anything that writes blobs or snapshots
//!   (import, pull, unpack) and exclusive by `gc`, so that gc never deletes
//!   the blobs of an image that is being added;
//! - `tmp/`: staging for blobs and unpacks, on the same file system.
//!
//! Invariant: several processes (the CLI and the agent) may use one store at
//! once; everything they can observe changes by rename only.
//!
//! INTERFACE PINNED FOR PARALLEL WORK: `open`, `root`, `resolve`, `config`,
//! `layer_dirs`, `add_lease` and `remove_lease` are what the engine codes
//! against.

pub mod blobs;
mod import;
pub mod manifest;
mod pull;
mod push;
pub mod reference;
pub mod registry;
pub mod unpack;

pub use import::ImportOptions;
pub use pull::{PullOptions, PullProgress};
pub use push::{PushProgress, PushTarget};
pub use reference::Reference;
pub use registry::Credentials;

use blobs::{BlobError, BlobStore};
use manifest::{Descriptor, Manifest, ManifestError};
use nix::fcntl::{Flock, FlockArg};
use reference::ReferenceError;
use registry::RegistryError;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use unpack::UnpackError;

/// How many hex digits of the chain id name a snapshot directory.
const SNAPSHOT_NAME_LEN: usize = 16;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file of the store or of an import could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// No image matches the name, id or digest.
    #[error("image {0} not found")]
    NotFound(String),
    /// An id prefix matches more than one image.
    #[error("id prefix {0} matches more than one image")]
    Ambiguous(String),
    /// The image is leased by a container and would be deleted.
    #[error("image {image} is in use by container {holder} (use force to untag it anyway)")]
    InUse {
        /// The image as named by the caller.
        image: String,
        /// The container holding it.
        holder: String,
    },
    /// Removing by id would drop several names at once (Docker's rule).
    #[error("image {image} has several names ({names}): remove them by name, or use force")]
    SeveralNames {
        /// The id or prefix the caller gave.
        image: String,
        /// The names it has, comma-separated.
        names: String,
    },
    /// A reference could not be parsed.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A blob is missing, corrupt or truncated.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// A manifest or index is malformed or unsupported.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A registry request failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// An image config is malformed or does not match its manifest.
    #[error("image config {digest}: {reason}")]
    InvalidConfig {
        /// The config's digest.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer could not be unpacked (hostile or malformed tar).
    #[error("layer {layer}: {source}")]
    Unpack {
        /// The layer's blob digest.
        layer: String,
        /// What went wrong, naming the entry.
        #[source]
        source: UnpackError,
    },
    /// An unpacked layer's content does not match the config's diff id.
    #[error("layer {layer}: uncompressed content hashes to {actual}, config says {expected}")]
    DiffIdMismatch {
        /// The layer's blob digest.
        layer: String,
        /// The diff id from the config.
        expected: String,
        /// The digest of what was unpacked.
        actual: String,
    },
    /// The import source is neither an OCI layout/archive nor a docker save.
    #[error("{path}: {reason}")]
    InvalidArchive {
        /// The archive or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The store's `index.json` is unreadable.
    #[error("{path}: corrupt image index: {reason}")]
    CorruptIndex {
        /// The index file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

impl ImageError {
    /// Whether the error comes from what the user asked for (an unknown or
    /// malformed name, a bad archive) rather than from the system. The CLI
    /// exits 2 for these.
    pub fn is_user_error(&self) -> bool {
        match self {
            ImageError::NotFound(_)
            | ImageError::Ambiguous(_)
            | ImageError::SeveralNames { .. }
            | ImageError::Reference(_)
            | ImageError::Manifest(_)
            | ImageError::InvalidConfig { .. }
            | ImageError::Unpack { .. }
            | ImageError::DiffIdMismatch { .. }
            | ImageError::InvalidArchive { .. } => true,
            ImageError::Blob(e) => !matches!(e, BlobError::Io { .. }),
            ImageError::Registry(e) => matches!(
                e,
                RegistryError::NotFound { .. } | RegistryError::ReservedName { .. }
            ),
            ImageError::Io { .. } | ImageError::InUse { .. } | ImageError::CorruptIndex { .. } => {
                false
            }
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A stored image, as `gantry image ls/inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// The image id: the digest of its config blob (`sha256:…`), as Docker's.
    pub id: String,
    /// References that name it, e.g. `docker.io/library/busybox:latest`.
    pub names: Vec<String>,
    /// The digest of its linux/amd64 manifest.
    pub manifest_digest: String,
    /// Total compressed size of its layers, in bytes.
    pub size: u64,
}

/// One layer of an image, as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerDetails {
    /// The blob digest.
    pub digest: String,
    /// The blob's media type.
    pub media_type: String,
    /// The blob size in bytes.
    pub size: u64,
    /// The digest of the uncompressed tar.
    pub diff_id: String,
    /// The chain id (the snapshot key).
    pub chain_id: String,
    /// The unpacked directory, if unpacked.
    pub snapshot: Option<PathBuf>,
}

/// Everything known about an image, for `gantry image inspect`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageDetails {
    /// The index record.
    #[serde(flatten)]
    pub record: ImageRecord,
    /// When the image was built (RFC 3339), if the config says.
    pub created: Option<String>,
    /// `os/architecture` from the config.
    pub platform: String,
    /// The image config as stored (entrypoint, cmd, env, …).
    pub config: serde_json::Value,
    /// The layers, bottom first.
    pub layers: Vec<LayerDetails>,
    /// Containers holding the image.
    pub leases: Vec<String>,
}

/// What `remove` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Removed {
    /// A name no longer refers to the image.
    Untagged(String),
    /// The image record is gone (its blobs go at the next `gc`).
    Deleted(String),
}

/// What `gc` freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Ids of unnamed, unleased image records dropped.
    pub images: Vec<String>,
    /// Digests of blobs deleted.
    pub blobs: Vec<String>,
    /// Snapshot directories deleted.
    pub snapshots: Vec<String>,
    /// Bytes freed on disk (blobs and snapshot files).
    pub bytes_freed: u64,
}

/// The index file's content.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Index {
    images: Vec<ImageRecord>,
    /// Holder (container id) → image id.
    #[serde(default)]
    leases: BTreeMap<String, String>,
}

/// How a name matched an image.
#[derive(Debug, PartialEq, Eq)]
enum Match {
    /// By one of its names (the normalised name).
    Name(String),
    /// By id, id prefix or manifest digest.
    Id,
}

/// The image store of one node.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore, ImageError> {
        let store = ImageStore { root: root.into() };
        for dir in [
            store.root.join("blobs/sha256"),
            store.snapshots_dir(),
            store.tmp_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Finds an image by reference (`busybox`, `busybox:1.36`,
    /// `registry:5000/app@sha256:…`), id or unique id prefix.
    pub fn resolve(&self, name: &str) -> Result<ImageRecord, ImageError> {
        let index = self.read_index()?;
        let (i, _) = find(&index, name)?;
        Ok(index.images[i].clone())
    }

    /// The image's config (entrypoint, cmd, env, user, workdir, …).
    pub fn config(
        &self,
        image: &ImageRecord,
    ) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
        let bytes = self.blobs().read(&image.id)?;
        parse_config(&bytes, &image.id)
    }

    /// The image's unpacked layer directories, bottom first, unpacking any
    /// layer not yet unpacked. Ready to be overlayfs lower dirs.
    pub fn layer_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        let _gc = self.gc_lock(false)?;
        let manifest = self.manifest(image)?;
        let config = self.config(image)?;
        self.unpack_all(&manifest, &config, &image.id)
    }

    /// Records that `holder` (a container id) uses `image`: it is then kept
    /// by garbage collection and `rm` refuses it.
    pub fn add_lease(&self, holder: &str, image: &ImageRecord) -> Result<(), ImageError> {
        self.update_index(|index| {
            if !index.images.iter().any(|r| r.id == image.id) {
                return Err(ImageError::NotFound(image.id.clone()));
            }
            index.leases.insert(holder.to_string(), image.id.clone());
            Ok(())
        })
    }

    /// Drops `holder`'s lease, if any.
    pub fn remove_lease(&self, holder: &str) -> Result<(), ImageError> {
        self.update_index(|index| {
            index.leases.remove(holder);
            Ok(())
        })
    }

    /// The containers holding leases, and the image id each holds.
    pub fn leases(&self) -> Result<BTreeMap<String, String>, ImageError> {
        Ok(self.read_index()?.leases)
    }

    /// All images, in the order they were added.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        Ok(self.read_index()?.images)
    }

    /// Everything about one image.
    pub fn inspect(&self, name: &str) -> Result<ImageDetails, ImageError> {
        let index = self.read_index()?;
        let (i, _) = find(&index, name)?;
        let record = index.images[i].clone();
        let manifest = self.manifest(&record)?;
        let config_bytes = self.blobs().read(&record.id)?;
        let config = parse_config(&config_bytes, &record.id)?;
        let raw: serde_json::Value =
            serde_json::from_slice(&config_bytes).unwrap_or(serde_json::Value::Null);
        let diff_ids = config.rootfs().diff_ids();
        let chains = chain_ids(diff_ids);
        let layers = manifest
            .layers
            .iter()
            .zip(diff_ids.iter().zip(&chains))
            .map(|(layer, (diff_id, chain))| {
                let dir = self.snapshot_dir(chain);
                LayerDetails {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                    size: layer.size,
                    diff_id: diff_id.clone(),
                    chain_id: chain.clone(),
                    snapshot: dir.is_dir().then_some(dir),
                }
            })
            .collect();
        let leases = index
            .leases
            .iter()
            .filter(|(_, id)| **id == record.id)
            .map(|(holder, _)| holder.clone())
            .collect();
        Ok(ImageDetails {
            created: config.created().clone(),
            platform: format!("{}/{}", config.os(), config.architecture()),
            config: raw
                .get("config")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            record,
            layers,
            leases,
        })
    }

    /// Removes `name`. A reference that is one of several names of an image
    /// is only untagged; otherwise the image record is deleted (by id, only
    /// with `force` when that would drop several names, as Docker does). A leased
    /// image is refused unless `force`, and with `force` it is untagged but
    /// kept while leased (Docker's `rmi -f` on an image a container uses).
    pub fn remove(&self, name: &str, force: bool) -> Result<Vec<Removed>, ImageError> {
        self.update_index(|index| {
            let (i, matched) = find(index, name)?;
            let record = &mut index.images[i];
            if let Match::Name(full) = &matched
                && record.names.len() > 1
            {
                record.names.retain(|n| n != full);
                return Ok(vec![Removed::Untagged(full.clone())]);
            }
            if matched == Match::Id && record.names.len() > 1 && !force {
                return Err(ImageError::SeveralNames {
                    image: name.to_string(),
                    names: record.names.join(", "),
                });
            }
            let id = record.id.clone();
            let holder = index
                .leases
                .iter()
                .find(|(_, image)| **image == id)
                .map(|(holder, _)| holder.clone());
            let record = &mut index.images[i];
            let mut done: Vec<Removed> = record.names.drain(..).map(Removed::Untagged).collect();
            match holder {
                Some(holder) if !force => Err(ImageError::InUse {
                    image: name.to_string(),
                    holder,
                }),
                Some(_) => Ok(done),
                None => {
                    index.images.remove(i);
                    done.push(Removed::Deleted(id));
                    Ok(done)
                }
            }
        })
    }

    /// Removes blobs and snapshots that no image record or lease uses, image
    /// records that have neither a name nor a lease, and stale staging files.
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        // Exclusive: no import, pull or unpack is half-way through, so
        // everything unreferenced (and all of tmp/) is garbage.
        let _gc = self.gc_lock(true)?;
        let mut report = GcReport::default();
        let index = self.update_index(|index| {
            let leased: BTreeSet<String> = index.leases.values().cloned().collect();
            index.images.retain(|r| {
                let keep = !r.names.is_empty() || leased.contains(&r.id);
                if !keep {
                    report.images.push(r.id.clone());
                }
                keep
            });
            Ok(Index {
                images: index.images.clone(),
                leases: index.leases.clone(),
            })
        })?;
        let mut used_blobs = BTreeSet::new();
        let mut used_snapshots = BTreeSet::new();
        for record in &index.images {
            used_blobs.insert(record.manifest_digest.clone());
            used_blobs.insert(record.id.clone());
            // An image whose manifest or config is unreadable keeps what we
            // can name; gc must never fail because one image is damaged.
            if let Ok(manifest) = self.manifest(record) {
                used_blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
            }
            if let Ok(config) = self.config(record) {
                for chain in chain_ids(config.rootfs().diff_ids()) {
                    used_snapshots.insert(snapshot_name(&chain));
                }
            }
        }
        let blobs = self.blobs();
        for (digest, size) in blobs.list()? {
            if !used_blobs.contains(&digest) {
                blobs.remove(&digest)?;
                report.bytes_freed += size;
                report.blobs.push(digest);
            }
        }
        let snapshots = self.snapshots_dir();
        for entry in fs::read_dir(&snapshots).map_err(io_error(&snapshots))? {
            let entry = entry.map_err(io_error(&snapshots))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !used_snapshots.contains(&name) {
                let path = entry.path();
                report.bytes_freed += disk_usage(&path);
                fs::remove_dir_all(&path).map_err(io_error(&path))?;
                report.snapshots.push(name);
            }
        }
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io_error(&tmp))? {
            let path = entry.map_err(io_error(&tmp))?.path();
            report.bytes_freed += disk_usage(&path);
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_error(&path))?;
        }
        Ok(report)
    }

    /// Imports an OCI layout directory, an OCI archive or a `docker save`
    /// archive (old or new format). Returns the images added.
    pub fn import(
        &self,
        path: &Path,
        options: &ImportOptions,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let _gc = self.gc_lock(false)?;
        import::import(self, path, options)
    }

    /// Pulls `reference` from its registry. Progress goes to `progress`.
    pub fn pull(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<ImageRecord, ImageError> {
        let _gc = self.gc_lock(false)?;
        pull::pull(self, reference, options, progress)
    }

    // ----- internals shared by import and pull -----

    pub(crate) fn blobs(&self) -> BlobStore {
        BlobStore::new(self.root.join("blobs/sha256"), self.tmp_dir())
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn snapshot_dir(&self, chain_id: &str) -> PathBuf {
        self.snapshots_dir().join(snapshot_name(chain_id))
    }

    fn manifest(&self, image: &ImageRecord) -> Result<Manifest, ImageError> {
        let bytes = self.blobs().read(&image.manifest_digest)?;
        match manifest::parse(&bytes, &image.manifest_digest, None)? {
            manifest::Parsed::Manifest(m) => Ok(m),
            manifest::Parsed::Index(_) => Err(ManifestError::UnsupportedMediaType {
                digest: image.manifest_digest.clone(),
                media_type: "index where an image manifest was expected".to_string(),
            }
            .into()),
        }
    }

    /// Checks the config against the manifest, unpacks every layer and
    /// records the image under `names` (taking those names from any other
    /// image, as a retag does). The manifest, config and layer blobs must
    /// already be in the store.
    pub(crate) fn add_image(
        &self,
        manifest: &Manifest,
        manifest_digest: &str,
        names: &[Reference],
    ) -> Result<ImageRecord, ImageError> {
        let config_digest = &manifest.config.digest;
        let config = parse_config(&self.blobs().read(config_digest)?, config_digest)?;
        self.unpack_all(manifest, &config, config_digest)?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let record = ImageRecord {
            id: config_digest.clone(),
            names: names.clone(),
            manifest_digest: manifest_digest.to_string(),
            size: manifest.layers.iter().map(|l| l.size).sum(),
        };
        self.update_index(|index| {
            for other in &mut index.images {
                other.names.retain(|n| !names.contains(n));
            }
            match index.images.iter_mut().find(|r| r.id == record.id) {
                Some(existing) => {
                    existing.names.extend(names.iter().cloned());
                    existing.manifest_digest = record.manifest_digest.clone();
                    existing.size = record.size;
                    Ok(existing.clone())
                }
                None => {
                    index.images.push(record.clone());
                    Ok(record)
                }
            }
        })
    }

    fn unpack_all(
        &self,
        manifest: &Manifest,
        config: &oci_spec::image::ImageConfiguration,
        config_digest: &str,
    ) -> Result<Vec<PathBuf>, ImageError> {
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::InvalidConfig {
                digest: config_digest.to_string(),
                reason: format!(
                    "{} diff ids for {} layers",
                    diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        let chains = chain_ids(diff_ids);
        let mut dirs = Vec::with_capacity(chains.len());
        for ((layer, diff_id), chain) in manifest.layers.iter().zip(diff_ids).zip(&chains) {
            let dir = self.snapshot_dir(chain);
            if !dir.is_dir() {
                self.unpack_snapshot(layer, diff_id, &dir)?;
            }
            dirs.push(dir);
        }
        Ok(dirs)
    }

    /// Unpacks one layer into a staging dir and renames it into place, so a
    /// snapshot directory is either absent or complete.
    fn unpack_snapshot(
        &self,
        layer: &Descriptor,
        diff_id: &str,
        dir: &Path,
    ) -> Result<(), ImageError> {
        let compression = manifest::layer_compression(layer)?;
        let blob = self.blobs().open(&layer.digest)?;
        let tmp = self.tmp_dir();
        let staging = tempfile::Builder::new()
            .prefix("unpack-")
            .tempdir_in(&tmp)
            .map_err(io_error(&tmp))?;
        // tempdir makes 0700; the root of the lowest layer is the
        // container's `/`, which must be world-readable.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755))
            .map_err(io_error(staging.path()))?;
        let actual = unpack::unpack_layer(io::BufReader::new(blob), compression, staging.path())
            .map_err(|source| ImageError::Unpack {
                layer: layer.digest.clone(),
                source,
            })?;
        if actual != diff_id {
            return Err(ImageError::DiffIdMismatch {
                layer: layer.digest.clone(),
                expected: diff_id.to_string(),
                actual,
            });
        }
        sync_fs(staging.path()).map_err(io_error(staging.path()))?;
        match fs::rename(staging.path(), dir) {
            Ok(()) => {
                // Already moved: nothing left for the guard to delete.
                let _ = staging.keep();
                Ok(())
            }
            // Another process unpacked the same layer first; ours goes.
            Err(_) if dir.is_dir() => Ok(()),
            Err(source) => Err(ImageError::Io {
                path: dir.to_path_buf(),
                source,
            }),
        }
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn read_index(&self) -> Result<Index, ImageError> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ImageError::CorruptIndex {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(source) => Err(ImageError::Io { path, source }),
        }
    }

    /// Read-modify-write of the index under the store lock; written only
    /// when `change` succeeds, by atomic rename.
    fn update_index<T>(
        &self,
        change: impl FnOnce(&mut Index) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let _lock = self.flock("lock", true)?;
        let mut index = self.read_index()?;
        let result = change(&mut index)?;
        let path = self.index_path();
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| ImageError::CorruptIndex {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix("index-")
            .tempfile_in(&self.root)
            .map_err(io_error(&self.root))?;
        tmp.write_all(&bytes).map_err(io_error(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io_error(&path))?;
        tmp.persist(&path).map_err(|e| ImageError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        blobs::sync_dir(&self.root).map_err(io_error(&self.root))?;
        Ok(result)
    }

    fn gc_lock(&self, exclusive: bool) -> Result<Flock<File>, ImageError> {
        self.flock("gc.lock", exclusive)
    }

    fn flock(&self, name: &str, exclusive: bool) -> Result<Flock<File>, ImageError> {
        let path = self.root.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(file, arg).map_err(|(_, errno)| ImageError::Io {
            path,
            source: errno.into(),
        })
    }
}

/// Parses an image config blob.
fn parse_config(
    bytes: &[u8],
    digest: &str,
) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::InvalidConfig {
        digest: digest.to_string(),
        reason: e.to_string(),
    })
}

/// The OCI chain ids of a layer stack: the first is the first diff id, each
/// next one is `sha256(previous + " " + diff id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chains.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff_id}")))
            ),
        };
        chains.push(next);
    }
    chains
}

fn snapshot_name(chain_id: &str) -> String {
    let hex = chain_id.strip_prefix("sha256:").unwrap_or(chain_id);
    hex.chars().take(SNAPSHOT_NAME_LEN).collect()
}

/// Finds the image `name` refers to: a reference first (Docker's order),
/// then a full id or manifest digest, then a unique id prefix.
fn find(index: &Index, name: &str) -> Result<(usize, Match), ImageError> {
    let hex_prefix = name.strip_prefix("sha256:").unwrap_or(name);
    let looks_like_id = !hex_prefix.is_empty() && hex_prefix.bytes().all(|b| b.is_ascii_hexdigit());
    if name.starts_with("sha256:") && hex_prefix.len() == 64 {
        if let Some(i) = index
            .images
            .iter()
            .position(|r| r.id == name || r.manifest_digest == name)
        {
            return Ok((i, Match::Id));
        }
        return Err(ImageError::NotFound(name.to_string()));
    }
    let parsed = if name.starts_with("sha256:") {
        None
    } else {
        match Reference::parse(name) {
            Ok(reference) => Some(reference),
            Err(_) if looks_like_id => None,
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(reference) = parsed {
        let full = reference.to_string();
        if let Some(i) = index.images.iter().position(|r| r.names.contains(&full)) {
            return Ok((i, Match::Name(full)));
        }
        if let Some(digest) = &reference.digest {
            let repo = reference.repository();
            if let Some(i) = index.images.iter().position(|r| {
                r.manifest_digest == *digest
                    && r.names
                        .iter()
                        .any(|n| Reference::parse(n).is_ok_and(|own| own.repository() == repo))
            }) {
                return Ok((i, Match::Id));
            }
        }
    }
    if looks_like_id {
        let prefix = hex_prefix.to_ascii_lowercase();
        let hits: Vec<usize> = index
            .images
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.id.strip_prefix("sha256:")
                    .is_some_and(|h| h.starts_with(&prefix))
            })
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [one] => return Ok((*one, Match::Id)),
            [] => {}
            _ => return Err(ImageError::Ambiguous(name.to_string())),
        }
    }
    Err(ImageError::NotFound(name.to_string()))
}

/// fsyncs the file system holding `path`, so an unpacked layer is durable
/// before its rename makes it visible.
fn sync_fs(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(path)?;
    // SAFETY: the fd is valid for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes used by the files under `path` (not following symlinks).
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| disk_usage(&entry.path()))
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
