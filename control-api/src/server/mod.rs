//! The control plane's shared state and its gRPC services (policy, config, identity, tokens).
//!
//! [`Hub`] holds the policies in force (with their version), the time each version was
//! committed, and a record per connected proxy (what it was sent, acknowledged or rejected).
//! Changes are announced on a `watch` channel: each proxy stream follows it in its own task and
//! sends only the latest snapshot, so a slow or stuck proxy delays nobody but itself.
//!
//! Policies reach the hub in one of two ways. Outside Kubernetes, [`Hub::commit`] applies a change
//! and persists it in the [`Store`] first; versions count up. In Kubernetes the custom resources
//! are the store: [`Hub::replace_all`] puts the whole set in force, versioned by a hash of its
//! content, so every replica watching the same API server names the same policy by the same
//! version — a proxy that reconnects to another replica is not sent what it already holds.

mod config_service;
mod grpc_only;
mod identity_service;
mod policy_service;

pub use config_service::ConfigServer;
pub use grpc_only::GrpcOnly;
pub use identity_service::{IdentityServer, TokenServer, admin_only};
pub use policy_service::PolicyServer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use trellis_proto::pb;
use trellis_proto::policy::PolicySet;
use trellis_proto::wire;

use crate::admin::Metrics;
use crate::store::{State, Store, StoreError};

/// What one proxy has been sent and has answered.
#[derive(Debug, Clone)]
pub struct ProxyRecord {
    pub id: String,
    pub workload: String,
    pub service_account: String,
    pub address: String,
    pub sent_version: Option<u64>,
    /// Content hash of the last snapshot sent: unchanged content is not sent again.
    pub sent_hash: Option<u64>,
    pub acked_version: Option<u64>,
    pub acked_at_ms: u64,
    pub last_nack: Option<(u64, String)>,
    pub last_seen_ms: u64,
    pub connected: bool,
}

/// A change put in force: its version, the connected proxies whose snapshot it changed (they are
/// the ones `apply --wait` waits for), and when (ms since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    pub version: u64,
    pub affected: Vec<String>,
    pub committed_at_ms: u64,
}

pub struct Hub {
    state: Mutex<State>,
    /// `None` in Kubernetes: the custom resources are the store (see [`Hub::replace_all`]).
    store: Option<Store>,
    changes: watch::Sender<u64>,
    /// When each recent version was committed, for convergence times.
    committed: Mutex<HashMap<u64, (Instant, u64)>>,
    proxies: Mutex<HashMap<String, ProxyRecord>>,
    /// Bumped when a proxy connects, disconnects, acknowledges or rejects: what status reports
    /// about proxies follows it.
    proxy_changes: watch::Sender<u64>,
    /// Snapshots by service account for the current version: proxies of one workload share one.
    snapshots: Mutex<SnapshotCache>,
    /// Pods whose proxy proved a mesh identity, by stream; announced on `mesh_changes`.
    mesh: Mutex<BTreeMap<String, pb::MeshedEndpoint>>,
    mesh_changes: watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
}

/// ((policy version, mesh generation), service account → (snapshot, content hash)).
type SnapshotCache = ((u64, u64), HashMap<String, (Arc<pb::Snapshot>, u64)>);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How many commit times are remembered for convergence metrics.
const COMMITS_REMEMBERED: usize = 64;

impl Hub {
    /// A hub whose changes are persisted in `store` (from which `state` was read).
    pub fn new(store: Store, state: State, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::build(Some(store), state, metrics)
    }

    /// A hub fed from outside with [`Hub::replace_all`] and persisting nothing: in Kubernetes
    /// the custom resources are the store. It holds no policy (version 0, nothing is sent to
    /// proxies) until the first `replace_all`.
    pub fn without_store(metrics: Arc<Metrics>) -> Arc<Self> {
        Self::build(None, State::default(), metrics)
    }

