//! The stand-in API server's HTTP side: accepting TLS connections, recording each request,
//! checking the bearer token and routing to the handlers — TokenReviews, the
//! MutatingWebhookConfiguration, and the verbs on the served kinds (list, watch streaming with
//! bookmarks, get, create, replace, patch, delete) over the store in `store.rs`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::store::{self, ApiError, Patch, Selector, Target};
use super::{ApiRequest, Review, State};

const WEBHOOK_CONFIGS: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/";

/// Every answer: a whole JSON document, or a watch's stream of events.
type Body = BoxBody<Bytes, Infallible>;

pub(super) async fn accept(
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stand-in API server: cannot listen: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stopped => return,
        };
        let Ok((tcp, _)) = accepted else {
            // Out of file descriptors or the like: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if state.down.load(Ordering::SeqCst) {
            drop(tcp);
            continue;
        }
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// A `Status` object, the API server's answer for every failure.
fn failure(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(status, store::status_json(status, reason, message))
}

fn header(req: &Request<Incoming>, name: http::header::HeaderName) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn route(req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
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
        query: query.clone(),
        authorization: authorization.clone(),
        content_type: content_type.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    if authorization != state.caller {
        return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == Method::POST {
        return review(&body, authorization, &state);
    }
    if let Some(name) = path.strip_prefix(WEBHOOK_CONFIGS) {
        return webhook_config(&method, name, &content_type, &body, &state);
    }
    if let Some(target) = store::parse_path(&path) {
        return resource(&method, &path, target, &query, &content_type, &body, &state)
            .unwrap_or_else(|e| failure(e.code, e.reason, &e.message));
    }
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// The verbs on the served kinds.
fn resource(
    method: &Method,
    path: &str,
    target: Target,
    query: &str,
    content_type: &str,
    body: &[u8],
    state: &Arc<State>,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(query)?;
    let Target {
        kind,
        namespace,
        name,
        status,
    } = target;
    let ok = |object| Ok(json_response(StatusCode::OK, object));
    match (method, namespace.as_deref(), name.as_deref()) {
        (&Method::GET, _, None) if query.watch => watch(state, kind, namespace, query),
        (&Method::GET, ns, None) => ok(state.store().list(
            kind,
            ns,
            &query.selector,
            &query.resource_version,
            query.limit,
            query.continue_token.as_deref(),
        )?),
        (&Method::POST, Some(ns), None) => {
            let object = state.store().create(kind, ns, json_body(body)?)?;
            Ok(json_response(StatusCode::CREATED, object))
        }
        (&Method::GET, Some(ns), Some(name)) => ok(state.store().get(kind, ns, name)?),
        (&Method::PUT, Some(ns), Some(name)) => {
            ok(state
                .store()
                .replace(kind, ns, name, json_body(body)?, status)?)
        }
        (&Method::PATCH, Some(ns), Some(name)) => {
            let patch = patch_body(content_type, body)?;
            ok(state.store().patch(kind, ns, name, &patch, status)?)
        }
        (&Method::DELETE, Some(ns), Some(name)) if !status => {
            ok(state.store().delete(kind, ns, name)?)
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {path} is not supported by this stand-in"),
        )),
    }
}

fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))
}

fn patch_body(content_type: &str, body: &[u8]) -> Result<Patch, ApiError> {
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    match media_type {
        "application/merge-patch+json" => json_body(body).map(Patch::Merge),
        "application/json-patch+json" => serde_json::from_slice(body)
            .map(Patch::Json)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}"))),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({other:?}); this stand-in \
                 accepts application/merge-patch+json and application/json-patch+json"
            ),
        )),
    }
}

/// The query parameters of the served verbs; the others (`pretty`, `resourceVersionMatch`,
/// `fieldManager`, …) are ignored.
#[derive(Default)]
struct Query {
    watch: bool,
    resource_version: String,
    bookmarks: bool,
    timeout: Option<Duration>,
    limit: Option<usize>,
    continue_token: Option<String>,
    selector: Selector,
}

impl Query {
    fn parse(raw: &str) -> Result<Self, ApiError> {
        let mut query = Query::default();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = crate::query::percent_decode(value);
            match key {
                "watch" => query.watch = flag(key, &value)?,
                "resourceVersion" => query.resource_version = value,
                "allowWatchBookmarks" => query.bookmarks = flag(key, &value)?,
                "timeoutSeconds" => query.timeout = Some(Duration::from_secs(number(key, &value)?)),
                "limit" => {
                    query.limit = usize::try_from(number(key, &value)?)
                        .ok()
                        .filter(|n| *n > 0)
                }
                "continue" => query.continue_token = Some(value).filter(|v| !v.is_empty()),
                "labelSelector" => query.selector = Selector::parse(&value)?,
                "fieldSelector" | "dryRun" if !value.is_empty() => {
                    return Err(ApiError::bad_request(format!(
                        "{key} is not supported by this stand-in"
                    )));
                }
                "sendInitialEvents" if flag(key, &value)? => {
                    // What a server without the WatchList feature answers.
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
                    ));
                }
                _ => {}
            }
        }
        Ok(query)
    }
}

/// A boolean parameter as Go's `strconv.ParseBool` reads it.
fn flag(key: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "" | "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "{key}={other:?}: expected true or false"
        ))),
    }
}

fn number(key: &str, value: &str) -> Result<u64, ApiError> {
    value.parse().map_err(|_| {
        ApiError::bad_request(format!("{key}={value:?}: expected a non-negative integer"))
    })
}

/// Opens a watch: 200 and a chunked stream of JSON lines. A resourceVersion older than the
/// history is said in the stream, as the real server says it: one ERROR event, then the end.
fn watch(
    state: &Arc<State>,
    kind: usize,
    namespace: Option<String>,
    query: Query,
) -> Result<Response<Body>, ApiError> {
    let from = store::parse_resource_version(&query.resource_version)?;
    let (lines_tx, lines) = mpsc::unbounded_channel();
    let (frames, body) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    match state
        .store()
        .watch(kind, namespace, query.selector, from, lines_tx)
    {
        Ok(id) => {
            tokio::spawn(stream_watch(
                state.clone(),
                id,
                lines,
                frames,
                query.bookmarks,
                query.timeout,
            ));
        }
        Err(expired) => {
            let line = store::event_line("ERROR", &expired.status());
            let _ = frames.try_send(Ok(Frame::data(line)));
        }
    }
    let mut rsp = Response::new(StreamBody::new(ReceiverStream::new(body)).boxed());
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(rsp)
}

/// Forwards watch `id`'s events, one chunk each, adding bookmarks if asked, until the store
/// closes the watch, `timeout` passes or the client leaves.
async fn stream_watch(
    state: Arc<State>,
    id: u64,
    mut lines: mpsc::UnboundedReceiver<Bytes>,
    frames: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    bookmarks: bool,
    timeout: Option<Duration>,
) {
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut next_bookmark = tokio::time::Instant::now() + state.bookmark_interval();
    loop {
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else { break };
                if frames.send(Ok(Frame::data(line))).await.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                // Queued behind every event up to the bookmark's version.
                state.store().bookmark(id);
                next_bookmark = tokio::time::Instant::now() + state.bookmark_interval();
            }
            () = &mut deadline => break,
            () = frames.closed() => break,
        }
    }
    state.store().unwatch(id);
}

fn review(body: &[u8], authorization: String, state: &State) -> Response<Body> {
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
) -> Response<Body> {
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
