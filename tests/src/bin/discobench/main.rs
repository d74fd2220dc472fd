//! `trellis-discobench`: discovery at scale — a benchmark, not a test (numbers go in the README).
//!
//! In one process: the stand-in Kubernetes API server filled with N services (10 namespaces) of
//! E meshed pods each and one EndpointSlice per service; a real `trellis-control serve
//! --kubernetes` against it; P simulated proxies (tonic streams on one runtime) subscribed to S
//! random services' `clusterIP:80` each, most of them also to the service that is rolled out
//! (`web-0` in `ns-0`), the rest ("bystanders") not. Then R rolling updates of that service,
//! one pod at a time as a Deployment does with maxSurge 1, maxUnavailable 0: create the new pod,
//! add it ready to the slice, mark the old one not ready, remove it from the slice, delete it.
//! Every API write is timed until the last subscriber has the endpoint set it implies; writes
//! that imply no change are given a quiet period in which nothing must arrive.
//!
//! Reported (a table on stdout, then one JSON line): time to the first full sync with the
//! control plane's RSS and CPU then; time and bytes of the proxies' initial answers; per kind of
//! write the fan-out time to the last subscriber, bytes per proxy and per write (cross-checked
//! with `trellis_control_discovery_update_bytes_total`), control-plane CPU per write; updates
//! bystanders received (must be 0); RSS after; and what a full snapshot of every destination
//! would weigh, i.e. what "resending the world" would cost per proxy per update.
//!
//! This file holds the arguments and the order of the run; the rest by domain: `cluster` (what
//! the stand-in API server holds and the objects the rollouts write), `control` (the control
//! plane process, its /proc figures and metrics), `proxies` (the simulated proxies' streams and
//! what they received; the full snapshot), `rollout` (the timed API writes), `report` (the table
//! and the JSON line).
//!
//! Usage (the control plane binary must be a release build of the same tree, next to this one):
//!
//! ```text
//! cargo build --release -p trellis-control --bin trellis-control &&
//!   cargo run --release -p trellis-tests --bin trellis-discobench -- \
//!     [--services 1000] [--endpoints 10] [--proxies 200] [--subscriptions 10] [--rollouts 3]
//! ```
//!
//! No privileges needed: everything is on 127.0.0.1. The simulated proxies share the machine
//! with the control plane, so on a small machine their CPU competes with it (say so with the
//! numbers).

mod cluster;
mod control;
mod proxies;
mod report;
mod rollout;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use trellis_tests::harness::FakeApiServer;

use crate::cluster::Cluster;
use crate::control::{ControlProcess, kill_control_plane_on_panic};
use crate::proxies::{Proxies, full_snapshot};
use crate::report::{Report, Summary};
use crate::rollout::Rollout;

/// The bearer token the stand-in expects from the control plane.
const TOKEN: &str = "discobench-token";

#[derive(Parser)]
#[command(
    name = "trellis-discobench",
    about = "Discovery at scale: initial sync, initial answers and rollout fan-out of a real control plane against the stand-in Kubernetes API"
)]
struct Args {
    /// Services (ClusterIP, one port 80 → 8080), spread over 10 namespaces.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Meshed pods (ready endpoints) per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Simulated proxies, one discovery stream (and connection) each.
    #[arg(long, default_value_t = 200)]
    proxies: usize,
    /// Random services each proxy subscribes to, besides the rolled one.
    #[arg(long, default_value_t = 10)]
    subscriptions: usize,
    /// Rolling updates of the rolled service (each replaces its E pods one by one).
    #[arg(long, default_value_t = 3)]
    rollouts: usize,
    /// Proxies that do not subscribe to the rolled service [default: a quarter of --proxies].
    #[arg(long)]
    bystanders: Option<usize>,
    /// After a write that changes no endpoint, how long to watch that nothing is sent (ms).
    #[arg(long, default_value_t = 100)]
    quiet_ms: u64,
    /// Seed of the proxies' random choice of services.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the control plane's log in this file (set TRELLIS_LOG for more detail) [default: a
    /// temporary file, removed at the end].
    #[arg(long)]
    control_log: Option<PathBuf>,
}

