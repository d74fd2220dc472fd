//! The control plane's shared state and its gRPC services (policy, config, identity, tokens).
//!
//! [`Hub`] holds the policies in force (with their version), the time each version was
//! committed, and a record per connected proxy (what it was sent, acknowledged or rejected).
//! Changes are announced on a `watch` channel: each proxy stream follows it in its own task and
//! sends only the latest snapshot, so a slow or stuck proxy delays nobody but itself.

mod config_service;
mod identity_service;
mod policy_service;

pub use config_service::ConfigServer;
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

pub struct Hub {
    state: Mutex<State>,
    store: Store,
    changes: watch::Sender<u64>,
    /// When each recent version was committed, for convergence times.
    committed: Mutex<BTreeMap<u64, (Instant, u64)>>,
    proxies: Mutex<HashMap<String, ProxyRecord>>,
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

impl Hub {
    pub fn new(store: Store, state: State, metrics: Arc<Metrics>) -> Arc<Self> {
        let (changes, _) = watch::channel(state.version);
        Arc::new(Self {
            state: Mutex::new(state),
            store,
            changes,
            committed: Mutex::default(),
            proxies: Mutex::default(),
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

    /// Announces membership changes of the mesh (pods with a verified identity).
    pub fn subscribe_mesh(&self) -> watch::Receiver<u64> {
        self.mesh_changes.subscribe()
    }

    /// Records that the proxy on stream `id` is meshed (or, with `None`, no longer).
    pub fn set_meshed(&self, id: &str, endpoint: Option<pb::MeshedEndpoint>) {
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
        let mut state = self.lock_state();
        let (mut next, changed) = change(&state);
        if changed.is_empty() {
            return Ok((state.version, changed, Vec::new(), now_ms()));
        }
        next.version = state.version + 1;
        self.store.save(&next)?;
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
        let committed_at = now_ms();
        {
            let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
            committed.insert(next.version, (Instant::now(), committed_at));
            while committed.len() > 64 {
                committed.pop_first();
            }
        }
        let version = next.version;
        *state = next;
        drop(state);
        self.changes.send_replace(version);
        Ok((version, changed, affected, committed_at))
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
