//! The current policy snapshot, its compiled routes, and the state that outlives reloads
//! (retry budgets per policy, endpoint health).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;
use trellis_proto::policy::{self, PolicySet};

use super::routes::{ClientScope, Route, RouteTable};
use crate::balance::{Balancer, EndpointRegistry};
use crate::retry::Budget;

/// One version of the policy, compiled for lookups.
pub struct Snapshot {
    /// A content hash; `none` before any policy was loaded.
    pub version: String,
    /// Where it came from: `none` or `file:<path>`.
    pub source: String,
    pub loaded_at: Option<SystemTime>,
    pub set: PolicySet,
    pub routes: RouteTable,
    /// Inbound ports that skip protocol detection (ServerPolicies selecting this workload).
    pub inbound_opaque_ports: Vec<u16>,
    /// The ServerPolicies selecting this workload (its namespace and service account).
    pub inbound_servers: Vec<policy::ServerPolicy>,
    /// Pods the control plane knows to be meshed: calls to them use mutual TLS unless a
    /// TrafficPolicy's `tls` says otherwise.
    pub meshed: Meshed,
}

/// A meshed pod: the identity its proxy proved, and its ports that stay plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    pub identity: Arc<str>,
    pub plaintext_ports: Vec<u16>,
}

pub type Meshed = Arc<HashMap<IpAddr, MeshPeer>>;

impl Snapshot {
    /// The identity a call on `route` to `addr` must reach, if it goes over mutual TLS: the
    /// policy's `tls` when it has one, else the control plane's knowledge of meshed pods (when
    /// `auto` — this proxy has an identity to present).
    /// For an endpoint discovery knows (`discovered`), automatic mutual TLS expects the
    /// identity discovery names for it (its pod's service account).
    pub fn mtls_identity(
        &self,
        route: &Route,
        addr: SocketAddr,
        auto: bool,
        discovered: Option<&crate::discovery::Resolved>,
    ) -> Option<Arc<str>> {
        let known = || {
            discovered.and_then(|d| d.identity(addr)).or_else(|| {
                self.meshed
                    .get(&addr.ip())
                    .filter(|peer| !peer.plaintext_ports.contains(&addr.port()))
                    .map(|peer| peer.identity.clone())
            })
        };
        match (&route.policy.tls, &route.mtls_identity) {
            // `mode: mutual` without a serverIdentity: the pod's proven identity if known.
            (Some(tls), Some(any)) if tls.server_identity.is_none() => {
                known().or(Some(any.clone()))
            }
            (Some(_), pinned) => pinned.clone(),
            (None, _) if auto => known(),
            (None, _) => None,
        }
    }
}

pub struct PolicyStore {
    tx: watch::Sender<Arc<Snapshot>>,
    pub scope: ClientScope,
    service_account: Option<String>,
    endpoints: EndpointRegistry,
    budgets: Mutex<HashMap<String, (policy::Budget, Arc<Budget>)>>,
    /// The built-in default route's budgets, one per original destination (bounded).
    default_budgets: Mutex<HashMap<SocketAddr, Arc<Budget>>>,
    default_route: Arc<Route>,
}

