//! haproxy as the sidecar pair we compare against: the same interception rules as Trellis
//! (`trellis-proxy init`, outbound 4140, inbound 4143), haproxy running as the proxy UID 2102
//! with one thread, certificates issued by a mesh CA of our own (`trellis_identity::ca::Ca`,
//! SPIFFE URI SANs as Trellis's), and its stats socket for TLS handshake counts.
//!
//! Differences from Trellis that no configuration removes, stated in the report: the client
//! side forwards everything to one fixed server (haproxy cannot read SO_ORIGINAL_DST), and it
//! checks the peer's chain against the mesh CA but not its SPIFFE identity.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_identity::ca::Ca;
use trellis_identity::spiffe::SpiffeId;
use trellis_tests::harness::{PROXY_UID, Pod, Proc};

use crate::topology::{App, Side, Tls, wait_listening};

/// The mesh CA and the two sidecars' credentials, as files haproxy reads.
pub struct Certs {
    pub ca_file: PathBuf,
    pub client_pem: PathBuf,
    pub server_pem: PathBuf,
}

impl Certs {
    pub fn issue(dir: &Path) -> Result<Self, String> {
        let (ca, ca_pem, _key) =
            Ca::generate("cluster.local").map_err(|e| format!("mesh CA: {e}"))?;
        let write = |name: &str, text: &str| -> Result<PathBuf, String> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path)
        };
        let pem = |sa: &str| -> Result<PathBuf, String> {
            let id = SpiffeId::new("cluster.local", "default", sa);
            let (issued, key) = ca
                .issue(&id, Duration::from_secs(24 * 3600), &[], &[])
                .map_err(|e| format!("certificate for {id}: {e}"))?;
            // haproxy's `crt`: the chain, then the key, in one file.
            write(
                &format!("haproxy-{sa}.pem"),
                &format!("{}{key}", issued.chain_pem),
            )
        };
        Ok(Self {
            client_pem: pem("client")?,
            server_pem: pem("server")?,
            ca_file: write("mesh-ca.pem", &ca_pem)?,
        })
    }
}

/// One haproxy sidecar: its process and its stats socket.
pub struct Haproxy {
    pub proc: Proc,
    socket: PathBuf,
}

impl Haproxy {
    /// Starts haproxy in `pod` as the `side` sidecar for `app`, forwarding to `server_ip`.
    pub fn start(
        pod: &Pod,
        side: Side,
        app: App,
        tls: Tls,
        server_ip: std::net::Ipv4Addr,
        certs: Option<&Certs>,
        dir: &Path,
    ) -> Result<Self, String> {
        let name = match side {
            Side::Client => "client",
            Side::Server => "server",
        };
        let socket = dir.join(format!("haproxy-{name}.sock"));
        let config = config(side, app, tls, server_ip, certs, &socket)?;
        let cfg = dir.join(format!("haproxy-{name}.cfg"));
        std::fs::write(&cfg, config).map_err(|e| format!("{}: {e}", cfg.display()))?;
        let uid = PROXY_UID.to_string();
        let mut cmd = pod.netns().command("setpriv");
        cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .args(["haproxy", "-db", "-f"])
            .arg(&cfg);
        // haproxy needs about 2 descriptors per connection: maxconn 9000 fits the hard
        // RLIMIT_NOFILE of 20,000 here (it raises its soft limit itself).
        let mut proc = Proc::spawn(
            &format!("haproxy {name}"),
            cmd,
            &dir.join(format!("haproxy-{name}.log")),
        );
        // Loopback: a probe to the pod IP from root would itself be intercepted.
        let port = match side {
            Side::Client => 4140,
            Side::Server => 4143,
        };
        let probe = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = wait_listening(pod, probe) {
            let exited = proc
                .try_wait()
                .map(|s| format!(" (exited: {s})"))
                .unwrap_or_default();
            return Err(format!("haproxy {name}{exited}: {e}:\n{}", proc.log()));
        }
        Ok(Self { proc, socket })
    }

    /// A field of `show info` (e.g. `CumSslConns`), 0 if absent.
    pub fn info(&self, field: &str) -> f64 {
        let read = || -> std::io::Result<String> {
            let mut s = UnixStream::connect(&self.socket)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"show info\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        };
        read()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

fn config(
    side: Side,
    app: App,
    tls: Tls,
    server_ip: std::net::Ipv4Addr,
    certs: Option<&Certs>,
    socket: &Path,
) -> Result<String, String> {
    let certs = match (tls, certs) {
        (Tls::Mutual, Some(c)) => Some(c),
        (Tls::Mutual, None) => return Err("mutual TLS without certificates".into()),
        (Tls::Plain, _) => None,
    };
    let mode = if app == App::Opaque { "tcp" } else { "http" };
    let port = app.port();
    let mut cfg = format!(
        "global\n    nbthread 1\n    maxconn 9000\n    stats socket {} mode 666 level admin\n    \
         ssl-default-bind-options ssl-min-ver TLSv1.3\n    \
         ssl-default-server-options ssl-min-ver TLSv1.3\n\
         defaults\n    mode {mode}\n    timeout connect 5s\n    timeout client 300s\n    \
         timeout server 300s\n    timeout http-keep-alive 300s\n    maxconn 9000\n",
        socket.display()
    );
    if mode == "http" {
        cfg.push_str("    option http-keep-alive\n    http-reuse always\n");
    }
    match side {
        Side::Client => {
            // The app's h2c prior knowledge is accepted as HTTP/2 on the plaintext bind.
            let bind_proto = if app == App::H2c { " proto h2" } else { "" };
            let upstream = match certs {
                // One multiplexed HTTP/2 connection between the proxies, as Trellis does.
                Some(c) if mode == "http" => format!(
                    " ssl crt {} ca-file {} verify required alpn h2",
                    c.client_pem.display(),
                    c.ca_file.display()
                ),
                Some(c) => format!(
                    " ssl crt {} ca-file {} verify required",
                    c.client_pem.display(),
                    c.ca_file.display()
                ),
                None => String::new(),
            };
            cfg.push_str(&format!(
                "frontend outbound\n    bind 127.0.0.1:4140{bind_proto}\n    default_backend peer\n\
                 backend peer\n    server peer {server_ip}:{port}{upstream}\n"
            ));
        }
        Side::Server => {
            let bind_tls = match certs {
                Some(c) => format!(
                    " ssl crt {} ca-file {} verify required curves X25519 alpn h2,http/1.1",
                    c.server_pem.display(),
                    c.ca_file.display()
                ),
                None => String::new(),
            };
            // Delivered to the original destination (pod IP:port) as the proxy UID, as Trellis.
            let app_proto = if app == App::H2c { " proto h2" } else { "" };
            cfg.push_str(&format!(
                "frontend inbound\n    bind :4143{bind_tls}\n    default_backend app\n\
                 backend app\n    server app {server_ip}:{port}{app_proto}\n"
            ));
        }
    }
    Ok(cfg)
}
