//! `trellis-control`: the control plane (`serve`) and its CLI (`apply`, `delete`, `get`, `status`,
//! `token create`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis_control::admin::{self, Metrics};
use trellis_control::cli::{self, Target};
use trellis_control::discovery::Discovery;
use trellis_control::discovery::service::DiscoveryServer;
use trellis_control::identity::tokenreview::TokenReviewConfig;
use trellis_control::identity::{Authority, IdentityConfig};
use trellis_control::inject::{self, InjectConfig};
use trellis_control::kube::config::{self as kube_config, KubeFlags};
use trellis_control::kube::{KubeClient, KubeConfig, ca_secret, keep_webhook_ca_bundle};
use trellis_control::server::{
    ConfigServer, GrpcOnly, Hub, IdentityServer, PolicyServer, TokenServer, admin_only,
};
use trellis_control::store::Store;
use trellis_control::webhook::Webhook;
use trellis_proto::pb::config_service_server::ConfigServiceServer;
use trellis_proto::pb::discovery_service_server::DiscoveryServiceServer;
use trellis_proto::pb::identity_service_server::IdentityServiceServer;
use trellis_proto::pb::policy_service_server::PolicyServiceServer;
use trellis_proto::pb::token_service_server::TokenServiceServer;

#[derive(Parser)]
#[command(
    name = "trellis-control",
    version,
    about = "The Trellis control plane and its CLI"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Serve(Box<ServeArgs>),
    /// Validate and store policy documents, and push them to the proxies.
    Apply {
        #[command(flatten)]
        target: Target,
        /// A YAML file, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Return when every affected proxy has acknowledged the new version.
        #[arg(long)]
        wait: bool,
        /// With --wait: how long to wait.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Remove the policies named in the documents (kind, namespace, name).
    Delete {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// List policies: KIND is TrafficPolicy or ServerPolicy.
    Get {
        #[command(flatten)]
        target: Target,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "yaml", "json"])]
        output: String,
    },
    /// Every connected proxy: workload, address, the version it acknowledged or rejected.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Print Kubernetes YAML with the sidecar injected (the webhook's code): Pods, Deployments,
    /// StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs; other kinds pass through.
    Inject {
        /// A YAML file (one or more documents), or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// The mesh CA the proxies will trust (the control plane's ca.pem); default:
        /// <state-dir>/ca.pem.
        #[arg(long, env = "TRELLIS_CA_FILE")]
        ca_file: Option<PathBuf>,
        #[arg(long, env = "TRELLIS_STATE_DIR", default_value = "/var/lib/trellis")]
        state_dir: PathBuf,
        /// The control plane's trust domain.
        #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        /// The control plane's namespace (never injected).
        #[arg(long, env = "TRELLIS_NAMESPACE", default_value = "trellis-system")]
        control_plane_namespace: String,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// Join tokens for proxies outside Kubernetes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new join token (shown once; the control plane keeps only its hash).
    Create {
        #[command(flatten)]
        target: Target,
        /// The identity the token proves, NAMESPACE/SERVICE_ACCOUNT.
        #[arg(long)]
        identity: String,
        /// How long the token may be used (it is reusable until then).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// gRPC address (TLS) for proxies (ConfigService, IdentityService) and the CLI
    /// (PolicyService, TokenService).
    #[arg(long, env = "TRELLIS_GRPC_ADDR", default_value = "0.0.0.0:7443")]
    grpc_addr: SocketAddr,
    /// Where policies, the CA, join tokens and the admin credential are kept across restarts.
    #[arg(long, env = "TRELLIS_STATE_DIR", default_value = "/var/lib/trellis")]
    state_dir: PathBuf,
    /// /live, /ready and /metrics of the control plane itself.
    #[arg(
        long,
        env = "TRELLIS_CONTROL_ADMIN_ADDR",
        default_value = "0.0.0.0:9990"
    )]
    admin_addr: SocketAddr,
    #[arg(long, env = "TRELLIS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The SPIFFE trust domain of every identity this CA issues.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The control plane's own namespace: its identity is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/trellis-control.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = "trellis-system")]
    namespace: String,
    /// Lifetime of workload certificates (proxies renew at about 70 %).
    #[arg(long, env = "TRELLIS_CERT_TTL", default_value = "24h", value_parser = parse_ttl)]
    cert_ttl: Duration,
    /// The operator's CA certificate (PEM; the signing certificate first, then its parents),
    /// instead of a root generated in the state dir.
    #[arg(long, env = "TRELLIS_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, env = "TRELLIS_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Extra DNS names or IPs in the control plane's serving certificate (comma-separated).
    #[arg(long, env = "TRELLIS_TLS_SANS", value_delimiter = ',')]
    tls_san: Vec<String>,
    /// Run against Kubernetes: the API server from --kube-api-url, else --kubeconfig, else the
    /// pod's service account; the CA and admin token shared by all replicas through the Secret
    /// --ca-secret (the state dir becomes a cache); TokenReview; watches.
    #[arg(long, env = "TRELLIS_KUBERNETES", value_parser = clap::builder::BoolishValueParser::new())]
    kubernetes: bool,
    /// The Kubernetes API server: TokenReview for service-account tokens, and the webhook's
    /// caBundle (also without --kubernetes). Unset and no --kubernetes: join tokens only.
    #[arg(long, env = "TRELLIS_KUBE_API_URL", alias = "tokenreview-url")]
    kube_api_url: Option<String>,
    /// Trust anchors of the API server [default with --kube-api-url:
    /// /var/run/secrets/kubernetes.io/serviceaccount/ca.crt]; replaces a kubeconfig's.
    #[arg(long, env = "TRELLIS_KUBE_CA", alias = "tokenreview-ca")]
    kube_ca: Option<PathBuf>,
    /// The control plane's own token for the API server, re-read on every request [default
    /// with --kube-api-url: /var/run/secrets/kubernetes.io/serviceaccount/token]; replaces a
    /// kubeconfig's.
    #[arg(
        long,
        env = "TRELLIS_KUBE_TOKEN_FILE",
        alias = "tokenreview-token-file"
    )]
    kube_token_file: Option<PathBuf>,
    /// With --kubernetes and no --kube-api-url: a kubeconfig (several separated by ':'); its
    /// user must authenticate with a bearer token.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<String>,
    /// The context of --kubeconfig to use instead of its current-context.
    #[arg(long, env = "TRELLIS_KUBE_CONTEXT")]
    kube_context: Option<String>,
    /// With --kubernetes: the cluster's DNS domain (services are name.namespace.svc.<domain>).
    #[arg(long, env = "TRELLIS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// With --kubernetes: the Secret in --namespace holding the mesh CA and admin token.
    #[arg(long, env = "TRELLIS_CA_SECRET", default_value = "trellis-ca")]
    ca_secret: String,
    /// HTTPS address of the sidecar-injection webhook (AdmissionReview v1 on POST /inject and
    /// /inject-annotated); unset: no webhook.
    #[arg(long, env = "TRELLIS_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate (PEM), e.g. from cert-manager; unset: the control plane's own
    /// serving certificate (mesh CA, names from --tls-san), whose CA it writes into the
    /// MutatingWebhookConfiguration's caBundle through the API server.
    #[arg(long, env = "TRELLIS_WEBHOOK_TLS_CERT", requires = "webhook_tls_key")]
    webhook_tls_cert: Option<PathBuf>,
    /// The key of --webhook-tls-cert (PEM).
    #[arg(long, env = "TRELLIS_WEBHOOK_TLS_KEY", requires = "webhook_tls_cert")]
    webhook_tls_key: Option<PathBuf>,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps (needs
    /// --kubernetes or --kube-api-url, and no --webhook-tls-cert).
    #[arg(
        long,
        env = "TRELLIS_WEBHOOK_CONFIG_NAME",
        default_value = "trellis-injector"
    )]
    webhook_config_name: String,
    #[command(flatten)]
    inject: InjectArgs,
}

