//! Gantry's agent: everything that runs on a node.
//!
//! - `bpf`: hand-assembled eBPF and the `bpf(2)` calls (device filter,
//!   connect-time service load balancing).
//! - [`daemon`]: the agent process: the dispatcher session with the
//!   controller, assignments to the worker, statuses, logs and exec relays.
//! - [`image`]: the content-addressed image store (import, pull, unpack, GC).
//! - [`engine`]: the container engine (OCI runtime, cgroups, shim, containers).
//! - [`network`]: per-node bridge networking (netns, veth, IPAM, nftables).
//! - [`paths`]: where all of that lives on disk.
//! - [`worker`]: the task worker: assignments to containers, restart
//!   policies, health checks.
//!
//! Invariant: only [`daemon`] runs an async runtime (tokio, for its gRPC
//! session), and nothing async ever forks to run Rust code. The OCI runtime
//! clones container processes only inside re-executed `gantry` processes
//! (shims, `gantry container exec`); the daemon's engine calls that spawn
//! shims are made from the worker's own std thread, never from the runtime.
//! Everything else in the crate is synchronous.
#![deny(missing_docs)]

pub(crate) mod bpf;
pub mod daemon;
pub mod engine;
pub mod image;
pub mod network;
pub mod paths;
pub mod worker;
