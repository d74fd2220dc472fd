//! The report: a table on stdout (initial sync, initial answers, the full snapshot, per kind of
//! write the fan-out time, bytes and control-plane CPU, bystanders, RSS after, what resending the
//! world would cost), then the same as one JSON line; with the machine and the control plane
//! build it was measured on.

use std::time::Duration;

use serde_json::json;
use trellis_tests::harness::control_bin;

use crate::cluster::NAMESPACES;
use crate::control::ProcStats;
use crate::proxies::{Initial, Snapshot};
use crate::rollout::{Rollout, WriteKind, WriteResult};

pub(crate) struct Summary {
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
    pub(crate) proxies: usize,
    pub(crate) subscriptions: usize,
    pub(crate) bystanders: usize,
    pub(crate) rollouts: usize,
}

pub(crate) struct Report {
    pub(crate) args: Summary,
    pub(crate) fill: Duration,
    pub(crate) sync_time: Duration,
    pub(crate) at_sync: ProcStats,
    pub(crate) initial: Initial,
    /// `trellis_control_discovery_subscriptions` once every proxy was answered.
    pub(crate) subscriptions: f64,
    pub(crate) snapshot: Snapshot,
    pub(crate) rollout: Rollout,
    pub(crate) after: ProcStats,
}

/// One kind of write over all the rollouts.
struct KindStats {
    kind: WriteKind,
    writes: usize,
    /// Writes that changed the ready endpoints (and so were fanned out).
    changes: usize,
    /// Per fanned-out write: until the last subscriber had it (sorted).
    last: Vec<Duration>,
    /// Per delivery: until that subscriber had it (sorted).
    each: Vec<Duration>,
    /// Per delivery: the update's size (sorted).
    proxy_bytes: Vec<usize>,
    /// Per write: bytes all proxies received (sorted).
    client_bytes: Vec<usize>,
    /// Per write: bytes the control plane counted (sorted).
    metric_bytes: Vec<f64>,
    unexpected: usize,
    /// Updates all proxies received, and what the control plane counted.
    client_updates: usize,
    metric_updates: f64,
    cpu: Duration,
}

impl KindStats {
    fn of(kind: WriteKind, writes: &[WriteResult]) -> Self {
        let writes: Vec<&WriteResult> = writes.iter().filter(|w| w.kind == kind).collect();
        let fanned: Vec<&&WriteResult> =
            writes.iter().filter(|w| !w.deliveries.is_empty()).collect();
        let sorted = |mut v: Vec<Duration>| {
            v.sort();
            v
        };
        let mut proxy_bytes: Vec<usize> = fanned
            .iter()
            .flat_map(|w| w.deliveries.iter().map(|d| d.1))
            .collect();
        proxy_bytes.sort();
        let mut client_bytes: Vec<usize> = writes.iter().map(|w| w.client_bytes).collect();
        client_bytes.sort();
        let mut metric_bytes: Vec<f64> = writes.iter().map(|w| w.metric_bytes).collect();
        metric_bytes.sort_by(f64::total_cmp);
        Self {
            kind,
            writes: writes.len(),
            changes: fanned.len(),
            last: sorted(
                fanned
                    .iter()
                    .filter_map(|w| w.deliveries.iter().map(|d| d.0).max())
                    .collect(),
            ),
            each: sorted(
                fanned
                    .iter()
                    .flat_map(|w| w.deliveries.iter().map(|d| d.0))
                    .collect(),
            ),
            proxy_bytes,
            client_bytes,
            metric_bytes,
            unexpected: writes
                .iter()
                .map(|w| w.client_updates - w.deliveries.len())
                .sum(),
            client_updates: writes.iter().map(|w| w.client_updates).sum(),
            metric_updates: writes.iter().map(|w| w.metric_updates).sum(),
            cpu: writes.iter().map(|w| w.cpu).sum(),
        }
    }

    fn cpu_per_write(&self) -> Duration {
        self.cpu / u32::try_from(self.writes.max(1)).unwrap_or(u32::MAX)
    }

    fn json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| round3(d.as_secs_f64() * 1e3));
        json!({
            "write": self.kind.id(),
            "writes": self.writes,
            "fanned_out": self.changes,
            "fanout_last_ms_p50": ms(percentile(&self.last, 0.5)),
            "fanout_last_ms_p99": ms(percentile(&self.last, 0.99)),
            "fanout_last_ms_max": ms(self.last.last().copied()),
            "delivery_ms_p50": ms(percentile(&self.each, 0.5)),
            "bytes_per_proxy_p50": percentile(&self.proxy_bytes, 0.5),
            "bytes_per_write_clients_p50": percentile(&self.client_bytes, 0.5),
            "bytes_per_write_metric_p50": percentile(&self.metric_bytes, 0.5),
            "unexpected_updates": self.unexpected,
            "updates_clients": self.client_updates,
            "updates_metric": self.metric_updates,
            "cpu_ms_per_write": round3(self.cpu_per_write().as_secs_f64() * 1e3),
        })
    }
}

