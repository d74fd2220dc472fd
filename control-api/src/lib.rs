//! The Trellis control plane: the place where policy lives and from which it reaches every proxy.
//!
//! - [`store`]: policies and their version, persisted in `--state-dir` (atomic write + fsync).
//! - [`server`]: the gRPC services — `PolicyService` (what the CLI calls) and `ConfigService`
//!   (the proxies' ACK/NACK streams) — and the per-proxy records `status` reports.
//! - [`admin`]: the control plane's own `/live`, `/ready` and `/metrics`.
//! - [`cli`]: `apply`, `delete`, `get`, `status`.

pub mod admin;
pub mod cli;
pub mod crds;
pub mod discovery;
pub mod identity;
pub mod inject;
pub mod kube;
pub mod server;
pub mod store;
pub mod tls;
pub mod webhook;
