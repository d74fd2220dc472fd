//! The proxy's workload identity: its certificate, and the TLS configurations built from it.
//!
//! One source keeps it current — the control plane's CA (`certify.rs`: key generated in
//! memory, certificate obtained before `/ready`, renewed at about 70 % of its lifetime, kept
//! when a renewal fails) or a directory written by cert-manager or SPIRE (`dir.rs`: reloaded
//! when it changes). Each new certificate is installed as one [`MeshTls`] value, swapped
//! atomically: connections being set up pick the current one, established ones keep theirs.

pub mod certify;
pub mod dir;

use std::sync::Arc;
use std::time::SystemTime;

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use trellis_identity::SpiffeId;
use trellis_identity::tls::{ALPN_H1, ALPN_H2, ALPN_TCP, Credentials, MESH_ALPNS};

use crate::metrics::Metrics;

/// The TLS material in force.
pub struct MeshTls {
    /// Counts certificates put in force (1 for the first): pooled connections opened with an
    /// older one are retired.
    pub generation: u64,
    pub identity: SpiffeId,
    pub not_after: SystemTime,
    /// Client configurations per mesh ALPN, and one for gRPC to the control plane.
    pub client_h2: Arc<ClientConfig>,
    pub client_h1: Arc<ClientConfig>,
    pub client_tcp: Arc<ClientConfig>,
    pub client_grpc: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl MeshTls {
    pub fn new(creds: &Credentials, generation: u64) -> Result<Self, String> {
        let client = |alpn: &[u8]| {
            creds
                .client_config(&[alpn])
                .map_err(|e| format!("TLS client configuration: {e}"))
        };
        Ok(Self {
            generation,
            identity: creds.identity.clone(),
            not_after: creds.not_after,
            client_h2: client(ALPN_H2)?,
            client_h1: client(ALPN_H1)?,
            client_tcp: client(ALPN_TCP)?,
            client_grpc: client(b"h2")?,
            server: creds
                .server_config(&MESH_ALPNS)
                .map_err(|e| format!("TLS server configuration: {e}"))?,
        })
    }

    pub fn expired(&self) -> bool {
        self.not_after <= SystemTime::now()
    }
}

/// Read access to the identity in force (none until the first certificate arrives).
#[derive(Clone)]
pub struct Identity {
    rx: watch::Receiver<Option<Arc<MeshTls>>>,
}

impl Identity {
    /// A proxy without identity: plaintext only.
    pub fn none() -> Self {
        let (_tx, rx) = watch::channel(None);
        Self { rx }
    }

    pub fn current(&self) -> Option<Arc<MeshTls>> {
        self.rx.borrow().clone()
    }

    /// Waits until a certificate is in force.
    pub async fn ready(&mut self) {
        let _ = self.rx.wait_for(|c| c.is_some()).await;
    }
}

/// Installs new certificates.
pub struct Installer {
    tx: watch::Sender<Option<Arc<MeshTls>>>,
    metrics: Arc<Metrics>,
}

impl Installer {
    pub fn new(metrics: Arc<Metrics>) -> (Self, Identity) {
        let (tx, rx) = watch::channel(None);
        (Self { tx, metrics }, Identity { rx })
    }

    pub fn current(&self) -> Option<Arc<MeshTls>> {
        self.tx.borrow().clone()
    }

    pub fn install(&self, creds: &Credentials, source: &str) -> Result<(), String> {
        let generation = self.current().map_or(1, |t| t.generation + 1);
        let tls = MeshTls::new(creds, generation)?;
        let expiry = unix(creds.not_after);
        self.metrics.identity(true, expiry);
        tracing::info!(identity = %creds.identity, source, expires_in_s = creds.not_after.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0), "certificate in force");
        self.tx.send_replace(Some(Arc::new(tls)));
        Ok(())
    }

    /// Records a failed attempt; the certificate in force (if any) stays.
    pub fn failed(&self) {
        let expiry = self.current().map_or(0, |t| unix(t.not_after));
        self.metrics.identity(false, expiry);
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
