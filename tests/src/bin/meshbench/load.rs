//! The load generators, run in the client pod on the load CPU (0) and bounded by `timeout`:
//! wrk (HTTP/1.1: keep-alive, a new connection per request, jittered low rate), h2load (h2c),
//! and `tcp-load`, this binary's own opaque-TCP echo client. Each returns a [`LoadResult`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use trellis_tests::harness::Pod;

use crate::procfs;

/// What one load-generator run reported.
#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    pub requests: f64,
    pub rps: f64,
    /// Latency percentiles in milliseconds (h2load prints no percentiles: mean only, in p50).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// Errors the generator counted (socket errors, non-2xx, failed streams).
    pub errors: f64,
    /// Bytes per second both ways (opaque TCP only).
    pub mbytes_per_s: Option<f64>,
    /// CPU time of the load generator itself.
    pub generator_cpu: Duration,
}

/// How wrk is driven.
#[derive(Debug, Clone, Copy)]
pub enum WrkMode {
    /// 50 keep-alive connections, as fast as they go.
    KeepAlive,
    /// `Connection: close`: a new client connection per request.
    Close,
    /// 50 connections, each waiting a random 0–100 ms before every request (~1,000 requests/s).
    Jittered,
}

/// Prints exact percentiles (µs) when wrk ends: its `--latency` text has no p99.9.
const DONE_LUA: &str = "function done(summary, latency, requests)\n  \
     for _, p in ipairs({50, 99, 99.9}) do\n    \
     io.write(string.format(\"PCT %g %d\\n\", p, latency:percentile(p)))\n  end\nend\n";

/// Each connection waits 0–100 ms (uniform) before every request.
const JITTER_LUA: &str =
    "math.randomseed(os.time())\nfunction delay()\n  return math.random(0, 100)\nend\n";

