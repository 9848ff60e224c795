//! Gantry's wire protocol.
//!
//! Only this crate knows protobuf. `gantry.proto` defines three gRPC services
//! in package `gantry.v1`, generated here (messages, clients and servers) by
//! `build.rs` with protox, so no `protoc` is needed:
//!
//! - [`v1::control_server::Control`]: the client API (stacks, services, tasks,
//!   nodes, logs, events, exec).
//! - [`v1::dispatcher_server::Dispatcher`]: the one bidirectional `Session`
//!   stream each agent holds (hello and heartbeats, task status and logs up;
//!   assignment sets, log and exec requests down).
//! - [`v1::raft_server::Raft`]: raft messages between controllers, carried
//!   as opaque bytes, and writes forwarded to the leader.
//!
//! Every other crate converts to and from plain Rust domain types at this
//! boundary (the controller's `wire` module); none of them names a prost type
//! outside that module.
#![deny(missing_docs)]

/// The protocol version a controller and an agent must agree on to talk;
/// sent in `Hello` and `SessionAccepted`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The generated `gantry.v1` package. Its documentation is the comments in
/// `gantry.proto`, which prost copies onto the generated items.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// Re-exported so that users of the generated messages (which implement
/// [`prost::Message`]) need no direct dependency of their own, and cannot
/// pick a mismatched version.
pub use prost;
/// Re-exported for the same reason as [`prost`]: the generated clients and
/// servers are tonic types (`Request`, `Status`, `transport::Server`).
pub use tonic;
