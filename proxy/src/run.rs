//! `trellis-proxy run`: binds the listeners, starts the admin server, and drains on shutdown.
//!
//! The data path runs on a multi-threaded runtime of `--threads` workers; the admin server runs
//! on its own thread. SIGTERM, SIGINT and `POST /shutdown` start the same drain: `/ready` turns
//! 503, listeners close (new connections are refused), in-flight requests get up to
//! `--drain-grace-period` to finish, then the process exits 0.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use trellis_identity::SpiffeId;
use trellis_identity::tls::Credentials;

use crate::admin::{self, AdminState};
use crate::cli::RunArgs;
use crate::discovery::Discovery;
use crate::drain::{self, Drained};
use crate::identity::{self, Installer, certify};
use crate::listener::{Listener, ListenerConfig};
use crate::metrics::{Direction, Metrics};
use crate::policy::routes::ClientScope;
use crate::policy::{PolicyStore, control, file as policy_file};
use crate::telemetry::access_log::AccessLogWriter;
use crate::telemetry::export::{self, ExportHandle};
use crate::telemetry::{AccessLog, Telemetry, Tracer};
use crate::transport::{Connector, Pool, PoolConfig};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
    #[error("{0}")]
    Policy(#[from] policy_file::PolicyFileError),
    #[error("{0}")]
    Identity(String),
    #[error("{0}")]
    Telemetry(String),
}

pub fn run(args: RunArgs) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let shutdown = Arc::new(Notify::new());
    let namespace = args
        .workload
        .as_deref()
        .and_then(|w| w.split_once('/'))
        .map(|(ns, _)| ns)
        .unwrap_or("default");
    let scope = ClientScope {
        namespace: namespace.to_string(),
        cluster_domain: args.cluster_domain.clone(),
    };
    let policies = PolicyStore::new(scope, args.service_account.clone());
    // Identity problems (unreadable files, a certificate that does not verify) stop the proxy
    // at start with the reason, like a wrong policy file.
    let control_plane = control_plane(&args)?;
    let identity_source = identity_source(&args, control_plane.as_ref())?;
    // A policy file that is wrong at start stops the proxy with every error listed: a typo in a
    // deployment should fail loudly, not run without the policy.
    if let Some(path) = &args.policy_file {
        let (set, version) = policy_file::load(path)?;
        tracing::info!(%version, traffic = set.traffic.len(), server = set.server.len(), path = %path.display(), "policy loaded");
        policies.apply(set, version.clone(), format!("file:{}", path.display()));
        metrics.policy_load(true, &version);
    }
    let settings = serde_json::to_value(&args).unwrap_or_default();
    let discovery = control_plane
        .as_ref()
        .map(|_| Discovery::new(args.discovery_timeout));
    let config: admin::ConfigFn = {
        let policies = policies.clone();
        let discovery = discovery.clone();
        Box::new(move || {
            let mut config = policies.config_json();
            if let Some(d) = &discovery {
                config["discovery"] = d.config_json();
            }
            config["proxy"] = settings.clone();
            config
        })
    };
    let (telemetry, telemetry_threads) = telemetry(&args, &metrics)?;
    let admin_state = AdminState::new(
        metrics.clone(),
        config,
        shutdown.clone(),
        args.probes.clone(),
    );
    let admin_listener =
        std::net::TcpListener::bind(args.admin_addr).map_err(|source| RunError::Bind {
            what: "admin",
            addr: args.admin_addr,
            source,
        })?;
    admin::spawn(admin_listener, admin_state.clone()).map_err(RunError::Runtime)?;

    // One worker: a current-thread runtime on the main thread avoids the work-stealing
    // scheduler's cross-thread wake-ups, which cost more CPU per request than they save.
    let runtime = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .thread_name("trellis-data")
            .enable_all()
            .build(),
    }
    .map_err(RunError::Runtime)?;
    let grace = args.drain_grace_period;
    let result = runtime.block_on(serve(
        args,
        Startup {
            metrics,
            policies,
            admin: admin_state,
            shutdown,
            identity_source,
            control_plane,
            telemetry,
            discovery,
        },
    ));
    // The drain is over: spans still queued get a short flush window, log lines are written.
    telemetry_threads.shutdown(grace.min(std::time::Duration::from_secs(5)));
    result
}

