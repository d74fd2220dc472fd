//! `apply -f` and `delete -f` in Kubernetes mode: the documents are written through the API
//! server, and the answer waits until the watch has brought them into force.
//!
//! The control plane does not put a change in force itself: the watch does, the same way for a
//! `trellis-control apply`, a `kubectl apply` or another replica's write. So that `apply --wait`
//! still means "the proxies have it", the answer waits (up to 5 s) until this replica's watch has
//! seen every written object at the generation the API server gave it, and then names the version
//! that brought it in force and the proxies that version changed.
//!
//! A document is only written when it differs from the object (as a policy: `2s` and `2000ms`
//! are the same): re-applying a file bumps no generation and wakes no proxy. Updates carry the
//! `resourceVersion` just read, so a concurrent writer's change is never silently overwritten: a
//! conflict re-reads and retries, three times at most.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use trellis_proto::policy::{API_VERSION, PolicySet};

use super::{CustomResource, InForce, Kind};
use crate::kube::watch::{ObjectKey, Projection};
use crate::kube::{KubeClient, api_message};
use crate::server::Commit;

/// How long an answer waits for the watch to bring a write into force.
const IN_FORCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-reads after a conflict (someone else wrote the object between our read and our write).
const CONFLICT_RETRIES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{object}: the Kubernetes API answered {status}: {message}{hint}{}", written_note(.written))]
    Refused {
        object: String,
        status: StatusCode,
        message: String,
        hint: &'static str,
        written: Vec<String>,
    },
    #[error("{object}: {reason}{}", written_note(.written))]
    Unreachable {
        object: String,
        reason: String,
        written: Vec<String>,
    },
    #[error("{object}: changed by another writer on each of {attempts} attempts; try again{}", written_note(.written))]
    Conflict {
        object: String,
        attempts: usize,
        written: Vec<String>,
    },
    #[error(
        "written to the Kubernetes API, but this control plane's watch did not bring {} into force within {}s: see its log for errors watching the policy resources",
        .pending.join(", "), IN_FORCE_TIMEOUT.as_secs()
    )]
    NotInForce { pending: Vec<String> },
}

fn written_note(written: &[String]) -> String {
    if written.is_empty() {
        " — nothing was written".to_string()
    } else {
        format!(
            " — already written: {}; the documents after it were not",
            written.join(", ")
        )
    }
}

/// What a write did: the documents that changed (as `apply` prints them) and the commit in force
/// once the watch had them.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub changed: Vec<String>,
    pub commit: Commit,
}

/// Writes policy documents through the API server (see the module documentation).
pub struct PolicyWriter {
    client: Arc<KubeClient>,
    in_force: watch::Receiver<Arc<InForce>>,
}

/// One document of the request.
struct Document {
    kind: Kind,
    key: ObjectKey,
    /// The whole document as read from the YAML.
    value: Value,
    /// What it means, for comparing with the object.
    policy: PolicySet,
}

impl Document {
    fn label(&self) -> String {
        format!("{} {}", self.kind, self.key)
    }
}

/// What the watch must show before the answer: the object at (uid, at least this generation),
/// or (`None`) the object gone.
type Expect = (Kind, ObjectKey, Option<(String, u64)>);

impl PolicyWriter {
    pub fn new(client: Arc<KubeClient>, in_force: watch::Receiver<Arc<InForce>>) -> Self {
        Self { client, in_force }
    }

    /// Creates or updates the object of each document of `yaml`, which `set` is the validated
    /// form of (validation happens before: nothing is written when any document is bad).
    pub async fn apply(&self, yaml: &str, set: &PolicySet) -> Result<Outcome, WriteError> {
        let mut changed = Vec::new();
        let mut expect = Vec::new();
        for doc in documents(yaml, set) {
            let object = doc.label();
            let (uid, generation, wrote) = self.put(&doc).await.map_err(|e| e.with(&changed))?;
            if wrote {
                changed.push(object);
            }
            expect.push((doc.kind, doc.key, Some((uid, generation))));
        }
        self.wait(changed, expect).await
    }

    /// Deletes the object named by each document of `yaml` (absent ones are not an error).
    pub async fn delete(&self, yaml: &str, set: &PolicySet) -> Result<Outcome, WriteError> {
        let mut changed = Vec::new();
        let mut expect = Vec::new();
        for doc in documents(yaml, set) {
            let object = doc.label();
            let path = doc.kind.object(&doc.key);
            let (status, body) = self
                .request(&object, Method::DELETE, &path, None)
                .await
                .map_err(|e| e.with(&changed))?;
            match status {
                s if s.is_success() => changed.push(format!("{object} deleted")),
                StatusCode::NOT_FOUND => {}
                status => return Err(refused(&object, status, &body, &changed)),
            }
            expect.push((doc.kind, doc.key, None));
        }
        self.wait(changed, expect).await
    }

