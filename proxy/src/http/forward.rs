//! Forwarding one HTTP request: the inbound side delivers it to the app; the outbound side
//! applies the TrafficPolicy that matches the call — endpoint choice, per-try and overall
//! timeouts, and retries within the policy's budget.
//!
//! An outbound call, in order:
//! 1. the policy snapshot is read once (a reload never changes a request in flight) and the
//!    route chosen (address, host, namespace default, built-in default);
//! 2. each attempt picks an endpoint (P2C, avoiding endpoints this request already tried), sends
//!    the request with a replayable body, and waits for response headers within the per-try
//!    timeout and the overall deadline;
//! 3. a failed attempt is retried when the policy lists its condition, the request may be sent
//!    again (it never reached an app, or it is idempotent, or the policy opted in), the body is
//!    still replayable, and the budget has a retry left — after a jittered backoff.
//!
//! The far sidecar's `trellis-error: connect-refused` (its app was not listening) counts as a
//! connect failure, and its `upstream-reset` as a reset: the same decisions as for local ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry::trace::SpanKind;

use super::body::TimedBody;
use super::exchange::{Completion, Counted, Exchange, ResponseFacts, SpanInFlight};
use super::{
    BoxBody, BoxError, ConnInfo, ORIG_PROTO_HEADER, PEER_IDENTITY_HEADER, RequestSummary,
    bridge_upgrade, error_response, is_grpc, upstream_uri,
};
use crate::balance::Verdict;
use crate::detect::Protocol;
use crate::error::{ERROR_HEADER, ProxyError};
use crate::inbound;
use crate::metrics::{Direction, Metrics};
use crate::policy::PolicyStore;
use crate::policy::routes::Route;
use crate::replay::ReplayBody;
use crate::retry::{self, Failure};
use crate::telemetry::context::Incoming as IncomingContext;
use crate::telemetry::semconv::{HttpFacts, http_span};
use crate::telemetry::{Parent, Telemetry};
use crate::transport::{Endpoint, HttpVersion, Pool};

/// Per-listener HTTP forwarding.
pub struct Forwarder {
    direction: Direction,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    telemetry: Arc<Telemetry>,
    policies: Arc<PolicyStore>,
    /// Proxy-made errors also go to the diagnostic log (stderr), at most a few per second.
    error_log: crate::error::RateLimited,
}

/// A request ready to send, minus its body.
struct Call {
    parts: http::request::Parts,
    /// The client's HTTP version (and the app's, inbound).
    version: HttpVersion,
    orig_dst: SocketAddr,
    grpc: bool,
    upgrade: bool,
    /// Outbound: what discovery knows about the original destination.
    discovered: Option<Arc<crate::discovery::Target>>,
}

/// How a call ended, for the response, the metrics and the access log.
struct Outcome {
    result: Result<Response<Incoming>, ProxyError>,
    attempts: u32,
    /// The outbound route the call took (none inbound), for the access log.
    route: Option<Arc<Route>>,
    endpoint: SocketAddr,
    deadline: Option<Instant>,
    idle_timeout: Option<Duration>,
    /// The server's identity when the call went over mesh TLS (outbound).
    peer: Option<Arc<str>>,
    /// The span that ends with the response: SERVER inbound, the last attempt's CLIENT span
    /// outbound.
    span: Option<SpanInFlight>,
}

impl Outcome {
    /// The proxy failed the request before sending it anywhere.
    fn failed(err: ProxyError, endpoint: SocketAddr) -> Self {
        Self {
            result: Err(err),
            attempts: 0,
            route: None,
            endpoint,
            deadline: None,
            idle_timeout: None,
            peer: None,
            span: None,
        }
    }
}

/// `network.protocol.version` of a hop.
fn version_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http2 => "2",
        _ => "1.1",
    }
}

impl Forwarder {
    pub fn new(
        direction: Direction,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        telemetry: Arc<Telemetry>,
        policies: Arc<PolicyStore>,
    ) -> Self {
        Self {
            direction,
            pool,
            metrics,
            telemetry,
            policies,
            error_log: crate::error::RateLimited::new(10),
        }
    }