/// The threads that ship telemetry, stopped (and flushed) after the drain.
struct TelemetryThreads {
    exporter: Option<ExportHandle>,
    access_log: Option<AccessLogWriter>,
}

impl TelemetryThreads {
    fn shutdown(self, window: std::time::Duration) {
        if let Some(exporter) = self.exporter {
            exporter.shutdown(std::time::Instant::now() + window);
        }
        if let Some(writer) = self.access_log {
            writer.shutdown();
        }
    }
}

/// Starts the trace exporter and the access log, as the flags say.
fn telemetry(
    args: &RunArgs,
    metrics: &Metrics,
) -> Result<(Arc<Telemetry>, TelemetryThreads), RunError> {
    let (access_log, writer) = AccessLog::start(args.access_log, metrics.access_log_dropped())
        .map_err(RunError::Runtime)?
        .unzip();
    let Some(endpoint) = args.otlp_endpoint.clone() else {
        return Ok((
            Arc::new(Telemetry {
                tracer: None,
                access_log,
            }),
            TelemetryThreads {
                exporter: None,
                access_log: writer,
            },
        ));
    };
    export::check_endpoint(&endpoint).map_err(RunError::Telemetry)?;
    let (namespace, name) = match args.workload.as_deref().and_then(|w| w.split_once('/')) {
        Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
        None => (None, "trellis-proxy".to_string()),
    };
    let resource = export::resource(&export::ResourceInfo {
        service_name: name,
        namespace,
        pod_name: args.pod_name.clone(),
        service_account: args.service_account.clone(),
    });
    let (exported, dropped_full, dropped_failed) = metrics.span_counters();
    let (tx, rx) = tokio::sync::mpsc::channel(export::QUEUE_CAPACITY);
    let wake = Arc::new(Notify::new());
    let handle = export::spawn(
        endpoint,
        resource,
        rx,
        wake.clone(),
        export::ExportMetrics {
            exported,
            dropped_export_failed: dropped_failed,
        },
    )
    .map_err(RunError::Runtime)?;
    let tracer = Tracer::new(tx, wake, args.trace_sample_ratio, dropped_full);
    Ok((
        Arc::new(Telemetry {
            tracer: Some(tracer),
            access_log,
        }),
        TelemetryThreads {
            exporter: Some(handle),
            access_log: writer,
        },
    ))
}

/// How to reach the control plane, read and checked once at start.
struct ControlPlane {
    url: String,
    /// `--trust-anchors` or `--trust-anchors-pem` (PEM), which verify it.
    anchors_pem: Vec<u8>,
    /// `--control-plane-identity`, which it must prove.
    identity: SpiffeId,
}

fn control_plane(args: &RunArgs) -> Result<Option<ControlPlane>, RunError> {
    let Some(url) = args.control_plane.clone() else {
        return Ok(None);
    };
    let identity = args
        .control_plane_identity
        .parse()
        .map_err(|e| RunError::Identity(format!("--control-plane-identity: {e}")))?;
    Ok(Some(ControlPlane {
        url,
        anchors_pem: trust_anchors(args)?,
        identity,
    }))
}

/// Where the proxy's certificate comes from, checked before anything starts.
enum IdentitySource {
    None,
    Dir(std::path::PathBuf, Credentials),
    ControlPlane(certify::CertifyConfig),
}

