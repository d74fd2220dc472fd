//! The admin server: `/live`, `/ready`, `/metrics`, `/config`, `POST /shutdown`, and the app's
//! probes (`/probe/...`, see `probe.rs`).
//!
//! It runs on its own thread and single-threaded runtime, apart from the data path, so that a
//! scrape storm or a slow admin client cannot delay proxied requests (and a busy data path
//! cannot make the liveness probe fail). `/config` and `/shutdown` answer only loopback peers:
//! in Kubernetes the admin port listens on the pod IP for kubelet and Prometheus. Probe paths
//! answer other peers only when the injector declared them (`--probes`, see
//! `probe/declared.rs`): any pod can reach the admin port, and an undeclared probe would let it
//! read any loopback port of the app around a strict ServerPolicy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::probe::DeclaredProbes;

/// What the admin endpoints report and control.
pub struct AdminState {
    ready: AtomicBool,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    config: ConfigFn,
    shutdown: Arc<Notify>,
    probes: DeclaredProbes,
}

/// Produces the `/config` document (the policy in force changes over time).
pub type ConfigFn = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

impl AdminState {
    /// `probes`: the probe paths open to peers other than loopback.
    pub fn new(
        metrics: Arc<Metrics>,
        config: ConfigFn,
        shutdown: Arc<Notify>,
        probes: DeclaredProbes,
    ) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            metrics,
            config,
            shutdown,
            probes,
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.set_ready(false);
    }
}

/// Serves the admin endpoints on `listener` from a dedicated thread, for the life of the process.
pub fn spawn(listener: std::net::TcpListener, state: Arc<AdminState>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("trellis-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin server could not start");
                        return;
                    }
                };
                loop {
                    let (stream, peer) = match listener.accept().await {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let state = state.clone();
                    let loopback = is_loopback(peer);
                    tokio::spawn(async move {
                        let shutdown_requested = Arc::new(AtomicBool::new(false));
                        let svc = {
                            let (state, requested) = (state.clone(), shutdown_requested.clone());
                            hyper::service::service_fn(move |req: Request<Incoming>| {
                                let probe = crate::probe::is_probe(req.uri().path())
                                    && req.method() == Method::GET;
                                let rsp = if !probe {
                                    Some(route(&state, loopback, req_ref(&req), &requested))
                                } else {
                                    probe_refusal(&state.probes, loopback, req.uri())
                                };
                                async move {
                                    match rsp {
                                        Some(rsp) => Ok::<_, Infallible>(rsp),
                                        None => Ok(crate::probe::handle(req).await),
                                    }
                                }
                            })
                        };
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                        // Only now: the response to POST /shutdown has been written and the
                        // connection closed, so the caller sees "draining" even when the drain
                        // completes (and the process exits) at once.
                        if shutdown_requested.load(Ordering::Acquire) {
                            state.shutdown.notify_one();
                        }
                    });
                }
            })
        })?;
    Ok(())
}

/// The parts of a request the synchronous endpoints look at.
struct ReqRef {
    method: Method,
    path: String,
}

fn req_ref(req: &Request<Incoming>) -> ReqRef {
    ReqRef {
        method: req.method().clone(),
        path: req.uri().path().to_string(),
    }
}

/// The pod itself (or an operator in it): 127.0.0.0/8, ::1, or ::ffff:127.x.y.z.
fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().is_loopback()
        || matches!(peer.ip(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

/// The 403 for a probe path a non-loopback peer may not use, or `None` to serve the probe.
fn probe_refusal(
    probes: &DeclaredProbes,
    loopback: bool,
    uri: &http::Uri,
) -> Option<Response<Full<Bytes>>> {
    let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    if loopback || probes.allows(target) {
        return None;
    }
    tracing::debug!(%target, "probe refused: not declared");
    let mut rsp = Response::new(Full::new(Bytes::from(format!(
        "forbidden: probe not declared: {target}; the injector declares the pod's probes in TRELLIS_PROBES (--probes), and only loopback clients may use other probe paths\n"
    ))));
    *rsp.status_mut() = StatusCode::FORBIDDEN;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Some(rsp)
}

fn route(
    state: &AdminState,
    loopback: bool,
    req: ReqRef,
    shutdown_requested: &AtomicBool,
) -> Response<Full<Bytes>> {
    match (&req.method, req.path.as_str()) {
        (&Method::GET | &Method::HEAD, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET | &Method::HEAD, "/ready") => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else if state.draining.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: starting (listeners, or the first policy snapshot from the control plane)\n",
                )
            }
        }
        (&Method::GET, "/metrics") => {
            let mut rsp = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            rsp
        }
        (&Method::GET, "/config") if loopback => {
            let body = serde_json::to_vec_pretty(&(state.config)()).unwrap_or_default();
            let mut rsp = Response::new(Full::new(Bytes::from(body)));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        (&Method::POST, "/shutdown") if loopback => {
            shutdown_requested.store(true, Ordering::Release);
            let mut rsp = text(StatusCode::OK, "draining\n");
            rsp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            rsp
        }
        (_, "/config" | "/shutdown") if !loopback => text(
            StatusCode::FORBIDDEN,
            "forbidden: this endpoint answers loopback clients only\n",
        ),
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST /shutdown\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready, /metrics, /config, POST /shutdown, /probe/http/<port>/<path>, /probe/tcp/<port> or /probe/grpc/<port>?service=<name>\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_the_pod_itself_in_any_address_family() {
        for peer in [
            "127.0.0.1:1",
            "127.9.9.9:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(peer.parse().unwrap()), "{peer}");
        }
        for peer in [
            "10.0.0.7:1",
            "[fd00::7]:1",
            "[::ffff:10.0.0.7]:1",
            "0.0.0.0:1",
        ] {
            assert!(!is_loopback(peer.parse().unwrap()), "{peer}");
        }
    }

    #[test]
    fn other_peers_get_only_the_declared_probes() {
        let declared: DeclaredProbes = "/probe/http/8080/healthz?full=1,/probe/tcp/5432"
            .parse()
            .unwrap();
        let refused = |loopback: bool, target: &str| {
            probe_refusal(&declared, loopback, &target.parse().unwrap()).map(|rsp| rsp.status())
        };
        assert_eq!(refused(false, "/probe/http/8080/healthz?full=1"), None);
        assert_eq!(refused(false, "/probe/tcp/5432"), None);
        for undeclared in [
            "/probe/http/8080/healthz",
            "/probe/http/8080/healthz?full=1&x=2",
            "/probe/http/8080/admin",
            "/probe/tcp/6379",
        ] {
            assert_eq!(
                refused(false, undeclared),
                Some(StatusCode::FORBIDDEN),
                "{undeclared}"
            );
            assert_eq!(refused(true, undeclared), None, "loopback: {undeclared}");
        }
        // Nothing declared: every probe path is loopback-only.
        let none = DeclaredProbes::default();
        assert!(probe_refusal(&none, false, &"/probe/tcp/5432".parse().unwrap()).is_some());
        assert!(probe_refusal(&none, true, &"/probe/tcp/5432".parse().unwrap()).is_none());
    }

    #[tokio::test]
    async fn the_refusal_names_the_path_and_where_probes_are_declared() {
        let rsp = probe_refusal(
            &DeclaredProbes::default(),
            false,
            &"/probe/http/8080/secret?id=1".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        let body = http_body_util::BodyExt::collect(rsp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains("probe not declared: /probe/http/8080/secret?id=1;")
                && body.contains("TRELLIS_PROBES"),
            "{body}"
        );
    }
}