    /// Forwards one request and returns the response to send back to the client.
    pub async fn forward(&self, mut req: Request<Incoming>, conn: &ConnInfo) -> Response<BoxBody> {
        let start = Instant::now();
        let upgrade = conn.protocol == Protocol::Http1 && super::wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let grpc = is_grpc(&req);
        let tracer = self.telemetry.tracer.as_ref();
        // The caller's trace context, read before any header is touched.
        let parent = tracer.map(|t| t.parent(IncomingContext::extract(req.headers())));
        let mut ex = Box::new(Exchange {
            telemetry: self.telemetry.clone(),
            metrics: self.metrics.clone(),
            direction: self.direction,
            protocol: if grpc { "grpc" } else { conn.protocol.as_str() },
            method: req.method().clone(),
            target: RequestSummary::of(&req),
            grpc,
            client: conn.client,
            orig_dst: *conn.orig_dst.as_ref().unwrap_or(&conn.client),
            destination: conn.destination.clone(),
            start,
            request_bytes: None,
            response: ResponseFacts {
                peer: match self.direction {
                    Direction::inbound => conn.peer.as_ref().map(|p| p.name.clone()),
                    Direction::outbound => None,
                },
                ..ResponseFacts::default()
            },
        });
        // Inbound: the SERVER span covers the whole request, refusals included.
        let server_span = match (self.direction, parent) {
            (Direction::inbound, Some(parent)) => Some(SpanInFlight {
                span: parent.child(SpanKind::Server),
                version: version_label(conn.protocol),
                resend_count: 0,
            }),
            _ => None,
        };

        let orig_dst = match &conn.orig_dst {
            Ok(addr) => *addr,
            Err(reason) => {
                let err = ProxyError::NoOriginalDestination {
                    reason: reason.clone(),
                };
                let mut outcome = Outcome::failed(err, conn.client);
                outcome.span = server_span;
                return self.respond(ex, outcome, client_upgrade);
            }
        };
        let (mut parts, body) = req.into_parts();
        super::strip_hop_by_hop(&mut parts.headers, upgrade);
        // Only a proxy may say that the proxy failed, or who the caller is: never trust what
        // an app or a plaintext caller claims.
        parts.headers.remove(ERROR_HEADER);
        parts.headers.remove(PEER_IDENTITY_HEADER);
        let orig_proto = parts.headers.remove(ORIG_PROTO_HEADER);
        let mut version = match conn.protocol {
            Protocol::Http2 => HttpVersion::Http2,
            _ => HttpVersion::Http1,
        };
        if self.direction == Direction::inbound {
            // Authorized per request, against the policy in force now: a long-lived mesh
            // connection follows policy changes.
            let verdict = {
                let snapshot = self.policies.current();
                let policy = inbound::policy_for(&snapshot.inbound_servers, orig_dst.port());
                inbound::authorize(policy, conn.peer.as_ref().map(|p| &p.id))
            };
            if let Err(reason) = verdict {
                tracing::warn!(direction = "inbound", client = %conn.client, peer = conn.peer.as_ref().map_or("plaintext", |p| &*p.name), dst = %orig_dst, error = "unauthorized", %reason, "request refused");
                let mut outcome = Outcome::failed(ProxyError::Unauthorized { reason }, orig_dst);
                outcome.span = server_span;
                return self.respond(ex, outcome, client_upgrade);
            }
            if let Some(peer) = &conn.peer {
                parts
                    .headers
                    .insert(PEER_IDENTITY_HEADER, peer.header.clone());
                // A request that a mesh peer carried over HTTP/2 for an HTTP/1.1 client goes
                // to the app as HTTP/1.1.
                if orig_proto.as_ref().is_some_and(|v| v == "HTTP/1.1") {
                    version = HttpVersion::Http1;
                    parts.version = Version::HTTP_11;
                    if !parts.headers.contains_key(HOST)
                        && let Some(a) = parts.uri.authority()
                        && let Ok(host) = HeaderValue::from_str(a.as_str())
                    {
                        parts.headers.insert(HOST, host);
                    }
                }
            }
            // The app sees the proxy's SERVER span as its caller.
            if let Some(s) = &server_span {
                s.span.inject(&mut parts.headers);
            }
        }
        parts.uri = upstream_uri(&parts, version, orig_dst);
        if version == HttpVersion::Http1 && !parts.headers.contains_key(HOST) {
            // HTTP/1.0 clients may omit Host; the upstream then sees the address dialled.
            if let Ok(host) = HeaderValue::from_str(&orig_dst.to_string()) {
                parts.headers.insert(HOST, host);
            }
        }
        let request_bytes = Arc::new(AtomicU64::new(0));
        ex.request_bytes = Some(request_bytes.clone());
        let body =
            Counted::new(body.map_err(BoxError::from).boxed_unsync(), request_bytes).boxed_unsync();
        let call = Call {
            parts,
            version,
            orig_dst,
            grpc,
            upgrade,
            discovered: conn.discovered.clone(),
        };
        let outcome = match self.direction {
            Direction::inbound => {
                let mut outcome = self.deliver(call, body).await;
                outcome.span = server_span;
                outcome
            }
            Direction::outbound => {
                self.call(call, body, &ex.target.authority, start, parent)
                    .await
            }
        };
        self.respond(ex, outcome, client_upgrade)
    }

