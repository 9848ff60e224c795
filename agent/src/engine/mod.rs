//! The container engine.
//!
//! - [`cgroups`]: resource limits and usage, cgroup v1 and v2 behind one enum.
//! - [`runtime`]: the OCI runtime (create/start/state/kill/delete/exec of a bundle).
//! - [`spec`]: image config + `docker run` overrides → OCI runtime spec (pure).
//! - [`user`]: `user` strings resolved against the image's passwd/group.
//! - [`rootfs`]: the overlayfs root of a container.
//! - [`volumes`]: named volumes, bind mounts' checks, copy-up.
//! - [`logs`]: json-file logs with rotation, and their reader.
//! - [`shim`]: the per-container shim process (`gantry shim`).
//! - [`container`]: the [`Engine`](container::Engine): Docker's container lifecycle.

pub mod cgroups;
pub mod container;
pub mod logs;
pub mod rootfs;
pub mod runtime;
pub mod shim;
pub mod spec;
pub mod user;
pub mod volumes;
