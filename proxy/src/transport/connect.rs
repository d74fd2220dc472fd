//! Dials upstream endpoints: connect timeout, TCP_NODELAY, keepalive, error classification, and
//! for mesh endpoints the TLS 1.3 handshake as this proxy's identity. The mesh ALPN names the
//! protocol inside (`trellis/h2` for pooled HTTP, `trellis/h1` for protocol upgrades,
//! `trellis/tcp` for opaque streams), and the server must prove the identity the endpoint
//! names before a byte of the request is sent.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use trellis_identity::tls::{ALPN_H1, ALPN_H2, ALPN_TCP, expect_identity, peer_identity};

use super::Endpoint;
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::io::BoxIo;
use crate::metrics::{Direction, Metrics};

/// Opens connections to endpoints on behalf of one listener direction.
pub struct Connector {
    direction: Direction,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    identity: Identity,
}

/// An endpoint identity that accepts any workload of the mesh (chain verified, name not pinned).
pub const ANY_MESH_IDENTITY: &str = "*";

impl Connector {
    pub fn new(
        direction: Direction,
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
        identity: Identity,
    ) -> Self {
        Self {
            direction,
            connect_timeout,
            metrics,
            identity,
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether this proxy has a certificate, and so calls meshed pods over mutual TLS. An
    /// expired one still counts: calls then fail with `tls-handshake` rather than silently
    /// falling back to plaintext.
    pub fn has_identity(&self) -> bool {
        self.identity.current().is_some()
    }

    /// Which certificate new mesh connections present (changes on every renewal), so pooled
    /// connections opened with an older one can be retired.
    pub fn tls_generation(&self) -> u64 {
        self.identity.current().map_or(0, |t| t.generation)
    }

    /// Connects to `endpoint`; `protocol` labels the upstream-connection metric.
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        protocol: &'static str,
    ) -> Result<BoxIo, ProxyError> {
        let addr = endpoint.addr;
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(ProxyError::from_connect(addr, e)),
                Err(_) => {
                    return Err(ProxyError::ConnectTimeout {
                        addr,
                        timeout: self.connect_timeout,
                    });
                }
            };
        // Best effort: a socket that refuses these options still carries traffic correctly.
        let _ = stream.set_nodelay(true);
        let keepalive = TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10));
        let _ = SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        self.metrics.upstream_connect(self.direction, protocol);
        match &endpoint.identity {
            None => Ok(Box::new(stream)),
            Some(expected) => self.handshake(stream, endpoint, expected, protocol).await,
        }
    }

    async fn handshake(
        &self,
        stream: TcpStream,
        endpoint: &Endpoint,
        expected: &str,
        protocol: &'static str,
    ) -> Result<BoxIo, ProxyError> {
        let addr = endpoint.addr;
        let fail = |result: &'static str, reason: String| {
            self.metrics.handshake(self.direction, result);
            ProxyError::TlsHandshake { addr, reason }
        };
        let Some(tls) = self.identity.current() else {
            return Err(fail(
                "no-identity",
                "this proxy has no certificate (no --identity-token-file or --identity-dir, or none obtained yet)".into(),
            ));
        };
        let (config, alpn) = match protocol {
            "http2" => (tls.client_h2.clone(), ALPN_H2),
            "http1" => (tls.client_h1.clone(), ALPN_H1),
            _ => (tls.client_tcp.clone(), ALPN_TCP),
        };
        let name = ServerName::IpAddress(addr.ip().into());
        let connect = tokio_rustls::TlsConnector::from(config).connect(name, stream);
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(fail("error", e.to_string())),
            Err(_) => {
                return Err(fail(
                    "timeout",
                    format!("no handshake within {:?}", self.connect_timeout),
                ));
            }
        };
        let (_, conn) = stream.get_ref();
        if conn.alpn_protocol() != Some(alpn) {
            return Err(fail(
                "error",
                "the peer did not accept the mesh protocol (it is not a Trellis proxy)".into(),
            ));
        }
        let verified = if expected == ANY_MESH_IDENTITY {
            peer_identity(conn.peer_certificates().unwrap_or_default())
                .map(|_| ())
                .ok_or_else(|| "the peer's certificate has no workload SPIFFE ID".to_string())
        } else {
            expect_identity(conn.peer_certificates(), expected)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if let Err(reason) = verified {
            self.metrics.handshake(self.direction, "identity-mismatch");
            return Err(ProxyError::TlsIdentityMismatch { addr, reason });
        }
        self.metrics.handshake(self.direction, "ok");
        Ok(Box::new(stream))
    }
}
