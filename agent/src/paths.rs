//! The on-disk layout of a node's data directory.
//!
//! Everything the agent keeps lives under one root (default
//! `/var/lib/gantry`), so that a node is wiped by removing one directory and
//! tests can run side by side in temporary directories.

use std::path::{Path, PathBuf};

/// The default data directory of a node.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/gantry";

/// The environment variable that overrides [`DEFAULT_DATA_DIR`].
pub const DATA_DIR_ENV: &str = "GANTRY_DATA_DIR";

/// A node's data directory and the well-known places inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// A data directory rooted at `root` (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The data directory named by `GANTRY_DATA_DIR`, else the default.
    pub fn from_env() -> Self {
        match std::env::var_os(DATA_DIR_ENV) {
            Some(dir) if !dir.is_empty() => DataDir::new(dir),
            _ => DataDir::new(DEFAULT_DATA_DIR),
        }
    }

    /// The root of the data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image store: blobs, image index and unpacked layer snapshots.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Per-container directories (bundle, state, logs, exit record).
    pub fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// Named volumes.
    pub fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// The OCI runtime's state root (like runc's `--root`), used by the shims.
    pub fn runtime_root(&self) -> PathBuf {
        self.root.join("runtime")
    }
}
