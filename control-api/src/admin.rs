//! The control plane's own health: `/live`, `/ready` and `/metrics` on `--admin-addr`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertifyLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WatchEventLabels {
    resource: &'static str,
    r#type: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RelistLabels {
    resource: &'static str,
    reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    connected: Gauge,
    pushes: Counter,
    answers: Family<ResultLabels, Counter>,
    convergence: Histogram,
    apply_errors: Family<ReasonLabels, Counter>,
    certify: Family<CertifyLabels, Counter>,
    unauthorized: Family<ReasonLabels, Counter>,
    injections: Family<ResultLabels, Counter>,
    kube_watch_events: Family<WatchEventLabels, Counter>,
    kube_relists: Family<RelistLabels, Counter>,
    kube_watch_errors: Family<ResourceLabels, Counter>,
    kube_synced: Family<ResourceLabels, Gauge>,
    /// `DiscoveryService` figures (registered with the rest).
    pub discovery: crate::discovery::DiscoveryMetrics,
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis_control");
        let connected = Gauge::default();
        registry.register(
            "proxies_connected",
            "Proxies with an open ConfigService stream",
            connected.clone(),
        );
        let pushes = Counter::default();
        registry.register(
            "snapshot_pushes",
            "Snapshots sent to proxies",
            pushes.clone(),
        );
        let answers = Family::<ResultLabels, Counter>::default();
        registry.register(
            "snapshot_answers",
            "Proxy answers to snapshots: ack or nack",
            answers.clone(),
        );
        let convergence = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "convergence_seconds",
            "Time from a policy commit to each proxy's acknowledgement",
            convergence.clone(),
        );
        let apply_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "apply_errors",
            "Rejected Apply/Delete calls: invalid or storage",
            apply_errors.clone(),
        );
        let certify = Family::<CertifyLabels, Counter>::default();
        registry.register(
            "certificates",
            "Certify calls: result issued (reason: how the caller proved its identity) or rejected (why)",
            certify.clone(),
        );
        let unauthorized = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "unauthorized_calls",
            "Calls refused for want of the admin credential, by service",
            unauthorized.clone(),
        );
        let injections = Family::<ResultLabels, Counter>::default();
        registry.register(
            "injections",
            "Admission reviews of pods: injected, skipped (opted out, not opted in, already injected, hostNetwork), refused (cannot be injected, e.g. an app running as the proxy's UID), invalid-review",
            injections.clone(),
        );
        let discovery = crate::discovery::DiscoveryMetrics::register(&mut registry);
        let kube_watch_events = Family::<WatchEventLabels, Counter>::default();
        registry.register(
            "kube_watch_events",
            "Kubernetes watch events received, by resource and type (added, modified, deleted, bookmark, error)",
            kube_watch_events.clone(),
        );
        let kube_relists = Family::<RelistLabels, Counter>::default();
        registry.register(
            "kube_relists",
            "Full lists of a Kubernetes resource, by reason: start, expired (the watch's resourceVersion was too old) or error (retrying a failed list)",
            kube_relists.clone(),
        );
        let kube_watch_errors = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "kube_watch_errors",
            "Failed lists and watches of a Kubernetes resource (unreachable, refused, invalid answer); each is retried with backoff",
            kube_watch_errors.clone(),
        );
        let kube_synced = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "kube_synced",
            "1 while the view of a Kubernetes resource is current (listed, watch open), 0 while listing or watching fails",
            kube_synced.clone(),
        );
        Self {
            discovery,
            kube_watch_events,
            kube_relists,
            kube_watch_errors,
            kube_synced,
            registry,
            certify,
            unauthorized,
            connected,
            pushes,
            answers,
            convergence,
            apply_errors,
            injections,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn proxy_connected(&self, delta: i64) {
        self.connected.inc_by(delta);
    }
    pub fn push(&self) {
        self.pushes.inc();
    }
    pub fn answer(&self, ack: bool) {
        self.answers
            .get_or_create(&ResultLabels {
                result: if ack { "ack" } else { "nack" },
            })
            .inc();
    }
    pub fn converged(&self, elapsed: Duration) {
        self.convergence.observe(elapsed.as_secs_f64());
    }
    pub fn apply_error(&self, reason: &'static str) {
        self.apply_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
    pub fn certify(&self, result: &'static str, reason: &'static str) {
        self.certify
            .get_or_create(&CertifyLabels { result, reason })
            .inc();
    }
    pub fn unauthorized(&self, reason: &'static str) {
        self.unauthorized
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
    pub fn injection(&self, result: &'static str) {
        self.injections
            .get_or_create(&ResultLabels { result })
            .inc();
    }
    pub fn kube_watch_event(&self, resource: &'static str, r#type: &'static str) {
        self.kube_watch_events
            .get_or_create(&WatchEventLabels { resource, r#type })
            .inc();
    }
    pub fn kube_relist(&self, resource: &'static str, reason: &'static str) {
        self.kube_relists
            .get_or_create(&RelistLabels { resource, reason })
            .inc();
    }
    pub fn kube_watch_error(&self, resource: &'static str) {
        self.kube_watch_errors
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }
    pub fn kube_synced(&self, resource: &'static str, synced: bool) {
        self.kube_synced
            .get_or_create(&ResourceLabels { resource })
            .set(i64::from(synced));
    }
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves the admin endpoints until the process exits.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move {
                            let (status, body) = match req.uri().path() {
                                "/live" => (StatusCode::OK, "live\n".to_string()),
                                "/ready" if metrics.ready.load(Ordering::Acquire) => {
                                    (StatusCode::OK, "ready\n".to_string())
                                }
                                "/ready" => (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "not ready: starting\n".to_string(),
                                ),
                                "/metrics" => (StatusCode::OK, metrics.encode()),
                                _ => (
                                    StatusCode::NOT_FOUND,
                                    "not found: try /live, /ready or /metrics\n".to_string(),
                                ),
                            };
                            let mut rsp = Response::new(Full::new(Bytes::from(body)));
                            *rsp.status_mut() = status;
                            Ok::<_, Infallible>(rsp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}
