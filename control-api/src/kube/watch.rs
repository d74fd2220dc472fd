//! A reflector: the current set of one kind of Kubernetes object (Services, EndpointSlices,
//! Pods...), kept by listing once and then watching, and handed to a consumer as changes to a
//! small projection of each object.
//!
//! The consumer sees `Applied` for every object, then `Synced`; after that, one `Applied` or
//! `Deleted` per real change. Changes that do not touch the projection (a status condition, an
//! annotation the consumer ignores) are not passed on: the reflector holds the last projection
//! sent for each object and compares.
//!
//! Why the details are as they are:
//! - A watch resumes from the last resourceVersion seen, so nothing between two watches is
//!   missed. When that version is too old for the API server (410 Gone), the only way back is a
//!   new list; its result is compared with what is held, so the consumer is told exactly the
//!   differences — no update lost, none duplicated — followed by `Synced`.
//! - Bookmarks carry no object but advance the resourceVersion, so that a quiet resource does
//!   not fall out of the API server's history window and force a relist at every reconnection.
//! - While the API server cannot be reached, what is held stays held and nothing is sent: the
//!   consumer keeps serving its last good state. Retries back off (250 ms doubling to 30 s,
//!   jittered) so that many replicas do not hammer a recovering API server in step.
//! - Every read of a watch waits at most its timeoutSeconds plus a minute: a connection that
//!   died without a FIN would otherwise leave the view silently stale forever.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::{Backoff, KubeClient, api_message};
use crate::admin::Metrics;

/// Objects per page of a list: bounds the size of one answer in a large cluster.
const PAGE_SIZE: usize = 500;
/// How long the API server keeps one watch open; it then ends it and we start the next one.
const WATCH_SECONDS: u64 = 290;
/// How much longer than [`WATCH_SECONDS`] a read may wait before the connection is deemed dead.
const IDLE_GRACE: Duration = Duration::from_secs(60);
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A watch that ends sooner than this without a single event counts as a failure to back off
/// from, not as a normal end: a server that closes at once would otherwise be called in a loop.
const SHORTEST_NORMAL_WATCH: Duration = Duration::from_secs(1);

/// `namespace/name` of an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// The key of an object as the API sends it; `None` without `metadata.name`. Cluster-scoped
    /// objects have an empty namespace.
    pub fn of(object: &Value) -> Option<Self> {
        let metadata = &object["metadata"];
        Some(Self {
            namespace: metadata["namespace"].as_str().unwrap_or_default().into(),
            name: metadata["name"].as_str().filter(|n| !n.is_empty())?.into(),
        })
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The fields a consumer keeps from one object of the watched kind.
pub trait Projection: Clone + PartialEq + Send + Sync + 'static {
    /// Err(reason): the object is skipped (logged once per resourceVersion) and treated as absent.
    fn project(object: &serde_json::Value) -> Result<Self, String>;
}

/// A change to the watched set, in the order it must be applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<T> {
    /// The object is new, or its projection changed.
    Applied(ObjectKey, Arc<T>),
    /// The object is gone (or no longer projects).
    Deleted(ObjectKey),
    /// A list has been applied: the consumer's view is complete. Sent after the first list and
    /// after every relist.
    Synced,
}

/// What to watch.
#[derive(Debug, Clone)]
pub struct Watched {
    /// The resource's plural name, e.g. "services", for logs and metrics.
    pub resource: &'static str,
    /// Its collection path, e.g. "/api/v1/services" (all namespaces); may carry a query, e.g. a
    /// `labelSelector`.
    pub path: String,
}

/// Lists then watches `watched` until `tx` is closed.
pub fn spawn<T: Projection>(
    client: Arc<KubeClient>,
    watched: Watched,
    metrics: Arc<Metrics>,
    tx: UnboundedSender<Event<T>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let closed = tx.clone();
        let resource = watched.resource;
        let reflector = Reflector {
            client,
            watched,
            metrics,
            tx,
            held: BTreeMap::new(),
            rejected: HashMap::new(),
            resource_version: None,
        };
        tokio::select! {
            _ = closed.closed() => tracing::debug!(resource, "watch stopped: no consumer"),
            _ = reflector.run() => {}
        }
    })
}

