//! A mesh of pods: network namespaces on one bridge, each with an app and (optionally) a sidecar.
//!
//! Addresses: pod N gets 10.77.0.(N+1)/24 and fd77::(N+1)/64 on its `eth0`. The bridge lives in
//! the mesh's own hub namespace, so nothing is added to the host's network.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Output;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::netns::{Netns, run};
use super::process::Proc;
use super::{PROXY_UID, Scrape, control_bin, privileged, proxy_bin, testapp_bin};

static MESHES: AtomicUsize = AtomicUsize::new(0);

pub struct Mesh {
    id: String,
    dir: PathBuf,
    next_pod: AtomicU32,
    hub: Netns,
}

impl Mesh {
    /// A new, empty mesh; `None` (with the reason printed) when this process lacks the
    /// privileges, outside CI. In CI (`CI=true`) missing privileges panic instead.
    pub fn new(test: &str) -> Option<Self> {
        privileged(test).then(Self::create)
    }

    /// A new, empty mesh; the caller has checked [`super::missing_privileges`].
    pub fn create() -> Self {
        Netns::sweep_stale("trl-");
        let id = format!(
            "trl-{}-{}",
            std::process::id(),
            MESHES.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("create the mesh's log folder");
        let hub = Netns::create(&format!("{id}-hub"));
        run(
            "ip",
            &["-n", hub.name(), "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", hub.name(), "link", "set", "br0", "up"]);
        Self {
            id,
            dir,
            next_pod: AtomicU32::new(1),
            hub,
        }
    }

    /// Adds a pod named `name`, attached to the mesh's bridge.
    pub fn pod(&self, name: &str) -> Pod {
        let n = self.next_pod.fetch_add(1, Ordering::Relaxed);
        assert!(n < 250, "too many pods in one mesh");
        let ns = Netns::create(&format!("{}-{name}", self.id));
        let hub = self.hub.name();
        let port = format!("v{n}");
        run(
            "ip",
            &[
                "-n",
                hub,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ],
        );
        run(
            "ip",
            &["-n", hub, "link", "set", &port, "master", "br0", "up"],
        );
        let ip = Ipv4Addr::new(10, 77, 0, (n + 1) as u8);
        let ip6: Ipv6Addr = format!("fd77::{}", n + 1).parse().expect("valid IPv6");
        run(
            "ip",
            &[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                ns.name(),
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        run("ip", &["-n", ns.name(), "link", "set", "eth0", "up"]);
        Pod {
            name: name.to_string(),
            ip,
            ip6,
            dir: self.dir.clone(),
            calls: AtomicU32::new(0),
            apps: Mutex::default(),
            proxy: Mutex::default(),
            control_state: Mutex::default(),
            ns,
        }
    }

    /// The common scenario: a `server` pod running the test app `server_app` with a sidecar
    /// started with `server_proxy_args`, and a `client` pod with a default sidecar.
    pub fn client_and_server(
        test: &str,
        server_app: &[&str],
        server_proxy_args: &[&str],
    ) -> Option<(Self, Pod, Pod)> {
        let mesh = Self::new(test)?;
        let server = mesh.pod("server");
        server.spawn_app(server_app);
        server.start_sidecar(server_proxy_args);
        let client = mesh.pod("client");
        client.start_sidecar(&[]);
        Some((mesh, client, server))
    }

    /// Writes a file the sidecars can read (e.g. a `--policy-file`) and returns its path.
    pub fn write_file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.join(name);
        // Write then rename: a proxy polling the file never sees half of it.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).expect("write file");
        std::fs::rename(&tmp, &path).expect("move file into place");
        path
    }

    /// The namespace that holds the bridge every pod is attached to.
    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    /// Where this mesh's process logs are written.
    pub fn log_dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One pod: a network namespace with its apps and its sidecar.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    dir: PathBuf,
    calls: AtomicU32,
    // Processes are declared before the namespace so that they are stopped before it is deleted.
    apps: Mutex<Vec<Proc>>,
    proxy: Mutex<Option<Proc>>,
    /// The state dir of the control plane running in this pod, if any (the CLI's credential).
    control_state: Mutex<Option<PathBuf>>,
    ns: Netns,
}

/// The control plane's identity with the defaults (`--trust-domain cluster.local`,
/// `--namespace trellis-system`).
pub const CONTROL_IDENTITY: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-control";

/// What `curl` saw.
#[derive(Debug)]
pub struct CurlResult {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub time_total: f64,
    pub stderr: String,
}

impl CurlResult {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// `http://<pod ip>:<port><path>`
    pub fn url(&self, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.ip)
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip.into(), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip6.into(), port)
    }

