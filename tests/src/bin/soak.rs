//! `trellis-soak`: a long mixed-load run through a meshed client/server pair, sampling the
//! proxies' resident memory, open descriptors and runtime tasks, to show they stay flat (not
//! part of the test suite; the note and README report its output).
//!
//! Pods in network namespaces with the real interception rules; identities from a control plane
//! issuing 90-second certificates (each proxy renews about once a minute); a strict ServerPolicy
//! and a retrying TrafficPolicy over mutual TLS. For the whole run, in parallel and each bounded
//! by the deadline:
//! - HTTP/1.1: keep-alive load, 4 connections, paced;
//! - HTTP/2: `h2load` bursts (2 connections × 4 streams);
//! - gRPC: server streams of 40 messages;
//! - opaque TCP: an echo over a new connection, ten times a second;
//! - policy: a TrafficPolicy change every 30 s (`trellis-control apply --wait`).
//!
//! Every `--sample-secs` both proxies' VmRSS, descriptor count and tokio task count are printed;
//! at the end, the first sample after warm-up is compared with the last few, and the run fails
//! (exit 1) on any failed request or on growth beyond the bounds printed with the verdict.
//!
//! Usage: trellis-soak [--minutes 30] [--sample-secs 10]   (root; h2load installed)

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use trellis_tests::harness::{Mesh, Pod, missing_privileges};

/// One sample of one proxy.
#[derive(Clone, Copy)]
struct Sample {
    rss_kb: u64,
    fds: u64,
    tasks: f64,
}

/// Counts of one kind of traffic.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn add(&self, ok: u64, failed: u64) {
        self.ok.fetch_add(ok, Ordering::Relaxed);
        self.failed.fetch_add(failed, Ordering::Relaxed);
    }
    fn get(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

struct Options {
    minutes: u64,
    sample_secs: u64,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        minutes: 30,
        sample_secs: 10,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| {
            args.get(i + 1)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
                .ok_or(format!("{} needs a positive whole number", args[i]))
        };
        match args[i].as_str() {
            "--minutes" => o.minutes = value(i)?,
            "--sample-secs" => o.sample_secs = value(i)?,
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: trellis-soak [--minutes 30] [--sample-secs 10]"
                ));
            }
        }
        i += 2;
    }
    Ok(o)
}