fn identity_source(
    args: &RunArgs,
    control_plane: Option<&ControlPlane>,
) -> Result<IdentitySource, RunError> {
    let err = |m: String| RunError::Identity(m);
    if let Some(dir) = &args.identity_dir {
        let creds = identity::dir::load(dir).map_err(|e| err(format!("--identity-dir {e}")))?;
        return Ok(IdentitySource::Dir(dir.clone(), creds));
    }
    let Some(token_file) = &args.identity_token_file else {
        return Ok(IdentitySource::None);
    };
    let cp = control_plane.ok_or_else(|| {
        err("--identity-token-file needs --control-plane (the CA that issues certificates)".into())
    })?;
    let (Some(workload), Some(sa)) = (&args.workload, &args.service_account) else {
        return Err(err(
            "--identity-token-file needs --workload NS/NAME and --service-account SA (the identity asked for)".into(),
        ));
    };
    let ns = workload.split_once('/').map_or("default", |(ns, _)| ns);
    let identity: SpiffeId = format!("spiffe://{}/ns/{ns}/sa/{sa}", cp.identity.trust_domain)
        .parse()
        .map_err(|e| err(format!("--workload/--service-account: {e}")))?;
    Ok(IdentitySource::ControlPlane(certify::CertifyConfig {
        url: cp.url.clone(),
        anchors_pem: cp.anchors_pem.clone(),
        control_identity: cp.identity.clone(),
        token_file: Some(token_file.clone()),
        identity,
    }))
}

/// `--trust-anchors` (a file) or `--trust-anchors-pem` (the text), one of which is required to
/// talk to the control plane.
fn trust_anchors(args: &RunArgs) -> Result<Vec<u8>, RunError> {
    let (pem, source) = match (&args.trust_anchors, &args.trust_anchors_pem) {
        (Some(path), _) => {
            let source = format!("--trust-anchors {}", path.display());
            let pem =
                std::fs::read(path).map_err(|e| RunError::Identity(format!("{source}: {e}")))?;
            (pem, source)
        }
        (None, Some(pem)) => (
            pem.0.as_bytes().to_vec(),
            "--trust-anchors-pem (TRELLIS_TRUST_ANCHORS_PEM)".to_string(),
        ),
        (None, None) => {
            return Err(RunError::Identity(
                "--control-plane needs the mesh CA (PEM) to verify the control plane: --trust-anchors FILE or --trust-anchors-pem PEM (TRELLIS_TRUST_ANCHORS_PEM)".into(),
            ));
        }
    };
    trellis_identity::tls::roots_from_pem(&pem)
        .map_err(|e| RunError::Identity(format!("{source}: {e}")))?;
    Ok(pem)
}

/// What `run` prepared before the runtime started.
struct Startup {
    metrics: Arc<Metrics>,
    policies: Arc<PolicyStore>,
    admin: Arc<AdminState>,
    shutdown: Arc<Notify>,
    identity_source: IdentitySource,
    control_plane: Option<ControlPlane>,
    telemetry: Arc<Telemetry>,
    discovery: Option<Arc<Discovery>>,
}

