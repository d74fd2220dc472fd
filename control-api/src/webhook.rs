//! The mutating admission webhook: AdmissionReview v1 over HTTPS, answered with the JSON patch
//! from [`crate::inject`] — the same code as `trellis-control inject`.
//!
//! Two paths, matching the two webhooks of `deploy/`'s MutatingWebhookConfiguration (the API
//! server selects namespaces by label; the webhook never needs to read a Namespace):
//! - `POST /inject`: pods in namespaces labelled `trellis.dev/inject: enabled`, injected unless
//!   the pod opts out;
//! - `POST /inject-annotated`: pods elsewhere, injected only when annotated
//!   `trellis.dev/inject: enabled`.
//!
//! Every answer is a well-formed AdmissionReview: a pod that cannot be injected (say, an app
//! running as the proxy's UID) is refused with the reason; a request that is not an
//! AdmissionReview gets a 400 naming what is wrong. Nothing panics into a 500.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

use crate::admin::Metrics;
use crate::inject::{self, InjectConfig, OptIn, Outcome};

/// The API server sends at most ~3 MiB of object; anything larger is not a review.
const MAX_BODY: usize = 4 << 20;

pub struct Webhook {
    pub config: InjectConfig,
    pub metrics: Arc<Metrics>,
}

/// Serves the webhook on `addr` with `tls` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    webhook: Arc<Webhook>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (webhook): {e}"))?;
    tracing::info!(%addr, "admission webhook listening");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, webhook) = (acceptor.clone(), webhook.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = hyper::service::service_fn(move |req| {
                    let webhook = webhook.clone();
                    async move { Ok::<_, Infallible>(webhook.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(())
}

impl Webhook {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        // The body is read (bounded) before any answer, also a refusal: answering an HTTP/2
        // request while its body is still arriving resets the stream under the client.
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the request body: {e}"),
                );
            }
        };
        let opt_in = match (&parts.method, parts.uri.path()) {
            (&Method::POST, "/inject") => OptIn::Namespace,
            (&Method::POST, "/inject-annotated") => OptIn::Annotation,
            (_, "/inject" | "/inject-annotated") => {
                return plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use POST with an AdmissionReview",
                );
            }
            _ => {
                return plain(
                    StatusCode::NOT_FOUND,
                    "paths: POST /inject, POST /inject-annotated",
                );
            }
        };
        match self.review(&body, opt_in) {
            Ok(answer) => json_response(StatusCode::OK, &answer),
            Err(why) => {
                self.metrics.injection("invalid-review");
                tracing::warn!(error = %why, "invalid AdmissionReview");
                plain(StatusCode::BAD_REQUEST, &why)
            }
        }
    }

    /// The AdmissionReview answer for a request body, or why the body is not a review.
    pub fn review(&self, body: &[u8], opt_in: OptIn) -> Result<Value, String> {
        let review: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        if review["kind"] != "AdmissionReview" {
            return Err(format!("kind is {}, not AdmissionReview", review["kind"]));
        }
        let api_version = review["apiVersion"].as_str().unwrap_or("");
        if api_version != "admission.k8s.io/v1" {
            return Err(format!(
                "apiVersion {api_version:?}: only admission.k8s.io/v1 is served"
            ));
        }
        let request = &review["request"];
        let uid = request["uid"]
            .as_str()
            .filter(|u| !u.is_empty())
            .ok_or("request.uid is missing")?;
        let answer = |response: Value| {
            let mut response = response;
            response["uid"] = json!(uid);
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
        };
        let kind = &request["kind"];
        if kind["kind"] != "Pod" || kind["group"].as_str().is_some_and(|g| !g.is_empty()) {
            self.metrics.injection("skipped");
            return Ok(answer(json!({"allowed": true})));
        }
        let pod = &request["object"];
        if !pod.is_object() {
            return Err("request.object is not a Pod object".into());
        }
        let namespace = request["namespace"]
            .as_str()
            .or_else(|| pod["metadata"]["namespace"].as_str());
        let workload = inject::workload_name(pod);
        let what = format!("pod {}/{}", namespace.unwrap_or("?"), pod_name(pod));
        match inject::inject(pod, namespace, &workload, opt_in, &self.config) {
            Ok(Outcome::Injected(ops)) => {
                self.metrics.injection("injected");
                tracing::info!(pod = %what, %workload, "sidecar injected");
                let patch = base64::engine::general_purpose::STANDARD
                    .encode(serde_json::to_vec(&ops).unwrap_or_default());
                Ok(answer(
                    json!({"allowed": true, "patchType": "JSONPatch", "patch": patch}),
                ))
            }
            Ok(Outcome::Skipped(why)) => {
                self.metrics.injection("skipped");
                tracing::debug!(pod = %what, reason = %why, "not injected");
                Ok(answer(json!({"allowed": true})))
            }
            Err(e) => {
                self.metrics.injection("refused");
                tracing::warn!(pod = %what, error = %e, "pod refused");
                Ok(answer(json!({
                    "allowed": false,
                    "status": {"code": 400, "reason": "BadRequest",
                               "message": format!("trellis sidecar injection: {e}")},
                })))
            }
        }
    }
}

fn pod_name(pod: &Value) -> &str {
    pod["metadata"]["name"]
        .as_str()
        .or_else(|| pod["metadata"]["generateName"].as_str())
        .unwrap_or("?")
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    rsp
}
