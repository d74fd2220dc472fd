//! Connections to upstream endpoints.
//!
//! [`Endpoint`] names where a request or connection goes: an address and, once mutual TLS exists,
//! the identity the peer must prove. [`Connector`] dials one; [`Pool`] keeps HTTP connections per
//! (endpoint, identity) and reuses them across client connections: HTTP/2 multiplexed over one
//! connection, HTTP/1.1 as a set of idle keep-alive connections. Opaque TCP dials a fresh
//! connection per client connection. Mutual TLS happens in [`Connector::connect`] for endpoints
//! that name an identity; everything above it sees a type-erased stream.

mod connect;
mod pool;

pub use connect::{ANY_MESH_IDENTITY, Connector};
pub use pool::{HttpVersion, Pool, PoolConfig};

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// One upstream destination, and the key of its pooled connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity the peer must prove (mutual TLS); `None` is plaintext.
    pub identity: Option<Arc<str>>,
}

impl Endpoint {
    pub fn plaintext(addr: SocketAddr) -> Self {
        Self {
            addr,
            identity: None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(id) => write!(f, "{} ({id})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}
