//! The output: one JSON line per run as it ends (for later analysis), and at the end one
//! Markdown table per measurement — median and min–max over the runs for each topology, and
//! the ratios Trellis/haproxy and Trellis/direct of the medians — with the runs flagged where
//! something else on the machine used noticeable CPU.

use crate::run::{MEASUREMENTS, Record};

/// Other processes' CPU above this (% of one CPU over the run) flags the run.
pub const NOISY_PCT: f64 = 15.0;

pub fn json_line(r: &Record) -> String {
    serde_json::json!({
        "measurement": r.measurement,
        "proxy": r.proxy,
        "run": r.run,
        "seconds": r.seconds,
        "requests": r.load.requests,
        "rps": r.load.rps,
        "p50_ms": r.load.p50_ms,
        "p99_ms": r.load.p99_ms,
        "p999_ms": r.load.p999_ms,
        "errors": r.load.errors,
        "mbytes_per_s": r.load.mbytes_per_s,
        "generator_cpu_s": r.load.generator_cpu.as_secs_f64(),
        "cpu_us_per_req_client_proxy": r.cpu_us_client,
        "cpu_us_per_req_server_proxy": r.cpu_us_server,
        "cpu_us_per_req_app": r.cpu_us_app,
        "idle_rss_kb": r.idle_rss_kb.map(|(c, s)| [c, s]),
        "peak_rss_kb": r.peak_rss_kb.map(|(c, s)| [c, s]),
        "server_tls_handshakes": r.handshakes,
        "key_exchange": r.kex,
        "other_cpu_pct": r.other_cpu_pct,
        "softirq_cpu_pct": r.softirq_cpu_pct,
        "error": r.error,
    })
    .to_string()
}

/// Median, min and max of the values.
fn stats(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

fn cell(s: Option<(f64, f64, f64)>, decimals: usize) -> String {
    match s {
        None => "—".into(),
        Some((m, lo, hi)) if (hi - lo).abs() < f64::EPSILON => format!("{m:.decimals$}"),
        Some((m, lo, hi)) => format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})"),
    }
}

fn ratio(a: Option<(f64, f64, f64)>, b: Option<(f64, f64, f64)>) -> String {
    match (a, b) {
        (Some((a, ..)), Some((b, ..))) if b != 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    }
}

type Metric = (&'static str, usize, fn(&Record) -> Option<f64>);

const METRICS: &[Metric] = &[
    ("requests/s", 0, |r| Some(r.load.rps)),
    ("p50 ms (h2load: mean)", 2, |r| r.load.p50_ms),
    ("p99 ms", 2, |r| r.load.p99_ms),
    ("p99.9 ms", 2, |r| r.load.p999_ms),
    ("MB/s (both ways)", 1, |r| r.load.mbytes_per_s),
    ("client proxy CPU µs/request", 1, |r| r.cpu_us_client),
    ("server proxy CPU µs/request", 1, |r| r.cpu_us_server),
    ("app CPU µs/request", 1, |r| r.cpu_us_app),
    ("client proxy peak RSS MB", 1, |r| {
        r.peak_rss_kb.map(|(c, _)| c as f64 / 1024.0)
    }),
    ("server proxy peak RSS MB", 1, |r| {
        r.peak_rss_kb.map(|(_, s)| s as f64 / 1024.0)
    }),
    ("server-side TLS handshakes per run", 0, |r| r.handshakes),
    ("load-generator errors", 0, |r| Some(r.load.errors)),
    ("kernel softirq CPU % (all CPUs)", 0, |r| {
        Some(r.softirq_cpu_pct)
    }),
    ("other processes' CPU %", 0, |r| Some(r.other_cpu_pct)),
];

pub fn tables(records: &[Record]) -> String {
    let mut out = String::new();
    for m in MEASUREMENTS {
        let of = |key: &str, proxy: &str| -> Vec<&Record> {
            records
                .iter()
                .filter(|r| r.measurement == key && r.proxy == proxy && r.error.is_none())
                .collect()
        };
        let (trellis, haproxy) = (of(m.key, "trellis"), of(m.key, "haproxy"));
        let direct = of(m.direct_ref, "direct");
        if records.iter().all(|r| r.measurement != m.key) {
            continue;
        }
        out.push_str(&format!(
            "\n### {}\n\nruns: direct {}{}, Trellis {}, haproxy {}\n\n",
            m.title,
            direct.len(),
            if m.direct_ref != m.key {
                format!(" (from {})", m.direct_ref)
            } else {
                String::new()
            },
            trellis.len(),
            haproxy.len()
        ));
        out.push_str(
            "| metric | direct | Trellis | haproxy | Trellis/haproxy | Trellis/direct |\n",
        );
        out.push_str("|---|---|---|---|---|---|\n");
        for (name, decimals, get) in METRICS {
            let s = |rs: &[&Record]| stats(rs.iter().filter_map(|r| get(r)).collect());
            let (d, t, h) = (s(&direct), s(&trellis), s(&haproxy));
            if d.is_none() && t.is_none() && h.is_none() {
                continue;
            }
            let proxy_only = name.contains("proxy") || name.contains("handshakes");
            out.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} |\n",
                cell(d, *decimals),
                cell(t, *decimals),
                cell(h, *decimals),
                ratio(t, h),
                if proxy_only {
                    "—".into()
                } else {
                    ratio(t, d)
                },
            ));
        }
        let kex = |rs: &[&Record]| {
            let mut k: Vec<String> = rs.iter().filter_map(|r| r.kex.clone()).collect();
            k.sort();
            k.dedup();
            if k.is_empty() {
                "—".into()
            } else {
                k.join(", ")
            }
        };
        if trellis.iter().chain(&haproxy).any(|r| r.kex.is_some()) {
            out.push_str(&format!(
                "\nKey exchange seen in the proxy-to-proxy ServerHello: Trellis {}, haproxy {}.\n",
                kex(&trellis),
                kex(&haproxy)
            ));
        }
        let noisy: Vec<String> = records
            .iter()
            .filter(|r| r.measurement == m.key && r.other_cpu_pct > NOISY_PCT)
            .map(|r| format!("{} run {} ({:.0} %)", r.proxy, r.run, r.other_cpu_pct))
            .collect();
        if !noisy.is_empty() {
            out.push_str(&format!(
                "\nNoisy runs (other processes > {NOISY_PCT:.0} % of a CPU): {}.\n",
                noisy.join(", ")
            ));
        }
        let failed: Vec<String> = records
            .iter()
            .filter(|r| r.measurement == m.key)
            .filter_map(|r| {
                r.error
                    .as_ref()
                    .map(|e| format!("{} run {}: {}", r.proxy, r.run, first_line(e)))
            })
            .collect();
        if !failed.is_empty() {
            out.push_str(&format!(
                "\nFailed runs (left out): {}.\n",
                failed.join("; ")
            ));
        }
    }
    out.push_str(&idle_rss(records));
    out
}

