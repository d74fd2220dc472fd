//! Discovery (`serve --kubernetes`): services, endpoints and identities learned from the
//! Kubernetes API and served to proxies on demand over `DiscoveryService.Watch`.
//!
//! - [`model`]: the fields kept from Services, EndpointSlices and Pods;
//! - [`index`]: those objects → one destination per subscribable key, recomputed per service;
//! - [`service`]: the gRPC stream — a proxy subscribes to the keys it meets and is sent only
//!   what changed for them, each update ACKed or NACKed.
//!
//! [`Discovery`] is what the two sides share: the published destinations (and pod addresses,
//! for calls straight to a pod IP), and a short log of which keys changed in each generation, so
//! a stream wakes up, reads the keys that changed since it last looked, and sends the ones it
//! subscribes to. A pod change that no stream holds a key for makes no generation at all: pods
//! come and go all the time, and most are never called by address.

pub mod index;
pub mod model;
pub mod service;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use trellis_proto::pb;

use crate::admin::Metrics;
use crate::kube::KubeClient;
use crate::kube::watch::{self as reflector, Event, Watched};
use index::{Destinations, Index, PodAddresses};

/// `trellis_control_discovery_*`: what the discovery streams carry.
pub struct DiscoveryMetrics {
    pub subscriptions: Gauge,
    updates: Counter,
    update_bytes: Counter,
    answers: Family<AnswerLabels, Counter>,
    pub destinations: Gauge,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AnswerLabels {
    result: &'static str,
}

impl DiscoveryMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            subscriptions: Gauge::default(),
            updates: Counter::default(),
            update_bytes: Counter::default(),
            answers: Family::default(),
            destinations: Gauge::default(),
        };
        registry.register(
            "discovery_subscriptions",
            "Keys (destinations) proxies subscribe to, over all discovery streams",
            this.subscriptions.clone(),
        );
        registry.register(
            "discovery_updates",
            "Discovery updates sent to proxies",
            this.updates.clone(),
        );
        registry.register(
            "discovery_update_bytes",
            "Encoded size of the discovery updates sent",
            this.update_bytes.clone(),
        );
        registry.register(
            "discovery_answers",
            "Proxy answers to discovery updates: ack or nack",
            this.answers.clone(),
        );
        registry.register(
            "discovery_destinations",
            "Destinations (service port × key) discovery publishes",
            this.destinations.clone(),
        );
        this
    }

    pub fn update(&self, bytes: usize) {
        self.updates.inc();
        self.update_bytes.inc_by(bytes as u64);
    }

    pub fn answer(&self, ack: bool) {
        self.answers
            .get_or_create(&AnswerLabels {
                result: if ack { "ack" } else { "nack" },
            })
            .inc();
    }
}

/// Generations kept in the change log; a stream further behind re-checks all its keys.
const LOG_GENERATIONS: usize = 1024;

pub struct Discovery {
    destinations: RwLock<Destinations>,
    pods: RwLock<PodAddresses>,
    /// How many subscriptions (over all streams) name each IP: a pod change nobody holds a key
    /// for wakes no stream.
    interest: Mutex<HashMap<IpAddr, usize>>,
    log: Mutex<VecDeque<(u64, Vec<String>)>>,
    generation: watch::Sender<u64>,
    synced: watch::Sender<bool>,
}

impl Discovery {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            destinations: RwLock::default(),
            pods: RwLock::default(),
            interest: Mutex::default(),
            log: Mutex::default(),
            generation: watch::channel(0).0,
            synced: watch::channel(false).0,
        })
    }

    /// The destination `key` names: a service port (its ClusterIP or DNS name), else — for
    /// `podIP:port` — that one pod, with its sidecar's identity (none on the proxy's own admin
    /// port, which stays plaintext).
    pub fn get(&self, key: &str) -> Option<Arc<pb::DiscoveredDestination>> {
        if let Some(d) = self
            .destinations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Some(d.clone());
        }
        let addr: SocketAddr = key.parse().ok()?;
        let identity = self
            .pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr.ip())?
            .clone()
            .filter(|_| addr.port() != crate::inject::ADMIN_PORT);
        let mut d = pb::DiscoveredDestination {
            key: key.to_string(),
            authority: key.to_string(),
            version: 0,
            protocol: pb::Protocol::Auto as i32,
            endpoints: vec![pb::DiscoveredEndpoint {
                address: addr.to_string(),
                identity: identity.as_deref().unwrap_or_default().to_string(),
            }],
        };
        d.version = index::content_version(&d);
        Some(Arc::new(d))
    }

    fn len(&self) -> usize {
        self.destinations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Becomes true once Services, EndpointSlices and Pods have all been listed: before that, a
    /// key that is not there yet is not known to be absent.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// The keys changed after generation `since`, or `None` when the log no longer reaches back
    /// that far.
    pub fn changed_since(&self, since: u64) -> Option<Vec<String>> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        match log.front() {
            Some((oldest, _)) if *oldest > since + 1 => None,
            _ => Some(
                log.iter()
                    .filter(|(g, _)| *g > since)
                    .flat_map(|(_, keys)| keys.iter().cloned())
                    .collect(),
            ),
        }
    }

    /// Runs `index.publish` under the write lock and announces what changed.
    fn publish(&self, index: &mut Index) {
        let mut changed = {
            let mut destinations = self.destinations.write().unwrap_or_else(|p| p.into_inner());
            index.publish(&mut destinations)
        };
        let markers = {
            let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
            index.publish_pods(&mut pods)
        };
        let interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        changed.extend(markers.into_iter().filter(|m| {
            m[1..]
                .parse::<IpAddr>()
                .is_ok_and(|ip| interest.contains_key(&ip))
        }));
        drop(interest);
        if changed.is_empty() {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let generation = *self.generation.borrow() + 1;
        tracing::debug!(generation, keys = changed.len(), "discovery changed");
        log.push_back((generation, changed));
        while log.len() > LOG_GENERATIONS {
            log.pop_front();
        }
        drop(log);
        self.generation.send_replace(generation);
    }

    /// Counts a subscription to (`+1`) or from (`-1`) a key for `ip`.
    fn interest(&self, ip: IpAddr, delta: isize) {
        let mut interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        let n = interest.entry(ip).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            interest.remove(&ip);
        }
    }
}

