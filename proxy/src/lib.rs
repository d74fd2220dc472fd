//! The Trellis sidecar proxy.
//!
//! A request's path through this crate, in reading order:
//! - [`init`]: the iptables rules that send a pod's TCP traffic to the proxy (the init container).
//! - [`listener`]: accepts a redirected connection, recovers its original destination
//!   ([`orig_dst`]), refuses loops, and hands it to [`detect`].
//! - [`detect`]: HTTP/1, HTTP/2 or opaque TCP, from the first bytes or a short timeout.
//! - [`http`]: HTTP/1.1, HTTP/2 and gRPC proxying through hyper; [`tcp`]: opaque forwarding,
//!   [`copy`]: its byte copy, which holds no buffer while idle.
//! - [`discovery`]: a ClusterIP's endpoints and their identities, from the control plane.
//! - [`policy`]: the TrafficPolicy that applies to an outbound call; [`retry`], [`replay`] and
//!   [`balance`]: retries within a budget, replayable bodies, endpoint choice and ejection.
//! - [`transport`]: dials upstream endpoints and pools connections per (endpoint, identity).
//! - [`admin`], [`metrics`], [`drain`]: the admin endpoints, Prometheus metrics, graceful shutdown;
//!   [`probe`]: the app's probes through the admin port; [`wait_ready`]: the classic-sidecar
//!   postStart hook.
//! - [`telemetry`]: trace context, spans exported over OTLP, and the access log.
//! - [`error`]: the named causes of every error the proxy produces itself.

pub mod admin;
pub mod balance;
pub mod cli;
pub mod copy;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod error;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod orig_dst;
pub mod policy;
pub mod probe;
pub mod replay;
pub mod retry;
pub mod run;
pub mod tcp;
pub mod telemetry;
pub mod transport;
pub mod wait_ready;
