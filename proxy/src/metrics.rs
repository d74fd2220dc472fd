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
    /// Bounded: the policy's host, or the original destination address; never a path.
    pub destination: Arc<str>,
    pub status: u16,
    /// The gRPC status code (empty for plain HTTP).
    pub grpc_status: Option<u32>,
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
    pub destination: Arc<str>,
    pub status_class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    pub protocol: &'static str,
    pub destination: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// One finished request, as the metrics record it.
pub struct RequestRecord<'a> {
    pub direction: Direction,
    pub protocol: &'static str,
    pub destination: &'a Arc<str>,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Inbound: the client's verified identity; outbound: the server's. None: plaintext.
    pub peer: Option<&'a Arc<str>>,
    /// Until the response headers.
    pub latency: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
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
    // 100 µs .. ~52 s: sidecar overheads live at the bottom, timeouts at the top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 20,
    ))
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<LatencyLabels>,
    request_bytes: Family<BytesLabels, Counter>,
    response_bytes: Family<BytesLabels, Counter>,
    spans_exported: Counter,
    spans_dropped: Family<ReasonLabels, Counter>,
    access_log_dropped: Counter,
    process: ProcessMetrics,
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
            "HTTP requests and gRPC calls completed, by direction, protocol, destination, status, gRPC status, TLS and peer identity",
            requests.clone(),
        );
        let request_duration: HistogramFamily<LatencyLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its response headers",
            request_duration.clone(),
        );
        let request_bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "request_bytes",
            "Request body bytes received from clients",
            request_bytes.clone(),
        );
        let response_bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "response_bytes",
            "Response body bytes sent to clients",
            response_bytes.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            spans_exported.clone(),
        );
        let spans_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "trace_spans_dropped",
            "Spans dropped: queue-full (export behind) or export-failed (collector down or refusing)",
            spans_dropped.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because stdout was not read fast enough",
            access_log_dropped.clone(),
        );
        let process = ProcessMetrics::register(&mut registry);
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
            request_bytes,
            response_bytes,
            spans_exported,
            spans_dropped,
            access_log_dropped,
            process,
            errors,
            conns_opened,
            conns_closed,
            conns_open,
            read_bytes,
            write_bytes,
            upstream_connects,
        }
    }

    pub fn request(&self, r: &RequestRecord<'_>) {
        self.requests
            .get_or_create(&RequestLabels {
                direction: r.direction,
                protocol: r.protocol,
                destination: r.destination.clone(),
                status: r.status,
                grpc_status: r.grpc_status,
                tls: r.peer.is_some(),
                peer_identity: r.peer.cloned(),
            })
            .inc();
        self.request_duration
            .get_or_create(&LatencyLabels {
                direction: r.direction,
                protocol: r.protocol,
                destination: r.destination.clone(),
                status_class: status_class(r.status),
            })
            .observe(r.latency.as_secs_f64());
        let bytes = BytesLabels {
            direction: r.direction,
            protocol: r.protocol,
            destination: r.destination.clone(),
        };
        if r.request_bytes > 0 {
            self.request_bytes
                .get_or_create(&bytes)
                .inc_by(r.request_bytes);
        }
        self.response_bytes
            .get_or_create(&bytes)
            .inc_by(r.response_bytes);
    }

    /// Counters for the trace exporter: exported, dropped because the queue was full, dropped
    /// because the export failed.
    pub fn span_counters(&self) -> (Counter, Counter, Counter) {
        let dropped = |reason| {
            self.spans_dropped
                .get_or_create(&ReasonLabels { reason })
                .clone()
        };
        (
            self.spans_exported.clone(),
            dropped("queue-full"),
            dropped("export-failed"),
        )
    }

    pub fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
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
    /// Reports the data-plane runtime's task count in `trellis_runtime_tasks` from now on.
    pub fn watch_runtime(&self, runtime: tokio::runtime::Handle) {
        let _ = self.process.runtime.set(runtime);
    }

    pub fn encode(&self) -> String {
        self.process.sample();
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's own resources, read from /proc when `/metrics` is scraped.
struct ProcessMetrics {
    rss: Gauge,
    fds: Gauge,
    cpu: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Tasks alive on the data-plane runtime (connections, streams, pooled connections,
    /// background loops): a leak shows here first.
    tasks: Gauge,
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl ProcessMetrics {
    fn register(registry: &mut Registry) -> Self {
        let rss = Gauge::default();
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the proxy process",
            prometheus_client::registry::Unit::Bytes,
            rss.clone(),
        );
        let fds = Gauge::default();
        registry.register(
            "process_open_fds",
            "Open file descriptors (sockets included) of the proxy process",
            fds.clone(),
        );
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time the proxy process has used",
            cpu.clone(),
        );
        let tasks = Gauge::default();
        registry.register(
            "runtime_tasks",
            "Tasks alive on the proxy's data-plane runtime",
            tasks.clone(),
        );
        Self {
            rss,
            fds,
            cpu,
            tasks,
            runtime: std::sync::OnceLock::new(),
        }
    }

    fn sample(&self) {
        if let Some(runtime) = self.runtime.get() {
            self.tasks.set(runtime.metrics().num_alive_tasks() as i64);
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let (page, ticks) = unsafe {
            (
                libc::sysconf(libc::_SC_PAGESIZE),
                libc::sysconf(libc::_SC_CLK_TCK),
            )
        };
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
            && let Some(pages) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i64>().ok())
        {
            self.rss.set(pages * page.max(1));
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Minus the descriptor read_dir itself holds open.
            self.fds.set(dir.count() as i64 - 1);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(after_comm) = stat.rsplit_once(')').map(|(_, rest)| rest)
        {
            // Fields after the command name: state is field 3, utime 14 and stime 15.
            let fields: Vec<&str> = after_comm.split_whitespace().collect();
            let ticks_used: f64 = [11, 12]
                .iter()
                .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
                .sum();
            let seconds = ticks_used / ticks.max(1) as f64;
            let delta = seconds - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
        }
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
        let dst: Arc<str> = Arc::from("10.0.0.2:80");
        let peer: Arc<str> = Arc::from("spiffe://cluster.local/ns/a/sa/b");
        let record = |direction, protocol, grpc_status, peer| RequestRecord {
            direction,
            protocol,
            destination: &dst,
            status: 200,
            grpc_status,
            peer,
            latency: Duration::from_millis(3),
            request_bytes: 5,
            response_bytes: 7,
        };
        m.request(&record(Direction::outbound, "http1", None, None));
        m.request(&record(Direction::inbound, "grpc", Some(0), Some(&peer)));
        m.error(Direction::inbound, "connect-refused");
        let mut conn = m.connection(Direction::inbound);
        m.detected(&mut conn, "opaque");
        conn.read.inc_by(10);
        drop(conn);
        let _ = m.span_counters();
        let text = m.encode();
        assert!(
            text.contains("trellis_process_resident_memory_bytes "),
            "{text}"
        );
        assert!(text.contains("trellis_process_open_fds "), "{text}");
        assert!(
            text.contains("trellis_process_cpu_seconds_total "),
            "{text}"
        );
        for line in [
            r#"trellis_requests_total{direction="outbound",protocol="http1",destination="10.0.0.2:80",status="200",grpc_status="",tls="false",peer_identity=""} 1"#,
            r#"trellis_requests_total{direction="inbound",protocol="grpc",destination="10.0.0.2:80",status="200",grpc_status="0",tls="true",peer_identity="spiffe://cluster.local/ns/a/sa/b"} 1"#,
            r#"trellis_request_duration_seconds_bucket{le="0.0032",direction="outbound",protocol="http1",destination="10.0.0.2:80",status_class="2xx"} 1"#,
            r#"trellis_request_bytes_total{direction="outbound",protocol="http1",destination="10.0.0.2:80"} 5"#,
            r#"trellis_response_bytes_total{direction="inbound",protocol="grpc",destination="10.0.0.2:80"} 7"#,
            r#"trellis_proxy_errors_total{direction="inbound",cause="connect-refused"} 1"#,
            r#"trellis_tcp_connections_opened_total{direction="inbound",protocol="opaque"} 1"#,
            r#"trellis_tcp_connections_closed_total{direction="inbound",protocol="opaque"} 1"#,
            r#"trellis_tcp_connections_open{direction="inbound"} 0"#,
            r#"trellis_tcp_read_bytes_total{direction="inbound"} 10"#,
            r#"trellis_trace_spans_dropped_total{reason="queue-full"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    /// The task gauge follows the runtime it watches: a spawned task that has not finished
    /// is counted, and it is gone once it has.
    #[tokio::test]
    async fn counts_the_runtime_tasks() {
        let m = Metrics::new();
        let gauge = |m: &Metrics| -> i64 {
            let text = m.encode();
            let line = text
                .lines()
                .find(|l| l.starts_with("trellis_runtime_tasks "))
                .unwrap_or_else(|| panic!("no task gauge in\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(gauge(&m), 0, "not watching a runtime yet");
        m.watch_runtime(tokio::runtime::Handle::current());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });
        let with_task = gauge(&m);
        assert!(with_task >= 1, "{with_task}");
        tx.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(gauge(&m), with_task - 1);
    }
}
