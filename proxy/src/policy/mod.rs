//! The policy in force: where it comes from, how it is matched to calls, and how it changes.
//!
//! - [`store`]: the current [`Snapshot`] (a value in a `watch` channel: every request reads the
//!   snapshot once and keeps it, so a reload never changes a request in flight).
//! - [`file`]: `--policy-file`, loaded at start and polled for changes; a file that fails
//!   validation is rejected with every error named and the policy in force stays.
//! - [`control`]: `--control-plane`, snapshots over gRPC with ACK/NACK.
//! - [`routes`]: which TrafficPolicy applies to a call.

pub mod control;
pub mod file;
pub mod routes;
mod store;

pub use store::{MeshPeer, Meshed, PolicyStore, Snapshot};