    fn build(store: Option<Store>, state: State, metrics: Arc<Metrics>) -> Arc<Self> {
        let (changes, _) = watch::channel(state.version);
        Arc::new(Self {
            state: Mutex::new(state),
            store,
            changes,
            committed: Mutex::default(),
            proxies: Mutex::default(),
            proxy_changes: watch::channel(0).0,
            snapshots: Mutex::default(),
            mesh: Mutex::default(),
            mesh_changes: watch::channel(0).0,
            metrics,
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lock_proxies(&self) -> std::sync::MutexGuard<'_, HashMap<String, ProxyRecord>> {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn version(&self) -> u64 {
        self.lock_state().version
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether there is a policy set to send. Always with a store (an empty store is a valid,
    /// empty set); without one, once the first [`Hub::replace_all`] has happened — before that,
    /// sending an empty snapshot would wipe the good config a reconnecting proxy holds.
    pub fn policy_loaded(&self) -> bool {
        self.store.is_some() || self.version() != 0
    }

    /// Announces that something about the proxies changed (connected, disconnected, answered).
    pub fn proxies_changed(&self) {
        self.proxy_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Follows [`Hub::proxies_changed`].
    pub fn subscribe_proxies(&self) -> watch::Receiver<u64> {
        self.proxy_changes.subscribe()
    }

    /// Announces membership changes of the mesh (pods with a verified identity).
    pub fn subscribe_mesh(&self) -> watch::Receiver<u64> {
        self.mesh_changes.subscribe()
    }

    /// Records that the proxy on stream `id` is meshed (or, with `None`, no longer).
    /// In Kubernetes (no store) nothing is kept: discovery knows every pod's identity from the
    /// API server and serves it per destination, so a pod starting or stopping does not resend
    /// every proxy's snapshot.
    pub fn set_meshed(&self, id: &str, endpoint: Option<pb::MeshedEndpoint>) {
        if self.store.is_none() {
            return;
        }
        let mut mesh = self.mesh.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match endpoint {
            Some(e) => mesh.insert(id.to_string(), e.clone()) != Some(e),
            None => mesh.remove(id).is_some(),
        };
        drop(mesh);
        if changed {
            self.mesh_changes.send_modify(|g| *g += 1);
        }
    }

    /// The meshed pods, one entry per IP (the latest stream wins), sorted.
    fn meshed(&self) -> Vec<pb::MeshedEndpoint> {
        let mesh = self.mesh.lock().unwrap_or_else(|p| p.into_inner());
        let by_ip: BTreeMap<&str, &pb::MeshedEndpoint> =
            mesh.values().map(|e| (e.ip.as_str(), e)).collect();
        by_ip.into_values().cloned().collect()
    }

    /// Commits a change: persists it first, then puts it in force and announces it.
    /// Returns (version, what changed, proxies whose snapshot changed, commit time).
    pub fn commit(
        &self,
        change: impl FnOnce(&State) -> (State, Vec<String>),
    ) -> Result<(u64, Vec<String>, Vec<String>, u64), StoreError> {
        let state = self.lock_state();
        let (mut next, changed) = change(&state);
        if changed.is_empty() {
            return Ok((state.version, changed, Vec::new(), now_ms()));
        }
        next.version = state.version + 1;
        if let Some(store) = &self.store {
            store.save(&next)?;
        }
        let commit = self.put_in_force(state, next);
        Ok((
            commit.version,
            changed,
            commit.affected,
            commit.committed_at_ms,
        ))
    }

    /// Replaces every policy in force with `set` (documents keyed by kind, namespace and name;
    /// a later duplicate wins). The version is [`content_version`] of the set, so replicas that
    /// receive the same set agree on it. `None` when the set in force is already this one.
    /// Nothing is persisted, even on a hub with a store: this is for a hub whose store is
    /// outside (see [`Hub::without_store`]).
    pub fn replace_all(&self, set: PolicySet) -> Option<Commit> {
        let (mut next, _) = State::default().with_applied(set);
        next.version = content_version(&next.policy_set());
        let state = self.lock_state();
        if state.version == next.version
            && state.traffic == next.traffic
            && state.server == next.server
        {
            return None;
        }
        Some(self.put_in_force(state, next))
    }

    /// Puts `next` in force (its version already set) and announces it.
    fn put_in_force(&self, mut state: std::sync::MutexGuard<'_, State>, next: State) -> Commit {
        let mesh_hash = mesh_hash(&self.meshed());
        // One hash per service account, not per proxy: proxies of a workload share snapshots.
        let mut hashes: HashMap<String, u64> = HashMap::new();
        let affected: Vec<String> = self
            .lock_proxies()
            .values()
            .filter(|p| {
                let hash = *hashes
                    .entry(p.service_account.clone())
                    .or_insert_with(|| snapshot_hash(&next, &p.service_account) ^ mesh_hash);
                p.connected && p.sent_hash != Some(hash)
            })
            .map(|p| p.id.clone())
            .collect();
        let committed_at_ms = now_ms();
        {
            let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
            committed.insert(next.version, (Instant::now(), committed_at_ms));
            // Content-hash versions are not ordered: forget the oldest by time, not by number.
            while committed.len() > COMMITS_REMEMBERED {
                let Some(oldest) = committed
                    .iter()
                    .min_by_key(|(_, (t, _))| *t)
                    .map(|(v, _)| *v)
                else {
                    break;
                };
                committed.remove(&oldest);
            }
        }
        let version = next.version;
        *state = next;
        drop(state);
        self.changes.send_replace(version);
        Commit {
            version,
            affected,
            committed_at_ms,
        }
    }

    /// The snapshot for a proxy of `service_account`, with its content hash. Built once per
    /// version and service account, however many proxies share them.
    pub fn snapshot_for(&self, service_account: &str) -> (Arc<pb::Snapshot>, u64) {
        let state = self.lock_state();
        let generation = *self.mesh_changes.borrow();
        let mut cache = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != (state.version, generation) {
            *cache = ((state.version, generation), HashMap::new());
        }
        if let Some((snapshot, hash)) = cache.1.get(service_account) {
            return (snapshot.clone(), *hash);
        }
        let meshed = self.meshed();
        let hash = snapshot_hash(&state, service_account) ^ mesh_hash(&meshed);
        let set = filtered(&state, service_account);
        let snapshot = Arc::new(pb::Snapshot {
            version: state.version.to_string(),
            nonce: String::new(),
            traffic: set.traffic.iter().map(wire::traffic_to_wire).collect(),
            server: set.server.iter().map(wire::server_to_wire).collect(),
            meshed,
        });
        cache
            .1
            .insert(service_account.to_string(), (snapshot.clone(), hash));
        (snapshot, hash)
    }

    /// Each connected proxy, and whether it has acknowledged what is in force for it: the
    /// current version, or — when later versions changed nothing for it and so were never sent
    /// to it — the snapshot it was last sent, which is still the current one for it.
    pub fn connected_proxies(&self) -> Vec<(ProxyRecord, bool)> {
        let version = self.version();
        // Copied out first: building a snapshot takes the state lock, which a commit holds while
        // it takes the proxies' lock.
        let proxies: Vec<ProxyRecord> = self
            .lock_proxies()
            .values()
            .filter(|p| p.connected)
            .cloned()
            .collect();
        let mut current: HashMap<String, u64> = HashMap::new();
        proxies
            .into_iter()
            .map(|p| {
                let hash = *current
                    .entry(p.service_account.clone())
                    .or_insert_with(|| self.snapshot_for(&p.service_account).1);
                let acked = p.acked_version == Some(version)
                    || (p.sent_hash == Some(hash)
                        && p.acked_version.is_some()
                        && p.acked_version == p.sent_version);
                (p, acked)
            })
            .collect()
    }

    pub fn policy_set(&self) -> (u64, PolicySet) {
        let state = self.lock_state();
        (state.version, state.policy_set())
    }

    /// Time from the commit of `version` to now, if it is still remembered.
    pub fn since_commit(&self, version: u64) -> Option<std::time::Duration> {
        self.committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&version)
            .map(|(t, _)| t.elapsed())
    }
}

/// The version of a policy set in Kubernetes mode: a hash of its canonical form (documents
/// sorted by namespace and name, defaults filled in), so it depends on the content only — not on
/// the order the API server listed the objects in, nor on which replica computed it. 53 bits, so
/// that it survives JSON readers that hold numbers as doubles; never 0, which means "no policy".
pub fn content_version(set: &PolicySet) -> u64 {
    let (canonical, _) = State::default().with_applied(set.clone());
    let hash = fnv(serde_json::to_string(&canonical.policy_set())
        .unwrap_or_default()
        .bytes());
    // Fold the high bits in rather than dropping them.
    let version = (hash ^ (hash >> 53)) & ((1 << 53) - 1);
    version.max(1)
}

/// All TrafficPolicies, and the ServerPolicies that select this service account.
fn filtered(state: &State, service_account: &str) -> PolicySet {
    let mut set = state.policy_set();
    set.server.retain(|s| {
        s.selector
            .service_account
            .as_deref()
            .is_none_or(|sa| sa == service_account)
    });
    set
}

fn snapshot_hash(state: &State, service_account: &str) -> u64 {
    let set = filtered(state, service_account);
    fnv(serde_json::to_string(&set).unwrap_or_default().bytes())
}

/// Folded into each snapshot's content hash: a membership change is new content.
fn mesh_hash(meshed: &[pb::MeshedEndpoint]) -> u64 {
    fnv(format!("{meshed:?}").bytes()).rotate_left(1)
}

fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: a, namespace: shop}\nspec: {timeout: 2s}\n";
    const B: &str = "apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {name: b, namespace: shop}\nspec: {mtls: strict}\n";
    const C: &str = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: c, namespace: default}\nspec: {timeout: 2000ms}\n";

    fn set(docs: &[&str]) -> PolicySet {
        PolicySet::parse(&docs.join("---\n")).unwrap()
    }

    #[test]
    fn the_content_version_depends_on_the_content_only() {
        let v = content_version(&set(&[A, B, C]));
        assert_eq!(
            v,
            content_version(&set(&[C, B, A])),
            "order does not matter"
        );
        let same_meaning = C.replace("2000ms", "2s");
        assert_eq!(v, content_version(&set(&[A, B, &same_meaning])));
        assert_ne!(v, content_version(&set(&[A, B])));
        for v in [v, content_version(&PolicySet::default())] {
            assert!(v > 0 && v < 1 << 53, "{v} is not a non-zero 53-bit number");
        }
    }

    #[test]
    fn replace_all_puts_a_whole_set_in_force_once() {
        let hub = Hub::without_store(Arc::new(Metrics::default()));
        assert!(!hub.policy_loaded(), "nothing to send before the first set");

        let first = hub
            .replace_all(set(&[A, B]))
            .expect("a new set is committed");
        assert_eq!(first.version, content_version(&set(&[A, B])));
        assert!(hub.policy_loaded());
        assert_eq!(hub.version(), first.version);
        assert!(hub.since_commit(first.version).is_some());
        assert_eq!(hub.replace_all(set(&[B, A])), None, "the same set again");

        let second = hub.replace_all(set(&[C])).expect("a different set");
        let (version, in_force) = hub.policy_set();
        assert_eq!(version, second.version);
        assert_eq!(in_force, set(&[C]), "what is not in the new set is gone");

        let empty = hub.replace_all(PolicySet::default()).expect("an empty set");
        assert_ne!(empty.version, 0, "an empty set is a policy too");
        assert!(hub.policy_loaded());
    }

    #[test]
    fn a_proxy_holding_what_a_new_version_means_for_it_has_acknowledged_it() {
        let hub = Hub::without_store(Arc::new(Metrics::default()));
        let v1 = hub.replace_all(set(&[A])).unwrap().version;
        let (_, hash) = hub.snapshot_for("web");
        hub.lock_proxies().insert(
            "p".into(),
            ProxyRecord {
                id: "p".into(),
                workload: "shop/web-1".into(),
                service_account: "web".into(),
                address: "10.0.0.1".into(),
                sent_version: Some(v1),
                sent_hash: Some(hash),
                acked_version: Some(v1),
                acked_at_ms: 0,
                last_nack: None,
                last_seen_ms: 0,
                connected: true,
            },
        );
        let acked = |hub: &Hub| hub.connected_proxies()[0].1;
        assert!(acked(&hub));

        // A ServerPolicy for another service account: a new version, nothing new for this proxy.
        let other = "apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {name: o, namespace: shop}\nspec: {selector: {serviceAccount: other}}\n";
        let v2 = hub.replace_all(set(&[A, other])).unwrap();
        assert!(v2.affected.is_empty(), "{v2:?}");
        assert!(
            acked(&hub),
            "it holds what version {} means for it",
            v2.version
        );

        // A TrafficPolicy changed: new for every proxy, not acknowledged until it says so.
        let v3 = hub.replace_all(set(&[C, other])).unwrap();
        assert_eq!(v3.affected, ["p"]);
        assert!(!acked(&hub));
    }

    #[test]
    fn a_hub_with_a_store_has_a_policy_from_the_start() {
        let dir = std::env::temp_dir().join(format!("trellis-hub-{}", std::process::id()));
        let (store, state) = Store::open(&dir).unwrap();
        let hub = Hub::new(store, state, Arc::new(Metrics::default()));
        assert!(hub.policy_loaded(), "an empty store is an empty policy set");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
