//! The discovery index: Services, EndpointSlices and Pods in, one [`pb::DiscoveredDestination`]
//! per subscribable key out (`clusterIP:port` and `name.ns.svc.<domain>:port` for every service
//! port).
//!
//! Changes mark services dirty (a slice marks its service; a pod marks the services whose
//! endpoints it backs) and only dirty services are recomputed, so a rollout of one service costs
//! one service's work however large the cluster is. A destination's version is a hash of its
//! content: two replicas watching the same API server publish the same versions, and an
//! unchanged destination is never sent again.
//!
//! Pods are also destinations of their own (a call straight to a pod IP: headless services,
//! StatefulSets): [`PodAddresses`] maps each pod IP to the identity of its sidecar, and a key
//! `podIP:port` resolves to that one endpoint. A pod change is announced as the marker key
//! `@<ip>`, which a subscriber expands to the keys it holds for that IP.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use prost::Message;
use trellis_proto::pb;

use super::model::{Pod, Service, ServicePort, Slice};
use crate::kube::watch::ObjectKey;

pub type Destinations = HashMap<String, Arc<pb::DiscoveredDestination>>;
/// Pod IP → the SPIFFE ID of its sidecar (`None`: no sidecar).
pub type PodAddresses = HashMap<IpAddr, Option<Arc<str>>>;

pub struct Index {
    cluster_domain: String,
    trust_domain: String,
    services: HashMap<ObjectKey, Arc<Service>>,
    slices: HashMap<ObjectKey, Arc<Slice>>,
    /// service → its slices.
    slices_of: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    pods: HashMap<ObjectKey, Arc<Pod>>,
    /// Pod IP → the pod holding it.
    pods_by_ip: HashMap<IpAddr, ObjectKey>,
    /// pod → the services whose endpoints it backed when they were last computed.
    pod_services: HashMap<ObjectKey, HashSet<ObjectKey>>,
    /// service → the keys it published.
    keys_of: HashMap<ObjectKey, Vec<String>>,
    dirty: HashSet<ObjectKey>,
    /// Pod IPs whose pod appeared, changed or went away since the last publication.
    dirty_ips: HashSet<IpAddr>,
}

impl Index {
    pub fn new(cluster_domain: &str, trust_domain: &str) -> Self {
        Self {
            cluster_domain: cluster_domain.to_string(),
            trust_domain: trust_domain.to_string(),
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            pods: HashMap::new(),
            pods_by_ip: HashMap::new(),
            pod_services: HashMap::new(),
            keys_of: HashMap::new(),
            dirty: HashSet::new(),
            dirty_ips: HashSet::new(),
        }
    }

    pub fn service(&mut self, key: ObjectKey, service: Option<Arc<Service>>) {
        match service {
            Some(s) => self.services.insert(key.clone(), s),
            None => self.services.remove(&key),
        };
        self.dirty.insert(key);
    }

    pub fn slice(&mut self, key: ObjectKey, slice: Option<Arc<Slice>>) {
        let owner = |s: &Slice| ObjectKey {
            namespace: key.namespace.clone(),
            name: s.service.clone(),
        };
        if let Some(old) = self.slices.remove(&key) {
            let svc = owner(&old);
            if let Some(set) = self.slices_of.get_mut(&svc) {
                set.remove(&key);
                if set.is_empty() {
                    self.slices_of.remove(&svc);
                }
            }
            self.dirty.insert(svc);
        }
        if let Some(new) = slice {
            let svc = owner(&new);
            self.slices_of
                .entry(svc.clone())
                .or_default()
                .insert(key.clone());
            self.slices.insert(key, new);
            self.dirty.insert(svc);
        }
    }