/// What injected sidecars get (the webhook's and `inject`'s settings).
#[derive(Debug, Clone, clap::Args)]
struct InjectArgs {
    /// The image of the injected init container and proxy.
    #[arg(long, env = "TRELLIS_PROXY_IMAGE", default_value = concat!("ghcr.io/trellis-mesh/trellis:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// imagePullPolicy of the injected containers.
    #[arg(long, env = "TRELLIS_PROXY_PULL_POLICY", default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    proxy_pull_policy: String,
    /// The control plane's URL as proxies reach it; default
    /// https://trellis-control.<namespace>.svc:7443.
    #[arg(long, env = "TRELLIS_CONTROL_PLANE_URL")]
    control_plane_url: Option<String>,
    /// The OTLP/gRPC collector injected proxies export spans to (unset: no tracing).
    #[arg(long, env = "TRELLIS_INJECT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// native: the proxy as an init container with restartPolicy Always (Kubernetes 1.29+);
    /// classic: a regular first container with a postStart hook (older clusters). A pod's
    /// `trellis.dev/sidecar-mode` annotation overrides it.
    #[arg(long, env = "TRELLIS_SIDECAR_MODE", value_enum, default_value_t = inject::SidecarMode::Native)]
    sidecar_mode: inject::SidecarMode,
    /// The proxy's UID (its traffic is never intercepted; no app container may use it).
    #[arg(long, env = "TRELLIS_PROXY_UID", default_value_t = 2102)]
    proxy_uid: u32,
}

