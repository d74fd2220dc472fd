//! The measurements and one measured run: what each measurement loads and through which
//! topologies, and the per-run record (throughput, latency, CPU per request and peak RSS per
//! proxy, TLS handshakes, and how much CPU something else on the machine used meanwhile).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::load::{self, LoadResult, WrkMode};
use crate::procfs;
use crate::topology::{App, Proxy, Side, Tls, Topology};

#[derive(Debug, Clone, Copy)]
pub enum Load {
    Wrk(WrkMode),
    H2load {
        clients: u32,
        streams: u32,
    },
    /// 10 connections echoing 16 KiB messages.
    Tcp,
}

pub struct Measurement {
    pub key: &'static str,
    pub title: &'static str,
    pub tls: Tls,
    pub app: App,
    pub load: Load,
    pub proxies: &'static [Proxy],
    /// The measurement whose direct runs (no sidecars, same load) this one compares with.
    pub direct_ref: &'static str,
}

const ALL: &[Proxy] = &[Proxy::Direct, Proxy::Trellis, Proxy::Haproxy];
const MESHED: &[Proxy] = &[Proxy::Trellis, Proxy::Haproxy];

/// In priority order.
pub const MEASUREMENTS: &[Measurement] = &[
    Measurement {
        key: "http1-plain",
        title: "(a, b) HTTP/1.1 keep-alive, 2 hops plaintext — wrk -t1 -c50",
        tls: Tls::Plain,
        app: App::Http1,
        load: Load::Wrk(WrkMode::KeepAlive),
        proxies: ALL,
        direct_ref: "http1-plain",
    },
    Measurement {
        key: "http1-mtls",
        title: "(c) HTTP/1.1 keep-alive, 2 hops mutual TLS — wrk -t1 -c50",
        tls: Tls::Mutual,
        app: App::Http1,
        load: Load::Wrk(WrkMode::KeepAlive),
        proxies: MESHED,
        direct_ref: "http1-plain",
    },
    Measurement {
        key: "latency-mtls",
        title: "(f) latency at a jittered ~1,000 requests/s (50 connections, 0–100 ms between requests), mutual TLS",
        tls: Tls::Mutual,
        app: App::Http1,
        load: Load::Wrk(WrkMode::Jittered),
        proxies: ALL,
        direct_ref: "latency-mtls",
    },
    Measurement {
        key: "conn-per-request-mtls",
        title: "(e) a new client connection per request (Connection: close, 50 at a time), mutual TLS",
        tls: Tls::Mutual,
        app: App::Http1,
        load: Load::Wrk(WrkMode::Close),
        proxies: ALL,
        direct_ref: "conn-per-request-mtls",
    },
    Measurement {
        key: "h2c-m1-mtls",
        title: "(d) HTTP/2 (h2c) — h2load -c10 -m1, mutual TLS",
        tls: Tls::Mutual,
        app: App::H2c,
        load: Load::H2load {
            clients: 10,
            streams: 1,
        },
        proxies: ALL,
        direct_ref: "h2c-m1-mtls",
    },
    Measurement {
        key: "h2c-m10-mtls",
        title: "(d) HTTP/2 (h2c) — h2load -c10 -m10, mutual TLS",
        tls: Tls::Mutual,
        app: App::H2c,
        load: Load::H2load {
            clients: 10,
            streams: 10,
        },
        proxies: ALL,
        direct_ref: "h2c-m10-mtls",
    },
    Measurement {
        key: "opaque-mtls",
        title: "(g) opaque TCP echo (10 connections, 16 KiB round trips) over mutual TLS",
        tls: Tls::Mutual,
        app: App::Opaque,
        load: Load::Tcp,
        proxies: ALL,
        direct_ref: "opaque-mtls",
    },
];

/// One run of one measurement through one topology.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub measurement: &'static str,
    pub proxy: &'static str,
    pub run: u32,
    pub load: LoadResult,
    /// CPU µs per request of the client-side and server-side proxy, and of the app.
    pub cpu_us_client: Option<f64>,
    pub cpu_us_server: Option<f64>,
    pub cpu_us_app: Option<f64>,
    /// VmRSS right after start (idle) and VmHWM after the run, kB.
    pub idle_rss_kb: Option<(u64, u64)>,
    pub peak_rss_kb: Option<(u64, u64)>,
    /// Handshakes the server-side proxy accepted during the run.
    pub handshakes: Option<f64>,
    pub kex: Option<String>,
    /// CPU used by processes other than the bench's own, in % of one CPU over the run.
    pub other_cpu_pct: f64,
    /// Softirq CPU (network receive processing, charged to no process), % of one CPU.
    pub softirq_cpu_pct: f64,
    pub seconds: f64,
    pub error: Option<String>,
}