    /// Runs `trellis-proxy init ARGS` in this pod.
    pub fn init(&self, args: &[&str]) -> Output {
        let mut full = vec!["init"];
        full.extend_from_slice(args);
        self.ns.exec(&proxy_bin().to_string_lossy(), &full)
    }

    /// Installs the interception rules (defaults) and starts the sidecar, as an injected pod has.
    pub fn start_sidecar(&self, run_args: &[&str]) {
        self.start_sidecar_with_env(run_args, &[]);
    }

    /// Starts `trellis-proxy run` as UID 2102 (JSON logs; `--access-log json` unless `args` says
    /// otherwise) and waits until `/ready` answers 200. Its access log (stdout) goes to
    /// `{pod}-access.log`, its diagnostic log (stderr) to `{pod}-proxy.log`.
    pub fn start_proxy(&self, args: &[&str]) {
        self.start_proxy_with_env(args, &[]);
    }

    /// [`Pod::start_sidecar`] with environment variables set for the proxy (e.g.
    /// `OTEL_RESOURCE_ATTRIBUTES`).
    pub fn start_sidecar_with_env(&self, run_args: &[&str], env: &[(&str, &str)]) {
        let out = self.init(&[]);
        assert!(
            out.status.success(),
            "init in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.start_proxy_with_env(run_args, env);
    }

    /// [`Pod::start_proxy`] with environment variables set for the proxy.
    pub fn start_proxy_with_env(&self, args: &[&str], env: &[(&str, &str)]) {
        let mut proc = self.spawn_proxy_proc(args, env);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = proc.try_wait() {
                panic!(
                    "{} proxy exited during startup ({status}):\n{}",
                    self.name,
                    proc.log()
                );
            }
            if self.admin_get("/ready").0 == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} proxy not ready after 15s:\n{}",
                self.name,
                proc.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.proxy.lock().expect("proxy lock") = Some(proc);
    }

    /// Starts the sidecar as [`Pod::start_proxy`] does, but returns at once instead of waiting
    /// for `/ready`: for a proxy that is not expected to become ready (yet).
    pub fn spawn_proxy(&self, args: &[&str]) {
        let proc = self.spawn_proxy_proc(args, &[]);
        *self.proxy.lock().expect("proxy lock") = Some(proc);
    }

    fn spawn_proxy_proc(&self, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let uid = PROXY_UID.to_string();
        let mut cmd = self.ns.command("setpriv");
        cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(proxy_bin())
            .args(["run", "--log-format", "json"]);
        if !args.iter().any(|a| a.starts_with("--access-log")) {
            cmd.args(["--access-log", "json"]);
        }
        cmd.args(args);
        cmd.envs(env.iter().copied());
        let log = self.dir.join(format!("{}-proxy.log", self.name));
        let access = self.dir.join(format!("{}-access.log", self.name));
        Proc::spawn_split(&format!("{} proxy", self.name), cmd, &access, &log)
    }

    /// Starts `trellis-control serve` in this pod (port 7443, admin 9990) with `state_dir`, and
    /// waits until it accepts connections.
    pub fn start_control_plane(&self, state_dir: &std::path::Path) {
        self.start_control_plane_with(state_dir, &[]);
    }

