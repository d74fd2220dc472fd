//! The proxy's Prometheus metrics, served as text on the admin server's `/metrics`.
//!
//! Every family is created once here; the data path holds cheap clones of individual counters
//! (an `Arc` around an atomic), so recording is one atomic add.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which listener a connection or request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Direction {
    #[allow(non_camel_case_types)]
    inbound,
    #[allow(non_camel_case_types)]
    outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::inbound => "inbound",
            Self::outbound => "outbound",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub protocol: &'static str,
    pub status: u16,
    /// Whether the request travelled over mesh TLS (inbound: arrived; outbound: was sent).
    pub tls: bool,
    /// Inbound: the client's verified SPIFFE ID; outbound: the server's. Empty for plaintext.
    /// Shared, not copied: recording a request allocates nothing.
    pub peer_identity: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub protocol: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: Direction,
    pub cause: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    pub protocol: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RetryLabels {
    pub policy: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    pub policy: String,
    pub endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LoadLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~33 s: sidecar overheads live at the bottom, timeouts at the top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 17,
    ))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<LatencyLabels>,
    errors: Family<ErrorLabels, Counter>,
    conns_opened: Family<ConnLabels, Counter>,
    conns_closed: Family<ConnLabels, Counter>,
    conns_open: Family<DirectionLabels, Gauge>,
    read_bytes: Family<DirectionLabels, Counter>,
    write_bytes: Family<DirectionLabels, Counter>,
    upstream_connects: Family<ConnLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    budget_exhausted: Family<PolicyLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    policy_loads: Family<LoadLabels, Counter>,
    policy_version: Family<VersionLabels, Gauge>,
    handshakes: Family<HandshakeLabels, Counter>,
    renewals: Family<LoadLabels, Counter>,
    identity_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests completed, by direction, protocol and response status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<LatencyLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to receiving its response headers",
            request_duration.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "proxy_errors",
            "Errors the proxy produced itself, by cause (README: Error causes)",
            errors.clone(),
        );
        let conns_opened = Family::<ConnLabels, Counter>::default();
        registry.register(
            "tcp_connections_opened",
            "Connections accepted, by direction and detected protocol",
            conns_opened.clone(),
        );
        let conns_closed = Family::<ConnLabels, Counter>::default();
        registry.register(
            "tcp_connections_closed",
            "Accepted connections that have closed",
            conns_closed.clone(),
        );
        let conns_open = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "tcp_connections_open",
            "Accepted connections currently open",
            conns_open.clone(),
        );
        let read_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tcp_read_bytes",
            "Bytes read from accepted (downstream) connections",
            read_bytes.clone(),
        );
        let write_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tcp_write_bytes",
            "Bytes written to accepted (downstream) connections",
            write_bytes.clone(),
        );
        let upstream_connects = Family::<ConnLabels, Counter>::default();
        registry.register(
            "upstream_connections_opened",
            "Connections the proxy opened to upstream endpoints (pooled HTTP connections count once)",
            upstream_connects.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "retries",
            "Retries sent, by policy and the failure that caused them",
            retries.clone(),
        );
        let budget_exhausted = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the policy's retry budget was spent",
            budget_exhausted.clone(),
        );
        let ejections = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "endpoint_ejections",
            "Times an endpoint was taken out of load balancing after consecutive failures",
            ejections.clone(),
        );
        let policy_loads = Family::<LoadLabels, Counter>::default();
        registry.register(
            "policy_loads",
            "Policy versions applied or rejected (the policy in force stays on rejection)",
            policy_loads.clone(),
        );
        let policy_version = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "policy_version",
            "1 for the policy version in force",
            policy_version.clone(),
        );
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "Mesh TLS handshakes, by direction and result (ok, or why it failed)",
            handshakes.clone(),
        );
        let renewals = Family::<LoadLabels, Counter>::default();
        registry.register(
            "identity_certificates",
            "Certificates obtained (result=ok) or failed attempts (result=error)",
            renewals.clone(),
        );
        let identity_expiry = Gauge::default();
        registry.register(
            "identity_expiry_timestamp_seconds",
            "When the proxy's current certificate expires (Unix time; 0: no certificate)",
            identity_expiry.clone(),
        );
        Self {
            registry,
            handshakes,
            renewals,
            identity_expiry,
            retries,
            budget_exhausted,
            ejections,
            policy_loads,
            policy_version,
            requests,
            request_duration,
            errors,
            conns_opened,
            conns_closed,
            conns_open,
            read_bytes,
            write_bytes,
            upstream_connects,
        }
    }

    pub fn request(
        &self,
        direction: Direction,
        protocol: &'static str,
        status: u16,
        peer: Option<&Arc<str>>,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                protocol,
                status,
                tls: peer.is_some(),
                peer_identity: peer.cloned(),
            })
            .inc();
        self.request_duration
            .get_or_create(&LatencyLabels {
                direction,
                protocol,
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn error(&self, direction: Direction, cause: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { direction, cause })
            .inc();
    }

    pub fn upstream_connect(&self, direction: Direction, protocol: &'static str) {
        self.upstream_connects
            .get_or_create(&ConnLabels {
                direction,
                protocol,
            })
            .inc();
    }

    pub fn retry(&self, policy: &str, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                policy: policy.to_string(),
                reason,
            })
            .inc();
    }

    pub fn retry_budget_exhausted(&self, policy: &str) {
        self.budget_exhausted
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
            })
            .inc();
    }

    pub fn ejection(&self, policy: &str, endpoint: std::net::SocketAddr) {
        self.ejections
            .get_or_create(&EndpointLabels {
                policy: policy.to_string(),
                endpoint: endpoint.to_string(),
            })
            .inc();
    }

    /// Records a policy load; `version` is the one in force afterwards.
    pub fn policy_load(&self, applied: bool, version: &str) {
        let result = if applied { "applied" } else { "rejected" };
        self.policy_loads
            .get_or_create(&LoadLabels { result })
            .inc();
        self.policy_version.clear();
        self.policy_version
            .get_or_create(&VersionLabels {
                version: version.to_string(),
            })
            .set(1);
    }

    pub fn handshake(&self, direction: Direction, result: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    /// A certificate obtained (`ok`) or a failed attempt, and the expiry in force.
    pub fn identity(&self, ok: bool, expiry_unix: i64) {
        self.renewals
            .get_or_create(&LoadLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        self.identity_expiry.set(expiry_unix);
    }

    /// Counts an accepted connection open; the returned guard counts it closed when dropped.
    pub fn connection(&self, direction: Direction) -> ConnectionMetrics {
        let labels = DirectionLabels { direction };
        let open = self.conns_open.get_or_create(&labels).clone();
        open.inc();
        ConnectionMetrics {
            direction,
            protocol: "unknown",
            open,
            closed: self.conns_closed.clone(),
            read: self.read_bytes.get_or_create(&labels).clone(),
            written: self.write_bytes.get_or_create(&labels).clone(),
        }
    }

    /// Records the protocol a connection was detected as.
    pub fn detected(&self, conn: &mut ConnectionMetrics, protocol: &'static str) {
        conn.protocol = protocol;
        self.conns_opened
            .get_or_create(&ConnLabels {
                direction: conn.direction,
                protocol,
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Byte counters and the open/closed accounting of one accepted connection.
pub struct ConnectionMetrics {
    direction: Direction,
    protocol: &'static str,
    open: Gauge,
    closed: Family<ConnLabels, Counter>,
    pub read: Counter,
    pub written: Counter,
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.open.dec();
        self.closed
            .get_or_create(&ConnLabels {
                direction: self.direction,
                protocol: self.protocol,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_errors_and_connections() {
        let m = Metrics::new();
        m.request(
            Direction::outbound,
            "http1",
            200,
            None,
            Duration::from_millis(3),
        );
        m.request(
            Direction::inbound,
            "http2",
            200,
            Some(&Arc::from("spiffe://cluster.local/ns/a/sa/b")),
            Duration::from_millis(3),
        );
        m.error(Direction::inbound, "connect-refused");
        let mut conn = m.connection(Direction::inbound);
        m.detected(&mut conn, "opaque");
        conn.read.inc_by(10);
        drop(conn);
        let text = m.encode();
        for line in [
            r#"trellis_requests_total{direction="outbound",protocol="http1",status="200",tls="false",peer_identity=""} 1"#,
            r#"trellis_requests_total{direction="inbound",protocol="http2",status="200",tls="true",peer_identity="spiffe://cluster.local/ns/a/sa/b"} 1"#,
            r#"trellis_proxy_errors_total{direction="inbound",cause="connect-refused"} 1"#,
            r#"trellis_tcp_connections_opened_total{direction="inbound",protocol="opaque"} 1"#,
            r#"trellis_tcp_connections_closed_total{direction="inbound",protocol="opaque"} 1"#,
            r#"trellis_tcp_connections_open{direction="inbound"} 0"#,
            r#"trellis_tcp_read_bytes_total{direction="inbound"} 10"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
