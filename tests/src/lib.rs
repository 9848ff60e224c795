//! Shared helpers for Gantry's end-to-end tests and benchmarks.
//!
//! The tests drive the real `gantry` binary as a user would. Tests that need
//! root, kernel features or Debian packages check for them first and print
//! `SKIPPED: <reason>` when they truly cannot run.

pub mod bench;
pub mod bundle;
pub mod cluster;
pub mod etcd;
pub mod image_fixtures;
pub mod linearizability;
pub mod load;
pub mod peers;

use std::path::PathBuf;

/// The `gantry` binary built from this workspace.
///
/// Found next to the test executable's `deps/` directory (`target/<profile>/`),
/// or named by `GANTRY_BIN`. Panics with what to do when it is missing, since
/// every end-to-end test needs it.
pub fn gantry_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("GANTRY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe of the test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("gantry");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bin gantry` first (deploy/test-all.sh does)",
        bin.display()
    );
    bin
}

/// Why the engine's end-to-end tests cannot run here, if they cannot: they
/// need root, Debian's static busybox (the test images are built from it)
/// and a cgroup hierarchy. Tests print `SKIPPED: <reason>` and return.
pub fn engine_test_prerequisites() -> Option<&'static str> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root");
    }
    if !bundle::busybox_available() {
        return Some("needs busybox-static (/bin/busybox)");
    }
    if !std::path::Path::new("/sys/fs/cgroup").exists() {
        return Some("needs a cgroup hierarchy at /sys/fs/cgroup");
    }
    None
}
