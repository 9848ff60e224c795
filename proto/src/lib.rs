//! Gantry's wire protocol.
//!
//! Only this crate knows protobuf: the controller/agent gRPC API lands here
//! with the control-plane issue, and every other crate converts to and from
//! plain Rust domain types at this boundary. Until then it only pins the
//! protocol version that nodes will compare when they meet.
#![deny(missing_docs)]

/// The protocol version a controller and an agent must agree on to talk.
pub const PROTOCOL_VERSION: u32 = 1;