    pub fn pod(&mut self, key: ObjectKey, pod: Option<Arc<Pod>>) {
        let old = match &pod {
            Some(p) => self.pods.insert(key.clone(), p.clone()),
            None => self.pods.remove(&key),
        };
        if old.as_deref() == pod.as_deref() {
            return;
        }
        for ip in old.iter().flat_map(|p| &p.ips) {
            if self.pods_by_ip.get(ip) == Some(&key) {
                self.pods_by_ip.remove(ip);
            }
            self.dirty_ips.insert(*ip);
        }
        for ip in pod.iter().flat_map(|p| &p.ips) {
            self.pods_by_ip.insert(*ip, key.clone());
            self.dirty_ips.insert(*ip);
        }
        if let Some(services) = self.pod_services.get(&key) {
            self.dirty.extend(services.iter().cloned());
        }
        if pod.is_none() {
            self.pod_services.remove(&key);
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.dirty_ips.is_empty()
    }

    /// Brings `addresses` up to date for the pod IPs that changed; returns their `@ip` markers.
    pub fn publish_pods(&mut self, addresses: &mut PodAddresses) -> Vec<String> {
        let mut changed = Vec::new();
        for ip in std::mem::take(&mut self.dirty_ips) {
            // The pod holding the address now (a reused IP may belong to a new pod).
            let holder = self
                .pods_by_ip
                .get(&ip)
                .and_then(|k| Some((k, self.pods.get(k)?)));
            let now = holder.map(|(k, p)| {
                p.meshed.then(|| {
                    Arc::from(format!(
                        "spiffe://{}/ns/{}/sa/{}",
                        self.trust_domain, k.namespace, p.service_account
                    ))
                })
            });
            let before = match now {
                Some(identity) => addresses
                    .insert(ip, identity.clone())
                    .map(|old| old != identity),
                None => addresses.remove(&ip).map(|_| true),
            };
            if before != Some(false) {
                changed.push(format!("@{ip}"));
            }
        }
        changed
    }

    /// Recomputes the dirty services into `published`; returns the keys whose destination
    /// changed, appeared or vanished.
    pub fn publish(&mut self, published: &mut Destinations) -> Vec<String> {
        let mut changed = Vec::new();
        let dirty: Vec<ObjectKey> = self.dirty.drain().collect();
        for svc in dirty {
            let fresh = self.compute(&svc);
            let old_keys = self.keys_of.remove(&svc).unwrap_or_default();
            let new_keys: HashSet<&str> = fresh.iter().map(|d| d.key.as_str()).collect();
            for key in old_keys {
                if !new_keys.contains(key.as_str()) && published.remove(&key).is_some() {
                    changed.push(key);
                }
            }
            let mut keys = Vec::with_capacity(fresh.len());
            for d in fresh {
                keys.push(d.key.clone());
                let same = published
                    .get(&d.key)
                    .is_some_and(|old| old.version == d.version);
                if !same {
                    changed.push(d.key.clone());
                    published.insert(d.key.clone(), Arc::new(d));
                }
            }
            if !keys.is_empty() {
                self.keys_of.insert(svc, keys);
            }
        }
        changed
    }

    fn compute(&mut self, svc: &ObjectKey) -> Vec<pb::DiscoveredDestination> {
        let Some(service) = self.services.get(svc).cloned() else {
            return Vec::new();
        };
        let fqdn = format!("{}.{}.svc.{}", svc.name, svc.namespace, self.cluster_domain);
        let slices: Vec<Arc<Slice>> = self
            .slices_of
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k).cloned())
            .collect();
        let mut out = Vec::new();
        for port in &service.ports {
            let mut endpoints: Vec<pb::DiscoveredEndpoint> = Vec::new();
            let mut app_protocol = port.app_protocol.clone();
            for slice in &slices {
                // A slice port matches the service port by name ("" for an unnamed one).
                let Some(sp) = slice.ports.iter().find(|p| p.name == port.name) else {
                    continue;
                };
                if app_protocol.is_none() {
                    app_protocol.clone_from(&sp.app_protocol);
                }
                for e in slice.endpoints.iter().filter(|e| e.ready) {
                    let identity = e.pod.as_ref().and_then(|name| {
                        let key = ObjectKey {
                            namespace: svc.namespace.clone(),
                            name: name.clone(),
                        };
                        self.pod_services
                            .entry(key.clone())
                            .or_default()
                            .insert(svc.clone());
                        let pod = self.pods.get(&key)?;
                        pod.meshed.then(|| {
                            format!(
                                "spiffe://{}/ns/{}/sa/{}",
                                self.trust_domain, svc.namespace, pod.service_account
                            )
                        })
                    });
                    for ip in &e.addresses {
                        endpoints.push(pb::DiscoveredEndpoint {
                            address: SocketAddr::new(*ip, sp.port).to_string(),
                            identity: identity.clone().unwrap_or_default(),
                        });
                    }
                }
            }
            endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            endpoints.dedup_by(|a, b| a.address == b.address);
            let mut dest = pb::DiscoveredDestination {
                key: String::new(),
                authority: format!("{fqdn}:{}", port.port),
                version: 0,
                protocol: protocol_of(port, app_protocol.as_deref(), &service) as i32,
                endpoints,
            };
            dest.version = content_version(&dest);
            let mut keys: Vec<String> = service
                .cluster_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, port.port).to_string())
                .collect();
            keys.push(dest.authority.clone());
            for key in keys {
                out.push(pb::DiscoveredDestination {
                    key,
                    ..dest.clone()
                });
            }
        }
        out
    }
}

/// `appProtocol` (Kubernetes' standard names and the common bare ones) and the opaque-ports
/// annotation → the protocol hint.
fn protocol_of(port: &ServicePort, app_protocol: Option<&str>, service: &Service) -> pb::Protocol {
    if service.opaque_ports.contains(&port.port) {
        return pb::Protocol::Opaque;
    }
    match app_protocol.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "http1" | "http/1.1") => pb::Protocol::Http1,
        Some("kubernetes.io/h2c" | "http2" | "h2c") => pb::Protocol::Http2,
        Some("grpc") => pb::Protocol::Grpc,
        Some("tcp" | "opaque" | "mysql" | "redis" | "mongo" | "postgres" | "kafka") => {
            pb::Protocol::Opaque
        }
        _ => pb::Protocol::Auto,
    }
}