impl Report {
    pub(crate) fn print(&self) {
        let a = &self.args;
        let subscribers = a.proxies - a.bystanders;
        let kinds: Vec<KindStats> = WriteKind::ALL
            .iter()
            .map(|k| KindStats::of(*k, &self.rollout.writes))
            .collect();
        let writes = self.rollout.writes.len();
        let changes: usize = kinds.iter().map(|k| k.changes).sum();
        let per = |d: Duration, n: usize| d.as_secs_f64() * 1e3 / n.max(1) as f64;
        let sent_p50 = kinds
            .iter()
            .find(|k| k.kind == WriteKind::AddReady)
            .and_then(|k| percentile(&k.proxy_bytes, 0.5))
            .unwrap_or(0);
        let client_total: usize = self.rollout.writes.iter().map(|w| w.client_bytes).sum();
        let client_updates: usize = kinds.iter().map(|k| k.client_updates).sum();
        let metric_updates: f64 = kinds.iter().map(|k| k.metric_updates).sum();
        let metric_total: f64 = self.rollout.writes.iter().map(|w| w.metric_bytes).sum();

        println!();
        println!("Trellis discovery benchmark");
        println!(
            "  cluster   {} services × {} meshed endpoints in {NAMESPACES} namespaces ({} objects; filled in {:.2} s, not counted)",
            a.services,
            a.endpoints,
            a.services * (a.endpoints + 2),
            self.fill.as_secs_f64()
        );
        println!(
            "  proxies   {} streams: {subscribers} subscribed to web-0.ns-0 + {} random services, {} bystanders with {} random services only",
            a.proxies, a.subscriptions, a.bystanders, a.subscriptions
        );
        println!("  machine   {}", machine());
        println!("  control   {}", control_build());
        println!();
        println!(
            "initial sync      {:>8.2} s   spawn → {} destinations published; then RSS {}, peak {}, CPU {:.2} s",
            self.sync_time.as_secs_f64(),
            2 * a.services,
            kib(self.at_sync.rss_kb),
            kib(self.at_sync.hwm_kb),
            self.at_sync.cpu.as_secs_f64()
        );
        println!(
            "initial answers   {:>8.3} s   until the last of {} proxies had every key (median {:.3} s); {} subscriptions",
            self.initial.all.as_secs_f64(),
            a.proxies,
            self.initial.median.as_secs_f64(),
            self.subscriptions
        );
        println!(
            "                  {:>10}   per proxy (median); {} in {} updates to all (control plane counted {}); {} keys absent",
            bytes(self.initial.bytes_median as f64),
            bytes(self.initial.bytes_total as f64),
            self.initial.updates,
            bytes(self.initial.metric_bytes),
            self.initial.absent
        );
        println!(
            "full snapshot     {:>10}   every destination ({} keys) in {} update(s), answered in {:.3} s",
            bytes(self.snapshot.bytes as f64),
            self.snapshot.keys,
            self.snapshot.updates,
            self.snapshot.elapsed.as_secs_f64()
        );
        println!();
        println!(
            "rollouts: {} × {} pods = {writes} API writes in {:.1} s, {changes} of them fanned out to {subscribers} subscribers",
            a.rollouts,
            a.endpoints,
            self.rollout.elapsed.as_secs_f64()
        );
        println!(
            "{:<22} {:>5} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>10} {:>10} | {:>9}",
            "write",
            "n",
            "updates",
            "last p50",
            "last p99",
            "last max",
            "each p50",
            "B/proxy",
            "B/write",
            "B/write",
            "CPU/write"
        );
        println!(
            "{:<22} {:>5} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>10} {:>10} | {:>9}",
            "", "", "", "", "", "", "", "p50", "proxies", "metric", "mean"
        );
        for k in &kinds {
            let ms = |d: Option<Duration>| {
                d.map_or("-".to_string(), |d| {
                    format!("{:.2} ms", d.as_secs_f64() * 1e3)
                })
            };
            println!(
                "{:<22} {:>5} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>10} {:>10} | {:>9}",
                k.kind.label(),
                k.writes,
                k.client_updates,
                ms(percentile(&k.last, 0.5)),
                ms(percentile(&k.last, 0.99)),
                ms(k.last.last().copied()),
                ms(percentile(&k.each, 0.5)),
                percentile(&k.proxy_bytes, 0.5).map_or("-".into(), |b| bytes(b as f64)),
                bytes(percentile(&k.client_bytes, 0.5).unwrap_or(0) as f64),
                bytes(percentile(&k.metric_bytes, 0.5).unwrap_or(0.0)),
                format!("{:.2} ms", k.cpu_per_write().as_secs_f64() * 1e3),
            );
        }
        println!(
            "  all writes: {client_updates} updates, {} to proxies (control plane counted {metric_updates} updates, {}); CPU {:.3} s (schedstat {:.3} s) = {:.2} ms per API write, {:.2} ms per fanned-out change",
            bytes(client_total as f64),
            bytes(metric_total),
            self.rollout.cpu.as_secs_f64(),
            self.rollout.on_cpu.as_secs_f64(),
            per(self.rollout.cpu, writes),
            per(self.rollout.cpu, changes)
        );
        println!(
            "  updates during rollouts to the {} bystanders: {}; to subscribers beyond one per change: {}",
            a.bystanders,
            self.rollout.bystander_updates,
            kinds.iter().map(|k| k.unexpected).sum::<usize>()
        );
        println!(
            "  control plane after: RSS {}, peak {}",
            kib(self.after.rss_kb),
            kib(self.after.hwm_kb)
        );
        let world = self.snapshot.bytes as f64;
        println!(
            "  resending the world instead: {} per proxy per update (vs {} sent, {:.0}×), {} per change to {subscribers} subscribers, {} to all {} proxies",
            bytes(world),
            bytes(sent_p50 as f64),
            world / sent_p50.max(1) as f64,
            bytes(world * subscribers as f64),
            bytes(world * a.proxies as f64),
            a.proxies
        );
        let secs = |d: Duration| round3(d.as_secs_f64());
        let line = json!({
            "bench": "trellis-discobench",
            "services": a.services,
            "endpoints": a.endpoints,
            "proxies": a.proxies,
            "subscriptions": a.subscriptions,
            "subscribers": subscribers,
            "bystanders": a.bystanders,
            "rollouts": a.rollouts,
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "fill_s": secs(self.fill),
            "sync_s": secs(self.sync_time),
            "sync_rss_kb": self.at_sync.rss_kb,
            "sync_hwm_kb": self.at_sync.hwm_kb,
            "sync_cpu_s": secs(self.at_sync.cpu),
            "initial_answers_s": secs(self.initial.all),
            "initial_answers_median_s": secs(self.initial.median),
            "initial_bytes_per_proxy_p50": self.initial.bytes_median,
            "initial_bytes_total": self.initial.bytes_total,
            "initial_bytes_metric": self.initial.metric_bytes,
            "initial_absent": self.initial.absent,
            "subscriptions_metric": self.subscriptions,
            "snapshot_keys": self.snapshot.keys,
            "snapshot_bytes": self.snapshot.bytes,
            "rollout_writes": writes,
            "rollout_fanned_out": changes,
            "rollout_s": secs(self.rollout.elapsed),
            "rollout_cpu_s": secs(self.rollout.cpu),
            "rollout_schedstat_cpu_s": secs(self.rollout.on_cpu),
            "rollout_cpu_ms_per_write": round3(per(self.rollout.cpu, writes)),
            "rollout_bytes_clients": client_total,
            "rollout_bytes_metric": metric_total,
            "bystander_updates": self.rollout.bystander_updates,
            "unexpected_updates": self.rollout.unexpected_updates,
            "after_rss_kb": self.after.rss_kb,
            "after_hwm_kb": self.after.hwm_kb,
            "writes": kinds.iter().map(KindStats::json).collect::<Vec<_>>(),
        });
        println!("{line}");
    }
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.2} MB", b / 1e6),
        b if b >= 1e4 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

fn kib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// CPUs, their model and the load when the report is written: how noisy the numbers may be.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!(
        "{cpus} CPUs ({model}), load average {load}; the simulated proxies share them with the control plane"
    )
}

/// Which control plane binary ran and how old it is: a stale release build would measure old
/// code.
fn control_build() -> String {
    let bin = control_bin();
    let age = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or("?".into(), |d| format!("{} min", d.as_secs() / 60));
    format!("{} (built {age} ago)", bin.display())
}