struct Reflector<T> {
    client: Arc<KubeClient>,
    watched: Watched,
    metrics: Arc<Metrics>,
    tx: UnboundedSender<Event<T>>,
    /// The projection last sent for each object.
    held: BTreeMap<ObjectKey, Arc<T>>,
    /// Objects whose projection failed, with the resourceVersion whose failure was logged.
    rejected: HashMap<ObjectKey, String>,
    /// Where the next watch starts; `None` until the first list succeeded.
    resource_version: Option<String>,
}

/// How a watch ended without an error.
enum Ended {
    /// The server closed it (its timeoutSeconds); `events` counts what it delivered.
    Closed { events: usize },
    /// The resourceVersion is too old: only a new list can catch up.
    Expired,
}

impl<T: Projection> Reflector<T> {
    async fn run(mut self) {
        let resource = self.watched.resource;
        self.metrics.kube_synced(resource, false);
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
        let mut relist = Some("start");
        // Set by a list, cleared by a watch that delivered something: a watch expiring right
        // after a list means a confused server, not an old version, and must not loop at once.
        let mut fresh_list = false;
        loop {
            if let Some(reason) = relist {
                self.metrics.kube_relist(resource, reason);
                match self.list().await {
                    Ok(objects) => {
                        self.metrics.kube_synced(resource, true);
                        tracing::info!(resource, reason, objects, "listed");
                        relist = None;
                        fresh_list = true;
                    }
                    Err(error) => {
                        let wait = backoff.next_wait();
                        self.failed(&error, wait, "cannot list");
                        relist = Some("error");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            let started = Instant::now();
            match self.watch().await {
                Ok(Ended::Closed { events }) => {
                    if events == 0 && started.elapsed() < SHORTEST_NORMAL_WATCH {
                        let wait = backoff.next_wait();
                        tracing::debug!(resource, retry_in = ?wait, "the watch ended at once; watching again after a pause");
                        tokio::time::sleep(wait).await;
                    } else {
                        backoff.reset();
                    }
                    if events > 0 {
                        fresh_list = false;
                    }
                }
                Ok(Ended::Expired) => {
                    tracing::info!(resource, "watch expired, relisting");
                    relist = Some("expired");
                    if fresh_list {
                        tokio::time::sleep(backoff.next_wait()).await;
                    }
                }
                Err(error) => {
                    let wait = backoff.next_wait();
                    self.failed(&error, wait, "watch failed; resuming");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn failed(&self, error: &str, retry_in: Duration, what: &'static str) {
        let resource = self.watched.resource;
        self.metrics.kube_watch_error(resource);
        self.metrics.kube_synced(resource, false);
        tracing::warn!(resource, %error, ?retry_in, held = self.held.len(), "{what}");
    }

    fn send(&self, event: Event<T>) {
        // A closed channel ends the task (see `spawn`): nothing to do here.
        let _ = self.tx.send(event);
    }

    /// Lists every object, page by page, and tells the consumer how that differs from what it
    /// holds. Returns how many objects there are.
    async fn list(&mut self) -> Result<usize, String> {
        let mut listed = BTreeMap::new();
        let mut rejected = HashSet::new();
        let mut next: Option<String> = None;
        let resource_version = loop {
            let mut path = format!("{}limit={PAGE_SIZE}", with_query(&self.watched.path));
            if let Some(token) = &next {
                path.push_str("&continue=");
                path.push_str(&query_value(token));
            }
            let (status, body) = self.client.request(Method::GET, &path, None, None).await?;
            if status != StatusCode::OK {
                return Err(self.refused("list", &path, status, &body));
            }
            let page: Value = serde_json::from_slice(&body)
                .map_err(|e| format!("GET {path}: the answer is not JSON: {e}"))?;
            let Some(items) = page["items"].as_array() else {
                return Err(format!("GET {path}: the answer is not a list (no items)"));
            };
            for object in items {
                let Some(key) = ObjectKey::of(object) else {
                    continue;
                };
                match self.project(&key, object) {
                    Some(value) => {
                        listed.insert(key, value);
                    }
                    None => {
                        rejected.insert(key);
                    }
                }
            }
            let metadata = &page["metadata"];
            next = metadata["continue"]
                .as_str()
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            if next.is_none() {
                break metadata["resourceVersion"]
                    .as_str()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| format!("GET {path}: the list has no resourceVersion"))?
                    .to_string();
            }
        };
        self.rejected.retain(|key, _| rejected.contains(key));
        let count = listed.len();
        for event in relist_events(&mut self.held, listed) {
            self.send(event);
        }
        self.send(Event::Synced);
        self.resource_version = Some(resource_version);
        Ok(count)
    }

    /// One watch from the last resourceVersion, applying its events until the server ends it.
    async fn watch(&mut self) -> Result<Ended, String> {
        let resource_version = self.resource_version.clone().unwrap_or_default();
        let path = format!(
            "{}watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}",
            with_query(&self.watched.path),
            query_value(&resource_version)
        );
        let idle = Duration::from_secs(WATCH_SECONDS) + IDLE_GRACE;
        let (status, mut lines) = self.client.watch_stream(&path, idle).await?;
        if status == StatusCode::GONE {
            return Ok(Ended::Expired);
        }
        if status != StatusCode::OK {
            let body = lines.read_to_end().await.unwrap_or_default();
            return Err(self.refused("watch", &path, status, &body));
        }
        self.metrics.kube_synced(self.watched.resource, true);
        let mut events = 0;
        while let Some(line) = lines.next_line().await? {
            events += 1;
            let event: Value = serde_json::from_slice(&line)
                .map_err(|e| format!("GET {path}: an event that is not JSON: {e}"))?;
            if self.apply(&event)? {
                return Ok(Ended::Expired);
            }
        }
        Ok(Ended::Closed { events })
    }

    /// Applies one watch event; `Ok(true)` if it says the resourceVersion expired.
    fn apply(&mut self, event: &Value) -> Result<bool, String> {
        let resource = self.watched.resource;
        let kind = event["type"].as_str().unwrap_or_default();
        let object = &event["object"];
        let label = match kind {
            "ADDED" => "added",
            "MODIFIED" => "modified",
            "DELETED" => "deleted",
            "BOOKMARK" => "bookmark",
            "ERROR" => "error",
            _ => "unknown",
        };
        self.metrics.kube_watch_event(resource, label);
        match kind {
            "ERROR" => {
                let code = object["code"].as_u64().unwrap_or_default();
                if code == 410 {
                    return Ok(true);
                }
                return Err(format!(
                    "the watch reported error {code}: {}",
                    object["message"].as_str().unwrap_or("no message")
                ));
            }
            "BOOKMARK" => {}
            "ADDED" | "MODIFIED" | "DELETED" => match ObjectKey::of(object) {
                None => tracing::warn!(resource, kind, "an event without metadata.name; ignored"),
                Some(key) if kind == "DELETED" => {
                    self.rejected.remove(&key);
                    if self.held.remove(&key).is_some() {
                        self.send(Event::Deleted(key));
                    }
                }
                Some(key) => match self.project(&key, object) {
                    Some(value) => {
                        if self.held.get(&key).is_none_or(|held| **held != value) {
                            let value = Arc::new(value);
                            self.held.insert(key.clone(), value.clone());
                            self.send(Event::Applied(key, value));
                        }
                    }
                    None => {
                        if self.held.remove(&key).is_some() {
                            self.send(Event::Deleted(key));
                        }
                    }
                },
            },
            other => tracing::warn!(
                resource,
                kind = other,
                "a watch event of unknown type; ignored"
            ),
        }
        if let Some(version) = object["metadata"]["resourceVersion"]
            .as_str()
            .filter(|v| !v.is_empty())
        {
            self.resource_version = Some(version.to_string());
        }
        Ok(false)
    }

    /// The projection of `object`, or `None` after logging why not — once per resourceVersion,
    /// since a relist would otherwise repeat the same complaint every few minutes.
    fn project(&mut self, key: &ObjectKey, object: &Value) -> Option<T> {
        match T::project(object) {
            Ok(value) => {
                self.rejected.remove(key);
                Some(value)
            }
            Err(reason) => {
                let version = object["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if self.rejected.get(key).map(String::as_str) != Some(version) {
                    tracing::warn!(resource = self.watched.resource, object = %key, resource_version = version, %reason, "object skipped: it cannot be read");
                    self.rejected.insert(key.clone(), version.to_string());
                }
                None
            }
        }
    }

    /// Why the API server refused a list or watch, with its own message and what to check.
    fn refused(&self, verb: &str, path: &str, status: StatusCode, body: &[u8]) -> String {
        let hint = match status {
            StatusCode::UNAUTHORIZED => {
                " (is the control plane's token valid for this API server?)".to_string()
            }
            StatusCode::FORBIDDEN => format!(
                " (may the control plane's service account {verb} {}? see its ClusterRole)",
                self.watched.resource
            ),
            _ => String::new(),
        };
        format!("GET {path} answered {status}{hint}: {}", api_message(body))
    }
}

/// What a consumer holding `held` must be told so that it holds `listed` instead: `Applied` for
/// new and changed objects, `Deleted` for vanished ones, nothing for the unchanged. `held`
/// becomes `listed` (keeping the old `Arc`s of unchanged objects).
fn relist_events<T: Projection>(
    held: &mut BTreeMap<ObjectKey, Arc<T>>,
    listed: BTreeMap<ObjectKey, T>,
) -> Vec<Event<T>> {
    let mut before = std::mem::take(held);
    let mut events = Vec::new();
    for (key, value) in listed {
        match before.remove(&key) {
            Some(old) if *old == value => {
                held.insert(key, old);
            }
            _ => {
                let value = Arc::new(value);
                held.insert(key.clone(), value.clone());
                events.push(Event::Applied(key, value));
            }
        }
    }
    events.extend(before.into_keys().map(Event::Deleted));
    events
}

/// `path` followed by `?` or `&`, ready for one more query parameter.
fn with_query(path: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}")
}

/// Percent-encodes a query value (continue tokens are base64 and may hold `+`, `/`, `=`).
fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Port(u16);

    impl Projection for Port {
        fn project(object: &Value) -> Result<Self, String> {
            object["spec"]["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .map(Port)
                .ok_or_else(|| "no spec.port".into())
        }
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn listed(objects: &[(&str, u16)]) -> BTreeMap<ObjectKey, Port> {
        objects.iter().map(|(n, p)| (key(n), Port(*p))).collect()
    }

    #[test]
    fn a_relist_reports_only_the_differences() {
        let mut held = BTreeMap::new();
        let first = relist_events(&mut held, listed(&[("cart", 80), ("web", 8080)]));
        assert_eq!(
            first,
            [
                Event::Applied(key("cart"), Arc::new(Port(80))),
                Event::Applied(key("web"), Arc::new(Port(8080))),
            ]
        );
        let cart = held[&key("cart")].clone();

        // While the watch was down: web changed, pay appeared, nothing vanished yet.
        let second = relist_events(
            &mut held,
            listed(&[("cart", 80), ("pay", 443), ("web", 8081)]),
        );
        assert_eq!(
            second,
            [
                Event::Applied(key("pay"), Arc::new(Port(443))),
                Event::Applied(key("web"), Arc::new(Port(8081))),
            ]
        );
        assert!(
            Arc::ptr_eq(&cart, &held[&key("cart")]),
            "an unchanged object keeps its Arc"
        );

        let third = relist_events(&mut held, listed(&[("web", 8081)]));
        assert_eq!(
            third,
            [Event::Deleted(key("cart")), Event::Deleted(key("pay"))]
        );
        assert_eq!(held.len(), 1);
        assert!(relist_events(&mut held, listed(&[("web", 8081)])).is_empty());
    }

    #[test]
    fn keys_and_query_values() {
        let service = serde_json::json!({"metadata": {"namespace": "shop", "name": "cart"}});
        assert_eq!(ObjectKey::of(&service).unwrap().to_string(), "shop/cart");
        let node = serde_json::json!({"metadata": {"name": "node-1"}});
        assert_eq!(ObjectKey::of(&node).unwrap().to_string(), "/node-1");
        assert_eq!(ObjectKey::of(&serde_json::json!({"metadata": {}})), None);
        assert_eq!(query_value("eyJ2Ijo+/x=="), "eyJ2Ijo%2B%2Fx%3D%3D");
        assert_eq!(with_query("/api/v1/pods"), "/api/v1/pods?");
        assert_eq!(
            with_query("/api/v1/pods?labelSelector=a"),
            "/api/v1/pods?labelSelector=a&"
        );
    }
}