fn idle_rss(records: &[Record]) -> String {
    let mut out =
        String::from("\n### Idle RSS of a fresh proxy (right after it is ready, before load)\n\n");
    out.push_str("| proxy | client side MB | server side MB |\n|---|---|---|\n");
    for proxy in ["trellis", "haproxy"] {
        let rs: Vec<(u64, u64)> = records
            .iter()
            .filter(|r| r.proxy == proxy && r.measurement == "http1-plain")
            .filter_map(|r| r.idle_rss_kb)
            .collect();
        let s =
            |f: fn(&(u64, u64)) -> u64| stats(rs.iter().map(|x| f(x) as f64 / 1024.0).collect());
        out.push_str(&format!(
            "| {proxy} (plaintext) | {} | {} |\n",
            cell(s(|x| x.0), 1),
            cell(s(|x| x.1), 1)
        ));
    }
    out
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// What was measured, how, and what is not the same between the two proxies.
pub fn preamble(cpus: usize) -> String {
    format!(
        "Machine: {cpus} CPUs. Load generator (wrk / h2load / tcp-load) pinned to CPU 0; both \
proxies, the app (nginx, 1 process, 13-byte body, access log off; the test app's TCP echo for \
opaque), the control plane and this bench pinned to CPU 1. Each proxy runs one worker thread \
(Trellis `--threads 1 --access-log off`; haproxy `nbthread 1`). Every run builds a fresh pair of \
pods; direct = the same pods without sidecars or interception rules.\n\n\
Not equal between the two: haproxy's client side forwards every intercepted connection to one \
fixed server (the server pod IP, the measurement's port), because it cannot read SO_ORIGINAL_DST; \
Trellis routes by the original destination and applies its policy per request. haproxy checks \
the peer chain against the mesh CA (`verify required`), not the SPIFFE identity; Trellis checks \
the server's SPIFFE identity. Between the proxies both speak HTTP/2 over TLS 1.3 (haproxy \
`alpn h2`, `http-reuse always`); opaque TCP is one TLS connection per client connection in both. \
haproxy's server side is pinned to X25519 (`curves X25519`, OpenSSL 3.0 has no ML-KEM); Trellis \
has no flag for it (rustls, aws-lc-rs provider defaults, which also offer X25519MLKEM768): the \
group actually negotiated is read from the captured ServerHello and shown under each mutual-TLS \
table; a mismatch with haproxy's X25519 would show there. \
CPU per request = utime+stime delta of the process ÷ requests completed; peak RSS = VmHWM after \
the run; handshakes = successful handshakes accepted by the server-side proxy during the run \
(Trellis `trellis_tls_handshakes_total{{direction=\"inbound\",result=\"ok\"}}`, haproxy \
`CumSslConns`); \"other processes' CPU\" = machine busy time minus the proxies, app, load \
generator and this bench, in % of one CPU, softirq time (network receive processing, charged \
to no process) shown apart; a run is flagged when other processes used more than {NOISY_PCT:.0} %."
    )
}

pub fn idle_table(results: &[crate::idle::IdleResult]) -> String {
    if results.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n### Trellis RSS per 10,000 idle client connections through the client sidecar\n\n\
         | connections | held | client proxy MB per 10k | server proxy MB per 10k |\n|---|---|---|---|\n",
    );
    for r in results {
        match &r.error {
            Some(e) => out.push_str(&format!(
                "| {} | failed: {} | — | — |\n",
                r.label,
                first_line(e)
            )),
            None => out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} |\n",
                r.label,
                r.connections,
                r.per_10k_kb.0 / 1024.0,
                r.per_10k_kb.1 / 1024.0
            )),
        }
    }
    out.push_str(
        "\n(RSS after the connections are open and idle minus before, scaled to 10,000. \
        haproxy is not measured here: its maxconn needs ~2 descriptors per connection, above the \
        20,000 hard limit.)\n",
    );
    out
}
