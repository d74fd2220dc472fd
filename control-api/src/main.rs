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
use trellis_control::identity::tokenreview::TokenReviewConfig;
use trellis_control::identity::{Authority, IdentityConfig};
use trellis_control::server::{
    ConfigServer, Hub, IdentityServer, PolicyServer, TokenServer, admin_only,
};
use trellis_control::store::Store;
use trellis_proto::pb::config_service_server::ConfigServiceServer;
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
    /// Kubernetes API server for TokenReview (service-account tokens); unset: join tokens only.
    #[arg(long, env = "TRELLIS_TOKENREVIEW_URL")]
    tokenreview_url: Option<String>,
    /// Trust anchors of the API server.
    #[arg(
        long,
        env = "TRELLIS_TOKENREVIEW_CA",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    tokenreview_ca: PathBuf,
    /// The control plane's own token for the API server (re-read on every review).
    #[arg(
        long,
        env = "TRELLIS_TOKENREVIEW_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    tokenreview_token_file: PathBuf,
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
    let (store, state) = Store::open(state_dir).map_err(|e| e.to_string())?;
    tracing::info!(version = state.version, traffic = state.traffic.len(), server = state.server.len(), dir = %state_dir.display(), "state loaded");
    let tokenreview = args.tokenreview_url.clone().map(|url| TokenReviewConfig {
        url,
        ca_file: args.tokenreview_ca.clone(),
        token_file: Some(args.tokenreview_token_file.clone()),
    });
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
    let hub = Hub::new(store, state, metrics.clone());
    let listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on {grpc_addr} (gRPC): {e}"))?;
    tracing::info!(%grpc_addr, %admin_addr, identity = %authority.control_identity, "serving");
    metrics.ready.store(true, Ordering::Release);
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
        PolicyServer::new(hub.clone()),
        admin_only(authority.clone(), "PolicyService"),
    );
    let tokens = TokenServiceServer::with_interceptor(
        TokenServer::new(authority.clone()),
        admin_only(authority.clone(), "TokenService"),
    );
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(policy)
        .add_service(tokens)
        .add_service(IdentityServiceServer::new(IdentityServer::new(authority)))
        .add_service(ConfigServiceServer::new(ConfigServer::new(hub)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("gRPC server failed: {e}"))
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
