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

    /// Every cause, for recognising one named by another proxy (`trellis-error`).
    pub const CAUSES: &[&'static str] = &[
        "connect-refused",
        "connect-timeout",
        "connect-unreachable",
        "no-original-destination",
        "detect-timeout",
        "idle-timeout",
        "upstream-reset",
        "overloaded",
        "timeout",
        "per-try-timeout",
        "retry-budget-exhausted",
        "no-healthy-endpoints",
        "tls-handshake",
        "tls-identity-mismatch",
        "unauthorized",
    ];

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

/// A cause named by another proxy's `trellis-error` header, as a static string (the value is
/// only trusted when it is one of ours: a label value must stay bounded).
pub fn known_cause(value: &str) -> Option<&'static str> {
    ProxyError::CAUSES.iter().find(|c| **c == value).copied()
}

/// Lets through at most `per_second` events per second and counts the rest, so a failure storm
/// cannot flood the diagnostic log. The suppressed count is reported with the next event let
/// through.
pub struct RateLimited {
    per_second: u32,
    state: std::sync::Mutex<(u64, u32, u64)>,
}

impl RateLimited {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: std::sync::Mutex::new((0, 0, 0)),
        }
    }

    /// Runs `log` unless this second's quota is spent.
    pub fn warn(&self, log: impl FnOnce()) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let suppressed = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            let (second, count, suppressed) = &mut *state;
            if *second != now {
                *second = now;
                *count = 0;
            }
            *count += 1;
            if *count > self.per_second {
                *suppressed += 1;
                return;
            }
            std::mem::take(suppressed)
        };
        if suppressed > 0 {
            tracing::warn!(
                suppressed,
                "proxy-made errors not logged (rate limit); see the access log and trellis_proxy_errors_total"
            );
        }
        log();
    }
}