async fn serve(args: RunArgs, startup: Startup) -> Result<(), RunError> {
    let Startup {
        metrics,
        policies,
        admin,
        shutdown,
        identity_source,
        control_plane,
        telemetry,
        discovery,
    } = startup;
    metrics.watch_runtime(tokio::runtime::Handle::current());
    let (installer, identity) = Installer::new(metrics.clone());
    let needs_identity = !matches!(identity_source, IdentitySource::None);
    match identity_source {
        IdentitySource::None => {}
        IdentitySource::Dir(dir, creds) => {
            let files = identity::dir::snapshot(&dir);
            installer
                .install(&creds, "identity dir")
                .map_err(RunError::Identity)?;
            tokio::spawn(identity::dir::watch(dir, installer, files));
        }
        IdentitySource::ControlPlane(config) => {
            tokio::spawn(certify::run(config, installer));
        }
    }
    if let Some(path) = args.policy_file.clone() {
        tokio::spawn(policy_file::watch(
            path,
            policies.clone(),
            metrics.clone(),
            args.policy_poll_interval,
        ));
    }
    let first_snapshot = Arc::new(Notify::new());
    if let Some(cp) = control_plane {
        let who = control::Identity {
            workload: args
                .workload
                .clone()
                .unwrap_or_else(|| "default/unknown".into()),
            service_account: args.service_account.clone().unwrap_or_default(),
            pod_name: args.pod_name.clone().unwrap_or_default(),
            pod_ip: args.pod_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            plaintext_ports: vec![u32::from(args.admin_addr.port())],
        };
        let channel = control::channel(&cp.url, &cp.anchors_pem, cp.identity, identity.clone())
            .map_err(RunError::Identity)?;
        let discover = discovery
            .clone()
            .map(|d| crate::discovery::follow(d, channel.clone(), who.workload.clone()));
        let follow = control::follow(
            cp.url,
            channel,
            who,
            policies.clone(),
            metrics.clone(),
            first_snapshot.clone(),
        );
        let mut identity = identity.clone();
        tokio::spawn(async move {
            // A proxy with an identity subscribes with its certificate, so the control plane
            // knows it is meshed (and which workload it may subscribe as).
            // Both streams share one connection: it must carry the certificate from the start.
            if needs_identity {
                identity.ready().await;
            }
            if let Some(discover) = discover {
                tokio::spawn(discover);
            }
            follow.await
        });
    }
    let idle_timeout = Some(args.idle_timeout).filter(|d| !d.is_zero());
    let own_ports = vec![
        args.inbound_addr.port(),
        args.outbound_addr.port(),
        args.admin_addr.port(),
    ];
    let (signal, watch) = drain::channel();
    let pool_config = PoolConfig {
        idle_timeout: args.pool_idle_timeout,
        max_idle_per_endpoint: args.pool_max_idle,
    };

    for (direction, addr) in [
        (Direction::inbound, args.inbound_addr),
        (Direction::outbound, args.outbound_addr),
    ] {
        let connector = Connector::new(
            direction,
            args.connect_timeout,
            metrics.clone(),
            identity.clone(),
        );
        let pool = Pool::new(connector, pool_config.clone());
        let listener = Listener::new(
            ListenerConfig {
                direction,
                detect_timeout: args.detect_timeout,
                opaque_ports: args.opaque_ports.clone(),
                own_ports: own_ports.clone(),
                max_connections: args.max_connections,
                telemetry: telemetry.clone(),
                idle_timeout,
                discovery: (direction == Direction::outbound)
                    .then(|| discovery.clone())
                    .flatten(),
                http_limits: crate::http::ServerLimits {
                    header_read_timeout: Some(args.header_read_timeout).filter(|d| !d.is_zero()),
                    max_header_bytes: args.max_header_bytes,
                },
            },
            pool,
            metrics.clone(),
            policies.clone(),
            identity.clone(),
        );
        let what = direction.as_str();
        let socket = bind(addr).map_err(|source| RunError::Bind { what, addr, source })?;
        tracing::info!(direction = what, %addr, "listening");
        tokio::spawn(listener.clone().serve(socket, watch.clone()));
        // IPv6 twin of a wildcard or loopback IPv4 address, so ip6tables-redirected traffic has
        // somewhere to land. Absent IPv6 is not an error.
        if let Some(addr6) = ipv6_twin(addr) {
            match bind(addr6) {
                Ok(socket) => {
                    tracing::info!(direction = what, addr = %addr6, "listening");
                    tokio::spawn(listener.serve(socket, watch.clone()));
                }
                Err(e) => tracing::debug!(addr = %addr6, error = %e, "no IPv6 listener"),
            }
        }
    }
    drop(watch);
    {
        let (admin, mut identity) = (admin.clone(), identity.clone());
        let (url, ready_timeout, admin_addr) = (
            args.control_plane.clone(),
            args.ready_timeout,
            args.admin_addr,
        );
        tokio::spawn(async move {
            // Ready needs the certificate (when the proxy has an identity) and the first policy.
            if needs_identity && identity.current().is_none() {
                tracing::info!("not ready: waiting for the first certificate");
                identity.ready().await;
            }
            match url {
                None => {
                    admin.set_ready(true);
                    tracing::info!(admin = %admin_addr, "ready");
                }
                Some(url) => {
                    ready_after_first_snapshot(url, first_snapshot, ready_timeout, admin, discovery)
                        .await
                }
            }
        });
    }

    wait_for_shutdown(&shutdown).await?;
    admin.set_draining();
    tracing::info!(grace_period = ?args.drain_grace_period, "draining: no new connections, waiting for in-flight requests");
    match signal.drain(args.drain_grace_period).await {
        Drained::Complete => tracing::info!("drained; exiting"),
        Drained::GracePeriodExpired => {
            tracing::warn!(grace_period = ?args.drain_grace_period, "grace period expired with connections still open; exiting")
        }
    }
    Ok(())
}