    /// Creates or updates one object; returns its uid and generation, and whether it was written.
    async fn put(&self, doc: &Document) -> Result<(String, u64, bool), WriteError> {
        let object = doc.label();
        let path = doc.kind.object(&doc.key);
        for _ in 0..=CONFLICT_RETRIES {
            let (status, body) = self.request(&object, Method::GET, &path, None).await?;
            let (method, target, body) = match status {
                StatusCode::NOT_FOUND => (
                    Method::POST,
                    doc.kind.collection(&doc.key.namespace),
                    new_object(doc),
                ),
                StatusCode::OK => {
                    let existing: Value =
                        serde_json::from_slice(&body).map_err(|e| WriteError::Unreachable {
                            object: object.clone(),
                            reason: format!("the API server's answer is not JSON: {e}"),
                            written: Vec::new(),
                        })?;
                    if let Some((uid, generation)) = same_policy(doc, &existing) {
                        return Ok((uid, generation, false));
                    }
                    (Method::PUT, path.clone(), updated_object(doc, existing))
                }
                status => return Err(refused(&object, status, &body, &[])),
            };
            let (status, answer) = self.request(&object, method, &target, Some(body)).await?;
            match status {
                // Created concurrently (POST) or changed since our read (PUT): read again.
                StatusCode::CONFLICT => continue,
                s if s.is_success() => {
                    let written: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
                    let meta = &written["metadata"];
                    let uid = meta["uid"].as_str().unwrap_or_default().to_string();
                    let generation = meta["generation"].as_u64().unwrap_or(0);
                    return Ok((uid, generation, true));
                }
                status => return Err(refused(&object, status, &answer, &[])),
            }
        }
        Err(WriteError::Conflict {
            object,
            attempts: CONFLICT_RETRIES + 1,
            written: Vec::new(),
        })
    }

    async fn request(
        &self,
        object: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, bytes::Bytes), WriteError> {
        let (content_type, body) = match body {
            Some(v) => (Some("application/json"), Some(v.to_string().into_bytes())),
            None => (None, None),
        };
        self.client
            .request(method, path, content_type, body)
            .await
            .map_err(|reason| WriteError::Unreachable {
                object: object.to_string(),
                reason,
                written: Vec::new(),
            })
    }

    /// Waits until the watch shows every expected object (or its absence).
    async fn wait(&self, changed: Vec<String>, expect: Vec<Expect>) -> Result<Outcome, WriteError> {
        let mut in_force = self.in_force.clone();
        let deadline = tokio::time::Instant::now() + IN_FORCE_TIMEOUT;
        loop {
            let pending: Vec<String> = {
                let seen = in_force.borrow_and_update();
                expect
                    .iter()
                    .filter(|(kind, key, written)| {
                        !seen.synced
                            || !seen.has(
                                *kind,
                                key,
                                written.as_ref().map(|(uid, g)| (uid.as_str(), *g)),
                            )
                    })
                    .map(|(kind, key, _)| format!("{kind} {key}"))
                    .collect()
            };
            if pending.is_empty() {
                let commit = in_force.borrow().commit.clone();
                return Ok(Outcome { changed, commit });
            }
            match tokio::time::timeout_at(deadline, in_force.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(WriteError::NotInForce { pending }),
            }
        }
    }
}

impl WriteError {
    /// The same error, noting the documents written before it.
    fn with(self, already: &[String]) -> Self {
        let already = already.to_vec();
        match self {
            Self::Refused {
                object,
                status,
                message,
                hint,
                ..
            } => Self::Refused {
                object,
                status,
                message,
                hint,
                written: already,
            },
            Self::Unreachable { object, reason, .. } => Self::Unreachable {
                object,
                reason,
                written: already,
            },
            Self::Conflict {
                object, attempts, ..
            } => Self::Conflict {
                object,
                attempts,
                written: already,
            },
            other => other,
        }
    }
}

fn refused(object: &str, status: StatusCode, body: &[u8], written: &[String]) -> WriteError {
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (is the control plane's token valid?)",
        StatusCode::FORBIDDEN => {
            " (may the control plane's service account get, create, update and delete trafficpolicies and serverpolicies? see its ClusterRole)"
        }
        StatusCode::NOT_FOUND => {
            " (does the namespace exist, and are the trellis.dev CustomResourceDefinitions installed?)"
        }
        _ => "",
    };
    WriteError::Refused {
        object: object.to_string(),
        status,
        message: api_message(body),
        hint,
        written: written.to_vec(),
    }
}

/// The documents of `yaml` (already validated as `set`), each with its meaning.
fn documents(yaml: &str, set: &PolicySet) -> Vec<Document> {
    let values: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap_or_default();
    values
        .into_iter()
        .filter(|v| !v.is_null())
        .filter_map(|value| {
            let kind = Kind::from_name(value["kind"].as_str()?)?;
            let name = value["metadata"]["name"].as_str()?.to_string();
            let namespace = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let mut policy = PolicySet::default();
            match kind {
                Kind::Traffic => policy.traffic.extend(
                    set.traffic
                        .iter()
                        .filter(|p| p.name == name && p.namespace == namespace)
                        .cloned(),
                ),
                Kind::Server => policy.server.extend(
                    set.server
                        .iter()
                        .filter(|p| p.name == name && p.namespace == namespace)
                        .cloned(),
                ),
            }
            Some(Document {
                kind,
                key: ObjectKey { namespace, name },
                value,
                policy,
            })
        })
        .collect()
}

