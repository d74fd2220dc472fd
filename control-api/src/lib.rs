//! The Trellis control plane.
//!
//! `trellis-control` pushes policy to proxies over gRPC, issues their certificates and injects
//! the sidecar into pods. It is built on top of the proxy core; until then this crate is
//! intentionally empty so that the workspace layout of `../shared/DESIGN.md` is in place.
