//! The container engine.
//!
//! - [`cgroups`]: resource limits and usage, cgroup v1 and v2 behind one enum.
//! - [`runtime`]: the OCI runtime (create/start/state/kill/delete/exec of a bundle).

pub mod cgroups;
pub mod runtime;
