//! Policies as custom resources: in Kubernetes mode (`serve --kubernetes`) the TrafficPolicy and
//! ServerPolicy objects of the API server are the policies, and the API server is their store.
//!
//! - [`sync`]: watches both kinds (all namespaces), validates every object with the same
//!   validator as `apply -f` and puts the valid ones in force together with
//!   [`Hub::replace_all`]; an invalid object is left out — nothing else is lost — and its status
//!   says why.
//! - [`write`]: `PolicyService.Apply/Delete` in Kubernetes mode: validate, write each document
//!   through the API server, then wait until the watch has brought the change into force.
//! - [`status`]: each object's status subresource — accepted or not, and per control-plane
//!   replica the version in force and how many of its proxies have acknowledged it.
//!
//! A custom resource is the same document people write for `apply -f` (apiVersion, kind,
//! metadata, spec), so validating one means rebuilding that document from the object and handing
//! it to [`PolicySet::parse`]: errors carry the same field paths in both worlds.

pub mod status;
pub mod sync;
pub mod write;

use std::fmt;
use std::sync::Arc;

use serde_json::{Value, json};
use trellis_proto::policy::{API_VERSION, PolicyErrors, PolicySet};

use crate::admin::Metrics;
use crate::kube::KubeClient;
use crate::kube::watch::{ObjectKey, Projection};
use crate::server::Hub;

pub use sync::InForce;
pub use write::{PolicyWriter, WriteError};

/// The API group and version of both kinds, as a path prefix.
pub const API_PATH: &str = "/apis/trellis.dev/v1alpha1";