pub fn wrk(pod: &Pod, url: &str, secs: u32, mode: WrkMode, dir: &std::path::Path) -> LoadResult {
    let duration = format!("-d{secs}s");
    let mut args = vec![
        "-t1",
        "-c50",
        duration.as_str(),
        "--latency",
        "--timeout",
        "5s",
    ];
    let script = dir.join(format!("wrk-{mode:?}.lua"));
    let lua = match mode {
        WrkMode::Jittered => format!("{JITTER_LUA}{DONE_LUA}"),
        _ => DONE_LUA.to_string(),
    };
    let _ = std::fs::write(&script, lua);
    let script_arg = script.to_string_lossy().into_owned();
    args.extend(["-s", script_arg.as_str()]);
    if let WrkMode::Close = mode {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let (text, cpu) = bounded(pod, "wrk", &args, secs);
    let mut r = parse_wrk(&text);
    r.generator_cpu = cpu;
    r
}

fn parse_wrk(text: &str) -> LoadResult {
    let line_value = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    // "PCT 99.9 1234" lines from DONE_LUA, in µs.
    let pct = |p: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("PCT "))
            .filter_map(|l| l.split_once(' '))
            .find(|(q, _)| *q == p)
            .and_then(|(_, us)| us.trim().parse::<f64>().ok())
            .map(|us| us / 1000.0)
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let socket_errors: f64 = text
        .lines()
        .find(|l| l.contains("Socket errors"))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    let non_2xx: f64 = text
        .lines()
        .find(|l| l.contains("Non-2xx"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0.0);
    LoadResult {
        requests,
        rps: line_value("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: pct("50").or_else(|| line_value("50%").and_then(|v| millis(&v))),
        p99_ms: pct("99").or_else(|| line_value("99%").and_then(|v| millis(&v))),
        p999_ms: pct("99.9"),
        errors: socket_errors + non_2xx,
        ..LoadResult::default()
    }
}

/// wrk's latency text (`812.00us`, `1.20ms`, `2.01s`) in milliseconds.
fn millis(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    match unit {
        "us" => Some(n / 1000.0),
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        "m" => Some(n * 60_000.0),
        _ => None,
    }
}

/// h2load with prior-knowledge h2c: `clients` connections, `streams` concurrent streams each.
pub fn h2load(pod: &Pod, url: &str, secs: u32, clients: u32, streams: u32) -> LoadResult {
    let (c, m, d) = (
        format!("-c{clients}"),
        format!("-m{streams}"),
        secs.to_string(),
    );
    let args = ["-t1", c.as_str(), m.as_str(), "-D", d.as_str(), url];
    let (text, cpu) = bounded(pod, "h2load", &args, secs);
    let field = |line_start: &str, idx: usize| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.split_whitespace().nth(idx))
            .map(|s| s.trim_end_matches(',').to_string())
    };
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
    let succeeded = field("requests:", 7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let failed: f64 = field("requests:", 9)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let errored: f64 = field("requests:", 11)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // "finished in 10.00s, 12345.60 req/s, 1.23MB/s"
    let rps = field("finished in", 3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // "time for request:  1.2ms  20ms  3.4ms  ..." : min max mean sd
    let mean = field("time for request:", 5).and_then(|v| millis(&v));
    LoadResult {
        requests: succeeded,
        rps,
        p50_ms: mean,
        errors: failed + errored,
        generator_cpu: cpu,
        ..LoadResult::default()
    }
}

/// This binary's `tcp-load` subcommand in the client pod: `conns` connections each echoing
/// `chunk`-byte messages to `target` for `secs`.
pub fn tcp_load(pod: &Pod, target: SocketAddr, secs: u32, conns: u32, chunk: usize) -> LoadResult {
    let exe = std::env::current_exe().map_or_else(
        |_| "trellis-meshbench".to_string(),
        |p| p.to_string_lossy().into_owned(),
    );
    let (t, s, c, k) = (
        target.to_string(),
        secs.to_string(),
        conns.to_string(),
        chunk.to_string(),
    );
    let args = ["tcp-load", t.as_str(), s.as_str(), c.as_str(), k.as_str()];
    let (text, cpu) = bounded(pod, &exe, &args, secs);
    let v: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let num = |k: &str| v[k].as_f64();
    LoadResult {
        requests: num("round_trips").unwrap_or(0.0),
        rps: num("round_trips_per_s").unwrap_or(0.0),
        p50_ms: num("p50_ms"),
        p99_ms: num("p99_ms"),
        p999_ms: None,
        errors: num("errors").unwrap_or(0.0),
        mbytes_per_s: num("mbytes_per_s"),
        generator_cpu: cpu,
    }
}

/// Runs `program` in `pod` on CPU 0 under `timeout` (the run's seconds + 30 s); its stdout and
/// the CPU time it used.
fn bounded(pod: &Pod, program: &str, args: &[&str], secs: u32) -> (String, Duration) {
    let limit = format!("{}s", secs + 30);
    let mut full = vec!["-k", "5s", limit.as_str(), "taskset", "-c", "0", program];
    full.extend_from_slice(args);
    let before = procfs::own_and_children().1;
    let out = pod.exec("timeout", &full);
    let cpu = procfs::own_and_children().1.saturating_sub(before);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&format!(
            "\n[{program} exited {}: {}]",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        eprintln!("  {program} failed: {}", text.trim());
    }
    (text, cpu)
}

/// The `tcp-load` subcommand itself: echo round trips over `conns` connections, one thread
/// each; prints one JSON object.
pub fn tcp_load_main(args: &[String]) -> std::process::ExitCode {
    let parsed = (|| -> Option<(SocketAddr, u64, u32, usize)> {
        Some((
            args.first()?.parse().ok()?,
            args.get(1)?.parse().ok()?,
            args.get(2)?.parse().ok()?,
            args.get(3)?.parse().ok()?,
        ))
    })();
    let Some((target, secs, conns, chunk)) = parsed else {
        eprintln!("usage: trellis-meshbench tcp-load ADDR SECONDS CONNECTIONS CHUNK_BYTES");
        return std::process::ExitCode::from(2);
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..conns)
        .map(|_| std::thread::spawn(move || echo_loop(target, deadline, chunk)))
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    for w in workers {
        match w.join() {
            Ok(Ok(mut l)) => latencies.append(&mut l),
            _ => errors += 1,
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
    };
    let n = latencies.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "round_trips": n,
            "round_trips_per_s": n / secs as f64,
            "mbytes_per_s": n * 2.0 * chunk as f64 / secs as f64 / 1e6,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "errors": errors,
        })
    );
    std::process::ExitCode::SUCCESS
}

fn echo_loop(
    target: SocketAddr,
    deadline: Instant,
    chunk: usize,
) -> std::io::Result<Vec<Duration>> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let out = vec![0x5au8; chunk];
    let mut back = vec![0u8; chunk];
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let start = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}
