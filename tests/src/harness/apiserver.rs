//! A stand-in for the pieces of the Kubernetes API server the control plane calls, which cannot
//! exist on these machines. It is small and honest about what it is: HTTPS on 127.0.0.1 with a
//! certificate of its own CA, answering in the API's real JSON:
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` (`authentication.k8s.io/v1`), from a fixed
//!   table of tokens;
//! - `GET` and `PATCH` (`application/json-patch+json`, applied with the `json-patch` crate) of
//!   `/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}`, for the one
//!   object the test provides. A successful patch bumps `metadata.resourceVersion`; a patch that
//!   does not apply (a failed `test` op included) is refused with 422 and a `Status`, changing
//!   nothing — which is how a resourceVersion precondition in a JSON patch behaves.
//!
//! It rejects callers without the expected bearer token (401), as the API server would, and
//! records every request and every review it was asked for.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

const WEBHOOK_CONFIGS: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/";

/// One review the control plane asked for: its own credential and the review's spec.
#[derive(Debug, Clone)]
pub struct Review {
    pub authorization: String,
    pub token: String,
    pub audiences: Vec<String>,
}

/// One request as the stand-in received it (before the bearer token was checked).
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub authorization: String,
    pub content_type: String,
    pub body: String,
}

/// The MutatingWebhookConfiguration the stand-in serves, and the scripted interference.
#[derive(Default)]
struct WebhookConfig {
    object: Option<Value>,
    /// How many more GETs are each followed by another writer changing the object.
    changes_after_get: usize,
}

pub struct FakeApiServer {
    pub url: String,
    /// The CA (PEM file) that verifies this server.
    pub ca_file: PathBuf,
    pub reviews: Arc<Mutex<Vec<Review>>>,
    /// Every request, in order of arrival.
    pub requests: Arc<Mutex<Vec<ApiRequest>>>,
    webhooks: Arc<Mutex<WebhookConfig>>,
    _thread: std::thread::JoinHandle<()>,
}

struct State {
    tokens: HashMap<String, (String, String, Vec<String>)>,
    /// The `Authorization` header every caller must send.
    caller: String,
    reviews: Arc<Mutex<Vec<Review>>>,
    requests: Arc<Mutex<Vec<ApiRequest>>>,
    webhooks: Arc<Mutex<WebhookConfig>>,
}

impl FakeApiServer {
    /// `tokens`: service-account token → (namespace, service account, audiences it is valid
    /// for). `caller_token`: the bearer token the control plane must present.
    pub fn start(
        dir: &std::path::Path,
        tokens: HashMap<String, (String, String, Vec<String>)>,
        caller_token: &str,
    ) -> Self {
        let (ca, ..) = trellis_identity::ca::Ca::generate("apiserver.test").expect("CA");
        let id = trellis_identity::SpiffeId::new("apiserver.test", "default", "kubernetes");
        let (issued, key) = ca
            .issue(
                &id,
                Duration::from_secs(3600),
                &["localhost".into()],
                &["127.0.0.1".parse().expect("ip")],
            )
            .expect("issue");
        let ca_file = dir.join("apiserver-ca.pem");
        std::fs::write(&ca_file, ca.bundle_pem()).expect("write CA");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let webhooks = Arc::new(Mutex::new(WebhookConfig::default()));
        let state = Arc::new(State {
            tokens,
            caller: format!("Bearer {caller_token}"),
            reviews: reviews.clone(),
            requests: requests.clone(),
            webhooks: webhooks.clone(),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, state) = (acceptor.clone(), state.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(route(req, &state).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        Self {
            url,
            ca_file,
            reviews,
            requests,
            webhooks,
            _thread: thread,
        }
    }

    /// Serves `object` (a MutatingWebhookConfiguration, found by its `metadata.name`).
    pub fn with_webhook_config(self, object: Value) -> Self {
        self.set_webhook_config(object);
        self
    }

    /// Replaces the served MutatingWebhookConfiguration; a missing resourceVersion becomes "1".
    pub fn set_webhook_config(&self, mut object: Value) {
        if object["metadata"]["resourceVersion"].is_null() {
            object["metadata"]["resourceVersion"] = json!("1");
        }
        self.webhooks.lock().expect("webhooks").object = Some(object);
    }

    /// The MutatingWebhookConfiguration as it is now.
    pub fn webhook_config(&self) -> Option<Value> {
        self.webhooks.lock().expect("webhooks").object.clone()
    }

    /// Right after each of the next `n` GETs of the webhook configuration is answered, another
    /// writer changes it (adds a label, bumps resourceVersion): the reader's copy is stale.
    pub fn change_after_next_gets(&self, n: usize) {
        self.webhooks.lock().expect("webhooks").changes_after_get = n;
    }

    /// The requests received so far with this method and path prefix.
    pub fn requests_to(&self, method: &Method, path_prefix: &str) -> Vec<ApiRequest> {
        self.requests
            .lock()
            .expect("requests")
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// A `Status` object, the API server's answer for every failure.
fn failure(status: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": status.as_u16()}),
    )
}

fn header(req: &Request<Incoming>, name: http::header::HeaderName) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn route(req: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authorization = header(&req, http::header::AUTHORIZATION);
    let content_type = header(&req, http::header::CONTENT_TYPE);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state.requests.lock().expect("requests").push(ApiRequest {
        method: method.clone(),
        path: path.clone(),
        authorization: authorization.clone(),
        content_type: content_type.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    if authorization != state.caller {
        return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == Method::POST {
        return review(&body, authorization, state);
    }
    if let Some(name) = path.strip_prefix(WEBHOOK_CONFIGS) {
        return webhook_config(&method, name, &content_type, &body, state);
    }
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn review(body: &[u8], authorization: String, state: &State) -> Response<Full<Bytes>> {
    let review: Value = serde_json::from_slice(body).unwrap_or_default();
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    state.reviews.lock().expect("reviews").push(Review {
        authorization,
        token: token.clone(),
        audiences: audiences.clone(),
    });
    let status = match state.tokens.get(&token) {
        Some((ns, sa, valid_for)) if audiences.iter().any(|a| valid_for.contains(a)) => {
            json!({
                "authenticated": true,
                "user": {"username": format!("system:serviceaccount:{ns}:{sa}"), "uid": "0000", "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")]},
                "audiences": audiences.iter().filter(|a| valid_for.contains(a)).collect::<Vec<_>>(),
            })
        }
        Some(_) => {
            json!({"authenticated": false, "error": "token audiences do not match the requested audiences"})
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json_response(
        StatusCode::CREATED,
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review["spec"],
            "status": status,
        }),
    )
}

fn webhook_config(
    method: &Method,
    name: &str,
    content_type: &str,
    body: &[u8],
    state: &State,
) -> Response<Full<Bytes>> {
    let mut webhooks = state.webhooks.lock().expect("webhooks");
    let found = webhooks
        .object
        .as_mut()
        .filter(|o| o["metadata"]["name"].as_str() == Some(name));
    let Some(object) = found else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "mutatingwebhookconfigurations.admissionregistration.k8s.io \"{name}\" not found"
            ),
        );
    };
    match *method {
        Method::GET => {
            let rsp = json_response(StatusCode::OK, object.clone());
            if webhooks.changes_after_get > 0 {
                webhooks.changes_after_get -= 1;
                if let Some(object) = webhooks.object.as_mut() {
                    object["metadata"]["labels"]["changed-by"] = json!("another-writer");
                    bump_resource_version(object);
                }
            }
            rsp
        }
        Method::PATCH => {
            if content_type != "application/json-patch+json" {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format ({content_type:?}); this stand-in accepts application/json-patch+json"
                    ),
                );
            }
            let patch: json_patch::Patch = match serde_json::from_slice(body) {
                Ok(p) => p,
                Err(e) => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid JSON patch: {e}"),
                    );
                }
            };
            let mut patched = object.clone();
            if let Err(e) = json_patch::patch(&mut patched, &patch.0) {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    &format!("the server rejected our request due to an error in our request: {e}"),
                );
            }
            bump_resource_version(&mut patched);
            *object = patched.clone();
            json_response(StatusCode::OK, patched)
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{method} is not supported by this stand-in"),
        ),
    }
}

fn bump_resource_version(object: &mut Value) {
    let version: u64 = object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    object["metadata"]["resourceVersion"] = json!((version + 1).to_string());
}
