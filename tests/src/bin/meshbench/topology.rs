//! One measured topology, built fresh for every run and torn down after it: a server pod (the
//! app, and a sidecar unless direct) and a client pod (the load generator, and a sidecar unless
//! direct) on the harness's bridge. Sidecars are Trellis (mutual TLS with certificates from a
//! control plane in a third pod) or haproxy (certificates from our own mesh CA), both behind
//! the same `trellis-proxy init` rules. Dropping a topology kills its processes and deletes its
//! namespaces (the harness does both on drop).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trellis_tests::harness::{Capture, Mesh, Pod, Proc, contains, testapp_bin};

use crate::haproxy::{Certs, Haproxy};
use crate::nginx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Direct,
    Trellis,
    Haproxy,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Direct => "direct",
            Proxy::Trellis => "trellis",
            Proxy::Haproxy => "haproxy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    Plain,
    Mutual,
}

/// What the server pod serves, and so which port the load goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    Http1,
    H2c,
    /// The test app's TCP echo on 6379, one of Trellis's default `--opaque-ports`.
    Opaque,
}

impl App {
    pub fn port(self) -> u16 {
        match self {
            App::Http1 => nginx::HTTP1_PORT,
            App::H2c => nginx::H2C_PORT,
            App::Opaque => OPAQUE_PORT,
        }
    }
}

pub const OPAQUE_PORT: u16 = 6379;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

pub struct Topology {
    // Declared first: stopped before the namespaces they run in are deleted.
    haproxies: Vec<(Side, Haproxy)>,
    app: Option<Proc>,
    pub client: Pod,
    pub server: Pod,
    _control: Option<Pod>,
    _mesh: Mesh,
    pub proxy: Proxy,
    /// The key-exchange group seen in the proxy-to-proxy ServerHello, for mutual TLS.
    pub kex: Option<String>,
}

impl Topology {
    pub fn build(proxy: Proxy, tls: Tls, app: App, dir: &Path) -> Result<Self, String> {
        Self::build_with(proxy, tls, app, dir, &[])
    }

    /// [`Topology::build`] with extra `trellis-proxy run` flags for Trellis sidecars.
    pub fn build_with(
        proxy: Proxy,
        tls: Tls,
        app: App,
        dir: &Path,
        trellis_extra: &[&str],
    ) -> Result<Self, String> {
        let mesh = Mesh::create();
        let server = mesh.pod("server");
        let client = mesh.pod("client");
        // The app starts before the interception rules, so that probing it is not redirected.
        let app_proc = match app {
            App::Http1 | App::H2c => Some(nginx::start(&server, dir)?),
            App::Opaque => {
                // Started here rather than with `spawn_app`, to know its pid (its CPU).
                let mut cmd = server.netns().command(&testapp_bin().to_string_lossy());
                cmd.args(["tcp-echo", "--listen", &format!("0.0.0.0:{OPAQUE_PORT}")]);
                let proc = Proc::spawn("tcp-echo", cmd, &dir.join("tcp-echo.log"));
                wait_listening(&server, server.addr(OPAQUE_PORT))?;
                Some(proc)
            }
        };
        let mut topo = Self {
            haproxies: Vec::new(),
            app: app_proc,
            client,
            server,
            _control: None,
            _mesh: mesh,
            proxy,
            kex: None,
        };
        match proxy {
            Proxy::Direct => {}
            Proxy::Trellis => topo.start_trellis(tls, trellis_extra)?,
            Proxy::Haproxy => topo.start_haproxy(tls, app, dir)?,
        }
        let capture = (tls == Tls::Mutual && proxy != Proxy::Direct)
            .then(|| Capture::start(topo._mesh.hub(), Duration::from_secs(2)));
        topo.check(app)?;
        if let Some(capture) = capture {
            topo.kex = Some(key_exchange(&capture.finish()));
        }
        Ok(topo)
    }

