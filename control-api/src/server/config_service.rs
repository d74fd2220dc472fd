//! `ConfigService.Stream`: one bidirectional stream per proxy.
//!
//! The proxy subscribes; a task of this stream's own sends it the current snapshot (unless it
//! already holds that version) and every later one whose content changed for it; each snapshot
//! carries the version and a fresh nonce, and the proxy's Ack or Nack for that nonce is recorded
//! (a rejected version is never recorded as acknowledged). Only the latest state is ever sent:
//! a proxy that falls behind skips versions instead of queueing them.
//!
//! A hub that has no policy set yet (Kubernetes mode before the first sync of the custom
//! resources) sends nothing: the proxy keeps what it holds until there is something real.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::pb::config_service_server::ConfigService;
use trellis_proto::pb::{self, ProxyMessage, Snapshot, proxy_message};

use super::{Hub, ProxyRecord, now_ms};
use crate::tls::PeerInfo;

pub struct ConfigServer {
    hub: Arc<Hub>,
    streams: AtomicU64,
}

impl ConfigServer {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            streams: AtomicU64::new(0),
        }
    }
}

/// A DNS label (RFC 1123), as Kubernetes namespaces are: `shop`, `kube-system`.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS subdomain (RFC 1123), as most Kubernetes object names are: `web-7d9f.v2`.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigService for ConfigServer {
    type StreamStream = SnapshotStream;

    async fn stream(
        &self,
        req: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let info = req
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let peer = info
            .addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let mut incoming = req.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream closed before a Subscribe"))?;
        let Some(proxy_message::Kind::Subscribe(sub)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be a Subscribe",
            ));
        };
        // What a subscriber says about itself is shown by `status` and keys its record: only
        // Kubernetes names, never arbitrary bytes (paths, escape sequences).
        if sub
            .workload
            .split_once('/')
            .is_none_or(|(ns, name)| !is_dns_label(ns) || !is_dns_subdomain(name))
        {
            return Err(Status::invalid_argument(format!(
                "Subscribe.workload {:?} is not NAMESPACE/NAME (Kubernetes names: lowercase letters, digits, '-', and '.' between labels)",
                sub.workload
            )));
        }
        if !sub.pod_ip.is_empty() && sub.pod_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "Subscribe.pod_ip {:?} is not an IP address",
                sub.pod_ip
            )));
        }
        if !sub.service_account.is_empty() && !is_dns_subdomain(&sub.service_account) {
            return Err(Status::invalid_argument(format!(
                "Subscribe.service_account {:?} is not a Kubernetes name (lowercase letters, digits, '-', and '.' between labels)",
                sub.service_account
            )));
        }
        // A proxy with a mesh certificate subscribes only as the workload it is.
        if let Some(id) = &info.identity {
            let ns = sub.workload.split_once('/').map_or("", |(ns, _)| ns);
            if id.namespace != ns || id.service_account != sub.service_account {
                return Err(Status::permission_denied(format!(
                    "the client certificate is {id}, which may not subscribe as workload {} with service account {:?}",
                    sub.workload, sub.service_account
                )));
            }
        }
        let n = self.streams.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}@{peer}#{n}", sub.workload);
        let held: Option<u64> = sub.version.parse().ok();
        let mut proxies = self.hub.lock_proxies();
        // Proxies gone for more than ten minutes leave `status` (pods churn; memory must not).
        let cutoff = now_ms().saturating_sub(10 * 60 * 1000);
        proxies.retain(|_, p| p.connected || p.last_seen_ms >= cutoff);
        proxies.insert(
            id.clone(),
            ProxyRecord {
                id: id.clone(),
                workload: sub.workload.clone(),
                service_account: sub.service_account.clone(),
                address: if sub.pod_ip.is_empty() {
                    peer.clone()
                } else {
                    sub.pod_ip.clone()
                },
                sent_version: None,
                sent_hash: None,
                acked_version: held,
                acked_at_ms: 0,
                last_nack: None,
                last_seen_ms: now_ms(),
                connected: true,
            },
        );
        drop(proxies);
        self.hub.proxies_changed();
        self.hub.metrics.proxy_connected(1);
        // A proxy that proved a mesh identity makes its pod a mutual-TLS destination for others.
        let meshed_as = info.identity.as_ref().map(|identity| {
            let ip = sub
                .pod_ip
                .parse::<std::net::IpAddr>()
                .ok()
                .or(info.addr.map(|a| a.ip()));
            pb::MeshedEndpoint {
                ip: ip.map(|ip| ip.to_string()).unwrap_or_default(),
                identity: identity.to_string(),
                plaintext_ports: sub.plaintext_ports.clone(),
            }
        });
        tracing::info!(%id, held = ?held, meshed = ?meshed_as.as_ref().map(|m| &m.identity), "proxy subscribed");

        let (tx, rx) = mpsc::channel(2);
        let hub = self.hub.clone();
        tokio::spawn(async move {
            if let Some(endpoint) = meshed_as.filter(|e| !e.ip.is_empty()) {
                hub.set_meshed(&id, Some(endpoint));
            }
            serve_stream(&hub, &id, &sub.service_account, held, &mut incoming, tx).await;
            hub.set_meshed(&id, None);
            if let Some(p) = hub.lock_proxies().get_mut(&id) {
                p.connected = false;
                p.last_seen_ms = now_ms();
            }
            hub.proxies_changed();
            hub.metrics.proxy_connected(-1);
            tracing::info!(%id, "proxy stream ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve_stream(
    hub: &Hub,
    id: &str,
    service_account: &str,
    held: Option<u64>,
    incoming: &mut Streaming<ProxyMessage>,
    tx: mpsc::Sender<Result<Snapshot, Status>>,
) {
    let mut changes = hub.subscribe();
    let mut mesh = hub.subscribe_mesh();
    let mut nonce = 0u64;
    let mut first = true;
    loop {
        if hub.policy_loaded() {
            if !send_if_new(hub, id, service_account, held, first, &mut nonce, &tx).await {
                return;
            }
            first = false;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            changed = mesh.changed() => {
                if changed.is_err() { return }
                // Pods come in bursts (a rollout, a restart of the control plane): one snapshot
                // per burst, not one per pod.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                mesh.borrow_and_update();
            }
            msg = incoming.message() => match msg {
                Ok(Some(msg)) => record_answer(hub, id, msg),
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// Sends the current snapshot if it is new for this proxy: not already sent, and — on the first
/// round — not the version the proxy said it holds and has acknowledged. `false`: the stream is
/// gone.
async fn send_if_new(
    hub: &Hub,
    id: &str,
    service_account: &str,
    held: Option<u64>,
    first: bool,
    nonce: &mut u64,
    tx: &mpsc::Sender<Result<Snapshot, Status>>,
) -> bool {
    let (shared, hash) = hub.snapshot_for(service_account);
    let version: u64 = shared.version.parse().unwrap_or(0);
    let (already_sent, acked) = {
        let proxies = hub.lock_proxies();
        let p = proxies.get(id);
        (
            p.and_then(|p| p.sent_hash) == Some(hash),
            p.and_then(|p| p.acked_version),
        )
    };
    let up_to_date = first && held == Some(version) && acked == Some(version);
    if !already_sent && !up_to_date {
        *nonce += 1;
        let mut snapshot = Snapshot::clone(&shared);
        snapshot.nonce = nonce.to_string();
        if let Some(p) = hub.lock_proxies().get_mut(id) {
            p.sent_version = Some(version);
            p.sent_hash = Some(hash);
        }
        hub.metrics.push();
        if tx.send(Ok(snapshot)).await.is_err() {
            return false;
        }
    } else if up_to_date && let Some(p) = hub.lock_proxies().get_mut(id) {
        p.sent_version = Some(version);
        p.sent_hash = Some(hash);
    }
    true
}

fn record_answer(hub: &Hub, id: &str, msg: ProxyMessage) {
    let mut proxies = hub.lock_proxies();
    let Some(p) = proxies.get_mut(id) else { return };
    p.last_seen_ms = now_ms();
    match msg.kind {
        Some(proxy_message::Kind::Ack(ack)) => {
            let Ok(version) = ack.version.parse::<u64>() else {
                return;
            };
            p.acked_version = Some(version);
            p.acked_at_ms = now_ms();
            drop(proxies);
            hub.proxies_changed();
            hub.metrics.answer(true);
            if let Some(elapsed) = hub.since_commit(version) {
                hub.metrics.converged(elapsed);
            }
        }
        Some(proxy_message::Kind::Nack(nack)) => {
            let version = nack.version.parse::<u64>().unwrap_or(0);
            tracing::warn!(%id, version, error = %nack.error, "proxy rejected a snapshot");
            p.last_nack = Some((version, nack.error));
            drop(proxies);
            hub.proxies_changed();
            hub.metrics.answer(false);
        }
        _ => {}
    }
}
