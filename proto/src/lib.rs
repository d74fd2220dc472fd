//! Trellis contracts shared by the proxy and the control plane.
//!
//! - [`policy`]: the policy model — `TrafficPolicy` and `ServerPolicy` documents as people write
//!   them in YAML, parsed into typed values and validated with errors that name the field.
//! - [`pb`]: the gRPC services and messages generated from `proto/trellis/v1/*.proto`
//!   (`ConfigService`, `DiscoveryService`, `PolicyService`, `IdentityService`, `TokenService`).
//! - [`wire`]: conversions between the two, validated by the same rules as YAML.

pub mod policy;
pub mod wire;

/// Generated from `proto/trellis/v1/`.
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("trellis.v1");
}
