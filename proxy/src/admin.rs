//! The admin server: `/live`, `/ready`, `/metrics`, `/config`, `POST /shutdown`, and the app's
//! probes (`/probe/...`, see `probe.rs`).
//!
//! It runs on its own thread and single-threaded runtime, apart from the data path, so that a
//! scrape storm or a slow admin client cannot delay proxied requests (and a busy data path
//! cannot make the liveness probe fail). `/config` and `/shutdown` answer only loopback peers:
//! in Kubernetes the admin port listens on the pod IP for kubelet and Prometheus.

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

/// What the admin endpoints report and control.
pub struct AdminState {
    ready: AtomicBool,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    config: ConfigFn,
    shutdown: Arc<Notify>,
}

/// Produces the `/config` document (the policy in force changes over time).
pub type ConfigFn = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, config: ConfigFn, shutdown: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            metrics,
            config,
            shutdown,
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
                    tokio::spawn(async move {
                        let shutdown_requested = Arc::new(AtomicBool::new(false));
                        let svc = {
                            let (state, requested) = (state.clone(), shutdown_requested.clone());
                            hyper::service::service_fn(move |req: Request<Incoming>| {
                                let probe = crate::probe::is_probe(req.uri().path())
                                    && req.method() == Method::GET;
                                let rsp = (!probe)
                                    .then(|| route(&state, peer, req_ref(&req), &requested));
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

fn route(
    state: &AdminState,
    peer: SocketAddr,
    req: ReqRef,
    shutdown_requested: &AtomicBool,
) -> Response<Full<Bytes>> {
    let loopback = peer.ip().is_loopback()
        || matches!(peer.ip(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
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
