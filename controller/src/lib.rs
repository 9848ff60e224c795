//! Gantry's controller.
//!
//! The controller holds the cluster's desired state (nodes, services, tasks),
//! replicates it, and turns it into task assignments for agents. It is built
//! by the control-plane issue; this crate exists now so that the workspace has
//! its final shape and the `gantry` binary can wire every role from day one.
#![deny(missing_docs)]

pub mod model;
pub mod orchestrator;
pub mod scheduler;

/// The role name that `gantry controller` reports in logs and status output.
pub const ROLE: &str = "controller";

pub mod compose;