fn main() -> ExitCode {
    if let Some(reason) = missing_privileges() {
        eprintln!("trellis-soak {reason}");
        return ExitCode::from(2);
    }
    let options = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("trellis-soak: {e}");
            return ExitCode::from(2);
        }
    };
    let mesh = Mesh::create();
    let control = mesh.pod("control");
    control.start_control_plane_with(
        &mesh.log_dir().join("control-state"),
        &["--cert-ttl", "90s"],
    );
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "soak"]);
    server.spawn_app(&["grpc", "--listen", "0.0.0.0:50051", "--name", "soak"]);
    server.spawn_app(&["tcp-echo", "--listen", "0.0.0.0:9000"]);
    let client = mesh.pod("client");
    for (pod, sa) in [(&server, "server"), (&client, "client")] {
        let flags = control.mesh_flags(&mesh, &format!("default/{sa}"), sa);
        pod.start_sidecar(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let policy_file = mesh.log_dir().join("soak-policy.yaml");
    let apply = |timeout_s: u64| -> Result<(), String> {
        std::fs::write(&policy_file, policy(&server, timeout_s)).map_err(|e| e.to_string())?;
        let out = control.control(&["apply", "--wait", "-f", &policy_file.to_string_lossy()]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    if let Err(e) = apply(5) {
        eprintln!("trellis-soak: the first policy was not applied: {e}");
        return ExitCode::FAILURE;
    }

    let deadline = Instant::now() + Duration::from_secs(options.minutes * 60);
    let stop = AtomicBool::new(false);
    let running = || !stop.load(Ordering::Relaxed) && Instant::now() < deadline;
    let (http1, h2, grpc, tcp, policies) = <(Tally, Tally, Tally, Tally, Tally)>::default();
    let mut samples: Vec<(u64, Sample, Sample)> = Vec::new();
    let start = Instant::now();
    println!(
        "trellis-soak: {} min, sampling every {} s; columns: elapsed s, client proxy RSS kB / fds / \
         tasks, server proxy RSS kB / fds / tasks, requests ok (failed): http1 h2 grpc tcp, policy changes",
        options.minutes, options.sample_secs
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            let url = server.url(8080, "/");
            while running() {
                let out = client.exec(
                    &trellis_tests::harness::testapp_bin().to_string_lossy(),
                    &[
                        "load",
                        "--url",
                        &url,
                        "--requests",
                        "400",
                        "--concurrency",
                        "4",
                        "--pace-ms",
                        "5",
                    ],
                );
                match last_json(&out.stdout) {
                    Some(v) => http1.add(
                        v["ok"].as_u64().unwrap_or(0),
                        v["failed"].as_u64().unwrap_or(400),
                    ),
                    None => http1.add(0, 400),
                }
            }
        });
        s.spawn(|| {
            let url = server.url(8080, "/");
            while running() {
                let out = client.exec("h2load", &["-c2", "-m4", "-n2000", &url]);
                let text = String::from_utf8_lossy(&out.stdout);
                match h2load_counts(&text) {
                    Some((ok, failed)) => h2.add(ok, failed),
                    None => h2.add(0, 2000),
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        s.spawn(|| {
            let target = format!("http://{}", server.addr(50051));
            while running() {
                let out = client.exec(
                    &trellis_tests::harness::testapp_bin().to_string_lossy(),
                    &[
                        "grpc-call",
                        "--target",
                        &target,
                        "--call",
                        "stream",
                        "--count",
                        "40",
                        "--interval-ms",
                        "25",
                    ],
                );
                let v = last_json(&out.stdout);
                let items = v
                    .as_ref()
                    .and_then(|v| v["items"].as_array().map(Vec::len))
                    .unwrap_or(0);
                let ok = v.as_ref().is_some_and(|v| v["ok"] == true) && items == 40;
                grpc.add(u64::from(ok), u64::from(!ok));
            }
        });
        s.spawn(|| {
            let connect = server.addr(9000).to_string();
            while running() {
                let out = client.exec(
                    &trellis_tests::harness::testapp_bin().to_string_lossy(),
                    &["tcp-call", "--connect", &connect, "--send", "soak echo"],
                );
                let ok = last_json(&out.stdout).is_some_and(|v| v["received"] == "soak echo");
                tcp.add(u64::from(ok), u64::from(!ok));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        s.spawn(|| {
            let mut n = 0u64;
            while running() {
                sleep_while(Duration::from_secs(30), &running);
                if !running() {
                    break;
                }
                n += 1;
                match apply(5 + n % 2) {
                    Ok(()) => policies.add(1, 0),
                    Err(e) => {
                        eprintln!("policy change {n} failed: {e}");
                        policies.add(0, 1);
                    }
                }
            }
        });
        while running() {
            sleep_while(Duration::from_secs(options.sample_secs), &running);
            let (c, sv) = (sample(&client), sample(&server));
            let elapsed = start.elapsed().as_secs();
            let t = |t: &Tally| {
                let (ok, failed) = t.get();
                format!("{ok} ({failed})")
            };
            println!(
                "{elapsed:>6} {:>7} {:>4} {:>5} | {:>7} {:>4} {:>5} | {} {} {} {} | {}",
                c.rss_kb,
                c.fds,
                c.tasks,
                sv.rss_kb,
                sv.fds,
                sv.tasks,
                t(&http1),
                t(&h2),
                t(&grpc),
                t(&tcp),
                t(&policies)
            );
            samples.push((elapsed, c, sv));
        }
        stop.store(true, Ordering::Relaxed);
    });

    let failed: u64 = [&http1, &h2, &grpc, &tcp, &policies]
        .iter()
        .map(|t| t.get().1)
        .sum();
    let rotations = (
        client
            .metrics()
            .sum("trellis_identity_certificates_total", &[("result", "ok")]),
        server
            .metrics()
            .sum("trellis_identity_certificates_total", &[("result", "ok")]),
    );
    println!(
        "totals: http1 {:?}, h2 {:?}, grpc streams {:?}, tcp echoes {:?}, policy changes {:?} \
         (ok, failed); certificates obtained client {} / server {}",
        http1.get(),
        h2.get(),
        grpc.get(),
        tcp.get(),
        policies.get(),
        rotations.0,
        rotations.1
    );
    let flat = verdict(&samples);
    if failed == 0 && flat {
        println!("verdict: flat, no failures");
        ExitCode::SUCCESS
    } else {
        println!("verdict: {failed} failures; flat: {flat}");
        ExitCode::FAILURE
    }
}

/// The mutual-TLS policy pair, with a per-request timeout that alternates between changes.
fn policy(server: &Pod, timeout_s: u64) -> String {
    let addrs = [8080, 50051, 9000]
        .iter()
        .map(|p| format!("\"{}\"", server.addr(*p)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: soak}}\nspec:\n  \
         destination: {{addresses: [{addrs}]}}\n  \
         tls: {{mode: mutual, serverIdentity: spiffe://cluster.local/ns/default/sa/server}}\n  \
         timeout: {timeout_s}s\n  \
         retries: {{maxRetries: 2, on: [connect-failure, reset, unavailable]}}\n---\n\
         apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {{name: soak}}\n\
         spec: {{selector: {{serviceAccount: server}}, mtls: strict}}\n"
    )
}

fn sample(pod: &Pod) -> Sample {
    let pid = pod.proxy_pid();
    let fds = trellis_tests::procfs::open_fds(pid).unwrap_or(0) as u64;
    Sample {
        rss_kb: trellis_tests::procfs::status_kb(pid, "VmRSS").unwrap_or(0),
        fds,
        tasks: pod.metrics().sum("trellis_runtime_tasks", &[]),
    }
}

/// Resources flat: the mean of the last quarter of samples against the first sample after a
/// warm-up (a quarter of the run, at most 5 minutes). Bounds: RSS +25 % or +4 MB, whichever is
/// larger; descriptors and tasks +50 (they follow the load's in-flight connections).
fn verdict(samples: &[(u64, Sample, Sample)]) -> bool {
    let warm = (samples.len() / 4).min(30);
    let tail = &samples[samples.len() - (samples.len() / 4).max(1)..];
    let Some(base) = samples.get(warm) else {
        println!("too few samples for a verdict");
        return false;
    };
    let mut flat = true;
    for (side, pick) in [
        (
            "client",
            (|s: &(u64, Sample, Sample)| s.1) as fn(&_) -> Sample,
        ),
        ("server", |s| s.2),
    ] {
        let b = pick(base);
        let n = tail.len() as f64;
        let mean = |f: fn(&Sample) -> f64| tail.iter().map(|s| f(&pick(s))).sum::<f64>() / n;
        let rss = mean(|s| s.rss_kb as f64);
        let fds = mean(|s| s.fds as f64);
        let tasks = mean(|s| s.tasks);
        let rss_ok = rss <= (b.rss_kb as f64 * 1.25).max(b.rss_kb as f64 + 4096.0);
        let fds_ok = fds <= b.fds as f64 + 50.0;
        let tasks_ok = tasks <= b.tasks + 50.0;
        println!(
            "{side} proxy: RSS {} kB at {} s -> {rss:.0} kB (last quarter mean); fds {} -> {fds:.1}; \
             tasks {} -> {tasks:.1}: {}",
            b.rss_kb,
            base.0,
            b.fds,
            b.tasks,
            if rss_ok && fds_ok && tasks_ok {
                "flat"
            } else {
                "GROWING"
            }
        );
        flat &= rss_ok && fds_ok && tasks_ok;
    }
    flat
}

fn last_json(stdout: &[u8]) -> Option<serde_json::Value> {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim().lines().last()?).ok()
}

/// `requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, ...`
fn h2load_counts(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("requests:"))?;
    let field = |name: &str| -> Option<u64> {
        let words: Vec<&str> = line.split([',', ' ']).filter(|w| !w.is_empty()).collect();
        let i = words.iter().position(|w| *w == name)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    let ok = field("succeeded")?;
    let total = field("total")?;
    Some((ok, total - ok))
}

fn sleep_while(total: Duration, running: &impl Fn() -> bool) {
    let end = Instant::now() + total;
    while running() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
}
