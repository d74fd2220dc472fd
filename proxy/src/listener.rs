//! The inbound and outbound listeners: accept, original destination, loop guard, detection,
//! then HTTP or opaque forwarding.
//!
//! Both directions work the same way; they differ in their [`Direction`] (metrics, which owned
//! headers are stripped, whether TrafficPolicy applies) and in the pool they dial through.
//! Inbound connections go to the app at their original destination (the pod IP and port the
//! client dialled): the proxy's own UID is exempt from the OUTPUT redirect, and an app that
//! listens only on 127.0.0.1 stays unreachable from other pods, exactly as without the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use trellis_identity::tls::{ALPN_H1, ALPN_H2, peer_identity};
use trellis_proto::policy::{Protocol as DeclaredProtocol, ServerPolicy};

use crate::cli::PortList;
use crate::detect::{self, Detected, Protocol};
use crate::drain;
use crate::error::ProxyError;
use crate::http::{self, ConnInfo, Forwarder};
use crate::identity::Identity;
use crate::inbound;
use crate::io::{Activity, CountingIo, PrefixedIo};
use crate::metrics::{Direction, Metrics};
use crate::orig_dst;
use crate::policy::PolicyStore;
use crate::tcp::{self, TcpTarget};
use crate::transport::Pool;

/// What a listener needs to handle its connections.
pub struct ListenerConfig {
    pub direction: Direction,
    pub detect_timeout: Duration,
    pub opaque_ports: PortList,
    /// The proxy's own listener ports (inbound, outbound, admin): never a destination.
    pub own_ports: Vec<u16>,
    pub max_connections: usize,
    /// Traces and the access log.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Connections with no traffic for this long are closed.
    pub idle_timeout: Option<Duration>,
    /// Outbound, with a control plane: service discovery.
    pub discovery: Option<Arc<crate::discovery::Discovery>>,
    /// What HTTP clients may send: header size and the time to send them.
    pub http_limits: http::ServerLimits,
}

pub struct Listener {
    config: ListenerConfig,
    identity: Identity,
    pool: Arc<Pool>,
    http: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    policies: Arc<PolicyStore>,
    limit: Arc<Semaphore>,
}

impl Listener {
    pub fn new(
        config: ListenerConfig,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        policies: Arc<PolicyStore>,
        identity: Identity,
    ) -> Arc<Self> {
        let http = Arc::new(Forwarder::new(
            config.direction,
            pool.clone(),
            metrics.clone(),
            config.telemetry.clone(),
            policies.clone(),
        ));
        let limit = Arc::new(Semaphore::new(config.max_connections));
        Arc::new(Self {
            config,
            identity,
            pool,
            http,
            metrics,
            policies,
            limit,
        })
    }

