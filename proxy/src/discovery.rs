//! Discovery: where a destination's endpoints are and who they are, from the control plane's
//! `DiscoveryService` (Kubernetes Services, EndpointSlices and Pods).
//!
//! Subscriptions are on demand. The first outbound connection to an address (a ClusterIP:port)
//! subscribes to it and waits up to `--discovery-timeout` for the answer; every later connection
//! to it finds the answer in place, and the control plane pushes changes as they happen. Each
//! address has one [`Target`] whose content is swapped atomically on an update: connections
//! keep their `Target`, so a long-lived connection follows endpoint changes, and a request in
//! flight keeps the endpoint it picked (removed endpoints drain — they get no new requests).
//!
//! An address the control plane does not know (a pod IP, something outside the cluster) is
//! answered as absent and called directly, as is everything while the control plane cannot be
//! reached — except addresses already resolved, which keep their last known endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use trellis_proto::pb;
use trellis_proto::pb::discovery_service_client::DiscoveryServiceClient;
use trellis_proto::policy::Protocol;

use crate::balance::{Balancer, EndpointRegistry};

/// Addresses one proxy tracks; beyond this new addresses are called directly.
const MAX_TARGETS: usize = 10_000;

/// One service port as the control plane described it.
pub struct Resolved {
    /// `name.namespace.svc.<cluster domain>:port`: the metrics `destination` label, and the
    /// host a TrafficPolicy for the service matches.
    pub authority: Arc<str>,
    pub version: u64,
    pub protocol: Protocol,
    pub balancer: Balancer,
    /// Endpoint → the SPIFFE ID of its proxy; endpoints without a sidecar are absent.
    identities: HashMap<SocketAddr, Arc<str>>,
}

impl Resolved {
    /// The identity a call to `addr` must reach over mutual TLS; `None`: the pod has no
    /// sidecar, the call is plaintext.
    pub fn identity(&self, addr: SocketAddr) -> Option<Arc<str>> {
        self.identities.get(&addr).cloned()
    }
}

/// What one subscribed address resolves to, now.
pub struct Target {
    key: String,
    current: RwLock<Option<Arc<Resolved>>>,
    answered: AtomicBool,
    notify: Notify,
}

impl Target {
    /// The destination in force (`None`: not a known service; call the original destination).
    pub fn current(&self) -> Option<Arc<Resolved>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, resolved: Option<Arc<Resolved>>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = resolved;
        self.answered.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

pub struct Discovery {
    targets: RwLock<HashMap<SocketAddr, Arc<Target>>>,
    subscribe: mpsc::UnboundedSender<String>,
    receiver: std::sync::Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    connected: AtomicBool,
    /// True once the stream has opened, or the control plane said it serves no discovery.
    settled: tokio::sync::watch::Sender<bool>,
    timeout: Duration,
    registry: EndpointRegistry,
}

impl Discovery {
    pub fn new(timeout: Duration) -> Arc<Self> {
        let (subscribe, receiver) = mpsc::unbounded_channel();
        Arc::new(Self {
            targets: RwLock::default(),
            subscribe,
            receiver: std::sync::Mutex::new(Some(receiver)),
            connected: AtomicBool::new(false),
            settled: tokio::sync::watch::channel(false).0,
            timeout,
            registry: EndpointRegistry::default(),
        })
    }

    /// The target for an outbound connection to `addr`. A new address is subscribed to, and —
    /// when the control plane is connected — waited for up to the discovery timeout.
    pub async fn lookup(&self, addr: SocketAddr) -> Option<Arc<Target>> {
        let existing = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .cloned();
        let target = match existing {
            Some(t) => t,
            None => {
                let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = targets.get(&addr) {
                    t.clone()
                } else {
                    if targets.len() >= MAX_TARGETS {
                        tracing::debug!(%addr, limit = MAX_TARGETS, "discovery: too many destinations tracked; calling directly");
                        return None;
                    }
                    let t = Arc::new(Target {
                        key: addr.to_string(),
                        current: RwLock::new(None),
                        answered: AtomicBool::new(false),
                        notify: Notify::new(),
                    });
                    targets.insert(addr, t.clone());
                    let _ = self.subscribe.send(t.key.clone());
                    t
                }
            }
        };
        if !target.answered.load(Ordering::Acquire)
            && self.connected.load(Ordering::Acquire)
            && !self.timeout.is_zero()
        {
            let notified = target.notify.notified();
            if !target.answered.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(self.timeout, notified).await;
            }
        }
        Some(target)
    }

