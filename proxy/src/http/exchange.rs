//! The record of one request from arrival to the end of its response body, and what is emitted
//! when it ends: the request metrics, the span (SERVER inbound, the last attempt's CLIENT span
//! outbound) and the access-log line.
//!
//! A response body is wrapped in [`Completion`], which counts its bytes, reads a gRPC status
//! from its trailers, and finishes the exchange when the body ends — or when it is dropped
//! unfinished (the client left, or the upstream reset the stream), so every request is
//! recorded exactly once.

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use opentelemetry::trace::SpanKind;

use super::{BoxBody, BoxError, RequestSummary};
use crate::metrics::{Direction, Metrics, RequestRecord};
use crate::policy::routes::Route;
use crate::telemetry::access_log::{HttpRecord, Record};
use crate::telemetry::semconv::{HttpFacts, http_span};
use crate::telemetry::{Span, Telemetry};

/// Everything known about a request by the time its response starts.
pub(super) struct Exchange {
    pub telemetry: Arc<Telemetry>,
    pub metrics: Arc<Metrics>,
    pub direction: Direction,
    /// `http1`, `http2` or `grpc`: what the client spoke.
    pub protocol: &'static str,
    pub method: http::Method,
    pub target: RequestSummary,
    pub grpc: bool,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    /// The `destination` label when no policy names one (the connection's original destination).
    pub destination: Arc<str>,
    pub start: Instant,
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub response: ResponseFacts,
}

/// What the response (or the proxy's error) said; filled in when the response starts.
#[derive(Default)]
pub(super) struct ResponseFacts {
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub latency: Duration,
    pub upstream: Option<SocketAddr>,
    pub attempts: u32,
    pub route: Option<Arc<Route>>,
    /// Inbound: the client's identity; outbound: the server's. None: plaintext.
    pub peer: Option<Arc<str>>,
    pub error: Option<&'static str>,
    pub error_detail: Option<String>,
    /// SERVER span inbound; the last attempt's CLIENT span outbound.
    pub span: Option<SpanInFlight>,
}

/// A span with what its attributes need beyond the exchange.
pub(super) struct SpanInFlight {
    pub span: Span,
    /// The HTTP version on the hop the span covers.
    pub version: &'static str,
    pub resend_count: u32,
}

impl Exchange {
    /// Reads the gRPC status of a trailers-only response.
    pub fn grpc_status_of(headers: &HeaderMap) -> Option<u32> {
        headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse().ok())
    }

    /// Records the finished request once: metrics, span, access log.
    fn finish(mut self: Box<Self>, end: End) {
        let span = self.response.span.take();
        let r = &self.response;
        let grpc_status = r.grpc_status.or(end.trailer_grpc_status);
        let destination = r
            .route
            .as_ref()
            .and_then(|route| route.destination.as_ref())
            .unwrap_or(&self.destination);
        let request_bytes = self
            .request_bytes
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        self.metrics.request(&RequestRecord {
            direction: self.direction,
            protocol: self.protocol,
            destination,
            status: r.status,
            grpc_status: grpc_status.filter(|_| self.grpc),
            peer: r.peer.as_ref(),
            latency: r.latency,
            request_bytes,
            response_bytes: end.response_bytes,
        });
        let trace = span.as_ref().map(|s| (s.span.trace_id, s.span.span_id));
        let policy = r.route.as_ref().map(|route| route.name.as_str());
        if let Some(log) = &self.telemetry.access_log {
            let duration = self.start.elapsed();
            log.log(Record::Http(Box::new(HttpRecord {
                // When the request arrived, derived rather than read on every request.
                time: SystemTime::now() - duration,
                direction: self.direction,
                protocol: self.protocol,
                method: self.method.clone(),
                authority: self.target.authority.clone(),
                path: self.target.path.clone(),
                status: r.status,
                grpc_status,
                duration,
                response_headers: r.latency,
                request_bytes,
                response_bytes: end.response_bytes,
                client: self.client,
                upstream: r.upstream.unwrap_or(self.orig_dst),
                attempts: r.attempts,
                policy: policy.unwrap_or_default().to_string(),
                peer_identity: r.peer.clone(),
                tls: r.peer.is_some(),
                error: r.error,
                error_detail: r.error_detail.clone().or(end.incomplete),
                trace,
            })));
        }
        let this = &self;
        if let (Some(tracer), Some(s)) = (&this.telemetry.tracer, span) {
            let (kind, client, upstream) = match this.direction {
                Direction::inbound => (SpanKind::Server, Some(this.client), None),
                Direction::outbound => (SpanKind::Client, None, r.upstream),
            };
            let (name, attrs, status) = http_span(&HttpFacts {
                kind,
                method: &this.method,
                authority: &this.target.authority,
                path: &this.target.path,
                orig_dst: this.orig_dst,
                version: s.version,
                grpc: this.grpc,
                status: Some(r.status),
                grpc_status,
                error: r.error,
                peer_identity: r.peer.as_deref(),
                tls: r.peer.is_some(),
                policy,
                client,
                upstream,
                resend_count: s.resend_count,
            });
            tracer.end(s.span, name, attrs, status);
        }
    }
}

/// How the response body ended.
struct End {
    response_bytes: u64,
    trailer_grpc_status: Option<u32>,
    /// Why the body did not complete, if it did not.
    incomplete: Option<String>,
}

/// A response body that finishes its exchange when it ends or is dropped.
pub(super) struct Completion {
    inner: BoxBody,
    bytes: u64,
    trailer_grpc_status: Option<u32>,
    /// Set when the body reported its end (hyper may then never poll it again).
    ended: Cell<bool>,
    error: Option<String>,
    exchange: Option<Box<Exchange>>,
}

impl Completion {
    pub fn new(inner: BoxBody, exchange: Box<Exchange>) -> Self {
        Self {
            inner,
            bytes: 0,
            trailer_grpc_status: None,
            ended: Cell::new(false),
            error: None,
            exchange: Some(exchange),
        }
    }
}

impl Body for Completion {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.trailer_grpc_status = Exchange::grpc_status_of(trailers);
                }
                if this.inner.is_end_stream() {
                    this.ended.set(true);
                }
            }
            Poll::Ready(Some(Err(e))) => this.error = Some(format!("response body: {e}")),
            Poll::Ready(None) => this.ended.set(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.ended.set(true);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        let incomplete = match self.error.take() {
            Some(e) => Some(e),
            None if !self.ended.get() && !self.inner.is_end_stream() => Some(
                "response body not completed: the client or the upstream went away".to_string(),
            ),
            None => None,
        };
        exchange.finish(End {
            response_bytes: self.bytes,
            trailer_grpc_status: self.trailer_grpc_status,
            incomplete,
        });
    }
}

/// A request body that counts the bytes it passes.
pub(super) struct Counted {
    inner: BoxBody,
    bytes: Arc<AtomicU64>,
}

impl Counted {
    pub fn new(inner: BoxBody, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
