//! Gantry's controller.
//!
//! The controller holds the cluster's desired state (nodes, services, tasks),
//! replicates it, and turns it into task assignments for agents.
//!
//! - [`compose`]: a Compose file → a normalized [`compose::Stack`], and stack diffs.
//! - [`model`]: the typed cluster objects (nodes, services, tasks).
//! - [`scheduler`]: the pure filter → score pipeline that places tasks on nodes.
//! - [`orchestrator`]: the pure reconcilers that turn services into task actions.
//! - [`raft`]: Raft replication of the store (raft-rs): one loop per
//!   controller, its storage over the command log, membership, snapshots.
//! - [`registry`]: the OCI distribution registry (`/v2/`) holding images loaded
//!   with `gantry image load`, from which agents pull what they lack.
//! - [`server`]: the controller process: store front, dispatcher, executor
//!   loops, the Control service, and `serve` on one listener.
//! - [`store`]: the command log, the state machine that applies it, and watches.
//! - [`wire`]: conversions between the model and the `gantry.v1` protobuf types.
//!
//! Invariant: the scheduler, the orchestrators and the Compose loader do no
//! I/O (the loader reads `.env`/`env_file` only through `ProjectFiles`) and
//! use no clock or randomness; the thin executor that commits their results
//! comes with the control plane.
#![deny(missing_docs)]
pub mod compose;
pub mod model;
pub mod orchestrator;
pub mod raft;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod wire;

/// The role name that `gantry controller` reports in logs and status output.
pub const ROLE: &str = "controller";