    /// Accepts connections on `socket` until a drain starts, then drops the socket so that new
    /// connections are refused while accepted ones finish.
    pub async fn serve(self: Arc<Self>, socket: TcpListener, drain: drain::Watch) {
        let direction = self.config.direction.as_str();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = drain.signaled() => break,
                accepted = socket.accept() => accepted,
            };
            let (stream, client) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(direction, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                let err = ProxyError::Overloaded {
                    limit: self.config.max_connections,
                };
                self.metrics.error(self.config.direction, err.cause());
                tracing::warn!(direction, %client, error = err.cause(), reason = %err, "connection shed");
                drop(stream);
                continue;
            };
            let this = self.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                this.handle(stream, client, drain).await;
                drop(permit);
            });
        }
        tracing::debug!(direction, addr = ?socket.local_addr().ok(), "listener closed for drain");
    }

    async fn handle(&self, stream: TcpStream, client: SocketAddr, drain: drain::Watch) {
        let direction = self.config.direction;
        let _ = stream.set_nodelay(true);
        let mut conn_metrics = self.metrics.connection(direction);
        let orig_dst = self.original_destination(&stream);
        let activity = Activity::new();
        let mut io = CountingIo::new(
            stream,
            conn_metrics.read.clone(),
            conn_metrics.written.clone(),
            activity.clone(),
        );

        // Outbound: what discovery knows about the destination (a new one waits briefly for
        // the control plane's answer, once).
        let target = match (direction, &orig_dst, &self.config.discovery) {
            (Direction::outbound, Ok(dst), Some(discovery)) => discovery.lookup(*dst).await,
            _ => None,
        };
        let discovered = target.as_ref().and_then(|t| t.current());
        // The policy in force when the connection arrived decides how it is handled.
        let snapshot = self.policies.current();
        let route = match (direction, &orig_dst) {
            (Direction::outbound, Ok(dst)) => Some(
                snapshot
                    .routes
                    .route(
                        None,
                        *dst,
                        &self.policies.scope,
                        discovered.as_ref().map(|d| &*d.authority),
                    )
                    .clone(),
            ),
            _ => None,
        };
        let declared_opaque = match (direction, &orig_dst) {
            (Direction::inbound, Ok(dst)) => snapshot.inbound_opaque_ports.contains(&dst.port()),
            _ => match route.as_ref().map(|r| r.policy.protocol) {
                Some(DeclaredProtocol::Auto) | None => discovered
                    .as_ref()
                    .is_some_and(|d| d.protocol == DeclaredProtocol::Opaque),
                Some(p) => p == DeclaredProtocol::Opaque,
            },
        };
        let server_policy = match (direction, &orig_dst) {
            (Direction::inbound, Ok(dst)) => {
                inbound::policy_for(&snapshot.inbound_servers, dst.port()).cloned()
            }
            _ => None,
        };
        let snapshot = (direction == Direction::outbound).then_some(snapshot);

        let mut buf = BytesMut::new();
        let opaque_port = orig_dst
            .as_ref()
            .is_ok_and(|d| self.config.opaque_ports.contains(d.port()));
        // Inbound, a proxy with an identity looks for a mesh ClientHello even on opaque ports
        // (the peer proxy always speaks first).
        let mesh_tls = direction == Direction::inbound && self.identity.current().is_some();
        let protocol = if (opaque_port || declared_opaque) && !mesh_tls {
            Protocol::Opaque
        } else {
            match detect::detect(&mut io, &mut buf, self.config.detect_timeout).await {
                Ok(Detected::Protocol(p)) => p,
                Ok(Detected::Timeout { bytes_read: 0 }) => Protocol::Opaque,
                Ok(Detected::Timeout { bytes_read }) => {
                    // Part of something that looked like HTTP, then silence: forward it as is.
                    self.metrics.error(direction, "detect-timeout");
                    tracing::debug!(%client, bytes_read, "incomplete request line at detect timeout; forwarding as opaque");
                    Protocol::Opaque
                }
                Ok(Detected::Closed) => return,
                Err(e) => {
                    tracing::debug!(%client, error = %e, "connection failed during protocol detection");
                    return;
                }
            }
        };
        if mesh_tls {
            match inbound::is_mesh_hello(&mut io, &mut buf, self.config.detect_timeout).await {
                Ok(true) => {
                    self.metrics.detected(&mut conn_metrics, "mesh-tls");
                    let io = PrefixedIo::new(buf.freeze(), io);
                    self.serve_mesh(
                        io,
                        client,
                        orig_dst,
                        server_policy.as_ref(),
                        activity,
                        drain,
                    )
                    .await;
                    drop(conn_metrics);
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(%client, error = %e, "connection failed while reading a ClientHello");
                    return;
                }
            }
        }
        let protocol = if opaque_port || declared_opaque {
            Protocol::Opaque
        } else {
            protocol
        };
        self.metrics.detected(&mut conn_metrics, protocol.as_str());
        let io = PrefixedIo::new(buf.freeze(), io);
        // Opaque plaintext into a server whose policy requires mutual TLS (or lists
        // identities) is closed; HTTP requests are refused one by one (403, forward.rs).
        if protocol == Protocol::Opaque
            && let Err(reason) = inbound::authorize(server_policy.as_ref(), None)
        {
            self.metrics.error(direction, "unauthorized");
            tracing::warn!(direction = direction.as_str(), %client, dst = ?orig_dst, error = "unauthorized", %reason, "plaintext connection refused");
            return;
        }

        match protocol {
            Protocol::Opaque => match orig_dst {
                Ok(orig_dst) => {
                    let idle_timeout = route
                        .as_ref()
                        .and_then(|r| r.policy.idle_timeout)
                        .or(self.config.idle_timeout);
                    let route = route.map(|r| {
                        let budget = self.policies.budget_for(&r, orig_dst);
                        (r, budget)
                    });
                    let target = TcpTarget {
                        orig_dst,
                        route,
                        idle_timeout,
                        snapshot,
                        discovered,
                    };
                    tcp::forward(
                        io,
                        client,
                        target,
                        activity,
                        self.pool.connector(),
                        &self.config.telemetry,
                        None,
                    )
                    .await;
                }
                Err(reason) => {
                    let err = ProxyError::NoOriginalDestination { reason };
                    self.metrics.error(direction, err.cause());
                    tracing::warn!(direction = direction.as_str(), %client, error = err.cause(), reason = %err, "connection refused");
                }
            },
            Protocol::Http1 | Protocol::Http2 => {
                // Each request reads the snapshot in force when it arrives.
                drop(snapshot);
                let mut info = ConnInfo::plain(client, orig_dst, protocol);
                if let Some(d) = &discovered {
                    info.destination = d.authority.clone();
                }
                info.discovered = target;
                tokio::select! {
                    _ = http::serve(io, self.http.clone(), info, drain, self.config.http_limits, &self.metrics, direction) => {}
                    _ = activity.expired(self.config.idle_timeout) => {
                        tracing::debug!(%client, "closing idle HTTP connection");
                    }
                }
            }
        }
        drop(conn_metrics);
    }

    /// A connection from a peer proxy: the TLS handshake (client certificate required), the
    /// server policy's verdict on the peer, then HTTP or opaque TCP as the ALPN says.
    async fn serve_mesh(
        &self,
        io: PrefixedIo<CountingIo<TcpStream>>,
        client: SocketAddr,
        orig_dst: Result<SocketAddr, String>,
        policy: Option<&ServerPolicy>,
        activity: Activity,
        drain: drain::Watch,
    ) {
        let direction = self.config.direction;
        let Some(tls) = self.identity.current() else {
            return;
        };
        let accept = tokio_rustls::TlsAcceptor::from(tls.server.clone()).accept(io);
        let stream = match tokio::time::timeout(Duration::from_secs(10), accept).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.metrics.handshake(direction, "error");
                tracing::warn!(direction = direction.as_str(), %client, error = "tls-handshake", reason = %e, "mesh TLS handshake refused");
                return;
            }
            Err(_) => {
                self.metrics.handshake(direction, "timeout");
                tracing::warn!(direction = direction.as_str(), %client, error = "tls-handshake", "mesh TLS handshake timed out");
                return;
            }
        };
        self.metrics.handshake(direction, "ok");
        let (_, conn) = stream.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let Some(peer) = conn.peer_certificates().and_then(peer_identity) else {
            self.metrics.error(direction, "unauthorized");
            tracing::warn!(%client, error = "unauthorized", "mesh peer certificate has no workload SPIFFE ID; closing");
            return;
        };
        let protocol = match alpn.as_deref() {
            Some(ALPN_H2) => Protocol::Http2,
            Some(ALPN_H1) => Protocol::Http1,
            _ => Protocol::Opaque,
        };
        match protocol {
            Protocol::Opaque => {
                if let Err(reason) = inbound::authorize(policy, Some(&peer)) {
                    self.metrics.error(direction, "unauthorized");
                    tracing::warn!(%client, peer = %peer, dst = ?orig_dst, error = "unauthorized", %reason, "mesh connection refused");
                    return;
                }
                let Ok(orig_dst) = orig_dst else { return };
                let target = TcpTarget {
                    orig_dst,
                    route: None,
                    idle_timeout: self.config.idle_timeout,
                    snapshot: None,
                    discovered: None,
                };
                tcp::forward(
                    stream,
                    client,
                    target,
                    activity,
                    self.pool.connector(),
                    &self.config.telemetry,
                    Some(Arc::from(peer.to_string())),
                )
                .await;
            }
            Protocol::Http1 | Protocol::Http2 => {
                let mut info = ConnInfo::plain(client, orig_dst, protocol);
                info.peer = Some(http::Peer::new(peer));
                tokio::select! {
                    _ = http::serve(stream, self.http.clone(), info, drain, self.config.http_limits, &self.metrics, direction) => {}
                    _ = activity.expired(self.config.idle_timeout) => {
                        tracing::debug!(%client, "closing idle mesh HTTP connection");
                    }
                }
            }
        }
    }

    /// The original destination, unless the connection was not redirected or would loop back
    /// into one of the proxy's own listeners.
    fn original_destination(&self, stream: &TcpStream) -> Result<SocketAddr, String> {
        let local = stream
            .local_addr()
            .map_err(|e| format!("local address unknown: {e}"))?;
        let dst = orig_dst::original_dst(stream).map_err(|e| {
            format!("SO_ORIGINAL_DST failed ({e}): was the connection redirected by `trellis-proxy init` rules?")
        })?;
        if dst == local {
            return Err(format!(
                "the connection was made directly to the proxy's listener {local}, not redirected to it; refusing to loop"
            ));
        }
        if self.config.own_ports.contains(&dst.port())
            && (dst.ip() == local.ip() || dst.ip().is_loopback())
        {
            return Err(format!(
                "{dst} is one of the proxy's own listeners; refusing to loop"
            ));
        }
        Ok(dst)
    }
}
