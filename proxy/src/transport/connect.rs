//! Dials upstream endpoints: connect timeout, TCP_NODELAY, keepalive, error classification.

use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use super::Endpoint;
use crate::error::ProxyError;
use crate::io::BoxIo;
use crate::metrics::{Direction, Metrics};

/// Opens connections to endpoints on behalf of one listener direction.
pub struct Connector {
    direction: Direction,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Connector {
    pub fn new(direction: Direction, connect_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            direction,
            connect_timeout,
            metrics,
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
        Ok(Box::new(stream))
    }
}