    /// Inbound: one attempt, to the app at the original destination.
    async fn deliver(&self, call: Call, body: BoxBody) -> Outcome {
        let endpoint = Endpoint::plaintext(call.orig_dst);
        let req = Request::from_parts(call.parts, body);
        Outcome {
            result: self.pool.send(&endpoint, call.version, req).await,
            attempts: 1,
            route: None,
            endpoint: call.orig_dst,
            deadline: None,
            idle_timeout: None,
            peer: None,
            span: None,
        }
    }

    async fn call(
        &self,
        call: Call,
        body: BoxBody,
        authority: &str,
        start: Instant,
        parent: Option<Parent>,
    ) -> Outcome {
        let snapshot = self.policies.current();
        // Discovery's view of the destination now: endpoint changes reach open connections.
        let discovered = call.discovered.as_ref().and_then(|t| t.current());
        let route: Arc<Route> = snapshot
            .routes
            .route(
                Some(authority),
                call.orig_dst,
                &self.policies.scope,
                discovered.as_ref().map(|d| &*d.authority),
            )
            .clone();
        // A policy's own endpoints win; else the service's endpoints; else the original
        // destination.
        let balancer = route
            .balancer
            .as_ref()
            .or(discovered.as_ref().map(|d| &d.balancer));
        // Kept for the per-endpoint mutual-TLS decision (an Arc: no copy).
        let auto_mtls = self.pool.connector().has_identity();
        let policy = &route.policy;
        let retries = &policy.retries;
        let deadline = policy.timeout.map(|t| start + t);
        // Only a policy's own idleTimeout needs a timer per response body; the proxy-wide idle
        // timeout is enforced once per connection (listener.rs), at no per-request cost.
        let idle_timeout = policy.idle_timeout;
        let budget = self.policies.budget_for(&route, call.orig_dst);
        // The identity the last attempt's server had to prove (mutual TLS), for the metrics.
        let mut last_peer: Option<Arc<str>> = None;
        budget.record_request();

        let declared_len = call
            .parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let max_retries = if call.upgrade { 0 } else { retries.max_retries };
        let may_replay = retry::replay_safe(&call.parts.method, call.grpc, retries);
        let mut body = Some(ReplayBody::new(
            body,
            retries.body_buffer_bytes,
            declared_len,
        ));
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempts = 0u32;
        let done = |result, attempts, endpoint, peer, span| Outcome {
            result,
            attempts,
            route: Some(route.clone()),
            endpoint,
            deadline,
            idle_timeout,
            peer,
            span,
        };
        loop {
            attempts += 1;
            // One CLIENT span per attempt, siblings under the caller's span.
            let mut span = parent.map(|p| SpanInFlight {
                span: p.child(SpanKind::Client),
                version: "1.1",
                resend_count: attempts - 1,
            });
            let (addr, in_flight) = match balancer {
                Some(balancer) => match balancer.pick(&tried) {
                    Some(endpoint) => (endpoint.addr, Some(endpoint.start())),
                    None => {
                        let err = ProxyError::NoHealthyEndpoints {
                            policy: match (&route.balancer, &discovered) {
                                (None, Some(d)) => d.authority.to_string(),
                                _ => route.name.clone(),
                            },
                            endpoints: balancer.endpoints().len(),
                        };
                        return done(Err(err), attempts, call.orig_dst, last_peer, span);
                    }
                },
                None => (call.orig_dst, None),
            };
            tried.push(addr);
            let Some(this_body) = body.take() else {
                return done(
                    Err(ProxyError::NoOriginalDestination {
                        reason: "internal: body consumed".into(),
                    }),
                    attempts,
                    addr,
                    last_peer,
                    span,
                );
            };
            let spare = this_body.try_clone();
            // Over mesh TLS every request rides the pooled HTTP/2 connection to the endpoint,
            // whatever the client spoke (the far side restores HTTP/1.1); protocol upgrades
            // need HTTP/1.1 end to end and get a connection of their own.
            let mesh = snapshot.mtls_identity(&route, addr, auto_mtls, discovered.as_deref());
            let mut parts = clone_parts(&call.parts);
            let mut upstream_version = call.version;
            if mesh.is_some() && !call.upgrade && call.version == HttpVersion::Http1 {
                upstream_version = HttpVersion::Http2;
                parts.uri = super::upstream_uri(&parts, HttpVersion::Http2, call.orig_dst);
                parts.version = Version::HTTP_2;
                parts
                    .headers
                    .insert(ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/1.1"));
            }
            last_peer.clone_from(&mesh);
            if let Some(s) = &mut span {
                s.version = if upstream_version == HttpVersion::Http2 {
                    "2"
                } else {
                    "1.1"
                };
                s.span.inject(&mut parts.headers);
            }
            let req = Request::from_parts(parts, this_body.boxed_unsync());

            let attempt_deadline = match (retries.per_try_timeout, deadline) {
                (Some(per_try), Some(d)) => Some((Instant::now() + per_try).min(d)),
                (Some(per_try), None) => Some(Instant::now() + per_try),
                (None, d) => d,
            };
            let endpoint = Endpoint {
                addr,
                identity: mesh,
            };
            let send = self.pool.send(&endpoint, upstream_version, req);
            let result = match attempt_deadline {
                None => send.await,
                Some(at) => match tokio::time::timeout_at(at.into(), send).await {
                    Ok(result) => result,
                    Err(_) if deadline.is_some_and(|d| at >= d) => {
                        let timeout = policy.timeout.unwrap_or_default();
                        return done(
                            Err(ProxyError::Timeout { timeout, attempts }),
                            attempts,
                            addr,
                            last_peer,
                            span,
                        );
                    }
                    Err(_) => Err(ProxyError::PerTryTimeout {
                        addr,
                        timeout: retries.per_try_timeout.unwrap_or_default(),
                        attempts,
                    }),
                },
            };
            if let Err(ProxyError::TlsHandshake { .. } | ProxyError::TlsIdentityMismatch { .. }) =
                &result
            {
                // The same handshake would fail again: not retried, and no request was sent.
                if let Some(in_flight) = in_flight {
                    in_flight.succeeded();
                }
                return done(result, attempts, addr, last_peer, span);
            }
            let failure = match &result {
                Ok(rsp) => classify_response(rsp),
                Err(e) => Some(classify_error(e)),
            };
            if let Some(in_flight) = in_flight {
                match failure {
                    Some(f) if counts_against_endpoint(f) => {
                        if let Verdict::Ejected(time) = in_flight.failed(&policy.ejection) {
                            self.metrics.ejection(&route.name, addr);
                            tracing::warn!(policy = %route.name, endpoint = %addr, ejected_for = ?time, "endpoint ejected after consecutive failures");
                        }
                    }
                    _ => in_flight.succeeded(),
                }
            }
            let Some(failure) = failure else {
                return done(result, attempts, addr, last_peer, span);
            };
            let retryable = attempts <= max_retries
                && failure.listed_in(&retries.on)
                && (failure.never_reached_app() || may_replay)
                && spare.is_some();
            if !retryable {
                return done(result, attempts, addr, last_peer, span);
            }
            if !budget.try_withdraw() {
                self.metrics.retry_budget_exhausted(&route.name);
                let result = result.map_err(|last| ProxyError::RetryBudgetExhausted {
                    policy: route.name.clone(),
                    last: Box::new(last),
                });
                return done(result, attempts, addr, last_peer, span);
            }
            self.metrics.retry(&route.name, failure.reason());
            tracing::debug!(policy = %route.name, endpoint = %addr, attempt = attempts, reason = failure.reason(), "retrying");
            if let Some(s) = span {
                self.end_attempt(
                    s,
                    &call,
                    authority,
                    &route,
                    addr,
                    last_peer.as_deref(),
                    &result,
                );
            }
            drop(result);
            let pause = retry::backoff(&retries.backoff, attempts);
            if let Some(d) = deadline
                && Instant::now() + pause >= d
            {
                let timeout = policy.timeout.unwrap_or_default();
                tokio::time::sleep_until(d.into()).await;
                return done(
                    Err(ProxyError::Timeout { timeout, attempts }),
                    attempts,
                    addr,
                    last_peer,
                    // This attempt's span has ended; the timeout belongs to no attempt.
                    None,
                );
            }
            tokio::time::sleep(pause).await;
            body = spare;
        }
    }

    /// Ends the span of an attempt that is about to be retried.
    #[allow(clippy::too_many_arguments)]
    fn end_attempt(
        &self,
        s: SpanInFlight,
        call: &Call,
        authority: &str,
        route: &Route,
        addr: SocketAddr,
        peer: Option<&str>,
        result: &Result<Response<Incoming>, ProxyError>,
    ) {
        let Some(tracer) = &self.telemetry.tracer else {
            return;
        };
        let (status, grpc_status, error) = match result {
            Ok(rsp) => (
                Some(rsp.status().as_u16()),
                Exchange::grpc_status_of(rsp.headers()),
                rsp.headers()
                    .get(ERROR_HEADER)
                    .and_then(|v| crate::error::known_cause(v.to_str().ok()?)),
            ),
            Err(e) => (None, None, Some(e.cause())),
        };
        let (name, attrs, status) = http_span(&HttpFacts {
            kind: SpanKind::Client,
            method: &call.parts.method,
            authority,
            path: call.parts.uri.path(),
            orig_dst: call.orig_dst,
            version: s.version,
            grpc: call.grpc,
            status,
            grpc_status,
            error,
            peer_identity: peer,
            tls: peer.is_some(),
            policy: Some(&route.name),
            client: None,
            upstream: Some(addr),
            resend_count: s.resend_count,
        });
        tracer.end(s.span, name, attrs, status);
    }

    /// Turns an outcome into the client's response; the exchange is recorded when the
    /// response body ends.
    fn respond(
        &self,
        mut ex: Box<Exchange>,
        outcome: Outcome,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<BoxBody> {
        let r = &mut ex.response;
        r.latency = ex.start.elapsed();
        r.attempts = outcome.attempts;
        r.upstream = Some(outcome.endpoint);
        r.route = outcome.route;
        r.span = outcome.span;
        // Outbound: the server's identity (inbound: the client's, known since the handshake).
        if self.direction == Direction::outbound {
            r.peer = outcome.peer;
        }
        let mut rsp = match outcome.result {
            Ok(rsp) => rsp,
            Err(err) => {
                let cause = err.cause();
                let rsp = error_response(&err, ex.grpc);
                self.metrics.error(self.direction, cause);
                self.error_log.warn(|| {
                    tracing::warn!(
                        direction = self.direction.as_str(), method = %ex.method,
                        authority = %ex.target.authority, path = %ex.target.path,
                        status = rsp.status().as_u16(), client = %ex.client, dst = %outcome.endpoint,
                        attempts = outcome.attempts, error = cause, reason = %err,
                        "request failed in the proxy"
                    )
                });
                let r = &mut ex.response;
                r.status = rsp.status().as_u16();
                r.grpc_status = Exchange::grpc_status_of(rsp.headers());
                r.error = Some(cause);
                r.error_detail = Some(err.to_string());
                return rsp.map(|body| Completion::new(body, ex).boxed_unsync());
            }
        };
        let status = rsp.status();
        match client_upgrade {
            Some(client_upgrade) if status == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream_upgrade = hyper::upgrade::on(&mut rsp);
                tokio::spawn(bridge_upgrade(client_upgrade, upstream_upgrade));
                super::strip_hop_by_hop(rsp.headers_mut(), true);
            }
            _ => super::strip_hop_by_hop(rsp.headers_mut(), false),
        }
        if self.direction == Direction::inbound {
            rsp.headers_mut().remove(ERROR_HEADER);
        } else if let Some(cause) = rsp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            // The far sidecar's error, passed on: the access log and span say which.
            ex.response.error = crate::error::known_cause(cause);
        }
        ex.response.status = status.as_u16();
        ex.response.grpc_status = Exchange::grpc_status_of(rsp.headers());
        // A response of known length is part of a unary exchange: the deadline covers its body.
        // Others (streams) are bounded by the idle timeout only.
        let known_length = rsp.headers().contains_key(CONTENT_LENGTH);
        let deadline = outcome
            .deadline
            .filter(|_| known_length)
            .map(tokio::time::Instant::from_std);
        rsp.map(|b| {
            let body = b.map_err(BoxError::from).boxed_unsync();
            let body = if deadline.is_none() && outcome.idle_timeout.is_none() {
                body
            } else {
                TimedBody::new(body, deadline, outcome.idle_timeout).boxed_unsync()
            };
            Completion::new(body, ex).boxed_unsync()
        })
    }
}

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let (mut out, ()) = Request::new(()).into_parts();
    out.method = parts.method.clone();
    out.uri = parts.uri.clone();
    out.version = parts.version;
    out.headers = parts.headers.clone();
    out
}

