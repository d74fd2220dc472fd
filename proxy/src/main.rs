//! `trellis-proxy`: the sidecar binary. `run` (the default) proxies; `init` installs the
//! interception rules and exits; `wait-ready` returns once a running proxy is ready.

use std::process::ExitCode;

use clap::Parser;
use trellis_proxy::cli::{Cli, Command, LogArgs, LogFormat};

fn main() -> ExitCode {
    trellis_identity::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Init { args, log }) => {
            init_logging(&log);
            trellis_proxy::init::run(&args).map_err(|e| e.to_string())
        }
        Some(Command::WaitReady { args, log }) => {
            init_logging(&log);
            trellis_proxy::wait_ready::run(&args).map_err(|e| e.to_string())
        }
        Some(Command::Run { args, log }) => {
            init_logging(&log);
            trellis_proxy::run::run(*args).map_err(|e| e.to_string())
        }
        None => {
            init_logging(&cli.log);
            trellis_proxy::run::run(cli.run).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log_level).unwrap_or_else(|e| {
        eprintln!(
            "trellis-proxy: warning: --log-level {:?} is not a valid filter ({e}); using info",
            log.log_level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match log.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