impl Args {
    /// Every mistake at once.
    fn check(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if self.services == 0 || self.services > 254 * 256 {
            errors.push(format!(
                "--services {}: between 1 and {} (ClusterIPs are 10.96.x.y)",
                self.services,
                254 * 256
            ));
        }
        if self.endpoints == 0 {
            errors.push("--endpoints 0: a rollout needs at least one pod".to_string());
        }
        let pods = self.services * self.endpoints + self.rollouts * self.endpoints;
        if pods > 254 * 256 {
            errors.push(format!(
                "{pods} pods (services × endpoints + rollouts × endpoints): at most {} (pod IPs are 10.244.x.y)",
                254 * 256
            ));
        }
        if self.subscriptions >= self.services {
            errors.push(format!(
                "--subscriptions {}: fewer than --services {} (the rolled service is not among the random ones)",
                self.subscriptions, self.services
            ));
        }
        if self.bystanders() > self.proxies {
            errors.push(format!(
                "--bystanders {}: at most --proxies {}",
                self.bystanders(),
                self.proxies
            ));
        }
        if self.proxies == self.bystanders() {
            errors.push("no proxy subscribes to the rolled service: fan-out is unmeasured".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    fn bystanders(&self) -> usize {
        self.bystanders.unwrap_or(self.proxies / 4)
    }

    fn subscribers(&self) -> usize {
        self.proxies - self.bystanders()
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.check() {
        eprintln!("trellis-discobench: {e}");
        return ExitCode::from(2);
    }
    let dir = std::env::temp_dir().join(format!("trellis-discobench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("trellis-discobench: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    kill_control_plane_on_panic();
    let report = run(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    report.print();
    ExitCode::SUCCESS
}

fn run(args: &Args, dir: &Path) -> Report {
    let cluster = Cluster::new(args);
    let api = FakeApiServer::start(dir, HashMap::new(), TOKEN);
    let started = Instant::now();
    let (objects, rolled) = cluster.fill(&api);
    let fill = started.elapsed();
    eprintln!(
        "filled the API server: {objects} objects in {:.2} s",
        fill.as_secs_f64()
    );

    let mut cp = ControlProcess::start(dir, &api, args.control_log.as_deref());
    let sync_time = cp.wait_destinations(2 * args.services);
    let at_sync = cp.stats();
    eprintln!(
        "control plane synced: {} destinations in {:.2} s",
        2 * args.services,
        sync_time.as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let proxies = Proxies::start(&rt, &cp, &cluster, args);
    let initial = proxies.wait_initial_answers(&cp);
    let subscriptions = cp
        .metrics()
        .sum("trellis_control_discovery_subscriptions", &[]);
    eprintln!(
        "{} proxies have their initial answers after {:.2} s",
        args.proxies,
        initial.all.as_secs_f64()
    );

    let snapshot = rt.block_on(full_snapshot(&cp, &cluster));
    // The snapshot's stream is closed: the subscriptions go back to the proxies' own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cp
        .metrics()
        .sum("trellis_control_discovery_subscriptions", &[])
        != subscriptions
    {
        assert!(
            Instant::now() < deadline,
            "the full snapshot's stream did not end within 10 s (trellis_control_discovery_subscriptions stays above {subscriptions})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let rollout = Rollout::run(&api, &cp, &cluster, rolled, &proxies, args);
    let after = cp.stats();

    // The streams go first, so the control plane's end is not a failure they would report.
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(cp);
    drop(api);
    Report {
        args: Summary {
            services: args.services,
            endpoints: args.endpoints,
            proxies: args.proxies,
            subscriptions: args.subscriptions,
            bystanders: args.bystanders(),
            rollouts: args.rollouts,
        },
        fill,
        sync_time,
        at_sync,
        initial,
        subscriptions,
        snapshot,
        rollout,
        after,
    }
}
