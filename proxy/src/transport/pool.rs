//! The HTTP connection pool, keyed by (endpoint, identity).
//!
//! HTTP/1.1: idle keep-alive connections are kept per endpoint (newest first, bounded, expired
//! after the idle timeout). A connection returns to the pool only once hyper says it can carry
//! another request (the previous response body has been read to the end); one whose response
//! was abandoned is closed by hyper instead. A request sent on an idle connection that the server
//! had already closed is given back by hyper unsent and goes out on another connection, so a
//! race with the server's idle timeout never fails a request.
//!
//! HTTP/2: one connection per endpoint carries every request; a single connect is in flight at a
//! time per endpoint, and a closed connection is replaced on the next request.
//!
//! Mesh (mutual TLS) connections remember the certificate they were opened with: after a
//! renewal, new requests go on a new connection with the new certificate, and the old one
//! finishes its in-flight requests and closes. Rotation therefore reaches the wire within one
//! request, not when a pooled connection happens to close.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{Connector, Endpoint};
use crate::error::ProxyError;
use crate::http::BoxBody;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
}

struct Idle {
    sender: http1::SendRequest<BoxBody>,
    since: Instant,
    /// The certificate it was opened with (`Connector::tls_generation`; 0 for plaintext).
    generation: u64,
}

/// An HTTP/2 connection and the certificate generation it was opened with.
type H2Slot = Arc<tokio::sync::Mutex<Option<(http2::SendRequest<BoxBody>, u64)>>>;

pub struct Pool {
    connector: Connector,
    config: PoolConfig,
    http1_idle: Mutex<HashMap<Endpoint, Vec<Idle>>>,
    http2: Mutex<HashMap<Endpoint, H2Slot>>,
}

impl Pool {
    pub fn new(connector: Connector, config: PoolConfig) -> Arc<Self> {
        let pool = Arc::new(Self {
            connector,
            config,
            http1_idle: Mutex::default(),
            http2: Mutex::default(),
        });
        Self::spawn_sweeper(Arc::downgrade(&pool), pool.config.idle_timeout);
        pool
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Sends `req` to `endpoint` over a pooled connection of the given HTTP version.
    pub async fn send(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        version: HttpVersion,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match version {
            HttpVersion::Http1 => self.send_http1(endpoint, req).await,
            HttpVersion::Http2 => self.send_http2(endpoint, req).await,
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        mut req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let generation = self.generation(endpoint);
        while let Some(mut sender) = self.take_idle(endpoint, generation) {
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    self.recycle(endpoint.clone(), sender, generation);
                    return Ok(rsp);
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection closed while idle. Try the next one.
                    Some(unsent) => req = unsent,
                    None => return Err(upstream_reset(endpoint, e.into_error())),
                },
            }
        }
        let io = self.connector.connect(endpoint, "http1").await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| upstream_reset(endpoint, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|e| upstream_reset(endpoint, e))?;
        self.recycle(endpoint.clone(), sender, generation);
        Ok(rsp)
    }

    /// The certificate generation a new connection to `endpoint` would use (0: plaintext).
    fn generation(&self, endpoint: &Endpoint) -> u64 {
        match endpoint.identity {
            Some(_) => self.connector.tls_generation(),
            None => 0,
        }
    }

    fn take_idle(
        &self,
        endpoint: &Endpoint,
        generation: u64,
    ) -> Option<http1::SendRequest<BoxBody>> {
        let mut idle = self.http1_idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(endpoint)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < self.config.idle_timeout
                && !conn.sender.is_closed()
                && conn.generation == generation
            {
                return Some(conn.sender);
            }
        }
        idle.remove(endpoint);
        None
    }

    /// Returns the connection to the pool once it can carry another request.
    fn recycle(
        self: &Arc<Self>,
        endpoint: Endpoint,
        mut sender: http1::SendRequest<BoxBody>,
        generation: u64,
    ) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(pool) = pool.upgrade() else { return };
            let mut idle = pool.http1_idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(endpoint).or_default();
            list.push(Idle {
                sender,
                since: Instant::now(),
                generation,
            });
            if list.len() > pool.config.max_idle_per_endpoint {
                list.remove(0);
            }
        });
    }

    async fn send_http2(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.http2_sender(endpoint).await?;
        if sender.ready().await.is_err() {
            // The connection went away between checkout and use: replace it once.
            self.forget_http2(endpoint, &sender).await;
            sender = self.http2_sender(endpoint).await?;
        }
        sender
            .send_request(req)
            .await
            .map_err(|e| upstream_reset(endpoint, e))
    }

    async fn http2_sender(
        &self,
        endpoint: &Endpoint,
    ) -> Result<http2::SendRequest<BoxBody>, ProxyError> {
        let slot = {
            let mut map = self.http2.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(endpoint.clone()).or_default().clone()
        };
        // Held across the connect: concurrent requests wait for one connection, not dial many.
        let mut slot = slot.lock().await;
        let generation = self.generation(endpoint);
        if let Some((sender, _)) = slot
            .as_ref()
            .filter(|(s, g)| !s.is_closed() && *g == generation)
        {
            return Ok(sender.clone());
        }
        let io = self.connector.connect(endpoint, "http2").await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| upstream_reset(endpoint, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *slot = Some((sender.clone(), generation));
        Ok(sender)
    }

    async fn forget_http2(&self, endpoint: &Endpoint, dead: &http2::SendRequest<BoxBody>) {
        let slot = self
            .http2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(endpoint)
            .cloned();
        if let Some(slot) = slot {
            let mut slot = slot.lock().await;
            if slot
                .as_ref()
                .is_some_and(|(s, _)| s.is_closed() || dead.is_closed())
            {
                *slot = None;
            }
        }
    }

    /// Drops expired idle HTTP/1 connections and closed HTTP/2 ones, so that endpoints that are
    /// never called again do not hold sockets or memory.
    fn spawn_sweeper(pool: Weak<Self>, idle_timeout: Duration) {
        let period = (idle_timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                {
                    let mut idle = pool.http1_idle.lock().unwrap_or_else(|p| p.into_inner());
                    idle.retain(|_, list| {
                        list.retain(|c| c.since.elapsed() < idle_timeout && !c.sender.is_closed());
                        !list.is_empty()
                    });
                }
                let mut h2 = pool.http2.lock().unwrap_or_else(|p| p.into_inner());
                h2.retain(|_, slot| match slot.try_lock() {
                    Ok(s) => s.as_ref().is_some_and(|(s, _)| !s.is_closed()),
                    Err(_) => true, // a connect is in progress
                });
            }
        });
    }
}

fn upstream_reset(endpoint: &Endpoint, e: hyper::Error) -> ProxyError {
    ProxyError::UpstreamReset {
        addr: endpoint.addr,
        source: Box::new(e),
    }
}
