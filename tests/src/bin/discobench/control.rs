//! The control plane under test: a real `trellis-control serve --kubernetes` (the release build
//! next to this binary) spawned against the stand-in API server, waited on until it listens and
//! until it publishes every destination; its `/metrics` scraped from the admin server; its RSS
//! and CPU read from /proc; gRPC channels to it for the simulated proxies; and killed at the end,
//! even when the benchmark panics.

use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use trellis_tests::harness::{CONTROL_IDENTITY, FakeApiServer, Scrape, control_bin, free_port};
use trellis_tests::procfs;

use crate::TOKEN;

/// Until the control plane listens (it first creates its CA Secret through the API).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Until the control plane publishes every destination.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// The control plane's pid while it runs, for the panic hook (release builds abort on panic, so
/// no destructor would stop it).
static CONTROL_PID: AtomicI32 = AtomicI32::new(0);

pub(crate) fn kill_control_plane_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let pid = CONTROL_PID.swap(0, Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) on a pid of our own child, with no memory passed.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }));
}

pub(crate) struct ControlProcess {
    child: Child,
    pid: u32,
    url: String,
    pub(crate) admin: String,
    state_dir: PathBuf,
    log: PathBuf,
    /// When it was spawned.
    started: Instant,
}

/// What /proc says about the control plane at one moment.
#[derive(Clone, Copy)]
pub(crate) struct ProcStats {
    pub(crate) rss_kb: u64,
    pub(crate) hwm_kb: u64,
    /// utime + stime (clock ticks: 10 ms steps).
    pub(crate) cpu: Duration,
    /// Time on CPU of its live threads (schedstat, in nanoseconds): precise enough for one write.
    pub(crate) on_cpu: Duration,
}

impl ControlProcess {
    /// `trellis-control serve --kubernetes` against `api` on free loopback ports, once it
    /// listens for gRPC.
    pub(crate) fn start(dir: &Path, api: &FakeApiServer, log: Option<&Path>) -> Self {
        let token_file = dir.join("token");
        std::fs::write(&token_file, TOKEN).expect("write the token file");
        let (grpc, admin) = (free_port(), free_port());
        let state_dir = dir.join("control-state");
        let log = log.map_or_else(|| dir.join("control.log"), Path::to_path_buf);
        let log_file = std::fs::File::create(&log).expect("create the control plane's log");
        let bin = control_bin();
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("serve")
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--kubernetes", "--kube-api-url", &api.url, "--kube-ca"])
            .arg(&api.ca_file)
            .arg("--kube-token-file")
            .arg(&token_file)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let pid = child.id();
        CONTROL_PID.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
        let mut cp = Self {
            child,
            pid,
            url: format!("https://127.0.0.1:{grpc}"),
            admin: format!("127.0.0.1:{admin}"),
            state_dir,
            log,
            started,
        };
        while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
            cp.check_alive("listening");
            assert!(
                started.elapsed() < START_TIMEOUT,
                "the control plane does not listen on 127.0.0.1:{grpc} after {START_TIMEOUT:?}; its log:\n{}",
                cp.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cp
    }

    /// Waits until `trellis_control_discovery_destinations` is `n`; the time since the spawn.
    pub(crate) fn wait_destinations(&mut self, n: usize) -> Duration {
        let mut seen = 0.0;
        loop {
            self.check_alive("publishing every destination");
            if let Some(text) = self.try_metrics() {
                seen = Scrape::parse(&text).sum("trellis_control_discovery_destinations", &[]);
                if seen == n as f64 {
                    return self.started.elapsed();
                }
            }
            assert!(
                self.started.elapsed() < SYNC_TIMEOUT,
                "the control plane publishes {seen} destinations after {SYNC_TIMEOUT:?}, not {n}; its log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn check_alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            CONTROL_PID.store(0, Ordering::SeqCst);
            panic!(
                "the control plane exited ({status}) before {what}; its log:\n{}",
                self.log_tail()
            );
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `GET /metrics` of the admin server; an empty scrape while it does not answer.
    pub(crate) fn metrics(&self) -> Scrape {
        Scrape::parse(&self.try_metrics().unwrap_or_default())
    }

    pub(crate) fn try_metrics(&self) -> Option<String> {
        let mut s = std::net::TcpStream::connect(&self.admin).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    pub(crate) fn stats(&self) -> ProcStats {
        proc_stats(self.pid).unwrap_or_else(|e| panic!("control plane (pid {}): {e}", self.pid))
    }

    pub(crate) fn channel(&self) -> tonic::transport::Channel {
        let ca = std::fs::read(self.state_dir.join("ca.pem")).unwrap_or_else(|e| {
            panic!(
                "the mesh CA {}: {e}",
                self.state_dir.join("ca.pem").display()
            )
        });
        let roots = trellis_identity::tls::roots_from_pem(&ca).expect("the mesh CA's certificates");
        let config = trellis_identity::tls::client_config(Arc::new(roots), None, &[b"h2"])
            .expect("a TLS client configuration");
        let control: trellis_identity::SpiffeId = CONTROL_IDENTITY
            .parse()
            .expect("the control plane's SPIFFE ID");
        trellis_identity::grpc::channel(
            &self.url,
            Arc::new(move || config.clone()),
            Arc::new(move |id| match id {
                Some(id) if id == control => Ok(()),
                other => Err(format!("the control plane is {other:?}, not {control}")),
            }),
        )
        .expect("a gRPC channel")
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        CONTROL_PID.store(0, Ordering::SeqCst);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS and VmHWM from /proc/PID/status, utime + stime from /proc/PID/stat.
fn proc_stats(pid: u32) -> Result<ProcStats, String> {
    let kb = |field: &str| {
        procfs::status_kb(pid, field).ok_or_else(|| format!("/proc/{pid}/status: no {field}"))
    };
    Ok(ProcStats {
        rss_kb: kb("VmRSS")?,
        hwm_kb: kb("VmHWM")?,
        cpu: procfs::cpu_time(pid).ok_or_else(|| format!("/proc/{pid}/stat: unreadable"))?,
        on_cpu: on_cpu(pid)?,
    })
}

/// The sum over the threads of /proc/PID/task/*/schedstat's first field (ns on CPU).
fn on_cpu(pid: u32) -> Result<Duration, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Ok(Duration::from_nanos(ns))
}