    /// Waits (at most `limit`) until discovery is usable or known to be absent, so a proxy does
    /// not turn ready and send the app's first calls past it.
    pub async fn settled(&self, limit: Duration) -> bool {
        let mut settled = self.settled.subscribe();
        tokio::time::timeout(limit, settled.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// What `/config` shows: every tracked address and its endpoints.
    pub fn config_json(&self) -> serde_json::Value {
        let targets = self.targets.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<serde_json::Value> = targets
            .values()
            .map(|t| match t.current() {
                Some(r) => serde_json::json!({
                    "key": t.key,
                    "authority": &*r.authority,
                    "version": r.version,
                    "protocol": format!("{:?}", r.protocol).to_ascii_lowercase(),
                    "endpoints": r.balancer.endpoints().iter().map(|e| serde_json::json!({
                        "address": e.addr.to_string(),
                        "identity": r.identities.get(&e.addr).map(|i| i.to_string()),
                    })).collect::<Vec<_>>(),
                }),
                None => serde_json::json!({
                    "key": t.key,
                    "absent": t.answered.load(Ordering::Acquire),
                }),
            })
            .collect();
        list.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        serde_json::json!({
            "connected": self.connected.load(Ordering::Acquire),
            "destinations": list,
        })
    }

    /// Applies one update: all of it, or (NACK) none of it. Returns the number of destinations
    /// and absent keys it answered.
    pub fn apply(&self, update: &pb::DiscoveryUpdate) -> Result<usize, String> {
        let mut parsed = Vec::with_capacity(update.destinations.len());
        for d in &update.destinations {
            let key: SocketAddr = d
                .key
                .parse()
                .map_err(|_| format!("destination {:?}: key is not ip:port", d.key))?;
            let mut addrs = Vec::with_capacity(d.endpoints.len());
            let mut identities = HashMap::new();
            for (i, e) in d.endpoints.iter().enumerate() {
                let addr: SocketAddr = e.address.parse().map_err(|_| {
                    format!(
                        "destination {}: endpoints[{i}].address {:?} is not ip:port",
                        d.key, e.address
                    )
                })?;
                if !e.identity.is_empty() {
                    e.identity
                        .parse::<trellis_identity::SpiffeId>()
                        .map_err(|err| {
                            format!(
                                "destination {}: endpoints[{i}].identity {:?}: {err}",
                                d.key, e.identity
                            )
                        })?;
                    identities.insert(addr, Arc::from(e.identity.as_str()));
                }
                addrs.push(addr);
            }
            let protocol = match pb::Protocol::try_from(d.protocol) {
                Ok(pb::Protocol::Http1) => Protocol::Http1,
                Ok(pb::Protocol::Http2) => Protocol::Http2,
                Ok(pb::Protocol::Grpc) => Protocol::Grpc,
                Ok(pb::Protocol::Opaque) => Protocol::Opaque,
                // Unknown values from a newer control plane: detect as usual.
                _ => Protocol::Auto,
            };
            parsed.push((key, addrs, identities, protocol, d));
        }
        let targets = self.targets.read().unwrap_or_else(|p| p.into_inner());
        let n = parsed.len() + update.absent.len();
        for (key, addrs, identities, protocol, d) in parsed {
            let Some(target) = targets.get(&key) else {
                continue;
            };
            target.set(Some(Arc::new(Resolved {
                authority: Arc::from(d.authority.as_str()),
                version: d.version,
                protocol,
                balancer: Balancer::new(&addrs, &self.registry),
                identities,
            })));
        }
        for key in &update.absent {
            if let Some(target) = key.parse().ok().and_then(|k: SocketAddr| targets.get(&k)) {
                target.set(None);
            }
        }
        // Endpoint state (latency, ejections) is kept for endpoints still in use.
        let in_use: Vec<SocketAddr> = targets
            .values()
            .filter_map(|t| t.current())
            .flat_map(|r| {
                r.balancer
                    .endpoints()
                    .iter()
                    .map(|e| e.addr)
                    .collect::<Vec<_>>()
            })
            .collect();
        self.registry.retain(&in_use);
        Ok(n)
    }

    fn all_keys(&self) -> Vec<String> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|t| t.key.clone())
            .collect()
    }

    /// Wakes everyone waiting for an answer (the stream is down: they call directly).
    fn release_waiters(&self) {
        for t in self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            t.notify.notify_waiters();
        }
    }
}

