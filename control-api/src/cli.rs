//! The CLI: `apply`, `delete`, `get`, `status`, each a PolicyService call.
//!
//! Errors say what to do: an unreachable control plane names the address and asks whether
//! `trellis-control serve` is running; a rejected document lists every field at fault.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use trellis_proto::pb::policy_service_client::PolicyServiceClient;
use trellis_proto::pb::token_service_client::TokenServiceClient;
use trellis_proto::pb::{ApplyRequest, CreateTokenRequest, ListRequest, StatusRequest};

pub type Client = PolicyServiceClient<InterceptedService<Channel, Auth>>;

/// Where the control plane is and how the CLI proves it is an admin. By default the
/// credential the control plane wrote into its state dir on this host.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The control plane's gRPC address (TLS).
    #[arg(long, env = "TRELLIS_SERVER", default_value = "https://127.0.0.1:7443")]
    pub server: String,
    /// The control plane's state dir, where the default credential is read from
    /// (ca.pem, admin-cert.pem, admin-key.pem).
    #[arg(long, env = "TRELLIS_STATE_DIR", default_value = "/var/lib/trellis")]
    pub state_dir: PathBuf,
    /// The mesh CA (PEM) to verify the control plane with [default: STATE_DIR/ca.pem].
    #[arg(long, env = "TRELLIS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Admin client certificate [default: STATE_DIR/admin-cert.pem].
    #[arg(long, env = "TRELLIS_ADMIN_CERT")]
    pub admin_cert: Option<PathBuf>,
    /// Admin client key [default: STATE_DIR/admin-key.pem].
    #[arg(long, env = "TRELLIS_ADMIN_KEY")]
    pub admin_key: Option<PathBuf>,
    /// A file holding the admin token, sent instead of the admin certificate.
    #[arg(long, env = "TRELLIS_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// Adds the admin token, when the CLI authenticates with one.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A TLS channel to the control plane, with the admin credential attached.
async fn channel(target: &Target) -> Result<(Channel, Auth), String> {
    let dir = &target.state_dir;
    let ca_file = target.ca_file.clone().unwrap_or_else(|| dir.join("ca.pem"));
    let ca = std::fs::read(&ca_file).map_err(|e| {
        format!(
            "cannot read the mesh CA {}: {e} — run on the control plane's host, or pass --state-dir / --ca-file",
            ca_file.display()
        )
    })?;
    let roots = Arc::new(
        trellis_identity::tls::roots_from_pem(&ca)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?,
    );
    let token = match &target.admin_token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .map_err(|e| format!("--admin-token-file {}: {e}", path.display()))?;
            Some(
                MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| format!("--admin-token-file {}: not a token", path.display()))?,
            )
        }
        None => None,
    };
    let cert = target
        .admin_cert
        .clone()
        .unwrap_or_else(|| dir.join("admin-cert.pem"));
    let key = target
        .admin_key
        .clone()
        .unwrap_or_else(|| dir.join("admin-key.pem"));
    let client_auth = if token.is_some() && target.admin_cert.is_none() {
        None
    } else {
        match (std::fs::read(&cert), std::fs::read(&key)) {
            (Ok(c), Ok(k)) => {
                let creds = trellis_identity::tls::Credentials::from_pem(&c, &k, &ca)
                    .map_err(|e| format!("admin credential {}: {e}", cert.display()))?;
                Some(creds)
            }
            // No credential here: calls will be refused with the reason, by the server.
            (Err(e), _) if target.admin_cert.is_some() => {
                return Err(format!("--admin-cert {}: {e}", cert.display()));
            }
            _ => None,
        }
    };
    let config = match &client_auth {
        Some(creds) => creds.client_config(&[b"h2"]),
        None => trellis_identity::tls::client_config(roots, None, &[b"h2"]),
    }
    .map_err(|e| format!("TLS configuration: {e}"))?;
    let channel = crate::tls::channel(&target.server, config).await?;
    Ok((channel, Auth(token)))
}

/// Connects to the control plane's PolicyService.
pub async fn connect(target: &Target) -> Result<Client, String> {
    let (channel, auth) = channel(target).await?;
    Ok(PolicyServiceClient::with_interceptor(channel, auth))
}

/// `token create`: a join token for `identity`, printed once.
pub async fn create_token(target: &Target, identity: &str, ttl: Duration) -> Result<(), String> {
    let (channel, auth) = channel(target).await?;
    let mut client = TokenServiceClient::with_interceptor(channel, auth);
    let rsp = client
        .create(CreateTokenRequest {
            identity: identity.to_string(),
            ttl_seconds: ttl.as_secs(),
        })
        .await
        .map_err(status_message)?
        .into_inner();
    println!("{}", rsp.token);
    eprintln!(
        "join token for {} (valid {}); it is shown only once — give it to the proxy as --identity-token-file",
        rsp.identity,
        humantime::format_duration(ttl)
    );
    Ok(())
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
        // Our version, or the one that superseded it since (a proxy is sent only the latest).
        // Versions are compared for equality: in Kubernetes they are content hashes, not
        // counters.
        let in_force = status.version;
        let reached = |v: u64| v == version || v == in_force;
        pending.retain(|id| {
            let Some(p) = status.proxies.iter().find(|p| &p.id == id) else {
                failed.push(format!("{id}: disconnected before acknowledging"));
                return false;
            };
            if p.last_nack_version.parse::<u64>().is_ok_and(reached) {
                failed.push(format!(
                    "{id}: rejected version {}: {}",
                    p.last_nack_version, p.last_nack_error
                ));
                return false;
            }
            if p.acked_version.parse::<u64>().is_ok_and(reached) {
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
