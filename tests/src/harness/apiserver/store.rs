//! The stand-in's object store: the served kinds, one global resourceVersion, the write rules of
//! the real API server (uid, generation, status subresource, optimistic concurrency), the event
//! history watches resume from, and the open watches themselves.
//!
//! Everything here is synchronous and runs under one lock: a write, its history entry and its
//! delivery to every open watch happen together, so a watch can never see events out of order
//! nor a bookmark ahead of an event it has not been sent yet.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

/// One kind of object the stand-in serves. All of them are namespaced.
pub(super) struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    /// Has a `status` subresource: writes to the object keep its status, writes to `/status`
    /// change nothing else.
    pub status: bool,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// How the API server names the resource in messages: `services`, `trafficpolicies.trellis.dev`.
    fn resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

pub(super) const KINDS: [Kind; 6] = [
    kind("", "v1", "services", "Service", true),
    kind("", "v1", "pods", "Pod", true),
    kind("", "v1", "secrets", "Secret", false),
    kind(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        false,
    ),
    kind(
        "trellis.dev",
        "v1alpha1",
        "trafficpolicies",
        "TrafficPolicy",
        true,
    ),
    kind(
        "trellis.dev",
        "v1alpha1",
        "serverpolicies",
        "ServerPolicy",
        true,
    ),
];

const fn kind(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    status: bool,
) -> Kind {
    Kind {
        group,
        version,
        plural,
        kind,
        status,
    }
}

/// What a URL path addresses: a collection (no name), an object, or an object's status.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub kind: usize,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub status: bool,
}

/// `/api/v1/{plural}`, `/api/v1/namespaces/{ns}/{plural}[/{name}[/status]]`, and the same under
/// `/apis/{group}/{version}/`. `None` for anything else.
pub(super) fn parse_path(path: &str) -> Option<Target> {
    let path = path.trim_end_matches('/');
    let (group, version, rest) = match path.strip_prefix("/api/v1/") {
        Some(rest) => ("", "v1", rest),
        None => {
            let mut parts = path.strip_prefix("/apis/")?.splitn(3, '/');
            (parts.next()?, parts.next()?, parts.next()?)
        }
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    let (namespace, plural, name, sub) = match segments.as_slice() {
        [plural] => (None, *plural, None, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    let kind = KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)?;
    let status = match sub {
        None => false,
        Some("status") if KINDS[kind].status => true,
        Some(_) => return None,
    };
    Some(Target {
        kind,
        namespace: namespace.map(String::from),
        name: name.map(String::from),
        status,
    })
}

/// A refusal, answered as the API server's `Status` object.
#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn status(&self) -> Value {
        status_json(self.code, self.reason, &self.message)
    }
}

pub(super) fn status_json(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()})
}

fn not_found(kind: &Kind, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{} \"{name}\" not found", kind.resource()),
    )
}

fn too_old(requested: u64, oldest: u64) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "Expired",
        format!("too old resource version: {requested} ({oldest})"),
    )
}

/// `resourceVersion` of a list or watch: `None` for "" and "0" (the current state).
pub(super) fn parse_resource_version(value: &str) -> Result<Option<u64>, ApiError> {
    match value {
        "" | "0" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}"))),
    }
}

/// A label selector of equality terms: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated.
#[derive(Debug, Clone, Default)]
pub(super) struct Selector(Vec<(String, Requirement)>);

#[derive(Debug, Clone)]
enum Requirement {
    Equals(String),
    NotEquals(String),
    Exists,
    Absent,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if term.contains(['(', ')', ' ']) {
                return Err(ApiError::bad_request(format!(
                    "labelSelector term {term:?}: this stand-in supports only =, ==, != and existence"
                )));
            }
            let (key, requirement) = if let Some((k, v)) = term.split_once("!=") {
                (k, Requirement::NotEquals(v.to_string()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, Requirement::Equals(v.to_string()))
            } else if let Some(k) = term.strip_prefix('!') {
                (k, Requirement::Absent)
            } else {
                (term, Requirement::Exists)
            };
            if key.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "labelSelector term {term:?}: no key"
                )));
            }
            terms.push((key.to_string(), requirement));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.0.iter().all(|(key, requirement)| {
            let value = labels[key.as_str()].as_str();
            match requirement {
                Requirement::Equals(v) => value == Some(v.as_str()),
                Requirement::NotEquals(v) => value != Some(v.as_str()),
                Requirement::Exists => value.is_some(),
                Requirement::Absent => value.is_none(),
            }
        })
    }
}

