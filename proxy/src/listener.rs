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
use trellis_proto::policy::Protocol as DeclaredProtocol;

use crate::cli::{AccessLog, PortList};
use crate::detect::{self, Detected, Protocol};
use crate::drain;
use crate::error::ProxyError;
use crate::http::{self, ConnInfo, Forwarder};
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
    pub access_log: AccessLog,
    /// Connections with no traffic for this long are closed.
    pub idle_timeout: Option<Duration>,
}

pub struct Listener {
    config: ListenerConfig,
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
    ) -> Arc<Self> {
        let http = Arc::new(Forwarder::new(
            config.direction,
            pool.clone(),
            metrics.clone(),
            config.access_log,
            policies.clone(),
        ));
        let limit = Arc::new(Semaphore::new(config.max_connections));
        Arc::new(Self {
            config,
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

        // The policy in force when the connection arrived decides how it is handled.
        let snapshot = self.policies.current();
        let route = match (direction, &orig_dst) {
            (Direction::outbound, Ok(dst)) => Some(
                snapshot
                    .routes
                    .route(None, *dst, &self.policies.scope)
                    .clone(),
            ),
            _ => None,
        };
        let declared_opaque = match (direction, &orig_dst) {
            (Direction::inbound, Ok(dst)) => snapshot.inbound_opaque_ports.contains(&dst.port()),
            _ => route
                .as_ref()
                .is_some_and(|r| r.policy.protocol == DeclaredProtocol::Opaque),
        };
        drop(snapshot);

        let mut buf = BytesMut::new();
        let opaque_port = orig_dst
            .as_ref()
            .is_ok_and(|d| self.config.opaque_ports.contains(d.port()));
        let protocol = if opaque_port || declared_opaque {
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
        self.metrics.detected(&mut conn_metrics, protocol.as_str());
        let io = PrefixedIo::new(buf.freeze(), io);

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
                    };
                    tcp::forward(
                        io,
                        client,
                        target,
                        activity,
                        self.pool.connector(),
                        self.config.access_log,
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
                let info = ConnInfo {
                    client,
                    orig_dst,
                    protocol,
                };
                tokio::select! {
                    _ = http::serve(io, self.http.clone(), info, drain) => {}
                    _ = activity.expired(self.config.idle_timeout) => {
                        tracing::debug!(%client, "closing idle HTTP connection");
                    }
                }
            }
        }
        drop(conn_metrics);
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