impl InjectArgs {
    fn config(&self, trust_domain: &str, namespace: &str, ca_pem: String) -> InjectConfig {
        InjectConfig {
            proxy_image: self.proxy_image.clone(),
            pull_policy: self.proxy_pull_policy.clone(),
            control_plane_url: self
                .control_plane_url
                .clone()
                .unwrap_or_else(|| format!("https://trellis-control.{namespace}.svc:7443")),
            control_plane_identity: format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/trellis-control"
            ),
            trust_anchors_pem: ca_pem,
            otlp_endpoint: self.otlp_endpoint.clone(),
            mode: self.sidecar_mode,
            proxy_uid: self.proxy_uid,
            control_plane_namespace: namespace.to_string(),
        }
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(5) {
        return Err("must be at least 5s".into());
    }
    Ok(d)
}

#[tokio::main]
async fn main() -> ExitCode {
    trellis_identity::install_crypto_provider();
    let args = Args::parse();
    let result = match args.command {
        Command::Serve(args) => {
            init_logging(&args.log_format);
            serve(*args).await
        }
        Command::Inject {
            file,
            ca_file,
            state_dir,
            trust_domain,
            control_plane_namespace,
            inject,
        } => inject_cli(
            &file,
            ca_file.unwrap_or_else(|| state_dir.join("ca.pem")),
            inject.config(&trust_domain, &control_plane_namespace, String::new()),
        ),
        Command::Token {
            command:
                TokenCommand::Create {
                    target,
                    identity,
                    ttl,
                },
        } => cli::create_token(&target, &identity, ttl).await,
        Command::Apply {
            target,
            file,
            wait,
            timeout,
        } => match cli::read_documents(&file) {
            Ok(yaml) => {
                with_client(&target, |mut c| async move {
                    cli::apply(&mut c, yaml, false, wait.then_some(timeout)).await
                })
                .await
            }
            Err(e) => Err(e),
        },
        Command::Delete { target, file } => match cli::read_documents(&file) {
            Ok(yaml) => {
                with_client(&target, |mut c| async move {
                    cli::apply(&mut c, yaml, true, None).await
                })
                .await
            }
            Err(e) => Err(e),
        },
        Command::Get {
            target,
            kind,
            name,
            output,
        } => {
            with_client(&target, |mut c| async move {
                cli::get(&mut c, kind, name, &output).await
            })
            .await
        }
        Command::Status { target, output } => {
            with_client(&target, |mut c| async move {
                cli::status(&mut c, &output).await
            })
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-control: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn with_client<F, Fut>(target: &Target, f: F) -> Result<(), String>
where
    F: FnOnce(cli::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    f(cli::connect(target).await?).await
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let ServeArgs {
        grpc_addr,
        ref state_dir,
        admin_addr,
        ..
    } = args;
    let metrics = Arc::new(Metrics::default());
    admin::serve(admin_addr, metrics.clone())
        .await
        .map_err(|e| format!("cannot listen on {admin_addr} (admin): {e}"))?;
    // In Kubernetes the policy resources are the store; the state dir (an emptyDir) is not.
    let stored = if args.kubernetes {
        trellis_control::store::private_dir(state_dir)
            .map_err(|e| format!("--state-dir {}: {e}", state_dir.display()))?;
        None
    } else {
        let (store, state) = Store::open(state_dir).map_err(|e| e.to_string())?;
        tracing::info!(version = state.version, traffic = state.traffic.len(), server = state.server.len(), dir = %state_dir.display(), "state loaded");
        Some((store, state))
    };
    let api = connect_kube(&args).await?;
    let tokenreview: Option<TokenReviewConfig> = api.as_ref().map(|(config, _)| config.clone());
    let config = IdentityConfig {
        trust_domain: args.trust_domain.clone(),
        namespace: args.namespace.clone(),
        cert_ttl: args.cert_ttl,
        ca_cert: args.ca_cert.clone(),
        ca_key: args.ca_key.clone(),
        extra_sans: args.tls_san.clone(),
        tokenreview,
    };
    let authority = Authority::bootstrap(state_dir, config, grpc_addr, metrics.clone())?;
    let tls = authority.server_tls(grpc_addr)?;
    let api = api.map(|(_, client)| client);
    if let Some(addr) = args.webhook_addr {
        start_webhook(&args, addr, &authority, api.clone(), metrics.clone()).await?;
    }
    let hub = match stored {
        Some((store, state)) => Hub::new(store, state, metrics.clone()),
        None => Hub::without_store(metrics.clone()),
    };
    // The API server with --kubernetes (watches); not with --kube-api-url alone.
    let kube: Option<Arc<KubeClient>> = api.filter(|_| args.kubernetes);
    // Policies: TrafficPolicy and ServerPolicy resources watched into the hub, written through.
    let policy_writer = kube
        .as_ref()
        .map(|kube| trellis_control::crds::start(hub.clone(), kube.clone(), metrics.clone()));
    // Discovery: Services, EndpointSlices and Pods watched, served on demand to proxies.
    let discovery = kube.as_ref().map(|kube| {
        let discovery = Discovery::new();
        trellis_control::discovery::run(
            kube.clone(),
            metrics.clone(),
            discovery.clone(),
            &args.cluster_domain,
            &args.trust_domain,
        );
        discovery
    });
    let listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on {grpc_addr} (gRPC): {e}"))?;
    tracing::info!(%grpc_addr, %admin_addr, identity = %authority.control_identity, "serving");
    // Ready once there is something right to serve: in Kubernetes, after the first list of
    // policies and of services, endpoints and pods (a replica that cannot reach the API server
    // never takes proxies from one that can).
    match &discovery {
        None => metrics.ready.store(true, Ordering::Release),
        Some(discovery) => {
            let (hub, metrics, mut synced) = (hub.clone(), metrics.clone(), discovery.synced());
            tokio::spawn(async move {
                let _ = synced.wait_for(|s| *s).await;
                while !hub.policy_loaded() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tracing::info!("synced with the Kubernetes API: ready");
                metrics.ready.store(true, Ordering::Release);
            });
        }
    }
    let discovery =
        discovery.map(|d| DiscoveryServiceServer::new(DiscoveryServer::new(d, metrics.clone())));
    let incoming = trellis_control::tls::incoming(listener, tls);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        tracing::info!("shutting down");
    };
    let policy = PolicyServiceServer::with_interceptor(
        match policy_writer {
            Some(writer) => PolicyServer::kubernetes(hub.clone(), writer),
            None => PolicyServer::new(hub.clone()),
        },
        admin_only(authority.clone(), "PolicyService"),
    );
    let tokens = TokenServiceServer::with_interceptor(
        TokenServer::new(authority.clone()),
        admin_only(authority.clone(), "TokenService"),
    );
    // Every service refuses what is not gRPC (see `server::GrpcOnly`).
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(GrpcOnly(policy))
        .add_service(GrpcOnly(tokens))
        .add_service(GrpcOnly(IdentityServiceServer::new(IdentityServer::new(
            authority,
        ))))
        .add_service(GrpcOnly(ConfigServiceServer::new(ConfigServer::new(hub))))
        .add_optional_service(discovery.map(GrpcOnly))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("gRPC server failed: {e}"))
}

/// The API server (see `config::resolve`) and one client for it. With --kubernetes, also puts
/// the CA and admin token shared by all replicas into the state dir, where
/// `Authority::bootstrap` loads them (unless --ca-cert gives the operator's CA).
async fn connect_kube(args: &ServeArgs) -> Result<Option<(KubeConfig, Arc<KubeClient>)>, String> {
    let flags = KubeFlags {
        kubernetes: args.kubernetes,
        api_url: args.kube_api_url.clone(),
        ca: args.kube_ca.clone(),
        token_file: args.kube_token_file.clone(),
        kubeconfig: args.kubeconfig.clone(),
        context: args.kube_context.clone(),
    };
    let Some(resolved) = kube_config::resolve(&flags)? else {
        return Ok(None);
    };
    let client = Arc::new(KubeClient::new(resolved.config.clone())?);
    tracing::info!(url = client.url(), source = %resolved.source, "Kubernetes API server");
    if let Some(ns) = resolved
        .namespace
        .as_deref()
        .filter(|ns| *ns != args.namespace)
    {
        tracing::warn!(namespace = ns, control_plane_namespace = %args.namespace, "the API server source names another namespace than --namespace; the CA Secret is read from --namespace");
    }
    if args.kubernetes {
        let (ns, name) = (&args.namespace, &args.ca_secret);
        ca_secret::load_or_create(&client, ns, name, &args.trust_domain)
            .await?
            .write_to(&args.state_dir, args.ca_cert.is_none())?;
    }
    Ok(Some((resolved.config, client)))
}

/// The admission webhook, with the control plane's serving certificate (whose CA goes into the
/// MutatingWebhookConfiguration's caBundle) or the operator's.
async fn start_webhook(
    args: &ServeArgs,
    addr: SocketAddr,
    authority: &Arc<Authority>,
    api: Option<Arc<KubeClient>>,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    let tls = match (&args.webhook_tls_cert, &args.webhook_tls_key) {
        (Some(cert), Some(key)) => trellis_control::tls::static_server_config(cert, key)?,
        _ => {
            let tls = authority.webhook_tls()?;
            match api {
                Some(client) => {
                    let (name, pem) = (
                        args.webhook_config_name.clone(),
                        authority.ca_pem().to_string(),
                    );
                    tokio::spawn(async move {
                        keep_webhook_ca_bundle(&client, &name, &pem).await;
                    });
                }
                None => tracing::warn!(
                    "--webhook-addr without --kubernetes or --kube-api-url: put the mesh CA (ca.pem in the state dir) into the webhook configuration's caBundle yourself"
                ),
            }
            tls
        }
    };
    let config = args.inject.config(
        &args.trust_domain,
        &args.namespace,
        authority.ca_pem().to_string(),
    );
    let webhook = Arc::new(Webhook { config, metrics });
    trellis_control::webhook::serve(addr, tls, webhook).await
}

/// `trellis-control inject`: YAML in, YAML with sidecars out; a report line per object on stderr.
fn inject_cli(file: &str, ca_file: PathBuf, mut config: InjectConfig) -> Result<(), String> {
    let yaml = cli::read_documents(file)?;
    let pem = std::fs::read_to_string(&ca_file).map_err(|e| {
        format!(
            "cannot read the mesh CA {}: {e} (pass --ca-file: the control plane's ca.pem)",
            ca_file.display()
        )
    })?;
    trellis_identity::tls::roots_from_pem(pem.as_bytes())
        .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
    config.trust_anchors_pem = pem;
    let (out, reports) = inject::inject_documents(&yaml, &config).map_err(|e| e.to_string())?;
    for r in reports {
        eprintln!("{}: {}", r.object, r.outcome);
    }
    print!("{out}");
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
