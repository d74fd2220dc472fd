//! A real OTLP/gRPC trace receiver (what a collector runs) inside a pod: the sidecars export
//! their spans to it, and tests read them back flattened, one [`ReceivedSpan`] per span.
//!
//! It serves opentelemetry-proto's generated `TraceService` with tonic on port 4317, from a
//! thread of its own that entered the pod's namespace, so it is reached like any collector in
//! the cluster would be. A collector that is down needs no receiver: point the sidecars at
//! [`collector_url`] of a pod where nothing listens.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

use super::{Netns, Pod};

/// The OTLP/gRPC port.
pub const OTLP_PORT: u16 = 4317;

/// `SpanKind` in the OTLP protocol.
pub const SPAN_KIND_SERVER: i32 = 2;
pub const SPAN_KIND_CLIENT: i32 = 3;

/// The URL an exporter would use for a collector in `pod`, whether or not one runs there.
pub fn collector_url(pod: &Pod) -> String {
    format!("http://{}:{OTLP_PORT}", pod.ip)
}

/// One span as the receiver got it, with its resource flattened in.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service_name: String,
    /// Every resource attribute, rendered as a string.
    pub resource: HashMap<String, String>,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// [`SPAN_KIND_SERVER`], [`SPAN_KIND_CLIENT`], ...
    pub kind: i32,
    pub attributes: HashMap<String, AttrValue>,
    /// The W3C trace flags the span was recorded with (bit 0: sampled), as the exporter sent them.
    pub flags: u32,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
}

/// A span attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// Arrays, maps and bytes, in their debug form: no test needs more of them.
    Other(String),
}

impl AttrValue {
    /// The value as a string: `"GET"`, `"200"`, `"true"`.
    pub fn render(&self) -> String {
        match self {
            Self::Str(s) | Self::Other(s) => s.clone(),
            Self::Int(i) => i.to_string(),
            Self::Bool(b) => b.to_string(),
            Self::Double(d) => d.to_string(),
        }
    }
}

impl ReceivedSpan {
    /// An attribute rendered as a string (ints and bools too), if the span has it.
    pub fn attr(&self, key: &str) -> Option<String> {
        self.attributes.get(key).map(AttrValue::render)
    }

    /// An integer attribute; `None` if missing or of another type (a status code sent as a
    /// string is a contract violation worth seeing).
    pub fn int_attr(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests: AtomicUsize,
}

/// A running trace receiver; it stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    store: Arc<Store>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Starts a receiver on `pod`'s IP, port 4317 (the pod needs no sidecar).
    pub fn start(pod: &Pod) -> Self {
        Self::start_in(pod.netns(), pod.ip.into())
    }

    /// Starts a receiver on `ip`:4317 inside `ns`.
    pub fn start_in(ns: &Netns, ip: IpAddr) -> Self {
        let addr = SocketAddr::new(ip, OTLP_PORT);
        let store = Arc::new(Store::default());
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(Receiver {
            store: store.clone(),
        });
        let thread = ns.spawn_thread(move || {
            // Bound on this thread, which has entered the namespace: the socket lives there.
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
            {
                Ok(l) => l,
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                let _ = bound_tx.send(Ok(()));
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let server = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming);
                // Not a graceful shutdown: an exporter's idle connection must not keep the
                // test waiting. Dropping the runtime closes every connection.
                tokio::select! {
                    result = server => {
                        if let Err(e) = result {
                            eprintln!("OTLP receiver on {addr} stopped: {e}");
                        }
                    }
                    _ = stopped => {}
                }
            });
        });
        match bound_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!(
                "OTLP receiver: cannot listen on {addr} in {}: {e}",
                ns.name()
            ),
            Err(_) => panic!("OTLP receiver on {addr} in {} did not start", ns.name()),
        }
        Self {
            addr,
            store,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://IP:4317`, for `--otlp-endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Polls until at least `n` spans have arrived or `timeout` passed; returns what it has
    /// either way (the test asserts on the count, with the spans to show).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        self.wait_until(timeout, |spans| spans.len() >= n)
    }

    /// Polls until `done` holds for the spans received or `timeout` passed; returns the spans.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many export calls arrived (each carries a batch of spans, possibly empty).
    pub fn requests(&self) -> usize {
        self.store.requests.load(Ordering::Relaxed)
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The gRPC service: flattens each export into the store.
struct Receiver {
    store: Arc<Store>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource: HashMap<String, String> = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default()
                .into_iter()
                .map(|kv| {
                    let (key, value) = attribute(kv);
                    (key, value.render())
                })
                .collect();
            let service_name = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(ReceivedSpan {
                    service_name: service_name.clone(),
                    resource: resource.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    // An all-zero parent is no parent (some exporters send one).
                    parent_span_id: Some(hex(&span.parent_span_id))
                        .filter(|p| p.bytes().any(|b| b != b'0'))
                        .unwrap_or_default(),
                    name: span.name,
                    kind: span.kind,
                    attributes: span.attributes.into_iter().map(attribute).collect(),
                    flags: span.flags,
                    status_code: span.status.map_or(0, |s| s.code),
                    start_unix_nanos: span.start_time_unix_nano,
                    end_unix_nanos: span.end_time_unix_nano,
                });
            }
        }
        self.store.requests.fetch_add(1, Ordering::Relaxed);
        self.store
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(kv: KeyValue) -> (String, AttrValue) {
    let value = match kv.value.and_then(|AnyValue { value }| value) {
        Some(any_value::Value::StringValue(s)) => AttrValue::Str(s),
        Some(any_value::Value::IntValue(i)) => AttrValue::Int(i),
        Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(b),
        Some(any_value::Value::DoubleValue(d)) => AttrValue::Double(d),
        Some(other) => AttrValue::Other(format!("{other:?}")),
        None => AttrValue::Other(String::new()),
    };
    (kv.key, value)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
