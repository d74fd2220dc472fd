//! From the watches of both kinds to the policies in force.
//!
//! Each object is validated when it arrives (once per spec, not once per pass). Passes put every
//! valid object in force at once with [`Hub::replace_all`]: the first after both kinds have been
//! listed — before that, half a list would take away policies that are merely not read yet —
//! and then at most one every 100 ms, so a `kubectl apply` of fifty objects is one version, not
//! fifty. After each pass, what was seen is published as an [`InForce`] for the status writer
//! and for `PolicyService` waiting for its own writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use trellis_proto::policy::PolicySet;

use super::{API_PATH, CustomResource, Kind};
use crate::admin::Metrics;
use crate::kube::KubeClient;
use crate::kube::watch::{self as reflector, Event, ObjectKey, Watched};
use crate::server::{Commit, Hub};

/// The shortest time between two passes.
const PASS_INTERVAL: Duration = Duration::from_millis(100);

/// What the last pass saw and put in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InForce {
    /// Whether both kinds have been listed and a pass has run (before: nothing is in force).
    pub synced: bool,
    /// The version in force, and the pass that made it so (its affected proxies).
    pub commit: Commit,
    /// Every object, valid or not.
    pub objects: BTreeMap<(Kind, ObjectKey), Observed>,
}

/// One object as the last pass saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub resource: Arc<CustomResource>,
    /// `Err`: why it is not in force (field paths and reasons).
    pub accepted: Result<(), String>,
}

impl InForce {
    /// Whether the object `key` is in the state the pass saw as `uid` at `generation` — or, with
    /// `None`, is gone.
    pub fn has(&self, kind: Kind, key: &ObjectKey, written: Option<(&str, u64)>) -> bool {
        let seen = self.objects.get(&(kind, key.clone()));
        match (seen, written) {
            (None, None) => true,
            (Some(o), Some((uid, generation))) => {
                o.resource.uid == uid && o.resource.generation >= generation
            }
            _ => false,
        }
    }
}

/// Starts the watches of both kinds and the task that syncs them into `hub`.
pub fn spawn(
    hub: Arc<Hub>,
    client: Arc<KubeClient>,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Arc<InForce>> {
    let (published, in_force) = watch::channel(Arc::new(InForce::default()));
    let (tx, rx) = mpsc::unbounded_channel();
    for kind in Kind::ALL {
        let (kind_tx, mut kind_rx) = mpsc::unbounded_channel::<Event<CustomResource>>();
        let watched = Watched {
            resource: kind.plural(),
            path: format!("{API_PATH}/{}", kind.plural()),
        };
        reflector::spawn(client.clone(), watched, metrics.clone(), kind_tx);
        // One channel for both kinds, each event tagged with the watch it came from: objects
        // listed from the API may lack `kind`.
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(event) = kind_rx.recv().await {
                if tx.send((kind, event)).is_err() {
                    return;
                }
            }
        });
    }
    tokio::spawn(run(hub, rx, published));
    in_force
}

async fn run(
    hub: Arc<Hub>,
    mut events: mpsc::UnboundedReceiver<(Kind, Event<CustomResource>)>,
    published: watch::Sender<Arc<InForce>>,
) {
    let mut sync = Sync::default();
    let mut next_pass = Instant::now();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some((kind, event)) => sync.handle(kind, event),
                None => return,
            },
            _ = tokio::time::sleep_until(next_pass), if sync.ready() => {
                let in_force = sync.pass(&hub);
                published.send_if_modified(|old| {
                    let modified = **old != in_force;
                    if modified {
                        *old = Arc::new(in_force);
                    }
                    modified
                });
                next_pass = Instant::now() + PASS_INTERVAL;
            }
        }
    }
}

#[derive(Default)]
struct Sync {
    objects: BTreeMap<(Kind, ObjectKey), Entry>,
    /// Per kind (in [`Kind::ALL`] order): listed at least once.
    listed: [bool; 2],
    dirty: bool,
    /// The pass that produced the version in force.
    commit: Commit,
}

struct Entry {
    resource: Arc<CustomResource>,
    validated: Result<PolicySet, String>,
}

impl Sync {
    fn ready(&self) -> bool {
        self.dirty && self.listed.iter().all(|l| *l)
    }

