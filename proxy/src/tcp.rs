//! Opaque TCP forwarding: a byte-for-byte bidirectional copy with half-close.
//!
//! When one side finishes sending (FIN), the other side's write half is shut down and the copy
//! continues in the other direction until it finishes too, so request/response protocols that
//! half-close (and server-first ones) behave exactly as without the proxy. On the outbound side
//! the matching policy picks the endpoint and retries failed connects (nothing has been sent
//! yet, so that is always safe); a stream with no traffic for the idle timeout is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::balance::Verdict;
use crate::error::ProxyError;
use crate::io::{Activity, BoxIo, Io};
use crate::policy::Snapshot;
use crate::policy::routes::Route;
use crate::retry::{self, Budget, Failure};
use crate::telemetry::Telemetry;
use crate::telemetry::access_log::{Record, TcpRecord};
use crate::transport::{Connector, Endpoint};

/// Where an opaque connection goes and how long it may stay silent.
pub struct TcpTarget {
    pub orig_dst: SocketAddr,
    /// The outbound policy, if any (inbound connections go to the original destination), and
    /// the retry budget that goes with it.
    pub route: Option<(Arc<Route>, Arc<Budget>)>,
    pub idle_timeout: Option<Duration>,
    /// Outbound: the policy snapshot the route came from, for the per-endpoint mutual-TLS
    /// decision (meshed pods).
    pub snapshot: Option<Arc<Snapshot>>,
    /// Outbound: the service discovery resolved the original destination to.
    pub discovered: Option<Arc<crate::discovery::Resolved>>,
}

/// Connects to the target and copies bytes both ways until both directions are done.
/// `peer`: inbound over mesh TLS, the client's verified identity.
pub async fn forward<I: Io>(
    mut client: I,
    client_addr: SocketAddr,
    target: TcpTarget,
    activity: Activity,
    connector: &Connector,
    telemetry: &Telemetry,
    peer: Option<Arc<str>>,
) {
    let start = Instant::now();
    let start_time = SystemTime::now();
    let direction = connector.direction();
    let log = |upstream: SocketAddr,
               peer: Option<Arc<str>>,
               bytes: (u64, u64),
               error: Option<&'static str>,
               detail: Option<String>| {
        if let Some(log) = &telemetry.access_log {
            log.log(Record::Tcp(Box::new(TcpRecord {
                time: start_time,
                direction,
                client: client_addr,
                upstream,
                duration: start.elapsed(),
                request_bytes: bytes.0,
                response_bytes: bytes.1,
                tls: peer.is_some(),
                peer_identity: peer,
                error,
                error_detail: detail,
            })));
        }
    };
    let (mut upstream, dst, server_identity) = match connect(&target, connector).await {
        Ok(connected) => connected,
        Err((err, dst)) => {
            connector.metrics().error(direction, err.cause());
            tracing::warn!(
                direction = direction.as_str(), protocol = "opaque", client = %client_addr,
                dst = %dst, error = err.cause(), reason = %err,
                "tcp connection failed in the proxy"
            );
            log(dst, peer, (0, 0), Some(err.cause()), Some(err.to_string()));
            return;
        }
    };
    let result = tokio::select! {
        result = crate::copy::bidirectional(&mut client, &mut upstream) => result.map_err(|e| (None, e)),
        _ = activity.expired(target.idle_timeout) => {
            connector.metrics().error(direction, "idle-timeout");
            Err((Some("idle-timeout"), std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no traffic for {:?}", target.idle_timeout.unwrap_or_default()),
            )))
        }
    };
    let peer = peer.or(server_identity);
    match result {
        Ok(bytes) => log(dst, peer, bytes, None, None),
        Err((cause, e)) => log(dst, peer, (0, 0), cause, Some(e.to_string())),
    }
}

/// Connects to the policy's endpoint (or the original destination), retrying failed connects
/// on other endpoints as the policy allows.
async fn connect(
    target: &TcpTarget,
    connector: &Connector,
) -> Result<(BoxIo, SocketAddr, Option<Arc<str>>), (ProxyError, SocketAddr)> {
    let Some((route, budget)) = &target.route else {
        let endpoint = Endpoint::plaintext(target.orig_dst);
        return match connector.connect(&endpoint, "opaque").await {
            Ok(io) => Ok((io, target.orig_dst, None)),
            Err(e) => Err((e, target.orig_dst)),
        };
    };
    let retries = &route.policy.retries;
    budget.record_request();
    let mut tried = Vec::new();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let discovered = target.discovered.as_deref();
        let balancer = route.balancer.as_ref().or(discovered.map(|d| &d.balancer));
        let (addr, in_flight) = match balancer {
            Some(b) => match b.pick(&tried) {
                Some(e) => (e.addr, Some(e.start())),
                None => {
                    let err = ProxyError::NoHealthyEndpoints {
                        policy: match (&route.balancer, discovered) {
                            (None, Some(d)) => d.authority.to_string(),
                            _ => route.name.clone(),
                        },
                        endpoints: b.endpoints().len(),
                    };
                    return Err((err, target.orig_dst));
                }
            },
            None => (target.orig_dst, None),
        };
        tried.push(addr);
        let identity = match &target.snapshot {
            Some(s) => s.mtls_identity(route, addr, connector.has_identity(), discovered),
            None => route.mtls_identity.clone(),
        };
        let endpoint = Endpoint { addr, identity };
        let result = connector.connect(&endpoint, "opaque").await;
        match result {
            Ok(io) => {
                if let Some(f) = in_flight {
                    f.succeeded();
                }
                return Ok((io, addr, endpoint.identity));
            }
            Err(err) => {
                if let Some(f) = in_flight
                    && let Verdict::Ejected(time) = f.failed(&route.policy.ejection)
                {
                    connector.metrics().ejection(&route.name, addr);
                    tracing::warn!(policy = %route.name, endpoint = %addr, ejected_for = ?time, "endpoint ejected after consecutive failures");
                }
                let tls_failure = matches!(
                    err,
                    ProxyError::TlsHandshake { .. } | ProxyError::TlsIdentityMismatch { .. }
                );
                let retry = attempts <= retries.max_retries
                    && !tls_failure
                    && Failure::ConnectFailure.listed_in(&retries.on);
                if !retry {
                    return Err((err, addr));
                }
                if !budget.try_withdraw() {
                    connector.metrics().retry_budget_exhausted(&route.name);
                    let err = ProxyError::RetryBudgetExhausted {
                        policy: route.name.clone(),
                        last: Box::new(err),
                    };
                    return Err((err, addr));
                }
                connector
                    .metrics()
                    .retry(&route.name, Failure::ConnectFailure.reason());
                tokio::time::sleep(retry::backoff(&retries.backoff, attempts)).await;
            }
        }
    }
}
