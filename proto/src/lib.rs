//! Trellis gRPC contracts.
//!
//! This crate will hold the `.proto` files for `ConfigService`, `IdentityService` and
//! `PolicyService` and the tonic/prost code generated from them (with protox, no protoc). The
//! services are designed together with the control plane that serves them; until then the crate
//! is intentionally empty so that the workspace layout of `../shared/DESIGN.md` is in place.
