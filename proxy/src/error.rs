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
        }
    }

    /// The HTTP status the proxy answers with when this error ends a request.
    pub fn status(&self) -> StatusCode {
        match self {
            // Nothing listens (yet): typical during rollouts, and safe to retry.
            Self::ConnectRefused { .. } | Self::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::ConnectUnreachable { .. }
            | Self::NoOriginalDestination { .. }
            | Self::UpstreamReset { .. } => StatusCode::BAD_GATEWAY,
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