/// A 53-bit FNV-1a hash of everything but the key (JSON-safe, never 0).
pub(super) fn content_version(d: &pb::DiscoveredDestination) -> u64 {
    let bytes = d.encode_to_vec();
    let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    (h & ((1 << 53) - 1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::model::SliceEndpoint;

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn pod(ip: &str, meshed: bool) -> Arc<Pod> {
        Arc::new(Pod {
            service_account: "web".into(),
            meshed,
            ips: vec![ip.parse().unwrap()],
        })
    }

    #[test]
    fn pod_addresses_carry_their_sidecars_identity_and_announce_changes() {
        let mut index = Index::new("cluster.local", "td");
        let mut addresses = PodAddresses::new();
        index.pod(key("shop", "web-1"), Some(pod("10.1.0.1", true)));
        index.pod(key("shop", "plain"), Some(pod("10.1.0.2", false)));
        let mut changed = index.publish_pods(&mut addresses);
        changed.sort();
        assert_eq!(changed, ["@10.1.0.1", "@10.1.0.2"]);
        assert_eq!(
            addresses[&"10.1.0.1".parse::<IpAddr>().unwrap()].as_deref(),
            Some("spiffe://td/ns/shop/sa/web")
        );
        assert_eq!(addresses[&"10.1.0.2".parse::<IpAddr>().unwrap()], None);
        // The same pod again: nothing to announce.
        index.pod(key("shop", "web-1"), Some(pod("10.1.0.1", true)));
        assert!(index.publish_pods(&mut addresses).is_empty());
        // Gone: the address is unknown again.
        index.pod(key("shop", "web-1"), None);
        assert_eq!(index.publish_pods(&mut addresses), ["@10.1.0.1"]);
        assert!(!addresses.contains_key(&"10.1.0.1".parse::<IpAddr>().unwrap()));
    }

    fn web() -> Arc<Service> {
        Arc::new(Service {
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                app_protocol: None,
            }],
            opaque_ports: vec![],
        })
    }

    fn slice(eps: &[(&str, bool, &str)]) -> Arc<Slice> {
        Arc::new(Slice {
            service: "web".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 8080,
                app_protocol: Some("http".into()),
            }],
            endpoints: eps
                .iter()
                .map(|(ip, ready, pod)| SliceEndpoint {
                    addresses: vec![ip.parse().unwrap()],
                    ready: *ready,
                    pod: Some(pod.to_string()),
                })
                .collect(),
        })
    }

    #[test]
    fn ready_endpoints_with_identities_under_both_keys_and_only_changes_republished() {
        let mut index = Index::new("cluster.local", "td");
        let mut published = Destinations::new();
        index.pod(key("shop", "web-1"), Some(pod("10.1.0.1", true)));
        index.pod(key("shop", "web-2"), Some(pod("10.1.0.2", false)));
        index.service(key("shop", "web"), Some(web()));
        index.slice(
            key("shop", "web-abc"),
            Some(slice(&[
                ("10.1.0.1", true, "web-1"),
                ("10.1.0.2", true, "web-2"),
                ("10.1.0.3", false, "web-3"),
            ])),
        );
        let mut changed = index.publish(&mut published);
        changed.sort();
        assert_eq!(changed, ["10.96.0.10:80", "web.shop.svc.cluster.local:80"]);
        let d = &published["10.96.0.10:80"];
        assert_eq!(d.authority, "web.shop.svc.cluster.local:80");
        assert_eq!(d.protocol, pb::Protocol::Http1 as i32, "slice appProtocol");
        let eps: Vec<(&str, &str)> = d
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.identity.as_str()))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.1.0.1:8080", "spiffe://td/ns/shop/sa/web"),
                ("10.1.0.2:8080", "")
            ]
        );
        assert_eq!(
            d.version,
            published["web.shop.svc.cluster.local:80"].version
        );

        // Re-applying the same objects changes nothing.
        index.service(key("shop", "web"), Some(web()));
        assert!(index.publish(&mut published).is_empty());

        // A pod getting meshed changes its service's destination.
        let before = published["10.96.0.10:80"].version;
        index.pod(key("shop", "web-2"), Some(pod("10.1.0.2", true)));
        assert_eq!(index.publish(&mut published).len(), 2);
        assert_ne!(published["10.96.0.10:80"].version, before);

        // Deleting the service withdraws both keys.
        index.service(key("shop", "web"), None);
        assert_eq!(index.publish(&mut published).len(), 2);
        assert!(published.is_empty());
    }
}
