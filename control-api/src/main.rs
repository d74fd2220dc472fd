//! `trellis-control`: the control plane (`serve`) and its CLI (`apply`, `delete`, `get`, `status`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis_control::admin::{self, Metrics};
use trellis_control::server::{ConfigServer, Hub, PolicyServer};
use trellis_control::{cli, store::Store};
use trellis_proto::pb::config_service_server::ConfigServiceServer;
use trellis_proto::pb::policy_service_server::PolicyServiceServer;

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
    Serve {
        /// gRPC address for proxies (ConfigService) and the CLI (PolicyService).
        #[arg(long, env = "TRELLIS_GRPC_ADDR", default_value = "0.0.0.0:7443")]
        grpc_addr: SocketAddr,
        /// Where policies and their version are kept across restarts.
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
    },
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
}

#[derive(clap::Args)]
struct Target {
    /// The control plane's gRPC address.
    #[arg(long, env = "TRELLIS_SERVER", default_value = "http://127.0.0.1:7443")]
    server: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Serve {
            grpc_addr,
            state_dir,
            admin_addr,
            log_format,
        } => {
            init_logging(&log_format);
            serve(grpc_addr, state_dir, admin_addr).await
        }
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
    f(cli::connect(&target.server).await?).await
}

async fn serve(
    grpc_addr: SocketAddr,
    state_dir: PathBuf,
    admin_addr: SocketAddr,
) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    admin::serve(admin_addr, metrics.clone())
        .await
        .map_err(|e| format!("cannot listen on {admin_addr} (admin): {e}"))?;
    let (store, state) = Store::open(&state_dir).map_err(|e| e.to_string())?;
    tracing::info!(version = state.version, traffic = state.traffic.len(), server = state.server.len(), dir = %state_dir.display(), "state loaded");
    let hub = Hub::new(store, state, metrics.clone());
    let listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on {grpc_addr} (gRPC): {e}"))?;
    tracing::info!(%grpc_addr, %admin_addr, "serving");
    metrics.ready.store(true, Ordering::Release);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        tracing::info!("shutting down");
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(PolicyServiceServer::new(PolicyServer::new(hub.clone())))
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
