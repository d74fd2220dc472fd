//! A stand-in for the Kubernetes API server, which cannot exist on these machines: HTTPS with a
//! certificate of its own CA, answering in the API's real JSON. It serves
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`, from a fixed table of tokens;
//! - `GET` and `PATCH` (`application/json-patch+json`, applied with the `json-patch` crate) of
//!   `/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}`, for the one
//!   object the test provides. A successful patch bumps that object's own
//!   `metadata.resourceVersion`; a patch that does not apply (a failed `test` op included) is
//!   refused with 422 and a `Status`, changing nothing — which is how a resourceVersion
//!   precondition in a JSON patch behaves;
//! - list, watch, get, create (POST), replace (PUT), merge/JSON patch and delete of namespaced
//!   `services`, `pods`, `secrets` (core v1), `endpointslices` (`discovery.k8s.io/v1`) and
//!   `trafficpolicies`, `serverpolicies` (`trellis.dev/v1alpha1`), plus the `/status`
//!   subresource of services, pods and both policies (`store.rs` keeps them; `routes.rs`
//!   answers the HTTP requests).
//!
//! What it does as the real server does: one resourceVersion counter bumped by every write;
//! uid, creationTimestamp and generation set on create, generation bumped when `spec` changes
//! (for every kind), writes to an object keeping its status and writes to `/status` changing
//! only the status; optimistic concurrency (409 on a stale resourceVersion), no-op updates
//! writing nothing; `limit`/`continue` pages of one snapshot; watches from a resourceVersion
//! replaying the history, then live, one chunk per event; 410 `Expired` once the history is
//! compacted; bookmarks; `timeoutSeconds`; `Status` bodies for every failure; 401 without the
//! expected bearer token.
//!
//! What it does not do: admission, validation against the CRD schemas, defaulting, finalizers
//! and graceful deletion, owner-reference garbage collection, field selectors and `dryRun`
//! (refused with 400 rather than ignored), label selectors beyond equality and existence,
//! server-side apply and strategic merge patch (415), watch-list streaming
//! (`sendInitialEvents`), cluster-scoped kinds, DELETE of a collection. Create keeps the status
//! it is given (the real server drops it; kubelet and controllers write it through `/status`),
//! so a test can store a running pod in one step. The history is kept whole until
//! [`FakeApiServer::compact`] (the real server keeps a window). A list from a resourceVersion
//! newer than the store's is answered 504 at once (the real server first waits up to 3 s); a
//! watch from one just waits for newer events. The MutatingWebhookConfiguration above keeps a
//! resourceVersion of its own, apart from the store's.
//!
//! Tests also write as another client would (kubectl, a controller) through the methods of
//! [`FakeApiServer`], which produce the same watch events, and can take the server down
//! ([`FakeApiServer::set_down`]) or end every watch ([`FakeApiServer::close_watches`]).
//! Every request and every review it was asked for is recorded.

#[doc(hidden)]
pub mod client;
pub mod objects;
mod routes;
mod store;

pub use objects::{ServicePort, SliceEndpoint, endpoint_slice, pod, service};

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use super::Netns;
use store::{ApiError, Patch, Selector, Store, Target};

/// The port [`FakeApiServer::start_in`] listens on, as the API server does on a real node.
const API_PORT: u16 = 6443;
/// How often a watch that allows bookmarks gets one, unless the test sets another interval.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

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
    /// The query string as sent (without `?`), e.g. `watch=1&resourceVersion=12`.
    pub query: String,
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
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct State {
    tokens: HashMap<String, (String, String, Vec<String>)>,
    /// The `Authorization` header every caller must send.
    caller: String,
    reviews: Arc<Mutex<Vec<Review>>>,
    requests: Arc<Mutex<Vec<ApiRequest>>>,
    webhooks: Arc<Mutex<WebhookConfig>>,
    store: Mutex<Store>,
    /// While set, connections are closed as soon as they are accepted.
    down: AtomicBool,
    bookmark_interval: Mutex<Duration>,
}

impl State {
    /// The store, also after a test panicked while holding it (it is never left half-written).
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bookmark_interval(&self) -> Duration {
        *self
            .bookmark_interval
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 (a free port). `tokens`: service-account token → (namespace, service
    /// account, audiences it is valid for). `caller_token`: the bearer token every caller must
    /// present.
    pub fn start(
        dir: &Path,
        tokens: HashMap<String, (String, String, Vec<String>)>,
        caller_token: &str,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        Self::serve(listener, dir, tokens, caller_token)
    }

    /// Starts on `ip`:6443 inside `ns`, with a certificate for `ip`; otherwise as [`Self::start`].
    pub fn start_in(
        ns: &Netns,
        ip: IpAddr,
        dir: &Path,
        tokens: HashMap<String, (String, String, Vec<String>)>,
        caller_token: &str,
    ) -> Self {
        let addr = SocketAddr::new(ip, API_PORT);
        // Bound by a thread that entered the namespace: the socket stays in it, whichever thread
        // serves it afterwards.
        let listener = ns
            .enter(move || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in namespace {}: {e}", ns.name()));
        Self::serve(listener, dir, tokens, caller_token)
    }

    fn serve(
        listener: std::net::TcpListener,
        dir: &Path,
        tokens: HashMap<String, (String, String, Vec<String>)>,
        caller_token: &str,
    ) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener.set_nonblocking(true).expect("nonblocking");
        let (ca, ..) = trellis_identity::ca::Ca::generate("apiserver.test").expect("CA");
        let id = trellis_identity::SpiffeId::new("apiserver.test", "default", "kubernetes");
        let mut ips = vec![addr.ip()];
        if addr.ip() != Ipv4Addr::LOCALHOST {
            ips.push(Ipv4Addr::LOCALHOST.into());
        }
        let names = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(String::from);
        let (issued, key) = ca
            .issue(&id, Duration::from_secs(3600), &names, &ips)
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
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let webhooks = Arc::new(Mutex::new(WebhookConfig::default()));
        let state = Arc::new(State {
            tokens,
            caller: format!("Bearer {caller_token}"),
            reviews: reviews.clone(),
            requests: requests.clone(),
            webhooks: webhooks.clone(),
            store: Mutex::new(Store::new()),
            down: AtomicBool::new(false),
            bookmark_interval: Mutex::new(BOOKMARK_INTERVAL),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // Dropping the runtime at the end closes every connection and watch.
            rt.block_on(routes::accept(listener, acceptor, served, stopped));
        });
        Self {
            url: format!("https://{addr}"),
            ca_file,
            reviews,
            requests,
            webhooks,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Serves `object` (a MutatingWebhookConfiguration, found by its `metadata.name`).
    pub fn with_webhook_config(self, object: Value) -> Self {
        self.set_webhook_config(object);
        self
    }

    /// Replaces the served MutatingWebhookConfiguration; a missing resourceVersion becomes "1".
    /// (It keeps its own resourceVersion, apart from the store's.)
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

    /// Creates `object` in a namespaced collection (`/api/v1/namespaces/default/services`) as
    /// another client would, and returns it as stored. Panics if the write is refused.
    pub fn create(&self, collection_path: &str, object: Value) -> Value {
        let (target, ns) = collection_target(collection_path, "create");
        self.state
            .store()
            .create(target.kind, &ns, object)
            .unwrap_or_else(|e| refused("create", collection_path, &e))
    }

    /// Replaces the object (or, for a `.../status` path, its status); a resourceVersion in
    /// `object` must be the current one. Panics if the write is refused.
    pub fn replace(&self, object_path: &str, object: Value) -> Value {
        let (target, ns, name) = object_target(object_path, "replace");
        self.state
            .store()
            .replace(target.kind, &ns, &name, object, target.status)
            .unwrap_or_else(|e| refused("replace", object_path, &e))
    }

    /// Applies an RFC 7386 merge patch to the object (or its status, for a `.../status` path).
    pub fn merge_patch(&self, object_path: &str, patch: Value) -> Value {
        let (target, ns, name) = object_target(object_path, "merge_patch");
        self.state
            .store()
            .patch(target.kind, &ns, &name, &Patch::Merge(patch), target.status)
            .unwrap_or_else(|e| refused("merge_patch", object_path, &e))
    }

    /// Deletes the object. Panics if there is none.
    pub fn delete(&self, object_path: &str) {
        let (target, ns, name) = object_target(object_path, "delete");
        self.state
            .store()
            .delete(target.kind, &ns, &name)
            .unwrap_or_else(|e| refused("delete", object_path, &e));
    }

    /// The object as stored now.
    pub fn get(&self, object_path: &str) -> Option<Value> {
        let (target, ns, name) = object_target(object_path, "get");
        self.state.store().get(target.kind, &ns, &name).ok()
    }

    /// The objects of a collection (namespaced, or all namespaces: `/api/v1/pods`), by
    /// namespace and name.
    pub fn list(&self, collection_path: &str) -> Vec<Value> {
        let target = parse(collection_path, "list");
        let list = self
            .state
            .store()
            .list(
                target.kind,
                target.namespace.as_deref(),
                &Selector::default(),
                "",
                None,
                None,
            )
            .unwrap_or_else(|e| refused("list", collection_path, &e));
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// The global resourceVersion: the version of the last write.
    pub fn resource_version(&self) -> String {
        self.state.store().resource_version().to_string()
    }

    /// Forgets the event history: watches from an older resourceVersion get a 410 ERROR event,
    /// lists from one an HTTP 410.
    pub fn compact(&self) {
        self.state.store().compact();
    }

    /// Ends every open watch stream now, as an API server restart would.
    pub fn close_watches(&self) {
        self.state.store().close_watches();
    }

    /// While down, connections are closed as soon as they are accepted, without an answer, and
    /// open watches end. Writes through these methods go on (and stay in the history).
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.close_watches();
        }
    }

    /// How often watches that allow bookmarks get one (taking effect after each one's next).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .state
            .bookmark_interval
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = interval;
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        self.state.store().open_watches()
    }

    /// How many watch requests arrived for `resource` (a plural: "services"), refused ones too.
    pub fn watch_requests(&self, resource: &str) -> usize {
        self.state.store().watch_requests(resource)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn parse(path: &str, what: &str) -> Target {
    store::parse_path(path)
        .unwrap_or_else(|| panic!("{what}: {path:?} is not a path this stand-in serves"))
}

fn collection_target(path: &str, what: &str) -> (Target, String) {
    let target = parse(path, what);
    match (&target.namespace, &target.name) {
        (Some(ns), None) => {
            let ns = ns.clone();
            (target, ns)
        }
        _ => panic!("{what}: {path:?} is not a namespaced collection"),
    }
}

fn object_target(path: &str, what: &str) -> (Target, String, String) {
    let target = parse(path, what);
    match (&target.namespace, &target.name) {
        (Some(ns), Some(name)) => {
            let (ns, name) = (ns.clone(), name.clone());
            (target, ns, name)
        }
        _ => panic!("{what}: {path:?} is not an object's path"),
    }
}

fn refused(what: &str, path: &str, e: &ApiError) -> ! {
    panic!(
        "{what} {path}: refused with {} {}: {}",
        e.code.as_u16(),
        e.reason,
        e.message
    )
}

impl FakeApiServer {
    /// `trellis-control serve --kubernetes` flags pointing at this server, with the caller's
    /// token read from `token_file`.
    pub fn serve_flags(&self, token_file: &std::path::Path) -> Vec<String> {
        vec![
            "--kubernetes".into(),
            "--kube-api-url".into(),
            self.url.clone(),
            "--kube-ca".into(),
            self.ca_file.to_string_lossy().into_owned(),
            "--kube-token-file".into(),
            token_file.to_string_lossy().into_owned(),
        ]
    }
}

/// The stand-in on 127.0.0.1 for tests that need no pods: its own folder (removed on drop) and
/// a file holding the bearer token it expects from the control plane.
pub struct LocalApi {
    pub api: FakeApiServer,
    pub dir: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
}

impl LocalApi {
    /// `test` names the folder; `caller_token` is what the control plane must present.
    pub fn start(test: &str, caller_token: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("trellis-api-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's folder");
        let api = FakeApiServer::start(&dir, HashMap::new(), caller_token);
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{caller_token}\n")).expect("write the token");
        Self {
            api,
            dir,
            token_file,
        }
    }

    /// The control plane's client for this server, with the expected token.
    pub fn client(&self) -> trellis_control::kube::KubeClient {
        trellis_control::kube::KubeClient::new(trellis_control::kube::KubeConfig {
            url: self.api.url.clone(),
            ca: trellis_control::kube::KubeCa::File(self.api.ca_file.clone()),
            token: Some(trellis_control::kube::KubeToken::File(
                self.token_file.clone(),
            )),
        })
        .expect("a client for the stand-in")
    }

    /// `serve --kubernetes` flags pointing at this server.
    pub fn serve_flags(&self) -> Vec<String> {
        self.api.serve_flags(&self.token_file)
    }
}

impl Drop for LocalApi {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
