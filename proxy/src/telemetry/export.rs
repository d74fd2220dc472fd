//! Shipping spans over OTLP/gRPC (opentelemetry-otlp's tonic exporter) from a thread of its own.
//!
//! Requests push finished spans into a bounded queue and never wait (`trace.rs`). This thread
//! wakes every 500 ms (or when the queue is half full), takes what is queued in batches of up to
//! 512, and exports each with a 5 s bound. While an export is pending the queue fills and further spans are dropped and counted:
//! a collector that is slow or down costs the spans, never the requests. On shutdown the queue
//! is flushed within the time the drain leaves.
//!
//! The exporter runs on its own current-thread runtime so that proto encoding and the export's
//! blocking waits never run on the data path's threads (../shared/STACK.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::EnvResourceDetector;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, mpsc, oneshot};

/// Spans waiting for export at most; beyond it they are dropped (`queue-full`).
pub const QUEUE_CAPACITY: usize = 4096;
const BATCH: usize = 512;
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Who this proxy is, for the resource attached to every span.
pub struct ResourceInfo {
    pub service_name: String,
    pub namespace: Option<String>,
    pub pod_name: Option<String>,
    pub service_account: Option<String>,
}

/// The counters the exporter keeps.
pub struct ExportMetrics {
    pub exported: Counter,
    pub dropped_export_failed: Counter,
}

/// The running exporter: ask it to flush and stop.
pub struct ExportHandle {
    stop: Option<oneshot::Sender<Instant>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The resource: service.name and the Kubernetes attributes from the flags, then
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`, which win where they say something.
pub fn resource(info: &ResourceInfo) -> Resource {
    let mut attrs = vec![KeyValue::new("service.name", info.service_name.clone())];
    if let Some(ns) = &info.namespace {
        attrs.push(KeyValue::new("k8s.namespace.name", ns.clone()));
    }
    if let Some(pod) = &info.pod_name {
        attrs.push(KeyValue::new("k8s.pod.name", pod.clone()));
    }
    if let Some(sa) = &info.service_account {
        attrs.push(KeyValue::new("k8s.serviceaccount.name", sa.clone()));
    }
    attrs.push(KeyValue::new("telemetry.sdk.name", "trellis-proxy"));
    attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let mut builder = Resource::builder_empty()
        .with_attributes(attrs)
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME")
        && !name.is_empty()
    {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

/// Checks the endpoint URL before anything starts: `http://host:port` (plaintext gRPC, as
/// Jaeger and collectors serve OTLP on 4317).
pub fn check_endpoint(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--otlp-endpoint {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "--otlp-endpoint {url:?}: TLS to the collector is not supported; use http:// to a collector or agent in the cluster"
            ));
        }
        _ => {
            return Err(format!(
                "--otlp-endpoint {url:?} needs a scheme and host, e.g. http://jaeger-collector.observability:4317"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("--otlp-endpoint {url:?} has no host"));
    }
    Ok(())
}

/// Starts the export thread; spans arrive on `queue`.
pub fn spawn(
    endpoint: String,
    resource: Resource,
    queue: mpsc::Receiver<SpanData>,
    wake: Arc<Notify>,
    metrics: ExportMetrics,
) -> std::io::Result<ExportHandle> {
    let (stop, stopped) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("trellis-export".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "trace export disabled: cannot start its runtime");
                    return;
                }
            };
            runtime.block_on(export_loop(
                endpoint, resource, queue, wake, metrics, stopped,
            ));
        })?;
    Ok(ExportHandle {
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl ExportHandle {
    /// Exports what is queued, giving up at `deadline`, and stops the thread.
    pub fn shutdown(mut self, deadline: Instant) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
        }
        if let Some(thread) = self.thread.take() {
            // The loop itself honours the deadline; joining cannot outlast it by much.
            let _ = thread.join();
        }
    }
}

async fn export_loop(
    endpoint: String,
    resource: Resource,
    mut queue: mpsc::Receiver<SpanData>,
    wake: Arc<Notify>,
    metrics: ExportMetrics,
    mut stop: oneshot::Receiver<Instant>,
) {
    // The tonic channel connects lazily: a collector that is not up yet is not an error here.
    let mut exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "trace export disabled: cannot build the OTLP exporter");
            return;
        }
    };
    exporter.set_resource(&resource);
    tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
    let mut shipper = Shipper {
        exporter,
        metrics,
        endpoint,
        failing: false,
    };
    let deadline = loop {
        // Wake on a timer, or early when the queue is half full: never per span, so a request
        // that queues a span wakes no thread.
        tokio::select! {
            biased;
            deadline = &mut stop => break deadline.unwrap_or_else(|_| Instant::now()),
            _ = wake.notified() => {}
            _ = tokio::time::sleep(BATCH_DELAY) => {}
        }
        shipper.ship_queued(&mut queue).await;
    };
    // Shutdown: what is queued, until the deadline.
    queue.close();
    if tokio::time::timeout_at(deadline.into(), shipper.ship_queued(&mut queue))
        .await
        .is_err()
    {
        tracing::warn!("trace export: shutdown deadline reached with spans still queued");
    }
    let _ = shipper.exporter.shutdown();
}

/// Exports batches and counts what became of each span.
struct Shipper {
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: ExportMetrics,
    endpoint: String,
    /// Whether the last export failed: failure and recovery are logged once each.
    failing: bool,
}

impl Shipper {
    /// Exports everything queued now, in batches of up to `BATCH`.
    async fn ship_queued(&mut self, queue: &mut mpsc::Receiver<SpanData>) {
        loop {
            let mut batch = Vec::with_capacity(BATCH);
            while batch.len() < BATCH {
                match queue.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            let (n, full) = (batch.len() as u64, batch.len() == BATCH);
            if n == 0 {
                return;
            }
            let endpoint = &self.endpoint;
            match self.exporter.export(batch).await {
                Ok(()) => {
                    self.metrics.exported.inc_by(n);
                    if self.failing {
                        tracing::info!(%endpoint, "trace export recovered");
                        self.failing = false;
                    }
                }
                Err(e) => {
                    self.metrics.dropped_export_failed.inc_by(n);
                    if !self.failing {
                        tracing::warn!(%endpoint, error = %e, spans = n, "trace export failed; spans are dropped (and counted) until the collector answers");
                        self.failing = true;
                    }
                }
            }
            if !full {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_errors_name_the_flag_and_the_fix() {
        assert!(check_endpoint("http://jaeger:4317").is_ok());
        assert!(
            check_endpoint("https://jaeger:4317")
                .unwrap_err()
                .contains("TLS")
        );
        assert!(
            check_endpoint("jaeger:4317")
                .unwrap_err()
                .contains("scheme")
        );
        assert!(check_endpoint("http://").is_err());
    }

    #[test]
    fn resource_names_the_workload_and_honours_the_environment() {
        let info = ResourceInfo {
            service_name: "reviews".into(),
            namespace: Some("shop".into()),
            pod_name: Some("reviews-1".into()),
            service_account: None,
        };
        let r = resource(&info);
        let get = |k: &'static str| r.get(&opentelemetry::Key::from_static_str(k));
        assert_eq!(get("service.name").unwrap().as_str(), "reviews");
        assert_eq!(get("k8s.namespace.name").unwrap().as_str(), "shop");
        assert_eq!(get("k8s.pod.name").unwrap().as_str(), "reviews-1");
    }
}