    fn handle(&mut self, kind: Kind, event: Event<CustomResource>) {
        match event {
            Event::Applied(key, resource) => {
                let id = (kind, key);
                let validated = match self.objects.get(&id) {
                    Some(old) if old.resource.spec == resource.spec => old.validated.clone(),
                    old => {
                        let validated = resource.validate(kind);
                        let was_invalid = old.is_some_and(|o| o.validated.is_err());
                        match &validated {
                            Err(error) => {
                                tracing::warn!(object = %format_args!("{kind} {}", id.1), %error, "invalid policy: not in force")
                            }
                            Ok(_) if was_invalid => {
                                tracing::info!(object = %format_args!("{kind} {}", id.1), "policy is valid again")
                            }
                            Ok(_) => {}
                        }
                        validated
                    }
                };
                self.objects.insert(
                    id,
                    Entry {
                        resource,
                        validated,
                    },
                );
            }
            Event::Deleted(key) => {
                self.objects.remove(&(kind, key));
            }
            Event::Synced => {
                let i = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
                self.listed[i] = true;
            }
        }
        self.dirty = true;
    }

    /// Puts every valid object in force and says what was seen.
    fn pass(&mut self, hub: &Hub) -> InForce {
        self.dirty = false;
        let mut set = PolicySet::default();
        let mut invalid = 0;
        for entry in self.objects.values() {
            match &entry.validated {
                Ok(valid) => {
                    set.traffic.extend(valid.traffic.iter().cloned());
                    set.server.extend(valid.server.iter().cloned());
                }
                Err(_) => invalid += 1,
            }
        }
        let (traffic, server) = (set.traffic.len(), set.server.len());
        if let Some(commit) = hub.replace_all(set) {
            tracing::info!(
                version = commit.version,
                traffic,
                server,
                invalid,
                affected = commit.affected.len(),
                "policy resources in force"
            );
            self.commit = commit;
        }
        InForce {
            synced: true,
            commit: self.commit.clone(),
            objects: self
                .objects
                .iter()
                .map(|(id, entry)| {
                    let observed = Observed {
                        resource: entry.resource.clone(),
                        accepted: entry.validated.as_ref().map(|_| ()).map_err(Clone::clone),
                    };
                    (id.clone(), observed)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::kube::watch::Projection;

    fn event(name: &str, generation: u64, spec: serde_json::Value) -> Event<CustomResource> {
        let resource = CustomResource::project(&json!({
            "metadata": {"name": name, "namespace": "shop", "uid": name, "generation": generation},
            "spec": spec,
        }))
        .unwrap();
        Event::Applied(resource.key(), Arc::new(resource))
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn nothing_is_put_in_force_before_both_kinds_are_listed() {
        let mut sync = Sync::default();
        sync.handle(Kind::Traffic, event("a", 1, json!({"timeout": "1s"})));
        sync.handle(Kind::Traffic, Event::Synced);
        assert!(!sync.ready(), "ServerPolicies are not listed yet");
        sync.handle(Kind::Server, Event::Synced);
        assert!(sync.ready());
    }

    #[test]
    fn valid_objects_are_in_force_and_an_invalid_one_is_left_out_with_its_reason() {
        let hub = Hub::without_store(Arc::new(Metrics::default()));
        let mut sync = Sync::default();
        sync.handle(Kind::Traffic, event("a", 1, json!({"timeout": "1s"})));
        sync.handle(Kind::Traffic, event("b", 4, json!({"timeout": "soon"})));
        sync.handle(Kind::Server, event("c", 1, json!({"mtls": "strict"})));
        sync.handle(Kind::Traffic, Event::Synced);
        sync.handle(Kind::Server, Event::Synced);
        let in_force = sync.pass(&hub);
        let (version, set) = hub.policy_set();
        assert_eq!(in_force.commit.version, version);
        assert_ne!(version, 0);
        let names: Vec<_> = set.traffic.iter().map(|p| p.name.as_str()).collect();
        assert_eq!((names, set.server.len()), (vec!["a"], 1));
        let b = &in_force.objects[&(Kind::Traffic, key("b"))];
        let error = b.accepted.as_ref().unwrap_err();
        assert!(error.starts_with("spec.timeout: "), "{error}");
        assert!(in_force.has(Kind::Traffic, &key("b"), Some(("b", 4))));
        assert!(!in_force.has(Kind::Traffic, &key("b"), Some(("b", 5))));
        assert!(in_force.has(Kind::Server, &key("zz"), None));

        // Deleting the invalid one changes nothing in force: same version, no new commit.
        sync.handle(Kind::Traffic, Event::Deleted(key("b")));
        let again = sync.pass(&hub);
        assert_eq!(hub.version(), version);
        assert_eq!(again.commit, in_force.commit);
        assert!(!again.objects.contains_key(&(Kind::Traffic, key("b"))));
    }
}
