//! Trellis contracts shared by the proxy and the control plane.
//!
//! - [`policy`]: the policy model — `TrafficPolicy` and `ServerPolicy` documents as people write
//!   them in YAML, parsed into typed values and validated with errors that name the field.
//!
//! The gRPC services (`ConfigService`, `IdentityService`, `PolicyService`) join this crate with
//! the control plane.

pub mod policy;
