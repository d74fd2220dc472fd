//! Opaque TCP forwarding: a byte-for-byte bidirectional copy with half-close.
//!
//! When one side finishes sending (FIN), the other side's write half is shut down and the copy
//! continues in the other direction until it finishes too, so request/response protocols that
//! half-close (and server-first ones) behave exactly as without the proxy.

use std::net::SocketAddr;
use std::time::Instant;

use crate::cli::AccessLog;
use crate::error::ProxyError;
use crate::io::Io;
use crate::transport::{Connector, Endpoint};

/// Connects to `endpoint` and copies bytes both ways until both directions are done.
pub async fn forward<I: Io>(
    mut client: I,
    client_addr: SocketAddr,
    endpoint: Endpoint,
    connector: &Connector,
    access_log: AccessLog,
) {
    let start = Instant::now();
    let direction = connector.direction();
    let mut upstream = match connector.connect(&endpoint, "opaque").await {
        Ok(io) => io,
        Err(err) => {
            report_failure(connector, &err, client_addr, &endpoint);
            return;
        }
    };
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let failed = result.is_err();
    if access_log == AccessLog::All || (access_log == AccessLog::Errors && failed) {
        let (sent, received) = result.as_ref().map(|(a, b)| (*a, *b)).unwrap_or_default();
        tracing::info!(
            target: "trellis::access",
            direction = direction.as_str(), protocol = "opaque", client = %client_addr,
            dst = %endpoint.addr, bytes_sent = sent, bytes_received = received,
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
            error = result.as_ref().err().map(|e| e.to_string()),
            "tcp connection"
        );
    }
}

fn report_failure(
    connector: &Connector,
    err: &ProxyError,
    client: SocketAddr,
    endpoint: &Endpoint,
) {
    connector
        .metrics()
        .error(connector.direction(), err.cause());
    tracing::warn!(
        target: "trellis::access",
        direction = connector.direction().as_str(), protocol = "opaque", client = %client,
        dst = %endpoint.addr, error = err.cause(), reason = %err,
        "tcp connection failed in the proxy"
    );
}