/// The object for a POST: the document, with its namespace spelled out.
fn new_object(doc: &Document) -> Value {
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(doc.key.name));
    metadata.insert("namespace".into(), json!(doc.key.namespace));
    for field in ["labels", "annotations"] {
        if let Some(v) = doc.value["metadata"].get(field) {
            metadata.insert(field.into(), v.clone());
        }
    }
    let mut object = json!({
        "apiVersion": API_VERSION,
        "kind": doc.kind.name(),
        "metadata": metadata,
    });
    if let Some(spec) = doc.value.get("spec") {
        object["spec"] = spec.clone();
    }
    object
}

/// The object for a PUT: the one read (with its resourceVersion, so that a concurrent change
/// makes the write fail instead of being lost), with the document's spec, labels, annotations.
fn updated_object(doc: &Document, mut existing: Value) -> Value {
    match doc.value.get("spec") {
        Some(spec) => existing["spec"] = spec.clone(),
        None => {
            if let Some(o) = existing.as_object_mut() {
                o.remove("spec");
            }
        }
    }
    for field in ["labels", "annotations"] {
        if let Some(v) = doc.value["metadata"].get(field) {
            existing["metadata"][field] = v.clone();
        }
    }
    existing
}

/// The object's uid and generation if it already is the document: the same policy, and the
/// labels and annotations the document gives (if any).
fn same_policy(doc: &Document, existing: &Value) -> Option<(String, u64)> {
    let resource = CustomResource::project(existing).ok()?;
    let policy = resource.validate(doc.kind).ok()?;
    let metadata_same = ["labels", "annotations"].iter().all(|field| {
        doc.value["metadata"]
            .get(*field)
            .is_none_or(|v| existing["metadata"].get(*field) == Some(v))
    });
    (policy == doc.policy && metadata_same).then_some((resource.uid, resource.generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\n\
        metadata: {name: reviews, labels: {team: a}}\nspec: {timeout: 2s}\n---\n\
        apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\n\
        metadata: {name: reviews, namespace: shop}\nspec: {mtls: strict}\n";

    fn docs() -> Vec<Document> {
        documents(YAML, &PolicySet::parse(YAML).unwrap())
    }

    #[test]
    fn documents_are_paired_with_their_meaning() {
        let docs = docs();
        let labels: Vec<String> = docs.iter().map(Document::label).collect();
        assert_eq!(
            labels,
            ["TrafficPolicy default/reviews", "ServerPolicy shop/reviews"]
        );
        assert_eq!(
            (docs[0].policy.traffic.len(), docs[0].policy.server.len()),
            (1, 0)
        );
        assert_eq!(
            (docs[1].policy.traffic.len(), docs[1].policy.server.len()),
            (0, 1)
        );
        assert_eq!(
            docs[0].kind.collection(&docs[0].key.namespace),
            "/apis/trellis.dev/v1alpha1/namespaces/default/trafficpolicies"
        );
        assert_eq!(
            docs[1].kind.object(&docs[1].key),
            "/apis/trellis.dev/v1alpha1/namespaces/shop/serverpolicies/reviews"
        );
    }

    #[test]
    fn a_new_object_is_the_document_with_its_namespace() {
        let object = new_object(&docs()[0]);
        assert_eq!(
            object,
            json!({
                "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": "reviews", "namespace": "default", "labels": {"team": "a"}},
                "spec": {"timeout": "2s"},
            })
        );
    }

    #[test]
    fn an_update_keeps_the_read_resource_version_and_replaces_the_spec() {
        let existing = json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "reviews", "namespace": "default", "uid": "u", "generation": 2,
                         "resourceVersion": "77", "labels": {"team": "b"}},
            "spec": {"timeout": "2000ms", "protocol": "http1"},
        });
        let doc = &docs()[0];
        let object = updated_object(doc, existing.clone());
        assert_eq!(object["metadata"]["resourceVersion"], "77");
        assert_eq!(object["metadata"]["labels"], json!({"team": "a"}));
        assert_eq!(object["spec"], json!({"timeout": "2s"}));
        assert_eq!(
            same_policy(doc, &existing),
            None,
            "protocol and labels differ"
        );

        let same = json!({
            "metadata": {"name": "reviews", "namespace": "default", "uid": "u", "generation": 2,
                         "labels": {"team": "a"}},
            "spec": {"timeout": "2000ms"},
        });
        assert_eq!(same_policy(doc, &same), Some(("u".to_string(), 2)));
    }

    #[test]
    fn errors_say_what_was_already_written() {
        let e = refused(
            "TrafficPolicy shop/b",
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"kind":"Status","message":"spec.timeout: Invalid value"}"#,
            &["TrafficPolicy shop/a".to_string()],
        );
        assert_eq!(
            e.to_string(),
            "TrafficPolicy shop/b: the Kubernetes API answered 422 Unprocessable Entity: \
             spec.timeout: Invalid value — already written: TrafficPolicy shop/a; the documents after it were not"
        );
    }
}
