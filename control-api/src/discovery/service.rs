//! `DiscoveryService.Watch`: one bidirectional stream per proxy.
//!
//! The proxy adds keys as it meets destinations; each new key is answered at once (after the
//! first sync with the Kubernetes API) with its destination or as absent. Afterwards the stream
//! follows [`Discovery`]'s generations and sends, per update, only the subscribed keys whose
//! version changed — a rollout of one service reaches only the proxies that call it, and only
//! that service. Every update has a nonce; the proxy's ACK or NACK is counted and a NACK logged.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::pb::discovery_service_server::DiscoveryService;
use trellis_proto::pb::{DiscoveredDestination, DiscoveryRequest, DiscoveryUpdate};

use super::Discovery;
use crate::admin::Metrics;

/// Keys one stream may subscribe to; more are refused with a warning (the proxy then calls
/// those destinations directly).
const MAX_KEYS: usize = 20_000;

pub struct DiscoveryServer {
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
}

impl DiscoveryServer {
    pub fn new(discovery: Arc<Discovery>, metrics: Arc<Metrics>) -> Self {
        Self { discovery, metrics }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<DiscoveryUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl DiscoveryService for DiscoveryServer {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let peer = req
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = Subscriber {
            discovery: self.discovery.clone(),
            metrics: self.metrics.clone(),
            sent: HashMap::new(),
            by_ip: HashMap::new(),
            nonce: 0,
            who: peer,
        };
        tokio::spawn(stream.serve(incoming, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Subscriber {
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    /// Subscribed key → the version last sent (0: sent as absent; None: nothing sent yet).
    sent: HashMap<String, Option<u64>>,
    /// The subscribed `ip:port` keys by IP, for `@<ip>` markers.
    by_ip: HashMap<IpAddr, Vec<String>>,
    nonce: u64,
    who: String,
}

impl Subscriber {
    async fn serve(
        mut self,
        mut incoming: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryUpdate, Status>>,
    ) {
        let mut generations = self.discovery.subscribe();
        let mut synced = self.discovery.synced();
        let mut seen = *generations.borrow_and_update();
        let mut waiting: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                msg = incoming.message() => {
                    let msg = match msg {
                        Ok(Some(msg)) => msg,
                        Ok(None) | Err(_) => break,
                    };
                    let fresh = self.request(msg);
                    if !*synced.borrow() {
                        waiting.extend(fresh);
                        continue;
                    }
                    if !self.send(&fresh, &tx).await {
                        break;
                    }
                }
                changed = synced.changed(), if !*synced.borrow() => {
                    if changed.is_err() {
                        break;
                    }
                    let keys = std::mem::take(&mut waiting);
                    if !self.send(&keys, &tx).await {
                        break;
                    }
                }
                changed = generations.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = *generations.borrow_and_update();
                    let keys = self
                        .discovery
                        .changed_since(seen)
                        .unwrap_or_else(|| self.sent.keys().cloned().collect());
                    seen = now;
                    if *synced.borrow() && !self.send(&keys, &tx).await {
                        break;
                    }
                }
            }
        }
        self.metrics
            .discovery
            .subscriptions
            .dec_by(self.sent.len() as i64);
        for (ip, keys) in &self.by_ip {
            self.discovery.interest(*ip, -(keys.len() as isize));
        }
        tracing::debug!(who = %self.who, "discovery stream ended");
    }

    /// Records subscriptions and answers; returns the keys that are new.
    fn request(&mut self, msg: DiscoveryRequest) -> Vec<String> {
        if !msg.workload.is_empty() {
            self.who = format!("{}@{}", msg.workload, self.who);
        }
        if !msg.nonce.is_empty() {
            let acked = msg.error.is_empty();
            self.metrics.discovery.answer(acked);
            if !acked {
                tracing::warn!(who = %self.who, nonce = %msg.nonce, error = %msg.error, "proxy rejected a discovery update");
            }
        }
        for key in &msg.unsubscribe {
            if self.sent.remove(key).is_some() {
                self.metrics.discovery.subscriptions.dec();
                if let Ok(addr) = key.parse::<SocketAddr>()
                    && let Some(keys) = self.by_ip.get_mut(&addr.ip())
                {
                    keys.retain(|k| k != key);
                    if keys.is_empty() {
                        self.by_ip.remove(&addr.ip());
                    }
                    self.discovery.interest(addr.ip(), -1);
                }
            }
        }
        let mut fresh = Vec::new();
        for key in msg.subscribe {
            if self.sent.contains_key(&key) {
                continue;
            }
            if self.sent.len() >= MAX_KEYS {
                tracing::warn!(who = %self.who, %key, limit = MAX_KEYS, "discovery subscription refused: too many keys on one stream");
                continue;
            }
            self.sent.insert(key.clone(), None);
            self.metrics.discovery.subscriptions.inc();
            if let Ok(addr) = key.parse::<SocketAddr>() {
                self.by_ip.entry(addr.ip()).or_default().push(key.clone());
                self.discovery.interest(addr.ip(), 1);
            }
            fresh.push(key);
        }
        fresh
    }

    /// Sends what changed among `keys` for this subscriber; false when the proxy is gone.
    async fn send(
        &mut self,
        keys: &[String],
        tx: &mpsc::Sender<Result<DiscoveryUpdate, Status>>,
    ) -> bool {
        let mut update = DiscoveryUpdate::default();
        // `@<ip>`: a pod changed; every key this proxy holds for that address may have.
        let mut expanded = Vec::new();
        for marker in keys.iter().filter_map(|k| k.strip_prefix('@')) {
            if let Some(held) = marker
                .parse()
                .ok()
                .and_then(|ip: IpAddr| self.by_ip.get(&ip))
            {
                expanded.extend(held.iter().cloned());
            }
        }
        for key in keys.iter().chain(&expanded) {
            let Some(sent) = self.sent.get_mut(key) else {
                continue;
            };
            match self.discovery.get(key) {
                Some(d) if *sent != Some(d.version) => {
                    *sent = Some(d.version);
                    update.destinations.push(DiscoveredDestination::clone(&d));
                }
                None if *sent != Some(0) => {
                    *sent = Some(0);
                    update.absent.push(key.clone());
                }
                _ => {}
            }
        }
        if update.destinations.is_empty() && update.absent.is_empty() {
            return true;
        }
        self.nonce += 1;
        update.nonce = self.nonce.to_string();
        self.metrics
            .discovery
            .update(prost::Message::encoded_len(&update));
        tx.send(Ok(update)).await.is_ok()
    }
}