/// The two policy kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Traffic,
    Server,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Traffic, Kind::Server];

    /// The `kind` of the documents and objects.
    pub fn name(self) -> &'static str {
        match self {
            Self::Traffic => "TrafficPolicy",
            Self::Server => "ServerPolicy",
        }
    }

    /// The resource name in API paths.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Traffic => "trafficpolicies",
            Self::Server => "serverpolicies",
        }
    }

    pub fn from_name(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == kind)
    }

    /// The collection in one namespace (POST creates here).
    pub fn collection(self, namespace: &str) -> String {
        format!("{API_PATH}/namespaces/{namespace}/{}", self.plural())
    }

    /// One object (GET, PUT, DELETE).
    pub fn object(self, key: &ObjectKey) -> String {
        format!("{}/{}", self.collection(&key.namespace), key.name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the control plane keeps of one custom resource (either kind: the watch it came from says
/// which). Its `status` is kept so that a restarted control plane does not rewrite a status that
/// already says what it would say.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomResource {
    pub name: String,
    pub namespace: String,
    /// Tells a re-created object from the one it replaces.
    pub uid: String,
    /// Bumped by the API server on every change of `spec` (not of status or labels).
    pub generation: u64,
    /// As the API server holds it; `Null` when absent.
    pub spec: Value,
    pub status: Value,
}

impl Projection for CustomResource {
    fn project(object: &Value) -> Result<Self, String> {
        let meta = &object["metadata"];
        let text = |field: &str| {
            meta[field]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("the object has no metadata.{field}"))
        };
        Ok(Self {
            name: text("name")?,
            namespace: text("namespace")?,
            uid: meta["uid"].as_str().unwrap_or_default().to_string(),
            generation: meta["generation"].as_u64().unwrap_or(0),
            spec: object.get("spec").cloned().unwrap_or(Value::Null),
            status: object.get("status").cloned().unwrap_or(Value::Null),
        })
    }
}

impl CustomResource {
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The policy document this object is: what `apply -f` would have read. Server-set metadata
    /// (uid, resourceVersion, managedFields, ...) is left out: the validator knows only the
    /// fields people write, and would report the rest as unknown.
    pub fn document(&self, kind: Kind) -> Value {
        let mut doc = json!({
            "apiVersion": API_VERSION,
            "kind": kind.name(),
            "metadata": {"name": self.name, "namespace": self.namespace},
        });
        if !self.spec.is_null() {
            doc["spec"] = self.spec.clone();
        }
        doc
    }

    /// Validates the object as a policy document. Errors are field paths and reasons, without
    /// the `document 1 (...)` label meant for multi-document files: a status names its object.
    pub fn validate(&self, kind: Kind) -> Result<PolicySet, String> {
        // JSON is YAML: the document goes through exactly the parser `apply -f` uses.
        let text = serde_json::to_string_pretty(&self.document(kind))
            .map_err(|e| format!("cannot serialize the object: {e}"))?;
        PolicySet::parse(&text).map_err(|PolicyErrors(errors)| {
            errors
                .iter()
                .map(|e| strip_document_label(e))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// `document 1 (TrafficPolicy ns/name): spec.timeout: ...` → `spec.timeout: ...`.
fn strip_document_label(error: &str) -> &str {
    if let Some(rest) = error.strip_prefix("document ") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let rest = &rest[digits..];
        if let Some(rest) = rest.strip_prefix(": ") {
            return rest;
        }
        if rest.starts_with(" (")
            && let Some(end) = rest.find("): ")
        {
            return &rest[end + 3..];
        }
    }
    error
}

/// The name this replica reports under in every object's `status.controlPlanes`: the pod name
/// (env `POD_NAME`, from the downward API), else the host name — in a pod, the same.
pub fn replica_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "trellis-control".to_string())
}

/// Starts the Kubernetes mode of the policies: the watches of both kinds, the sync into `hub`
/// and the status writer. Returns what `PolicyService` writes through.
pub fn start(hub: Arc<Hub>, client: Arc<KubeClient>, metrics: Arc<Metrics>) -> Arc<PolicyWriter> {
    let replica = replica_name();
    tracing::info!(%replica, "policies come from TrafficPolicy and ServerPolicy resources");
    let in_force = sync::spawn(hub.clone(), client.clone(), metrics);
    status::spawn(hub.clone(), client.clone(), in_force.clone(), replica);
    Arc::new(PolicyWriter::new(client, in_force))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(spec: Value) -> CustomResource {
        CustomResource::project(&json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {
                "name": "reviews", "namespace": "shop", "uid": "u-1", "generation": 3,
                "resourceVersion": "812", "managedFields": [{"manager": "kubectl"}],
                "labels": {"team": "a"},
            },
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_valid_resource_is_the_policy_its_document_is() {
        let cr = resource(json!({
            "destination": {"host": "reviews", "port": 9080},
            "timeout": "2s",
            "retries": {"on": ["connect-failure", 503]},
        }));
        assert_eq!((cr.uid.as_str(), cr.generation), ("u-1", 3));
        let set = cr.validate(Kind::Traffic).unwrap();
        let yaml = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\n\
                    metadata: {name: reviews, namespace: shop}\n\
                    spec: {destination: {host: reviews, port: 9080}, timeout: 2s, retries: {\"on\": [connect-failure, 503]}}\n";
        assert_eq!(set, PolicySet::parse(yaml).unwrap());
        assert_eq!(
            set.traffic[0].timeout,
            Some(std::time::Duration::from_secs(2))
        );
    }

    #[test]
    fn an_invalid_resource_is_reported_by_field_path() {
        let cr = resource(json!({"timeout": "5x", "retries": {"maxRetrys": 2}}));
        let error = cr.validate(Kind::Traffic).unwrap_err();
        assert!(error.contains("spec.timeout: "), "{error}");
        assert!(error.contains("spec.retries.maxRetrys"), "{error}");
        assert!(!error.contains("document 1"), "{error}");
    }

    #[test]
    fn the_kind_comes_from_the_watch_and_a_missing_spec_is_the_defaults() {
        let cr = resource(Value::Null);
        let set = cr.validate(Kind::Server).unwrap();
        assert_eq!((set.traffic.len(), set.server.len()), (0, 1));
        assert_eq!(set.server[0].namespace, "shop");
    }

    #[test]
    fn strings_that_need_escaping_survive_the_trip_through_yaml() {
        let cr = resource(json!({"destination": {"host": "a\"b: c\n#d"}}));
        let error = cr.validate(Kind::Traffic).unwrap_err();
        assert!(error.starts_with("spec.destination.host"), "{error}");
    }

    #[test]
    fn an_object_without_a_namespace_is_not_projected() {
        let error = CustomResource::project(&json!({"metadata": {"name": "a"}})).unwrap_err();
        assert!(error.contains("metadata.namespace"), "{error}");
    }

    #[test]
    fn document_labels_are_stripped() {
        assert_eq!(
            strip_document_label("document 1 (TrafficPolicy a/b): spec.x: bad"),
            "spec.x: bad"
        );
        assert_eq!(strip_document_label("document 2: kind: bad"), "kind: bad");
        assert_eq!(
            strip_document_label("not valid YAML: x"),
            "not valid YAML: x"
        );
    }
}
