//! `trellis-meshbench`: Trellis side by side with haproxy as the sidecar pair, through real
//! pods (network namespaces, the real interception rules), in one run on one machine. Every
//! measurement builds a fresh topology per run — direct (no sidecars), Trellis, haproxy,
//! interleaved — with the load generator on CPU 0 and everything else (proxies with one worker
//! thread, the app, the control plane) on CPU 1. Prints a JSON line per run, then one Markdown
//! table per measurement. Run it through `sudo scripts/meshbench`, which installs the tools
//! and builds the release binaries first.
//!
//! Usage: trellis-meshbench [--runs N] [--seconds S] [--quick] [--only KEY,KEY] [--no-idle]
//!        trellis-meshbench tcp-load ADDR SECONDS CONNECTIONS CHUNK   (internal: opaque load)

mod haproxy;
mod idle;
mod load;
mod nginx;
mod procfs;
mod report;
mod run;
mod topology;

use std::process::ExitCode;
use std::time::Instant;

use trellis_tests::harness::missing_privileges;

struct Options {
    runs: u32,
    seconds: u32,
    only: Option<Vec<String>>,
    idle: bool,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        runs: 3,
        seconds: 10,
        only: None,
        idle: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--runs" => o.runs = number(&value("--runs")?, "--runs")?,
            "--seconds" => o.seconds = number(&value("--seconds")?, "--seconds")?,
            "--no-idle" => o.idle = false,
            "--quick" => {
                o.runs = 1;
                o.seconds = 3;
            }
            "--only" => o.only = Some(value("--only")?.split(',').map(str::to_string).collect()),
            "-h" | "--help" => {
                return Err(
                    "usage: trellis-meshbench [--runs N] [--seconds S] [--quick] \
                            [--only KEY,KEY] [--no-idle]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if let Some(only) = &o.only {
        let known: Vec<&str> = run::MEASUREMENTS.iter().map(|m| m.key).collect();
        if let Some(bad) = only.iter().find(|k| !known.contains(&k.as_str())) {
            return Err(format!(
                "--only: no measurement {bad:?}; known: {}",
                known.join(", ")
            ));
        }
    }
    Ok(o)
}

fn number(v: &str, name: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{name}: expected a positive number, got {v:?}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("tcp-load") {
        return load::tcp_load_main(&args[1..]);
    }
    let options = match parse_options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(reason) = missing_privileges() {
        eprintln!("trellis-meshbench {reason}");
        return ExitCode::from(2);
    }
    let cpus = procfs::cpus();
    if cpus < 2 {
        eprintln!(
            "trellis-meshbench needs 2 CPUs (load generator on 0, the rest on 1); found {cpus}"
        );
        return ExitCode::from(2);
    }
    // Before any thread or child exists: everything spawned from now on inherits CPU 1.
    if let Err(e) = procfs::pin_self(1) {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    let nofile = procfs::raise_nofile();
    let root = std::env::temp_dir().join(format!("meshbench-{}", std::process::id()));
    let started = Instant::now();
    let mut records = Vec::new();
    for run in 1..=options.runs {
        for m in run::MEASUREMENTS {
            if options
                .only
                .as_ref()
                .is_some_and(|o| !o.iter().any(|k| k == m.key))
            {
                continue;
            }
            for proxy in m.proxies {
                let name = format!("{}-{}-{run}", m.key, proxy.name());
                eprintln!("[{:>5.0}s] {name}", started.elapsed().as_secs_f64());
                let rec = match topology::run_dir(&root, &name) {
                    Ok(dir) => run::run_once(m, *proxy, run, options.seconds, &dir),
                    Err(e) => run::Record {
                        measurement: m.key,
                        proxy: proxy.name(),
                        run,
                        error: Some(e),
                        ..run::Record::default()
                    },
                };
                if let Some(e) = &rec.error {
                    eprintln!("  FAILED: {e}");
                }
                println!("{}", report::json_line(&rec));
                records.push(rec);
            }
        }
    }
    let idle = if options.idle && nofile >= 20_000 {
        eprintln!(
            "[{:>5.0}s] idle connections",
            started.elapsed().as_secs_f64()
        );
        idle::measure_all(&root)
    } else {
        if options.idle {
            eprintln!("skipping idle connections: open-files limit {nofile} < 20,000");
        }
        Vec::new()
    };
    let _ = std::fs::remove_dir_all(&root);
    println!(
        "\n## trellis-meshbench: {} run(s) of {} s each\n",
        options.runs, options.seconds
    );
    println!("{}", report::preamble(cpus));
    println!("{}", report::tables(&records));
    println!("{}", report::idle_table(&idle));
    println!("\nTotal time {:.0} s.", started.elapsed().as_secs_f64());
    if records.iter().all(|r| r.error.is_some()) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
