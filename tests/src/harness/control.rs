//! A real `trellis-control serve` on loopback (no pods), for tests of its gRPC API: started
//! with a fresh state dir, reached over TLS with the credential it wrote there (admin) or
//! none (as a proxy before its first certificate).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::control_bin;

pub struct ControlPlane {
    child: Child,
    pub url: String,
    pub admin_url: String,
    pub dir: PathBuf,
}

impl ControlPlane {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts with extra `serve` flags; its log goes to `<dir>.log` (see [`ControlPlane::log`]).
    pub fn start_with(name: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let admin = free_port();
        let dir = std::env::temp_dir().join(format!("trellis-cp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = std::fs::File::create(dir.with_extension("log")).expect("create log");
        let child = Command::new(control_bin())
            .args([
                "serve",
                "--grpc-addr",
                &format!("127.0.0.1:{port}"),
                "--admin-addr",
                &format!("127.0.0.1:{admin}"),
                "--state-dir",
            ])
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start trellis-control");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "control plane not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("https://127.0.0.1:{port}"),
            admin_url: format!("127.0.0.1:{admin}"),
            dir,
        }
    }

    /// A channel to the control plane over TLS; with the admin credential of its state dir
    /// when `admin`, else anonymous (as a proxy before its first certificate).
    pub fn channel(&self, admin: bool) -> tonic::transport::Channel {
        let ca = std::fs::read(self.dir.join("ca.pem")).expect("ca.pem");
        let config = if admin {
            let cert = std::fs::read(self.dir.join("admin-cert.pem")).expect("admin-cert.pem");
            let key = std::fs::read(self.dir.join("admin-key.pem")).expect("admin-key.pem");
            trellis_identity::tls::Credentials::from_pem(&cert, &key, &ca)
                .expect("admin credential")
                .client_config(&[b"h2"])
                .expect("client config")
        } else {
            let roots = trellis_identity::tls::roots_from_pem(&ca).expect("trust anchors");
            trellis_identity::tls::client_config(Arc::new(roots), None, &[b"h2"])
                .expect("client config")
        };
        self.channel_with(config)
    }

    /// A channel presenting whatever `config` presents.
    pub fn channel_with(&self, config: Arc<rustls::ClientConfig>) -> tonic::transport::Channel {
        trellis_identity::grpc::channel(
            &self.url,
            Arc::new(move || config.clone()),
            Arc::new(|_| Ok(())),
        )
        .expect("channel")
    }

    /// Runs the CLI against this control plane with the credential in its state dir.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(control_bin())
            .args(args)
            .args(["--server", &self.url])
            .arg("--state-dir")
            .arg(&self.dir)
            .output()
            .expect("run trellis-control")
    }

    /// The control plane's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// `GET /metrics` of the control plane's admin server.
    pub fn metrics(&self) -> super::Scrape {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.admin_url).expect("admin port");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        super::Scrape::parse(body)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A simulated proxy's `ConfigService.Stream`: subscribes with `subscribe`, then ACKs every
/// snapshot — or NACKs every version but "0" with `nack` — calling `seen` with each version as
/// it arrives. Returns when the stream ends.
pub async fn simulated_proxy(
    channel: tonic::transport::Channel,
    subscribe: trellis_proto::pb::Subscribe,
    nack: Option<String>,
    mut seen: impl FnMut(String) + Send,
) {
    use tokio_stream::StreamExt;
    use trellis_proto::pb::config_service_client::ConfigServiceClient;
    use trellis_proto::pb::{Ack, Nack, ProxyMessage, proxy_message::Kind};

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = ProxyMessage {
        kind: Some(Kind::Subscribe(subscribe)),
    };
    if tx.send(first).await.is_err() {
        return;
    }
    let Ok(stream) = ConfigServiceClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut stream = stream.into_inner();
    while let Some(Ok(s)) = stream.next().await {
        seen(s.version.clone());
        let kind = match &nack {
            Some(error) if s.version != "0" => Kind::Nack(Nack {
                version: s.version,
                nonce: s.nonce,
                error: error.clone(),
            }),
            _ => Kind::Ack(Ack {
                version: s.version,
                nonce: s.nonce,
            }),
        };
        if tx.send(ProxyMessage { kind: Some(kind) }).await.is_err() {
            return;
        }
    }
}