/// Follows the control plane's discovery stream until the process exits: reconnects with
/// jittered backoff (250 ms doubling to 10 s) and subscribes again to every tracked address.
/// A control plane without discovery (not in Kubernetes mode) is asked again every minute.
pub async fn follow(discovery: Arc<Discovery>, channel: Channel, workload: String) {
    let Some(mut keys) = discovery
        .receiver
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return;
    };
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(10);
    let mut backoff = FIRST;
    loop {
        let mut delivered = false;
        let result = session(
            &discovery,
            channel.clone(),
            &workload,
            &mut keys,
            &mut delivered,
        )
        .await;
        discovery.connected.store(false, Ordering::Release);
        discovery.release_waiters();
        let pause = match result {
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::debug!("the control plane serves no discovery (not in Kubernetes mode)");
                discovery.settled.send_replace(true);
                Duration::from_secs(60)
            }
            Err(status) => {
                tracing::warn!(error = %trellis_identity::grpc::status_cause(&status), "discovery stream failed; keeping the endpoints in force");
                if delivered {
                    backoff = FIRST;
                }
                let ms = backoff.as_millis() as u64;
                backoff = (backoff * 2).min(MAX);
                Duration::from_millis(fastrand::u64(ms / 2..=ms))
            }
            Ok(()) => FIRST,
        };
        tokio::time::sleep(pause).await;
    }
}

async fn session(
    discovery: &Discovery,
    channel: Channel,
    workload: &str,
    keys: &mut mpsc::UnboundedReceiver<String>,
    delivered: &mut bool,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    // Queued keys are covered by the full list sent first.
    while keys.try_recv().is_ok() {}
    let _ = tx.send(pb::DiscoveryRequest {
        workload: workload.to_string(),
        subscribe: discovery.all_keys(),
        ..Default::default()
    });
    let mut client = DiscoveryServiceClient::new(channel);
    let mut updates = client
        .watch(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    discovery.connected.store(true, Ordering::Release);
    discovery.settled.send_replace(true);
    tracing::info!("discovery stream open");
    loop {
        tokio::select! {
            key = keys.recv() => {
                let Some(key) = key else { return Ok(()) };
                let mut subscribe = vec![key];
                while let Ok(k) = keys.try_recv() {
                    subscribe.push(k);
                }
                let _ = tx.send(pb::DiscoveryRequest { subscribe, ..Default::default() });
            }
            update = updates.message() => {
                let Some(update) = update? else { return Ok(()) };
                *delivered = true;
                let answer = match discovery.apply(&update) {
                    Ok(n) => {
                        tracing::debug!(nonce = %update.nonce, destinations = n, "discovery update applied");
                        pb::DiscoveryRequest { nonce: update.nonce, ..Default::default() }
                    }
                    Err(error) => {
                        tracing::error!(nonce = %update.nonce, %error, "discovery update rejected; the endpoints in force stay");
                        pb::DiscoveryRequest { nonce: update.nonce, error, ..Default::default() }
                    }
                };
                let _ = tx.send(answer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(key: &str, endpoints: &[(&str, &str)]) -> pb::DiscoveryUpdate {
        pb::DiscoveryUpdate {
            nonce: "1".into(),
            destinations: vec![pb::DiscoveredDestination {
                key: key.into(),
                authority: "web.shop.svc.cluster.local:80".into(),
                version: 7,
                protocol: pb::Protocol::Http1 as i32,
                endpoints: endpoints
                    .iter()
                    .map(|(a, i)| pb::DiscoveredEndpoint {
                        address: a.to_string(),
                        identity: i.to_string(),
                    })
                    .collect(),
            }],
            absent: vec![],
        }
    }

    #[tokio::test]
    async fn updates_swap_endpoints_and_bad_ones_change_nothing() {
        let d = Discovery::new(Duration::ZERO);
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let target = d.lookup(vip).await.unwrap();
        assert!(target.current().is_none());
        d.apply(&update(
            "10.96.0.10:80",
            &[
                ("10.1.0.1:8080", "spiffe://td/ns/shop/sa/web"),
                ("10.1.0.2:8080", ""),
            ],
        ))
        .unwrap();
        let r = target.current().unwrap();
        assert_eq!(r.balancer.endpoints().len(), 2);
        assert_eq!(
            r.identity("10.1.0.1:8080".parse().unwrap()).as_deref(),
            Some("spiffe://td/ns/shop/sa/web")
        );
        assert_eq!(
            r.identity("10.1.0.2:8080".parse().unwrap()),
            None,
            "no sidecar: plaintext"
        );
        let err = d
            .apply(&update("10.96.0.10:80", &[("10.1.0.9", "")]))
            .unwrap_err();
        assert!(err.contains("endpoints[0].address"), "{err}");
        let err = d
            .apply(&update("10.96.0.10:80", &[("10.1.0.9:80", "spiffe://x")]))
            .unwrap_err();
        assert!(err.contains("endpoints[0].identity"), "{err}");
        assert_eq!(target.current().unwrap().version, 7, "the good one stays");
        d.apply(&pb::DiscoveryUpdate {
            nonce: "2".into(),
            destinations: vec![],
            absent: vec!["10.96.0.10:80".into()],
        })
        .unwrap();
        assert!(target.current().is_none(), "service gone: call directly");
    }
}
