//! Gantry's agent: everything that runs on a node.
//!
//! - [`image`]: the content-addressed image store (import, pull, unpack, GC).
//! - [`engine`]: the container engine (OCI runtime, cgroups, shim, containers).
//! - [`network`]: per-node bridge networking (netns, veth, IPAM, nftables).
//! - [`paths`]: where all of that lives on disk.
//! - [`worker`]: the task worker: assignments to containers, restart
//!   policies, health checks.
//!
//! Invariant: nothing in this crate starts an async runtime. The OCI runtime
//! and the shim clone container processes, which must only ever happen from a
//! single-threaded process; async callers wrap engine calls in
//! `spawn_blocking`.
#![deny(missing_docs)]

pub mod engine;
pub mod image;
pub mod network;
pub mod paths;
pub mod worker;
