//! `--control-plane`: policy from `trellis-control` over `ConfigService.Stream`.
//!
//! The proxy subscribes with its workload and the version it holds, applies each snapshot
//! atomically (requests in flight keep theirs) and ACKs it, or NACKs it with every error and
//! keeps the last good one. While the control plane is away the last good policy keeps serving;
//! the client reconnects with jittered exponential backoff (250 ms doubling to 10 s) and
//! subscribes again with the version it holds, so an unchanged control plane sends nothing new.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_identity::SpiffeId;
use trellis_identity::grpc::{ConfigSource, ServerCheck};
use trellis_proto::pb::config_service_client::ConfigServiceClient;
use trellis_proto::pb::{Ack, Nack, ProxyMessage, Subscribe, proxy_message};
use trellis_proto::wire;

use super::PolicyStore;
use super::store::{MeshPeer, Meshed};
use crate::metrics::Metrics;

/// Who this proxy is, as it tells the control plane.
#[derive(Debug, Clone)]
pub struct Identity {
    pub workload: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_ip: String,
    /// Ports of this pod other meshed proxies must call in plaintext (the admin port).
    pub plaintext_ports: Vec<u32>,
}

/// Follows the control plane until the process exits. `first` is notified once the first
/// snapshot is in force.
pub async fn follow(
    url: String,
    channel: Channel,
    identity: Identity,
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    first: Arc<Notify>,
) {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(10);
    let mut backoff = FIRST;
    let mut announced_first = false;
    loop {
        let mut delivered = false;
        let upstream = Upstream {
            url: &url,
            channel: channel.clone(),
        };
        match session(
            upstream,
            &identity,
            &store,
            &metrics,
            &first,
            &mut announced_first,
            &mut delivered,
        )
        .await
        {
            Ok(()) => {
                tracing::warn!(%url, "control plane closed the stream; keeping the policy in force and reconnecting")
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, in_force = %store.current().version, "control plane unreachable; keeping the policy in force")
            }
        }
        if delivered {
            // The control plane was healthy until just now: try again soon.
            backoff = FIRST;
        }
        // Full jitter in [backoff/2, backoff]: proxies restarted together do not reconnect together.
        let pause = Duration::from_millis(fastrand::u64(
            backoff.as_millis() as u64 / 2..=backoff.as_millis() as u64,
        ));
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(MAX);
    }
}

/// The control plane a session talks to.
struct Upstream<'a> {
    url: &'a str,
    channel: Channel,
}

async fn session(
    upstream: Upstream<'_>,
    identity: &Identity,
    store: &PolicyStore,
    metrics: &Metrics,
    first: &Notify,
    announced_first: &mut bool,
    delivered: &mut bool,
) -> Result<(), String> {
    let Upstream { url, channel } = upstream;
    let mut client = ConfigServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let held = store.current();
    let held_version = if held.source.starts_with("control-plane:") {
        held.version.clone()
    } else {
        String::new()
    };
    let subscribe = Subscribe {
        workload: identity.workload.clone(),
        service_account: identity.service_account.clone(),
        pod_name: identity.pod_name.clone(),
        pod_ip: identity.pod_ip.clone(),
        version: held_version.clone(),
        plaintext_ports: identity.plaintext_ports.clone(),
    };
    tx.send(ProxyMessage {
        kind: Some(proxy_message::Kind::Subscribe(subscribe)),
    })
    .await
    .map_err(|_| "stream closed".to_string())?;
    let mut snapshots = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| trellis_identity::grpc::status_cause(&s))?
        .into_inner();
    tracing::info!(%url, held = %held_version, "subscribed to the control plane");
    if !held_version.is_empty() && !*announced_first {
        *announced_first = true;
        first.notify_one();
    }
    while let Some(snapshot) = snapshots
        .message()
        .await
        .map_err(|s| trellis_identity::grpc::status_cause(&s))?
    {
        *delivered = true;
        let (version, nonce) = (snapshot.version.clone(), snapshot.nonce.clone());
        let answer = match apply_snapshot(store, &snapshot, format!("control-plane:{url}")) {
            Ok((traffic, server)) => {
                metrics.policy_load(true, &version);
                tracing::info!(%version, traffic, server, "policy applied from the control plane");
                if !*announced_first {
                    *announced_first = true;
                    first.notify_one();
                }
                proxy_message::Kind::Ack(Ack { version, nonce })
            }
            Err(errors) => {
                metrics.policy_load(false, &store.current().version);
                tracing::error!(%version, in_force = %store.current().version, "{errors}; snapshot rejected, the policy in force stays");
                proxy_message::Kind::Nack(Nack {
                    version,
                    nonce,
                    error: errors.to_string(),
                })
            }
        };
        tx.send(ProxyMessage { kind: Some(answer) })
            .await
            .map_err(|_| "stream closed".to_string())?;
    }
    Ok(())
}

/// Validates a snapshot and, if every policy in it is valid, puts it in force (all of it, or
/// nothing: on an error the policy in force stays). Returns the number of TrafficPolicies and
/// ServerPolicies applied, or every problem, each named by document and field path (the NACK).
pub fn apply_snapshot(
    store: &PolicyStore,
    snapshot: &trellis_proto::pb::Snapshot,
    source: String,
) -> Result<(usize, usize), trellis_proto::policy::PolicyErrors> {
    let set = wire::set_from_wire(&snapshot.traffic, &snapshot.server)?;
    let counts = (set.traffic.len(), set.server.len());
    let meshed = meshed_from_wire(&snapshot.meshed);
    store.apply_with_mesh(set, snapshot.version.clone(), source, meshed);
    Ok(counts)
}

/// The channel to the control plane: TLS verified against the trust anchors, the server must be
/// `control_identity`, and the proxy's certificate (once it has one) is presented so the control
/// plane knows which workload is asking.
pub fn channel(
    url: &str,
    anchors_pem: &[u8],
    control_identity: SpiffeId,
    identity: crate::identity::Identity,
) -> Result<Channel, String> {
    let anchors = Arc::new(
        trellis_identity::tls::roots_from_pem(anchors_pem)
            .map_err(|e| format!("--trust-anchors: {e}"))?,
    );
    let anonymous =
        trellis_identity::tls::client_config(anchors, None, &[b"h2"]).map_err(|e| e.to_string())?;
    let config: ConfigSource = Arc::new(move || match identity.current() {
        Some(tls) if !tls.expired() => tls.client_grpc.clone(),
        _ => anonymous.clone(),
    });
    let check: ServerCheck = Arc::new(move |id: Option<SpiffeId>| match id {
        Some(id) if id == control_identity => Ok(()),
        other => Err(format!(
            "the control plane is {}, not {control_identity}",
            other.map_or("an unknown identity".into(), |i| i.to_string())
        )),
    });
    trellis_identity::grpc::channel(url, config, check)
}

/// The meshed pods of a snapshot; entries that do not parse are skipped (they only make calls
/// to that pod plaintext, which a strict server refuses with a clear error).
fn meshed_from_wire(meshed: &[trellis_proto::pb::MeshedEndpoint]) -> Meshed {
    let map = meshed
        .iter()
        .filter_map(|m| {
            let ip = m.ip.parse().ok()?;
            let peer = MeshPeer {
                identity: Arc::from(m.identity.as_str()),
                plaintext_ports: m
                    .plaintext_ports
                    .iter()
                    .filter_map(|p| u16::try_from(*p).ok())
                    .collect(),
            };
            Some((ip, peer))
        })
        .collect();
    Arc::new(map)
}
