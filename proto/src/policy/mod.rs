//! The policy model: Kubernetes-style YAML documents for people, typed values for the code.
//!
//! [`PolicySet::parse`] reads one or more `---`-separated documents and returns every policy, or
//! every problem at once, each named by document and field path:
//! `document 1 (TrafficPolicy default/reviews): spec.retries.perTryTimeout: "5x" is not a duration`.
//! Absent fields take the defaults documented in the README ("Policy reference"); the defaults
//! live here, in one place, as the `Default` impls.

mod fields;
pub(crate) mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

pub const API_VERSION: &str = "trellis.dev/v1alpha1";

/// Every policy from one source (a file, later the control plane), in document order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PolicySet {
    pub traffic: Vec<TrafficPolicy>,
    pub server: Vec<ServerPolicy>,
}

impl PolicySet {
    /// Parses and validates YAML documents. All problems are reported together.
    pub fn parse(yaml: &str) -> Result<Self, PolicyErrors> {
        validate::parse(yaml)
    }
}

/// Everything wrong with a set of documents, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<String>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error(s) in policy:", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Client side: what happens to calls to a destination.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub name: String,
    pub namespace: String,
    pub destination: Destination,
    pub protocol: Protocol,
    /// The whole call, all attempts, to the response headers (and the body of responses with a
    /// known length). `None`: no limit.
    #[serde(with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Longest silence on a response body or an opaque stream before it is closed.
    #[serde(with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    pub retries: Retries,
    pub ejection: Ejection,
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// Matched against the HTTP authority. Short Kubernetes names (`reviews`, `reviews.default`)
    /// are completed by the proxy against the policy's namespace and the cluster domain.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Original destinations (ip:port) this policy applies to.
    pub addresses: Vec<SocketAddr>,
    /// Endpoints to balance across; empty: the original destination.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Auto,
    Http1,
    Http2,
    Grpc,
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    pub max_retries: u32,
    pub on: Vec<RetryOn>,
    #[serde(with = "opt_duration")]
    pub per_try_timeout: Option<Duration>,
    pub backoff: Backoff,
    pub budget: Budget,
    /// Retry non-idempotent requests (POST, PATCH) even when they may have reached the app.
    pub non_idempotent: bool,
    /// Request bodies up to this size are kept for replay; larger ones are sent once.
    pub body_buffer_bytes: u64,
}

impl Default for Retries {
    /// The conservative default: retry only what provably never reached an app.
    fn default() -> Self {
        Self {
            max_retries: 2,
            on: vec![RetryOn::ConnectFailure, RetryOn::RefusedStream],
            per_try_timeout: None,
            backoff: Backoff::default(),
            budget: Budget::default(),
            non_idempotent: false,
            body_buffer_bytes: 64 * 1024,
        }
    }
}

/// A condition under which an attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// The TCP connection failed, or the far sidecar could not connect to its app.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the server did not process the request.
    RefusedStream,
    /// The connection was reset or closed before a response.
    Reset,
    /// 502, 503 or 504.
    GatewayError,
    /// This HTTP status.
    Status(u16),
    /// This gRPC status, from a trailers-only response.
    Grpc(GrpcCode),
}

impl RetryOn {
    pub fn is_grpc(self) -> bool {
        matches!(self, Self::Grpc(_))
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::RefusedStream => f.write_str("refused-stream"),
            Self::Reset => f.write_str("reset"),
            Self::GatewayError => f.write_str("gateway-error"),
            Self::Status(code) => write!(f, "{code}"),
            Self::Grpc(code) => f.write_str(code.name()),
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The retryable gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    Cancelled = 1,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
}

impl GrpcCode {
    pub const ALL: [GrpcCode; 5] = [
        Self::Cancelled,
        Self::DeadlineExceeded,
        Self::ResourceExhausted,
        Self::Internal,
        Self::Unavailable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::DeadlineExceeded => "deadline-exceeded",
            Self::ResourceExhausted => "resource-exhausted",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
        }
    }

    pub fn code(self) -> u32 {
        self as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Backoff {
    #[serde(with = "duration")]
    pub base: Duration,
    #[serde(with = "duration")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

/// Retries may add at most `percent` of the recent request rate, plus `min_per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    pub percent: f64,
    pub min_per_second: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            percent: 20.0,
            min_per_second: 10,
        }
    }
}

/// When an endpoint is taken out of the balancer, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ejection {
    /// Consecutive failures (connect failures, the far sidecar's connect-refused, 5xx) that eject.
    pub consecutive_failures: u32,
    /// First ejection; doubles on each consecutive ejection up to `max_time`.
    #[serde(with = "duration")]
    pub base_time: Duration,
    #[serde(with = "duration")]
    pub max_time: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_time: Duration::from_secs(1),
            max_time: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    pub mode: TlsMode,
    pub server_identity: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Disabled,
    Mutual,
}

/// Server side: who may call a workload's port, and how.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Selector,
    /// The port this applies to; `None`: every port of the selected workloads.
    pub port: Option<u16>,
    pub mtls: Mtls,
    pub allow: Vec<Allow>,
    /// Inbound ports forwarded as opaque TCP without protocol detection.
    pub opaque_ports: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    pub service_account: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mtls {
    Strict,
    Permissive,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Allow {
    pub identities: Vec<String>,
}

mod duration {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

mod opt_duration {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}