/// Builds the topology, runs the load once and records; the topology is gone on return.
pub fn run_once(m: &Measurement, proxy: Proxy, run: u32, secs: u32, dir: &Path) -> Record {
    let mut rec = Record {
        measurement: m.key,
        proxy: proxy.name(),
        run,
        ..Record::default()
    };
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Topology::build(proxy, m.tls, m.app, dir)
    }));
    let topo = match built {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            rec.error = Some(e);
            return rec;
        }
        Err(panic) => {
            rec.error = Some(panic_text(panic));
            return rec;
        }
    };
    let measured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        measure(&topo, m, secs, dir, &mut rec)
    }));
    if let Err(panic) = measured {
        rec.error = Some(panic_text(panic));
    }
    rec.kex = topo.kex.clone();
    rec
}

fn measure(topo: &Topology, m: &Measurement, secs: u32, dir: &Path, rec: &mut Record) {
    let proxies = topo.proxy_pids();
    let pid_of = |side: Side| proxies.iter().find(|(s, _)| *s == side).map(|(_, p)| *p);
    let (client_pid, server_pid) = (pid_of(Side::Client), pid_of(Side::Server));
    if let (Some(c), Some(s)) = (client_pid, server_pid) {
        rec.idle_rss_kb = Some((procfs::status_kb(c, "VmRSS"), procfs::status_kb(s, "VmRSS")));
    }
    let watched: Vec<u32> = [client_pid, server_pid, topo.app_pid()]
        .into_iter()
        .flatten()
        .collect();
    let cpu = |pid: Option<u32>| pid.map(procfs::cpu_time).unwrap_or_default();
    let handshakes_before = topo.server_handshakes();
    let before = (cpu(client_pid), cpu(server_pid), cpu(topo.app_pid()));
    let watched_before: Duration = watched.iter().map(|p| procfs::cpu_time(*p)).sum();
    let (busy_before, own_before) = (procfs::machine_busy(), procfs::own_and_children().0);
    let start = Instant::now();

    let url = topo.server.url(m.app.port(), "/");
    let result = match m.load {
        Load::Wrk(mode) => load::wrk(&topo.client, &url, secs, mode, dir),
        Load::H2load { clients, streams } => {
            load::h2load(&topo.client, &url, secs, clients, streams)
        }
        Load::Tcp => load::tcp_load(
            &topo.client,
            topo.server.addr(m.app.port()),
            secs,
            10,
            16384,
        ),
    };

    let elapsed = start.elapsed();
    let (busy_after, own_after) = (procfs::machine_busy(), procfs::own_and_children().0);
    let watched_after: Duration = watched.iter().map(|p| procfs::cpu_time(*p)).sum();
    let after = (cpu(client_pid), cpu(server_pid), cpu(topo.app_pid()));
    let known = watched_after.saturating_sub(watched_before)
        + own_after.saturating_sub(own_before)
        + result.generator_cpu;
    let other = busy_after
        .0
        .saturating_sub(busy_before.0)
        .saturating_sub(known);
    let pct = |d: Duration| d.as_secs_f64() / elapsed.as_secs_f64().max(0.001) * 100.0;
    rec.other_cpu_pct = pct(other);
    rec.softirq_cpu_pct = pct(busy_after.1.saturating_sub(busy_before.1));
    rec.seconds = elapsed.as_secs_f64();

    let per_request = |b: Duration, a: Duration| {
        (result.requests > 0.0).then(|| a.saturating_sub(b).as_secs_f64() * 1e6 / result.requests)
    };
    if client_pid.is_some() {
        rec.cpu_us_client = per_request(before.0, after.0);
        rec.cpu_us_server = per_request(before.1, after.1);
    }
    if topo.app_pid().is_some() {
        rec.cpu_us_app = per_request(before.2, after.2);
    }
    if let (Some(c), Some(s)) = (client_pid, server_pid) {
        rec.peak_rss_kb = Some((procfs::status_kb(c, "VmHWM"), procfs::status_kb(s, "VmHWM")));
    }
    if let (Some(b), Some(a)) = (handshakes_before, topo.server_handshakes()) {
        rec.handshakes = Some(a - b);
    }
    if result.requests == 0.0 {
        rec.error = Some("the load generator completed no request".into());
    }
    rec.load = result;
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}