/// A change to apply with PATCH.
pub(super) enum Patch {
    /// RFC 7386 (`application/merge-patch+json`).
    Merge(Value),
    /// RFC 6902 (`application/json-patch+json`).
    Json(json_patch::Patch),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

/// One write, as watches replay it.
struct Event {
    rv: u64,
    kind: usize,
    key: (String, String),
    change: Change,
    /// The object after the change; for a deletion, its last state with the deletion's version.
    object: Value,
    /// The object before the change (none for a creation).
    previous: Option<Value>,
}

struct Watcher {
    kind: usize,
    namespace: Option<String>,
    selector: Selector,
    /// One JSON line per event; dropping it ends the watch stream.
    lines: UnboundedSender<Bytes>,
}

impl Watcher {
    /// How this watch sees `event`, if at all: an object that starts or stops matching the
    /// selector is ADDED or DELETED for it, as the real watch cache reports it.
    fn sees(&self, event: &Event) -> Option<&'static str> {
        if event.kind != self.kind || self.namespace.as_ref().is_some_and(|ns| *ns != event.key.0) {
            return None;
        }
        let now = self.selector.matches(&event.object);
        let before = event
            .previous
            .as_ref()
            .is_some_and(|p| self.selector.matches(p));
        match (event.change, before, now) {
            (Change::Added, _, true) => Some("ADDED"),
            (Change::Deleted, true, _) => Some("DELETED"),
            (Change::Modified, true, true) => Some("MODIFIED"),
            (Change::Modified, false, true) => Some("ADDED"),
            (Change::Modified, true, false) => Some("DELETED"),
            _ => None,
        }
    }
}

pub(super) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A list's continuation: the version of the first page (later pages show the same snapshot)
/// and the last key returned.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    namespace: String,
    name: String,
}

pub(super) struct Store {
    /// The global resourceVersion: the version of the last write.
    rv: u64,
    /// Watches and lists may start from any version at or after this one; `history` holds
    /// every write after it.
    oldest: u64,
    /// Per kind (index into [`KINDS`]), by (namespace, name).
    objects: Vec<BTreeMap<(String, String), Value>>,
    history: Vec<Event>,
    watchers: HashMap<u64, Watcher>,
    next_watch: u64,
    /// Numbers the uids and generated names.
    serial: u64,
    watch_requests: HashMap<&'static str, usize>,
}

impl Store {
    pub fn new() -> Self {
        Self {
            rv: 1,
            oldest: 1,
            objects: KINDS.iter().map(|_| BTreeMap::new()).collect(),
            history: Vec::new(),
            watchers: HashMap::new(),
            next_watch: 0,
            serial: 0,
            watch_requests: HashMap::new(),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, kind: usize, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects[kind]
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| not_found(&KINDS[kind], name))
    }

