//! The CLI: `apply`, `delete`, `get`, `status`, each a PolicyService call.
//!
//! Errors say what to do: an unreachable control plane names the address and asks whether
//! `trellis-control serve` is running; a rejected document lists every field at fault.

use std::io::Read;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis_proto::pb::policy_service_client::PolicyServiceClient;
use trellis_proto::pb::{ApplyRequest, ListRequest, StatusRequest};

pub type Client = PolicyServiceClient<Channel>;

/// Connects to the control plane at `server`.
pub async fn connect(server: &str) -> Result<Client, String> {
    let endpoint = Channel::from_shared(server.to_string())
        .map_err(|e| format!("{server:?} is not a URL (e.g. http://127.0.0.1:7443): {e}"))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        // The innermost cause is the useful one ("Connection refused (os error 111)").
        let mut cause = e.to_string();
        let mut next = std::error::Error::source(&e);
        while let Some(s) = next {
            cause = s.to_string();
            next = s.source();
        }
        format!(
            "cannot reach control plane at {server}: {cause} — is `trellis-control serve` running?"
        )
    })?;
    Ok(PolicyServiceClient::new(channel))
}

/// Reads `-f FILE` (or standard input for `-`).
pub fn read_documents(file: &str) -> Result<String, String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))
    }
}

fn status_message(e: tonic::Status) -> String {
    match e.code() {
        tonic::Code::Unavailable
            if e.message().contains("transport") || e.message().contains("connect") =>
        {
            format!(
                "control plane unreachable: {} — is `trellis-control serve` running?",
                e.message()
            )
        }
        _ => e.message().to_string(),
    }
}

/// `apply -f` / `delete -f`: prints what changed; with `wait`, waits for the affected proxies.
pub async fn apply(
    client: &mut Client,
    yaml: String,
    delete: bool,
    wait: Option<Duration>,
) -> Result<(), String> {
    let req = ApplyRequest { yaml };
    let rsp = if delete {
        client.delete(req).await
    } else {
        client.apply(req).await
    }
    .map_err(status_message)?
    .into_inner();
    if rsp.changed.is_empty() {
        println!("unchanged (version {})", rsp.version);
        return Ok(());
    }
    for c in &rsp.changed {
        println!("{c}");
    }
    println!("version {}", rsp.version);
    let Some(timeout) = wait else { return Ok(()) };
    wait_for_acks(
        client,
        rsp.version,
        &rsp.affected_proxies,
        rsp.committed_at_ms,
        timeout,
    )
    .await
}

async fn wait_for_acks(
    client: &mut Client,
    version: u64,
    affected: &[String],
    committed_at_ms: u64,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    let mut pending: Vec<String> = affected.to_vec();
    let mut failed = Vec::new();
    while !pending.is_empty() && start.elapsed() < timeout {
        let status = client
            .status(StatusRequest {})
            .await
            .map_err(status_message)?
            .into_inner();
        pending.retain(|id| {
            let Some(p) = status.proxies.iter().find(|p| &p.id == id) else {
                failed.push(format!("{id}: disconnected before acknowledging"));
                return false;
            };
            if p.last_nack_version
                .parse::<u64>()
                .is_ok_and(|v| v >= version)
            {
                failed.push(format!(
                    "{id}: rejected version {}: {}",
                    p.last_nack_version, p.last_nack_error
                ));
                return false;
            }
            if p.acked_version.parse::<u64>().is_ok_and(|v| v >= version) {
                let took = p.acked_at_ms.saturating_sub(committed_at_ms);
                println!("acknowledged by {id} in {took} ms");
                return false;
            }
            true
        });
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    for id in &pending {
        failed.push(format!("{id}: no acknowledgement within {timeout:?}"));
    }
    if failed.is_empty() {
        println!(
            "{} proxies converged on version {version} in {} ms",
            affected.len(),
            start.elapsed().as_millis()
        );
        Ok(())
    } else {
        Err(format!(
            "version {version} did not converge:\n  {}",
            failed.join("\n  ")
        ))
    }
}

/// `get [KIND] [NAME]`: a table, or the documents as YAML or JSON.
pub async fn get(
    client: &mut Client,
    kind: Option<String>,
    name: Option<String>,
    output: &str,
) -> Result<(), String> {
    let kind = match kind.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("all") => String::new(),
        Some("trafficpolicy" | "trafficpolicies" | "tp") => "TrafficPolicy".into(),
        Some("serverpolicy" | "serverpolicies" | "sp") => "ServerPolicy".into(),
        Some(other) => {
            return Err(format!(
                "unknown kind {other:?}: use TrafficPolicy or ServerPolicy"
            ));
        }
    };
    let rsp = client
        .list(ListRequest {
            kind,
            name: name.unwrap_or_default(),
        })
        .await
        .map_err(status_message)?
        .into_inner();
    match output {
        "yaml" => print!("{}", rsp.yaml),
        "json" => {
            let docs = trellis_proto::wire::documents(&rsp.traffic, &rsp.server);
            println!(
                "{}",
                serde_json::to_string_pretty(&docs).unwrap_or_default()
            );
        }
        _ => {
            println!(
                "{:<14} {:<14} {:<24} DESTINATION / SELECTOR",
                "KIND", "NAMESPACE", "NAME"
            );
            for t in &rsp.traffic {
                let d = t.destination.clone().unwrap_or_default();
                let dest = if d.host.is_empty() {
                    d.addresses.join(",")
                } else {
                    d.host
                };
                println!(
                    "{:<14} {:<14} {:<24} {dest}",
                    "TrafficPolicy", t.namespace, t.name
                );
            }
            for s in &rsp.server {
                println!(
                    "{:<14} {:<14} {:<24} serviceAccount={} port={}",
                    "ServerPolicy", s.namespace, s.name, s.service_account, s.port
                );
            }
            println!("version {}", rsp.version);
        }
    }
    Ok(())
}

/// `status`: every proxy the control plane knows, and what it acknowledged or rejected.
pub async fn status(client: &mut Client, output: &str) -> Result<(), String> {
    let rsp = client
        .status(StatusRequest {})
        .await
        .map_err(status_message)?
        .into_inner();
    let now = crate::server::now_ms();
    if output == "json" {
        let rows: Vec<_> = rsp
            .proxies
            .iter()
            .map(|p| serde_json::json!({
                "id": p.id, "workload": p.workload, "address": p.address, "connected": p.connected,
                "sentVersion": p.sent_version, "ackedVersion": p.acked_version,
                "lastNackVersion": p.last_nack_version, "lastNackError": p.last_nack_error,
                "lastSeenMsAgo": now.saturating_sub(p.last_seen_ms),
            }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"version": rsp.version, "proxies": rows})
            )
            .unwrap_or_default()
        );
        return Ok(());
    }
    println!("control plane version {}", rsp.version);
    println!(
        "{:<26} {:<18} {:<10} {:<6} {:<6} {:<10} LAST NACK",
        "WORKLOAD", "ADDRESS", "STATE", "SENT", "ACKED", "SEEN"
    );
    for p in &rsp.proxies {
        let nack = if p.last_nack_version.is_empty() {
            "-".to_string()
        } else {
            format!(
                "v{}: {}",
                p.last_nack_version,
                p.last_nack_error.replace('\n', " ")
            )
        };
        println!(
            "{:<26} {:<18} {:<10} {:<6} {:<6} {:<10} {nack}",
            p.workload,
            p.address,
            if p.connected { "connected" } else { "gone" },
            p.sent_version,
            p.acked_version,
            format!("{}s ago", now.saturating_sub(p.last_seen_ms) / 1000),
        );
    }
    Ok(())
}