    fn start_trellis(&mut self, tls: Tls, extra: &[&str]) -> Result<(), String> {
        let mut base = vec!["--threads", "1", "--access-log", "off"];
        base.extend_from_slice(extra);
        if tls == Tls::Plain {
            self.server.start_sidecar(&base);
            self.client.start_sidecar(&base);
            return Ok(());
        }
        let control = self._mesh.pod("control");
        let state = self._mesh.log_dir().join("control-state");
        control.start_control_plane(&state);
        for (pod, sa) in [(&self.server, "server"), (&self.client, "client")] {
            let mut flags = control.mesh_flags(&self._mesh, &format!("default/{sa}"), sa);
            flags.extend(base.iter().map(|s| s.to_string()));
            pod.start_sidecar(&flags.iter().map(String::as_str).collect::<Vec<_>>());
        }
        // Mutual TLS to the server pod's ports (no ServerPolicy: the server accepts both).
        let addresses: Vec<String> = [nginx::HTTP1_PORT, nginx::H2C_PORT, OPAQUE_PORT]
            .iter()
            .map(|p| format!("\"{}\"", self.server.addr(*p)))
            .collect();
        let policy = format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: server}}\n\
             spec:\n  destination: {{addresses: [{}]}}\n  \
             tls: {{mode: mutual, serverIdentity: spiffe://cluster.local/ns/default/sa/server}}\n",
            addresses.join(", ")
        );
        let file = self._mesh.write_file("mtls.yaml", &policy);
        let out = control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]);
        if !out.status.success() {
            return Err(format!(
                "applying the mutual-TLS policy: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        self._control = Some(control);
        Ok(())
    }

    fn start_haproxy(&mut self, tls: Tls, app: App, dir: &Path) -> Result<(), String> {
        for pod in [&self.server, &self.client] {
            let out = pod.init(&[]);
            if !out.status.success() {
                return Err(format!(
                    "trellis-proxy init in {}: {}",
                    pod.name,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let certs = match tls {
            Tls::Mutual => Some(Certs::issue(dir)?),
            Tls::Plain => None,
        };
        let ip = self.server.ip;
        for (side, pod) in [(Side::Server, &self.server), (Side::Client, &self.client)] {
            let h = Haproxy::start(pod, side, app, tls, ip, certs.as_ref(), dir)?;
            self.haproxies.push((side, h));
        }
        Ok(())
    }

    /// One request (or echo) from the client pod before measuring: the path works, and any
    /// proxy-to-proxy connection exists before the measured run starts.
    fn check(&self, app: App) -> Result<(), String> {
        match app {
            App::Http1 | App::H2c => {
                let url = self.server.url(app.port(), "/");
                let mut args = vec![url.as_str()];
                if app == App::H2c {
                    args.insert(0, "--http2-prior-knowledge");
                }
                let rsp = self.client.curl(&args);
                if rsp.status != 200 || rsp.body != nginx::BODY {
                    return Err(format!(
                        "{} check through {}: status {}, body {:?}, {}",
                        url,
                        self.proxy.name(),
                        rsp.status,
                        rsp.body,
                        rsp.stderr
                    ));
                }
                Ok(())
            }
            App::Opaque => {
                let target = self.server.addr(OPAQUE_PORT);
                self.client.netns().enter(move || echo_once(target))
            }
        }
    }

    /// (what, pid) of every process whose CPU and memory we report: the proxies and the app.
    pub fn proxy_pids(&self) -> Vec<(Side, u32)> {
        match self.proxy {
            Proxy::Direct => Vec::new(),
            Proxy::Trellis => vec![
                (Side::Client, self.client.proxy_pid()),
                (Side::Server, self.server.proxy_pid()),
            ],
            Proxy::Haproxy => self
                .haproxies
                .iter()
                .map(|(side, h)| (*side, h.proc.pid()))
                .collect(),
        }
    }

    pub fn app_pid(&self) -> Option<u32> {
        self.app.as_ref().map(Proc::pid)
    }

    /// Successful mesh TLS handshakes accepted by the server-side proxy so far.
    pub fn server_handshakes(&self) -> Option<f64> {
        match self.proxy {
            Proxy::Direct => None,
            Proxy::Trellis => Some(self.server.metrics().sum(
                "trellis_tls_handshakes_total",
                &[("direction", "inbound"), ("result", "ok")],
            )),
            Proxy::Haproxy => self
                .haproxies
                .iter()
                .find(|(side, _)| *side == Side::Server)
                .map(|(_, h)| h.info("CumSslConns")),
        }
    }
}

fn echo_once(target: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("echo check: connect {target}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut back = [0u8; 4];
    s.write_all(b"ping")
        .and_then(|_| s.read_exact(&mut back))
        .map_err(|e| format!("echo check via {target}: {e}"))?;
    if &back != b"ping" {
        return Err(format!("echo check: got {back:?}"));
    }
    Ok(())
}

/// The TLS 1.3 key-exchange group in a captured ServerHello's key_share extension. The
/// patterns are the extension's type, length, group and key length: a ClientHello's key_share
/// has one more length field, so it does not match.
fn key_exchange(frames: &[u8]) -> String {
    const GROUPS: [(&str, [u8; 8]); 4] = [
        (
            "X25519MLKEM768",
            [0x00, 0x33, 0x04, 0x64, 0x11, 0xec, 0x04, 0x60],
        ),
        ("X25519", [0x00, 0x33, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]),
        (
            "secp256r1",
            [0x00, 0x33, 0x00, 0x45, 0x00, 0x17, 0x00, 0x41],
        ),
        (
            "secp384r1",
            [0x00, 0x33, 0x00, 0x65, 0x00, 0x18, 0x00, 0x61],
        ),
    ];
    let seen: Vec<&str> = GROUPS
        .iter()
        .filter(|(_, pattern)| contains(frames, pattern))
        .map(|(name, _)| *name)
        .collect();
    if seen.is_empty() {
        "not seen".to_string()
    } else {
        seen.join("+")
    }
}

/// Polls until something listens on `addr`'s port inside `pod` (10 s at most). Asks `ss`
/// rather than connecting: once the interception rules are in, a probe from root would itself
/// be redirected.
pub fn wait_listening(pod: &Pod, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{}", addr.port());
    loop {
        let out = pod.exec("ss", &["-Hltn", &filter]);
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nothing listening on port {} in {} after 10 s",
                addr.port(),
                pod.name
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh folder for one run's files, readable and writable by the proxy UID (haproxy
/// creates its stats socket there and reads its certificates: bench-only keys).
pub fn run_dir(root: &Path, name: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    Ok(dir)
}