/// Watches Services, EndpointSlices and Pods (all namespaces) and keeps `discovery` current.
/// Until all three are listed nothing is published; while the API server is away the last
/// published destinations stay.
pub fn run(
    kube: Arc<KubeClient>,
    metrics: Arc<Metrics>,
    discovery: Arc<Discovery>,
    cluster_domain: &str,
    trust_domain: &str,
) -> tokio::task::JoinHandle<()> {
    let (svc_tx, mut services) = mpsc::unbounded_channel::<Event<model::Service>>();
    let (slice_tx, mut slices) = mpsc::unbounded_channel::<Event<model::Slice>>();
    let (pod_tx, mut pods) = mpsc::unbounded_channel::<Event<model::Pod>>();
    let watched = |resource: &'static str, path: &str| Watched {
        resource,
        path: path.to_string(),
    };
    reflector::spawn(
        kube.clone(),
        watched("services", "/api/v1/services"),
        metrics.clone(),
        svc_tx,
    );
    reflector::spawn(
        kube.clone(),
        watched("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices"),
        metrics.clone(),
        slice_tx,
    );
    reflector::spawn(
        kube,
        watched("pods", "/api/v1/pods"),
        metrics.clone(),
        pod_tx,
    );
    let mut index = Index::new(cluster_domain, trust_domain);
    let metrics_gauge = metrics.discovery.destinations.clone();
    tokio::spawn(async move {
        let mut synced = [false; 3];
        loop {
            // One event (waiting), then everything already queued: a burst is one publication.
            tokio::select! {
                Some(e) = services.recv() => apply_service(&mut index, &mut synced, e),
                Some(e) = slices.recv() => apply_slice(&mut index, &mut synced, e),
                Some(e) = pods.recv() => apply_pod(&mut index, &mut synced, e),
                else => return,
            }
            for _ in 0..100_000 {
                if let Ok(e) = services.try_recv() {
                    apply_service(&mut index, &mut synced, e);
                } else if let Ok(e) = slices.try_recv() {
                    apply_slice(&mut index, &mut synced, e);
                } else if let Ok(e) = pods.try_recv() {
                    apply_pod(&mut index, &mut synced, e);
                } else {
                    break;
                }
            }
            if synced.iter().all(|s| *s) {
                if index.has_changes() {
                    discovery.publish(&mut index);
                    metrics_gauge.set(discovery.len() as i64);
                }
                if !*discovery.synced.borrow() {
                    tracing::info!(
                        destinations = discovery.len(),
                        "discovery synced with the Kubernetes API"
                    );
                    discovery.synced.send_replace(true);
                }
            }
        }
    })
}

fn apply_service(index: &mut Index, synced: &mut [bool; 3], e: Event<model::Service>) {
    match e {
        Event::Applied(k, v) => index.service(k, Some(v)),
        Event::Deleted(k) => index.service(k, None),
        Event::Synced => synced[0] = true,
    }
}

fn apply_slice(index: &mut Index, synced: &mut [bool; 3], e: Event<model::Slice>) {
    match e {
        Event::Applied(k, v) => index.slice(k, Some(v)),
        Event::Deleted(k) => index.slice(k, None),
        Event::Synced => synced[1] = true,
    }
}

fn apply_pod(index: &mut Index, synced: &mut [bool; 3], e: Event<model::Pod>) {
    match e {
        Event::Applied(k, v) => index.pod(k, Some(v)),
        Event::Deleted(k) => index.pod(k, None),
        Event::Synced => synced[2] = true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::watch::ObjectKey;

    #[test]
    fn pod_changes_wake_streams_only_when_someone_holds_a_key_for_the_pod() {
        let discovery = Discovery::new();
        let mut index = Index::new("cluster.local", "td");
        let pod = |ip: &str, sa: &str| {
            Some(Arc::new(model::Pod {
                service_account: sa.into(),
                meshed: true,
                ips: vec![ip.parse().unwrap()],
            }))
        };
        let key = |name: &str| ObjectKey {
            namespace: "shop".into(),
            name: name.into(),
        };
        index.pod(key("a"), pod("10.1.0.1", "web"));
        discovery.publish(&mut index);
        assert_eq!(
            *discovery.subscribe().borrow(),
            0,
            "nobody asked about 10.1.0.1"
        );
        let d = discovery.get("10.1.0.1:8080").expect("a known pod");
        assert_eq!(d.endpoints[0].identity, "spiffe://td/ns/shop/sa/web");
        assert_eq!(
            discovery.get("10.1.0.1:4191").unwrap().endpoints[0].identity,
            "",
            "the proxy's admin port stays plaintext"
        );

        discovery.interest("10.1.0.1".parse().unwrap(), 1);
        index.pod(key("a"), None);
        // The address is reused by another workload's pod in the same burst.
        index.pod(key("b"), pod("10.1.0.1", "api"));
        discovery.publish(&mut index);
        assert_eq!(*discovery.subscribe().borrow(), 1);
        assert_eq!(
            discovery.changed_since(0).unwrap(),
            ["@10.1.0.1"],
            "one marker for the address"
        );
        assert!(
            discovery.get("10.1.0.1:8080").is_some(),
            "held by pod b now"
        );
    }
}