impl PolicyStore {
    pub fn new(scope: ClientScope, service_account: Option<String>) -> Arc<Self> {
        let default_route = Arc::new(Route::builtin_default(Arc::new(Budget::default())));
        let empty = Snapshot {
            version: "none".into(),
            source: "none".into(),
            loaded_at: None,
            set: PolicySet::default(),
            routes: RouteTable::new(Vec::new(), default_route.clone(), &scope),
            inbound_opaque_ports: Vec::new(),
            inbound_servers: Vec::new(),
            meshed: Meshed::default(),
        };
        let (tx, _) = watch::channel(Arc::new(empty));
        Arc::new(Self {
            tx,
            scope,
            service_account,
            endpoints: EndpointRegistry::default(),
            budgets: Mutex::default(),
            default_budgets: Mutex::default(),
            default_route,
        })
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Compiles `set` and puts it in force (no meshed pods: a policy file).
    pub fn apply(&self, set: PolicySet, version: String, source: String) {
        self.apply_with_mesh(set, version, source, Meshed::default());
    }

    /// Compiles `set` and puts it in force with the meshed pods the control plane sent.
    pub fn apply_with_mesh(&self, set: PolicySet, version: String, source: String, meshed: Meshed) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let mut keep_budgets = HashMap::new();
        let mut all_endpoints = Vec::new();
        let routes = set
            .traffic
            .iter()
            .map(|p| {
                let name = format!("{}/{}", p.namespace, p.name);
                // A budget survives a reload unless its settings changed.
                let budget = match budgets.remove(&name) {
                    Some((cfg, b)) if cfg == p.retries.budget => b,
                    _ => Arc::new(Budget::new(&p.retries.budget)),
                };
                keep_budgets.insert(name.clone(), (p.retries.budget, budget.clone()));
                all_endpoints.extend_from_slice(&p.destination.endpoints);
                let balancer = (!p.destination.endpoints.is_empty())
                    .then(|| Balancer::new(&p.destination.endpoints, &self.endpoints));
                Arc::new(Route::new(p.clone(), budget, balancer))
            })
            .collect();
        *budgets = keep_budgets;
        self.endpoints.retain(&all_endpoints);
        let inbound_servers: Vec<policy::ServerPolicy> = set
            .server
            .iter()
            .filter(|s| {
                s.namespace == self.scope.namespace
                    && (s.selector.service_account.is_none()
                        || s.selector.service_account == self.service_account)
            })
            .cloned()
            .collect();
        let inbound_opaque_ports = inbound_servers
            .iter()
            .flat_map(|s| s.opaque_ports.iter().copied())
            .collect();
        let snapshot = Snapshot {
            version,
            source,
            loaded_at: Some(SystemTime::now()),
            routes: RouteTable::new(routes, self.default_route.clone(), &self.scope),
            set,
            inbound_opaque_ports,
            inbound_servers,
            meshed,
        };
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// The retry budget for a call on `route` to `dst`: the policy's own, or for the built-in
    /// default one per destination, so that a failing destination spends only its own retries.
    pub fn budget_for(&self, route: &Route, dst: SocketAddr) -> Arc<Budget> {
        if !route.builtin {
            return route.budget.clone();
        }
        const MAX_DESTINATIONS: usize = 10_000;
        let mut budgets = self
            .default_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if budgets.len() >= MAX_DESTINATIONS && !budgets.contains_key(&dst) {
            // Bounded memory: start over rather than grow (budgets refill within 10 s anyway).
            budgets.clear();
        }
        budgets.entry(dst).or_default().clone()
    }

    /// What `/config` shows about policy: version, source, content, and endpoint health.
    pub fn config_json(&self) -> serde_json::Value {
        let s = self.current();
        let mut endpoints = Vec::new();
        for route in s.routes.all() {
            if let Some(b) = &route.balancer {
                for e in b.endpoints() {
                    let (latency, pending, ejected_for) = e.snapshot();
                    endpoints.push(serde_json::json!({
                        "policy": route.name,
                        "address": e.addr.to_string(),
                        "latencyEwmaMs": latency.as_secs_f64() * 1e3,
                        "inFlight": pending,
                        "ejectedForMs": ejected_for.map(|d| d.as_millis() as u64),
                    }));
                }
            }
        }
        endpoints.sort_by_key(|e| e.to_string());
        endpoints.dedup();
        serde_json::json!({
            "version": s.version,
            "source": s.source,
            "loadedAt": s.loaded_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "policy": s.set,
            "endpoints": endpoints,
            "meshedPods": s.meshed.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::policy::PolicySet;

    #[test]
    fn meshed_pods_get_mutual_tls_unless_a_policy_says_otherwise() {
        let store = PolicyStore::new(
            ClientScope {
                namespace: "default".into(),
                cluster_domain: "cluster.local".into(),
            },
            None,
        );
        let set = PolicySet::parse(
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: plain}\nspec: {destination: {addresses: [\"10.0.0.1:81\"]}, tls: {mode: disabled}}\n---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: any}\nspec: {destination: {addresses: [\"10.0.0.1:82\", \"10.0.0.9:82\"]}, tls: {mode: mutual}}\n",
        )
        .unwrap();
        let web: Arc<str> = Arc::from("spiffe://cluster.local/ns/default/sa/web");
        let meshed = HashMap::from([(
            "10.0.0.1".parse().unwrap(),
            MeshPeer {
                identity: web.clone(),
                plaintext_ports: vec![4191],
            },
        )]);
        store.apply_with_mesh(set, "v1".into(), "test".into(), Arc::new(meshed));
        let s = store.current();
        let id = |addr: &str, auto| {
            let addr: SocketAddr = addr.parse().unwrap();
            let route = s.routes.route(None, addr, &store.scope, None).clone();
            s.mtls_identity(&route, addr, auto, None)
        };
        assert_eq!(id("10.0.0.1:80", true), Some(web.clone()), "meshed pod");
        assert_eq!(id("10.0.0.1:80", false), None, "this proxy has no identity");
        assert_eq!(id("10.0.0.1:4191", true), None, "its admin port");
        assert_eq!(id("10.0.0.2:80", true), None, "not meshed");
        assert_eq!(id("10.0.0.1:81", true), None, "tls: disabled");
        assert_eq!(
            id("10.0.0.1:82", true),
            Some(web),
            "mutual: the proven identity"
        );
        assert_eq!(
            id("10.0.0.9:82", true).as_deref(),
            Some("*"),
            "mutual: any mesh identity"
        );
    }

    #[test]
    fn the_default_route_has_a_budget_per_destination_and_policies_share_theirs() {
        let store = PolicyStore::new(
            ClientScope {
                namespace: "default".into(),
                cluster_domain: "cluster.local".into(),
            },
            None,
        );
        let set = PolicySet::parse(
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {destination: {host: web}}\n",
        )
        .unwrap();
        store.apply(set, "v1".into(), "test".into());
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let s = store.current();
        let default = s.routes.route(None, a, &store.scope, None).clone();
        assert!(default.builtin);
        // A failing destination spends its own budget only.
        let budget_a = store.budget_for(&default, a);
        let mut spent = 0;
        while budget_a.try_withdraw() {
            spent += 1;
        }
        assert_eq!(spent, 10, "one second of the 10/s reserve");
        assert!(
            store.budget_for(&default, b).try_withdraw(),
            "another destination still has retries"
        );
        assert!(Arc::ptr_eq(&budget_a, &store.budget_for(&default, a)));
        let web = s.routes.route(Some("web"), a, &store.scope, None).clone();
        assert!(
            Arc::ptr_eq(&store.budget_for(&web, a), &store.budget_for(&web, b)),
            "a policy's budget is shared by its calls"
        );
    }
}
