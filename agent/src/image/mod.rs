//! The image store: content-addressed blobs, image records, unpacked layers.
//!
//! INTERFACE PINNED FOR PARALLEL WORK: the signatures below are what the
//! engine codes against; the bodies are filled in by the image-store work.

use std::path::{Path, PathBuf};

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

/// The image store of one node.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore, ImageError> {
        Ok(ImageStore { root: root.into() })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Finds an image by reference (`busybox`, `busybox:1.36`,
    /// `registry:5000/app@sha256:…`), id or unique id prefix.
    pub fn resolve(&self, name: &str) -> Result<ImageRecord, ImageError> {
        let _ = name;
        unimplemented!("filled in by the image-store work")
    }

    /// The image's config (entrypoint, cmd, env, user, workdir, …).
    pub fn config(
        &self,
        image: &ImageRecord,
    ) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
        let _ = image;
        unimplemented!("filled in by the image-store work")
    }

    /// The image's unpacked layer directories, bottom first, unpacking any
    /// layer not yet unpacked. Ready to be overlayfs lower dirs.
    pub fn layer_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        let _ = image;
        unimplemented!("filled in by the image-store work")
    }

    /// Records that `holder` (a container id) uses `image`: it is then kept
    /// by garbage collection and `rm` refuses it.
    pub fn add_lease(&self, holder: &str, image: &ImageRecord) -> Result<(), ImageError> {
        let _ = (holder, image);
        unimplemented!("filled in by the image-store work")
    }

    /// Drops `holder`'s lease, if any.
    pub fn remove_lease(&self, holder: &str) -> Result<(), ImageError> {
        let _ = holder;
        unimplemented!("filled in by the image-store work")
    }
}