fn classify_error(e: &ProxyError) -> Failure {
    match e {
        ProxyError::ConnectRefused { .. }
        | ProxyError::ConnectTimeout { .. }
        | ProxyError::ConnectUnreachable { .. } => Failure::ConnectFailure,
        ProxyError::PerTryTimeout { .. } => Failure::PerTryTimeout,
        e if e.is_refused_stream() => Failure::RefusedStream,
        _ => Failure::Reset,
    }
}

/// A response that may be retried: the far sidecar's own errors, error statuses, and non-OK
/// gRPC statuses in a trailers-only response.
fn classify_response(rsp: &Response<Incoming>) -> Option<Failure> {
    match rsp
        .headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("connect-refused" | "connect-timeout" | "connect-unreachable") => {
            return Some(Failure::ConnectFailure);
        }
        Some("upstream-reset") => return Some(Failure::Reset),
        _ => {}
    }
    let http = rsp.status().as_u16();
    match Exchange::grpc_status_of(rsp.headers()) {
        Some(0) => None,
        Some(code) => Some(Failure::Status {
            http,
            grpc: Some(code),
        }),
        None if http >= 400 => Some(Failure::Status { http, grpc: None }),
        None => None,
    }
}

/// Failures that say something about the endpoint's health (not about the request).
fn counts_against_endpoint(f: Failure) -> bool {
    match f {
        Failure::ConnectFailure
        | Failure::Reset
        | Failure::PerTryTimeout
        | Failure::RefusedStream => true,
        Failure::Status { http, grpc: None } => (502..=504).contains(&http),
        Failure::Status {
            grpc: Some(code), ..
        } => code == 14,
    }
}