    /// `start_control_plane` with extra `serve` flags.
    pub fn start_control_plane_with(&self, state_dir: &std::path::Path, extra: &[&str]) {
        *self.control_state.lock().expect("state lock") = Some(state_dir.to_path_buf());
        let mut cmd = self.ns.command(&control_bin().to_string_lossy());
        cmd.args([
            "serve",
            "--grpc-addr",
            "0.0.0.0:7443",
            "--admin-addr",
            "127.0.0.1:9990",
            "--state-dir",
        ])
        .arg(state_dir)
        .args(extra);
        self.spawn_and_wait(
            "control plane",
            cmd,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 7443),
        );
    }

    /// The control plane's URL for proxies in other pods.
    pub fn control_url(&self) -> String {
        format!("https://{}:7443", self.ip)
    }

    /// The flags a sidecar needs to follow this pod's control plane: its URL and the trust
    /// anchors (copied where the proxy UID can read them).
    pub fn control_flags(&self, mesh: &Mesh) -> Vec<String> {
        let state = self.control_state.lock().expect("state lock").clone();
        let state = state.expect("no control plane started in this pod");
        let ca = std::fs::read_to_string(state.join("ca.pem")).expect("read ca.pem");
        let anchors = mesh.write_file(&format!("{}-trust-anchors.pem", self.name), &ca);
        vec![
            "--control-plane".into(),
            self.control_url(),
            "--trust-anchors".into(),
            anchors.to_string_lossy().into_owned(),
        ]
    }

    /// Creates a join token for `identity` (NS/SA) with this pod's control plane and writes it
    /// to a file the proxy UID can read.
    pub fn join_token_file(&self, mesh: &Mesh, identity: &str) -> PathBuf {
        let out = self.control(&["token", "create", "--identity", identity, "--ttl", "1h"]);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        mesh.write_file(&format!("token-{}", identity.replace('/', "-")), &token)
    }

    /// The flags of a meshed sidecar for workload `ns/name` with service account `sa`: policy
    /// and a certificate from this pod's control plane (a join token for `ns/sa`).
    pub fn mesh_flags(&self, mesh: &Mesh, workload: &str, sa: &str) -> Vec<String> {
        let ns = workload.split_once('/').map_or("default", |(ns, _)| ns);
        let token = self.join_token_file(mesh, &format!("{ns}/{sa}"));
        let mut flags = self.control_flags(mesh);
        flags.extend([
            "--identity-token-file".into(),
            token.to_string_lossy().into_owned(),
            "--workload".into(),
            workload.into(),
            "--service-account".into(),
            sa.into(),
        ]);
        flags
    }

    /// Runs the `trellis-control` CLI in this pod, with the credential of the control plane
    /// started here (its state dir), as an operator on the control plane's host would.
    pub fn control(&self, args: &[&str]) -> Output {
        let mut cmd = self.ns.command(&control_bin().to_string_lossy());
        cmd.args(args);
        if let Some(dir) = self.control_state.lock().expect("state lock").as_ref() {
            cmd.env("TRELLIS_STATE_DIR", dir);
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("running trellis-control in {}: {e}", self.name))
    }

    /// The policy version in force in this pod's sidecar (`version` of `GET /config`).
    pub fn config_version(&self) -> String {
        let (status, body) = self.admin_get("/config");
        assert_eq!(status, 200, "GET /config on {}'s proxy: {body}", self.name);
        let config: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/config of {} is not JSON ({e}): {body}", self.name));
        config["version"].as_str().unwrap_or("").to_string()
    }

    /// `trellis-control status -o json` against the control plane in this pod.
    pub fn control_status(&self) -> serde_json::Value {
        let out = self.control(&["status", "-o", "json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "trellis-control status in {} failed: {stdout}{}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("trellis-control status printed no JSON ({e}): {stdout}"))
    }

    /// The workloads `trellis-control status` lists as connected with `version` acknowledged,
    /// sorted.
    pub fn connected_proxies(&self, version: &str) -> Vec<String> {
        let status = self.control_status();
        let mut workloads: Vec<String> = status["proxies"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|p| p["connected"] == true && p["ackedVersion"] == version)
            .map(|p| p["workload"].as_str().unwrap_or("").to_string())
            .collect();
        workloads.sort();
        workloads
    }

    /// Starts `trellis-testapp ARGS` and waits until it accepts connections on its `--listen`.
    pub fn spawn_app(&self, args: &[&str]) {
        let listen: SocketAddr = args
            .iter()
            .position(|a| *a == "--listen")
            .and_then(|i| args.get(i + 1))
            .and_then(|a| a.parse().ok())
            .expect("spawn_app needs --listen ADDR");
        let probe = match listen.ip() {
            ip if ip.is_unspecified() && listen.is_ipv4() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
            }
            ip if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
            _ => listen,
        };
        let mut cmd = self.ns.command(&testapp_bin().to_string_lossy());
        cmd.args(args);
        self.spawn_and_wait(&format!("app {}", args[0]), cmd, probe);
    }

    fn spawn_and_wait(&self, what: &str, cmd: std::process::Command, probe: SocketAddr) {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.join(format!("{}-app-{n}.log", self.name));
        let mut proc = Proc::spawn(&format!("{} {what}", self.name), cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .ns
            .enter(move || TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok())
        {
            if let Some(status) = proc.try_wait() {
                panic!("{what} in {} exited ({status}):\n{}", self.name, proc.log());
            }
            assert!(
                Instant::now() < deadline,
                "{what} in {} not listening on {probe} after 10s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.apps.lock().expect("apps lock").push(proc);
    }

    /// Kills every app process of this pod (SIGKILL), as a crash would.
    pub fn kill_apps(&self) {
        let mut apps = self.apps.lock().expect("apps lock");
        for app in apps.iter() {
            app.signal(libc::SIGKILL);
        }
        for app in apps.iter_mut() {
            app.wait_timeout(Duration::from_secs(5));
        }
    }

    /// Runs curl in this pod (as the app would): `-sS`, a 30 s limit, headers and body captured.
    pub fn curl(&self, args: &[&str]) -> CurlResult {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let headers_file = self.dir.join(format!("{}-curl-{n}.headers", self.name));
        let body_file = self.dir.join(format!("{}-curl-{n}.body", self.name));
        let mut cmd = self.ns.command("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "30",
            "-w",
            "%{http_code} %{time_total}",
            "-D",
        ])
        .arg(&headers_file)
        .arg("-o")
        .arg(&body_file)
        .args(args);
        let out = cmd.output().expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut parts = stdout.split_whitespace();
        let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let time_total = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
        let raw_headers = std::fs::read_to_string(&headers_file).unwrap_or_default();
        let headers = raw_headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let body = std::fs::read_to_string(&body_file).unwrap_or_default();
        let _ = std::fs::remove_file(&headers_file);
        let _ = std::fs::remove_file(&body_file);
        CurlResult {
            status,
            headers,
            body,
            time_total,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs a `trellis-testapp` client command in this pod and parses the JSON it prints.
    pub fn testapp(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ns.exec(&testapp_bin().to_string_lossy(), args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "testapp {args:?} in {} failed ({}): {}{}",
            self.name,
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("testapp {args:?} printed no JSON ({e}): {stdout}"))
    }

    /// A command run in this pod, as root (an app).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.ns.exec(program, args)
    }

    /// GET on the sidecar's admin server (127.0.0.1:4191) from inside the pod: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        self.admin_request("GET", path)
    }

    pub fn admin_request(&self, method: &str, path: &str) -> (u16, String) {
        self.local_request(4191, method, path)
    }

    /// The metrics of the control plane running in this pod (admin port 9990).
    pub fn control_metrics(&self) -> Scrape {
        let (status, body) = self.local_request(9990, "GET", "/metrics");
        assert_eq!(status, 200, "GET /metrics on {}'s control plane", self.name);
        Scrape::parse(&body)
    }

    /// An HTTP/1.0 request to 127.0.0.1:`port` inside this pod.
    fn local_request(&self, port: u16, method: &str, path: &str) -> (u16, String) {
        let request =
            format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
        self.ns.enter(move || {
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            else {
                return (0, String::new());
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            if stream.write_all(request.as_bytes()).is_err() {
                return (0, String::new());
            }
            let mut raw = String::new();
            let _ = stream.read_to_string(&mut raw);
            let status = raw
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let body = raw
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (status, body)
        })
    }

    /// The sidecar's metrics.
    pub fn metrics(&self) -> Scrape {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200, "GET /metrics on {}'s proxy", self.name);
        Scrape::parse(&body)
    }

    /// Sends a signal to the sidecar.
    pub fn signal_proxy(&self, signal: i32) {
        self.proxy
            .lock()
            .expect("proxy lock")
            .as_ref()
            .expect("no proxy running")
            .signal(signal);
    }

    /// Waits for the sidecar to exit; its exit code, or `None` if it is still running.
    pub fn wait_proxy_exit(&self, timeout: Duration) -> Option<i32> {
        let mut proxy = self.proxy.lock().expect("proxy lock");
        let proc = proxy.as_mut().expect("no proxy running");
        proc.wait_timeout(timeout).map(|s| s.code().unwrap_or(-1))
    }

    /// The sidecar's process id.
    pub fn proxy_pid(&self) -> u32 {
        self.proxy
            .lock()
            .expect("proxy lock")
            .as_ref()
            .map(|p| p.pid())
            .expect("no proxy running")
    }

    /// A `/proc/PID/status` field of the sidecar, in kB (`VmRSS`, `VmHWM`).
    pub fn proxy_status_kb(&self, field: &str) -> u64 {
        let proxy = self.proxy.lock().expect("proxy lock");
        proxy
            .as_ref()
            .and_then(|p| p.status_kb(field))
            .unwrap_or_else(|| panic!("{field} of {}'s proxy", self.name))
    }

    /// The sidecar's diagnostic log (stderr) so far.
    pub fn proxy_log(&self) -> String {
        self.proxy
            .lock()
            .expect("proxy lock")
            .as_ref()
            .map(|p| p.log())
            .unwrap_or_default()
    }

    /// The sidecar's access log (stdout) so far.
    pub fn access_log(&self) -> String {
        self.proxy
            .lock()
            .expect("proxy lock")
            .as_ref()
            .map(|p| p.stdout_log())
            .unwrap_or_default()
    }

    /// Every line of the sidecar's access log that is a JSON object (`--access-log json`).
    pub fn access_log_json(&self) -> Vec<serde_json::Value> {
        self.access_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(serde_json::Value::is_object)
            .collect()
    }

    /// The last access-log line that `matches`, waiting up to `timeout` for it: the sidecar
    /// writes a line when the response body has ended, from a thread of its own, so it may
    /// come a moment after the client saw the response.
    pub fn access_log_line(
        &self,
        timeout: Duration,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.access_log_json().into_iter().rev().find(&matches);
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Pod::access_log_line`] within 10 s, or a failure naming `what` and showing the log.
    pub fn expect_access_log_line(
        &self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.access_log_line(Duration::from_secs(10), matches)
            .unwrap_or_else(|| {
                panic!(
                    "no access log line {what} in {}'s sidecar after 10 s:\n{}",
                    self.name,
                    self.access_log()
                )
            })
    }

    /// `iptables-save -t nat` (or ip6tables) in this pod with the given backend (`nft`/`legacy`).
    pub fn nat_rules(&self, ipv6: bool, backend: &str) -> String {
        let tool = format!(
            "{}-{backend}-save",
            if ipv6 { "ip6tables" } else { "iptables" }
        );
        let out = self.ns.exec(&tool, &["-t", "nat"]);
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Drop the comment lines with timestamps, so that two dumps compare equal.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
