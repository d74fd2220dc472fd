//! Errors the proxy produces itself, each with a stable, named cause.
//!
//! The cause is what users see: in the `trellis-error` response header, in the access log and as
//! the `cause` label of `trellis_proxy_errors_total`. The list is part of the contract (README,
//! "Error causes"): extend it, never rename an entry.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

/// The response header that carries the cause of an error the proxy produced.
pub const ERROR_HEADER: &str = "trellis-error";

/// An error produced by the proxy while forwarding a connection or a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("connection to {addr} refused: {source}")]
    ConnectRefused { addr: SocketAddr, source: io::Error },

    #[error("connection to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },

    #[error("{addr} is unreachable: {source}")]
    ConnectUnreachable { addr: SocketAddr, source: io::Error },

    #[error("no original destination: {reason}")]
    NoOriginalDestination { reason: String },

    #[error("upstream {addr} reset the connection: {source}")]
    UpstreamReset {
        addr: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("connection limit of {limit} reached")]
    Overloaded { limit: usize },

    #[error("no response within the policy's timeout of {timeout:?} ({attempts} attempt(s))")]
    Timeout { timeout: Duration, attempts: u32 },

    #[error(
        "no response within the per-try timeout of {timeout:?} from {addr} ({attempts} attempt(s))"
    )]
    PerTryTimeout {
        addr: SocketAddr,
        timeout: Duration,
        attempts: u32,
    },

    #[error("retry budget of policy {policy} is spent; last failure: {last}")]
    RetryBudgetExhausted {
        policy: String,
        last: Box<ProxyError>,
    },

    #[error("all {endpoints} endpoints of policy {policy} are ejected after consecutive failures")]
    NoHealthyEndpoints { policy: String, endpoints: usize },

    #[error("mutual TLS with {addr} failed: {reason}")]
    TlsHandshake { addr: SocketAddr, reason: String },

    #[error("{addr} is not the expected server: {reason}")]
    TlsIdentityMismatch { addr: SocketAddr, reason: String },

    #[error("{reason}")]
    Unauthorized { reason: String },
}

impl ProxyError {
    /// The stable name of this error's cause (README, "Error causes").
    pub fn cause(&self) -> &'static str {
        match self {
            Self::ConnectRefused { .. } => "connect-refused",
            Self::ConnectTimeout { .. } => "connect-timeout",
            Self::ConnectUnreachable { .. } => "connect-unreachable",
            Self::NoOriginalDestination { .. } => "no-original-destination",
            Self::UpstreamReset { .. } => "upstream-reset",
            Self::Overloaded { .. } => "overloaded",
            Self::Timeout { .. } => "timeout",
            Self::PerTryTimeout { .. } => "per-try-timeout",
            Self::RetryBudgetExhausted { .. } => "retry-budget-exhausted",
            Self::NoHealthyEndpoints { .. } => "no-healthy-endpoints",
            Self::TlsHandshake { .. } => "tls-handshake",
            Self::TlsIdentityMismatch { .. } => "tls-identity-mismatch",
            Self::Unauthorized { .. } => "unauthorized",
        }
    }

    /// Whether the upstream refused the HTTP/2 stream (REFUSED_STREAM): the request was not
    /// processed and may be retried safely.
    pub fn is_refused_stream(&self) -> bool {
        let Self::UpstreamReset { source, .. } = self else {
            return false;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(e) = next {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            next = e.source();
        }
        false
    }

    /// The HTTP status the proxy answers with when this error ends a request.
    pub fn status(&self) -> StatusCode {
        match self {
            // Nothing listens (yet): typical during rollouts, and safe to retry.
            Self::ConnectRefused { .. }
            | Self::Overloaded { .. }
            | Self::NoHealthyEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::ConnectTimeout { .. } | Self::Timeout { .. } | Self::PerTryTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::RetryBudgetExhausted { last, .. } => last.status(),
            Self::ConnectUnreachable { .. }
            | Self::NoOriginalDestination { .. }
            | Self::UpstreamReset { .. }
            | Self::TlsHandshake { .. }
            | Self::TlsIdentityMismatch { .. } => StatusCode::BAD_GATEWAY,
            Self::Unauthorized { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// Classifies a failed connect(2) to `addr`.
    pub fn from_connect(addr: SocketAddr, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Self::ConnectUnreachable { addr, source }
            }
            _ => Self::ConnectRefused { addr, source },
        }
    }
}