/// `/ready` turns 200 once the first snapshot from the control plane is in force (or, after
/// `timeout`, with the built-in default policy), logging while it waits.
async fn ready_after_first_snapshot(
    url: String,
    first: Arc<Notify>,
    timeout: std::time::Duration,
    admin: Arc<AdminState>,
    discovery: Option<Arc<Discovery>>,
) {
    let start = tokio::time::Instant::now();
    loop {
        let wait = std::time::Duration::from_secs(5);
        let wait = if timeout.is_zero() {
            wait
        } else {
            wait.min(timeout.saturating_sub(start.elapsed()))
        };
        if tokio::time::timeout(wait, first.notified()).await.is_ok() {
            // The app's first calls should find discovery in place (a few ms after the policy).
            if let Some(d) = &discovery
                && !d.settled(std::time::Duration::from_secs(2)).await
            {
                tracing::warn!(
                    "ready before the discovery stream opened: the first calls may go to their original destinations"
                );
            }
            admin.set_ready(true);
            tracing::info!(elapsed = ?start.elapsed(), "ready: the first policy snapshot is in force");
            return;
        }
        if !timeout.is_zero() && start.elapsed() >= timeout {
            admin.set_ready(true);
            tracing::warn!(%url, ?timeout, "ready without a policy snapshot: the control plane did not answer in time; serving with the built-in default policy");
            return;
        }
        tracing::info!(%url, waited = ?start.elapsed(), "not ready: waiting for the first policy snapshot from the control plane");
    }
}

async fn wait_for_shutdown(shutdown: &Notify) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = shutdown.notified() => tracing::info!("POST /shutdown received"),
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn ipv6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => {
            Some(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port()))
        }
        IpAddr::V4(v4) if v4.is_loopback() => {
            Some(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from([&["trellis-proxy", "run"], argv].concat()).unwrap();
        match cli.command {
            Some(Command::Run { args, .. }) => *args,
            other => panic!("expected run, got {other:?}"),
        }
    }

    fn control_plane_error(argv: &[&str]) -> String {
        let args = run_args(&[&["--control-plane", "https://trellis-control:7443"], argv].concat());
        match control_plane(&args) {
            Ok(_) => panic!("{argv:?}: expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_control_plane_needs_trust_anchors_by_file_or_text() {
        assert_eq!(
            control_plane_error(&[]),
            "--control-plane needs the mesh CA (PEM) to verify the control plane: --trust-anchors FILE or --trust-anchors-pem PEM (TRELLIS_TRUST_ANCHORS_PEM)"
        );
    }

    #[test]
    fn trust_anchors_pem_is_checked_like_the_file() {
        assert_eq!(
            control_plane_error(&["--trust-anchors-pem", "ca.pem"]),
            "--trust-anchors-pem (TRELLIS_TRUST_ANCHORS_PEM): no certificate found"
        );
        let err = control_plane_error(&[
            "--trust-anchors-pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        ]);
        assert!(
            err.starts_with("--trust-anchors-pem (TRELLIS_TRUST_ANCHORS_PEM): certificate 1 is not a usable trust anchor"),
            "{err}"
        );
        assert!(
            control_plane_error(&["--trust-anchors", "/nonexistent/ca.pem"])
                .starts_with("--trust-anchors /nonexistent/ca.pem: "),
        );
    }

    #[test]
    fn trust_anchors_pem_with_the_mesh_ca_verifies_the_control_plane() {
        let (_, ca_pem, _) = trellis_identity::ca::Ca::generate("cluster.local").unwrap();
        let args = run_args(&[
            "--control-plane",
            "https://trellis-control:7443",
            "--trust-anchors-pem",
            &ca_pem,
        ]);
        let cp = control_plane(&args).unwrap().unwrap();
        assert_eq!(cp.anchors_pem, ca_pem.as_bytes());
        assert_eq!(
            serde_json::to_value(&args).unwrap()["trust_anchors_pem"],
            "(set: 1 certificate)"
        );
    }
}