    /// A `{Kind}List`. `resource_version` older than the retained history is refused with 410
    /// (except "" and "0"); a continuation shows the first page's snapshot.
    pub fn list(
        &self,
        kind: usize,
        namespace: Option<&str>,
        selector: &Selector,
        resource_version: &str,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let (at, after) = match continue_token {
            Some(token) => {
                let token = decode_continue(token)?;
                if token.rv < self.oldest {
                    return Err(ApiError::new(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter.",
                    ));
                }
                (token.rv, Some((token.namespace, token.name)))
            }
            None => match parse_resource_version(resource_version)? {
                Some(rv) if rv < self.oldest => return Err(too_old(rv, self.oldest)),
                Some(rv) if rv > self.rv => {
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "Timeout",
                        format!("Too large resource version: {rv}, current: {}", self.rv),
                    ));
                }
                _ => (self.rv, None),
            },
        };
        let state = self.state_at(kind, at);
        let mut matching = state
            .iter()
            .filter(|(key, _)| after.as_ref().is_none_or(|a| **key > a))
            .filter(|((ns, _), object)| {
                namespace.is_none_or(|n| n == ns) && selector.matches(object)
            });
        let items: Vec<(&&(String, String), &&Value)> = match limit {
            Some(limit) => matching.by_ref().take(limit).collect(),
            None => matching.by_ref().collect(),
        };
        let remaining = matching.count();
        let k = &KINDS[kind];
        let mut metadata = json!({"resourceVersion": at.to_string()});
        if let (true, Some(((ns, name), _))) = (remaining > 0, items.last()) {
            let token = ContinueToken {
                rv: at,
                namespace: ns.clone(),
                name: name.clone(),
            };
            metadata["continue"] = json!(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(serde_json::to_vec(&token).unwrap_or_default())
            );
            metadata["remainingItemCount"] = json!(remaining);
        }
        Ok(json!({
            "apiVersion": k.api_version(),
            "kind": format!("{}List", k.kind),
            "metadata": metadata,
            "items": items.into_iter().map(|(_, o)| (*o).clone()).collect::<Vec<_>>(),
        }))
    }

    /// The objects of `kind` as they were at version `at` (undoing the later writes), borrowed:
    /// a paginated list of thousands of objects must not copy them all for every page.
    fn state_at(&self, kind: usize, at: u64) -> BTreeMap<&(String, String), &Value> {
        // Key → its state before the first write after `at` (None: it did not exist). Newest
        // first, so the oldest write's "previous" is what stays.
        let mut undo: BTreeMap<&(String, String), Option<&Value>> = BTreeMap::new();
        for event in self.history.iter().rev().take_while(|e| e.rv > at) {
            if event.kind != kind {
                continue;
            }
            match (&event.change, &event.previous) {
                (Change::Added, _) => undo.insert(&event.key, None),
                (_, Some(previous)) => undo.insert(&event.key, Some(previous)),
                (_, None) => None,
            };
        }
        self.objects[kind]
            .iter()
            .filter(|(key, _)| !undo.contains_key(key))
            .chain(undo.iter().filter_map(|(key, v)| Some((*key, (*v)?))))
            .collect()
    }

    pub fn create(
        &mut self,
        kind: usize,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let k = &KINDS[kind];
        check_shape(k, &object)?;
        let metadata = &object["metadata"];
        if metadata["namespace"]
            .as_str()
            .is_some_and(|ns| !ns.is_empty() && ns != namespace)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        self.serial += 1;
        let name = match (
            metadata["name"].as_str().filter(|n| !n.is_empty()),
            metadata["generateName"].as_str().filter(|n| !n.is_empty()),
        ) {
            (Some(name), _) => name.to_string(),
            (None, Some(prefix)) => format!("{prefix}{}", suffix(self.serial)),
            (None, None) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        k.kind
                    ),
                ));
            }
        };
        let key = (namespace.to_string(), name.clone());
        if self.objects[kind].contains_key(&key) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", k.resource()),
            ));
        }
        self.rv += 1;
        object["apiVersion"] = json!(k.api_version());
        object["kind"] = json!(k.kind);
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(name);
        metadata["namespace"] = json!(namespace);
        metadata["uid"] = json!(format!(
            "7e11150a-0000-4000-8000-{:012x}",
            self.serial & 0xffff_ffff_ffff
        ));
        metadata["resourceVersion"] = json!(self.rv.to_string());
        metadata["generation"] = json!(1);
        metadata["creationTimestamp"] = json!(rfc3339_now());
        self.objects[kind].insert(key.clone(), object.clone());
        self.record(kind, key, Change::Added, object.clone(), None);
        Ok(object)
    }

    /// PUT: the object (or only its status, with `status`). A resourceVersion in `object` must
    /// be the current one; an update that changes nothing writes nothing.
    pub fn replace(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        new: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let k = &KINDS[kind];
        check_shape(k, &new)?;
        let key = (namespace.to_string(), name.to_string());
        let current = self.objects[kind]
            .get(&key)
            .cloned()
            .ok_or_else(|| not_found(k, name))?;
        let given = |field: &str| new["metadata"][field].as_str().filter(|v| !v.is_empty());
        if let Some(other) = given("name").filter(|n| *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({other}) does not match the name on the URL ({name})"
            )));
        }
        if given("namespace").is_some_and(|ns| ns != namespace) {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let current_rv = current["metadata"]["resourceVersion"].clone();
        if given("resourceVersion").is_some_and(|rv| Some(rv) != current_rv.as_str()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    k.resource()
                ),
            ));
        }
        let mut next = if status {
            let mut next = current.clone();
            set_or_remove(&mut next, "status", new.get("status").cloned());
            next
        } else {
            let mut next = new;
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
            ] {
                next["metadata"][field] = current["metadata"][field].clone();
            }
            if k.status {
                set_or_remove(&mut next, "status", current.get("status").cloned());
            }
            if next.get("spec") != current.get("spec") {
                let generation = current["metadata"]["generation"].as_u64().unwrap_or(1);
                next["metadata"]["generation"] = json!(generation + 1);
            }
            next["apiVersion"] = json!(k.api_version());
            next["kind"] = json!(k.kind);
            next
        };
        next["metadata"]["resourceVersion"] = current_rv;
        if next == current {
            return Ok(current);
        }
        self.rv += 1;
        next["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects[kind].insert(key.clone(), next.clone());
        self.record(kind, key, Change::Modified, next.clone(), Some(current));
        Ok(next)
    }

    /// PATCH: applied to the current object, then written as [`Store::replace`] writes (so a
    /// resourceVersion in the patch is a precondition).
    pub fn patch(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        patch: &Patch,
        status: bool,
    ) -> Result<Value, ApiError> {
        let mut patched = self.get(kind, namespace, name)?;
        match patch {
            Patch::Merge(p) if p.is_object() => json_patch::merge(&mut patched, p),
            Patch::Merge(_) => {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            Patch::Json(p) => json_patch::patch(&mut patched, &p.0).map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?,
        }
        self.replace(kind, namespace, name, patched, status)
    }

    /// DELETE: answers the object as it was, with the deletion's resourceVersion.
    pub fn delete(&mut self, kind: usize, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let key = (namespace.to_string(), name.to_string());
        let current = self.objects[kind]
            .remove(&key)
            .ok_or_else(|| not_found(&KINDS[kind], name))?;
        self.rv += 1;
        let mut gone = current.clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(kind, key, Change::Deleted, gone.clone(), Some(current));
        Ok(gone)
    }

    fn record(
        &mut self,
        kind: usize,
        key: (String, String),
        change: Change,
        object: Value,
        previous: Option<Value>,
    ) {
        let event = Event {
            rv: self.rv,
            kind,
            key,
            change,
            object,
            previous,
        };
        for watcher in self.watchers.values() {
            if let Some(kind) = watcher.sees(&event) {
                // A closed receiver is a watch whose client left; its task unregisters it.
                let _ = watcher.lines.send(event_line(kind, &event.object));
            }
        }
        self.history.push(event);
    }

    /// Opens a watch. From `Some(rv)`: every retained change after `rv`, 410 if `rv` is older
    /// than the history; from `None` ("" or "0"): an ADDED for every current object. Then the
    /// live changes, until the returned id is unregistered or [`Store::close_watches`].
    pub fn watch(
        &mut self,
        kind: usize,
        namespace: Option<String>,
        selector: Selector,
        from: Option<u64>,
        lines: UnboundedSender<Bytes>,
    ) -> Result<u64, ApiError> {
        *self.watch_requests.entry(KINDS[kind].plural).or_default() += 1;
        let watcher = Watcher {
            kind,
            namespace,
            selector,
            lines,
        };
        match from {
            Some(rv) if rv < self.oldest => return Err(too_old(rv, self.oldest)),
            Some(rv) => {
                for event in self.history.iter().filter(|e| e.rv > rv) {
                    if let Some(kind) = watcher.sees(event) {
                        let _ = watcher.lines.send(event_line(kind, &event.object));
                    }
                }
            }
            None => {
                for ((ns, _), object) in &self.objects[kind] {
                    if watcher.namespace.as_ref().is_none_or(|n| n == ns)
                        && watcher.selector.matches(object)
                    {
                        let _ = watcher.lines.send(event_line("ADDED", object));
                    }
                }
            }
        }
        self.next_watch += 1;
        self.watchers.insert(self.next_watch, watcher);
        Ok(self.next_watch)
    }

    /// Sends watch `id` a BOOKMARK at the current global resourceVersion: every change up to
    /// it is already in the watch's queue.
    pub fn bookmark(&self, id: u64) {
        if let Some(watcher) = self.watchers.get(&id) {
            let k = &KINDS[watcher.kind];
            let object = json!({"kind": k.kind, "apiVersion": k.api_version(),
                "metadata": {"resourceVersion": self.rv.to_string()}});
            let _ = watcher.lines.send(event_line("BOOKMARK", &object));
        }
    }

    pub fn unwatch(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    /// Ends every open watch (their queued events are still delivered first).
    pub fn close_watches(&mut self) {
        self.watchers.clear();
    }

    pub fn open_watches(&self) -> usize {
        self.watchers.len()
    }

    pub fn watch_requests(&self, plural: &str) -> usize {
        self.watch_requests.get(plural).copied().unwrap_or(0)
    }

    /// Forgets the history: resuming from any version before now answers 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv;
    }
}

/// The object must be a JSON object with object metadata, and of the kind it is written to.
fn check_shape(kind: &Kind, object: &Value) -> Result<(), ApiError> {
    if !object.is_object() || !(object["metadata"].is_object() || object["metadata"].is_null()) {
        return Err(ApiError::bad_request(format!(
            "the body must be a {} object with object metadata",
            kind.kind
        )));
    }
    let expected = kind.api_version();
    if let Some(given) = object["apiVersion"].as_str().filter(|v| *v != expected) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({given}) does not match the expected API version ({expected})"
        )));
    }
    if let Some(given) = object["kind"].as_str().filter(|v| *v != kind.kind) {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({given}) does not match the expected kind ({})",
            kind.kind
        )));
    }
    Ok(())
}

fn set_or_remove(object: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = object.as_object_mut() {
        match value {
            Some(v) if !v.is_null() => map.insert(field.to_string(), v),
            _ => map.remove(field),
        };
    }
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| ApiError::bad_request(format!("continue key is not valid: {token:?}")))
}

/// The five-character suffix of a generated name, from the consonants and digits Kubernetes uses.
fn suffix(mut n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// The current time as `creationTimestamp` writes it: `2025-01-31T12:00:00Z`.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
