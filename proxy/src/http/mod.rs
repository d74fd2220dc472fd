//! HTTP/1.1, HTTP/2 and gRPC proxying.
//!
//! [`serve`] runs hyper's server on a detected connection; every request goes through
//! [`Forwarder::forward`] (`forward.rs`): hop-by-hop headers are removed, headers the proxy owns
//! are stripped from what the app sent, the request goes upstream over a pooled connection of the
//! same HTTP version (outbound: as the matching policy says), and the response streams back
//! (bodies and trailers are never buffered whole; `body.rs` bounds them in time). HTTP/1.1 upgrades (WebSocket) are bridged byte for byte after
//! the `101`. Errors the proxy produces answer with a status and a `trellis-error` header; for
//! gRPC callers they are a trailers-only response with a `grpc-status`, so gRPC clients see
//! `UNAVAILABLE` with the cause instead of a protocol error.

mod body;
mod exchange;
mod forward;
mod headers;

pub use forward::Forwarder;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::detect::Protocol;
use crate::drain;
use crate::error::{ERROR_HEADER, ProxyError};
use crate::io::Io;
use crate::metrics::{Direction, Metrics};
use crate::transport::HttpVersion;

pub use headers::{strip_hop_by_hop, wants_upgrade};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy forwards or produces.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What the listener learned about a connection before HTTP started.
pub struct ConnInfo {
    pub client: SocketAddr,
    /// The original destination, or why there is none (every request then fails with
    /// `no-original-destination`).
    pub orig_dst: Result<SocketAddr, String>,
    pub protocol: Protocol,
    /// Inbound over mesh TLS: the client's verified identity. Each request is authorized
    /// against the ServerPolicy in force when it arrives.
    pub peer: Option<Peer>,
    /// The `destination` metrics label for requests no policy names: the original destination
    /// address, formatted once per connection.
    pub destination: Arc<str>,
    /// Outbound: what discovery knows about the original destination (a service's ClusterIP).
    pub discovered: Option<Arc<crate::discovery::Target>>,
}

/// A mesh client verified at the handshake, with what every request needs from it prepared
/// once per connection: the header value for the app and the metrics label.
pub struct Peer {
    pub id: trellis_identity::SpiffeId,
    pub name: Arc<str>,
    pub header: HeaderValue,
}

impl Peer {
    pub fn new(id: trellis_identity::SpiffeId) -> Self {
        let name: Arc<str> = Arc::from(id.to_string());
        // A SPIFFE ID is printable ASCII (it parsed), so it is always a valid header value.
        let header = HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static(""));
        Self { id, name, header }
    }
}

impl ConnInfo {
    pub fn plain(
        client: SocketAddr,
        orig_dst: Result<SocketAddr, String>,
        protocol: Protocol,
    ) -> Self {
        let destination = match &orig_dst {
            Ok(addr) => Arc::from(addr.to_string()),
            Err(_) => Arc::from(""),
        };
        Self {
            client,
            orig_dst,
            protocol,
            peer: None,
            destination,
            discovered: None,
        }
    }
}

/// The verified identity of the calling workload, set by the inbound proxy on requests that
/// arrived over mesh TLS (and removed from every other request: it cannot be forged).
pub const PEER_IDENTITY_HEADER: &str = "trellis-peer-identity";
/// Between proxies: the HTTP version the client spoke when its request rides the mesh's HTTP/2
/// connection, so the far side delivers it to the app in that version. Only trusted from a
/// mesh peer.
pub const ORIG_PROTO_HEADER: &str = "trellis-orig-proto";

/// What a client may send before its request reaches the [`Forwarder`]: hostile or broken
/// clients are answered by hyper itself (400, 431, or a closed connection) and never reach an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// HTTP/1: the request line and headers must all arrive within this time, or the connection
    /// is closed without a response (a slowloris client). hyper also applies it to a keep-alive
    /// connection waiting for its next request. `None`: no limit.
    pub header_read_timeout: Option<Duration>,
    /// Request line plus headers (HTTP/1), or the header list (HTTP/2, advertised in SETTINGS):
    /// beyond it HTTP/1 gets `431 Request Header Fields Too Large`. HTTP/1 also allows at most
    /// 100 header lines (hyper's fixed limit; 431 beyond).
    pub max_header_bytes: usize,
}

/// The `trellis_proxy_errors_total` cause of a client connection that hyper ended with an
/// error before (or instead of) a request: what the client did wrong, if it was the client.
fn client_error_cause(e: &hyper::Error) -> Option<&'static str> {
    if e.is_parse_too_large() {
        Some("request-headers-too-large")
    } else if e.is_parse() {
        Some("bad-request")
    } else if e.is_timeout() {
        Some("header-read-timeout")
    } else {
        None
    }
}

/// Serves HTTP on an accepted, detected connection until it closes or a drain completes it.
/// Requests hyper refuses (malformed, headers too large, too slow) are counted in `metrics`
/// under their cause; none of them reaches the forwarder.
pub async fn serve<I: Io>(
    io: I,
    fwd: Arc<Forwarder>,
    conn: ConnInfo,
    drain: drain::Watch,
    limits: ServerLimits,
    metrics: &Metrics,
    direction: Direction,
) {
    let protocol = conn.protocol;
    let client = conn.client;
    let conn = Arc::new(conn);
    let service = hyper::service::service_fn(move |req| {
        let (fwd, conn) = (fwd.clone(), conn.clone());
        async move { Ok::<_, Infallible>(fwd.forward(req, &conn).await) }
    });
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => res,
                _ = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        _ => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_header_size(limits.max_header_bytes)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => res,
                _ = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        match client_error_cause(&e) {
            Some(cause) => {
                metrics.error(direction, cause);
                tracing::debug!(direction = direction.as_str(), %client, error = cause, reason = %e, "client HTTP connection refused by the HTTP server");
            }
            None => tracing::debug!(error = %e, "client HTTP connection ended with an error"),
        }
    }
}

/// The request target as the upstream must see it: origin-form for HTTP/1.1
/// (`/path?query`, with Host carrying the authority), absolute for HTTP/2 (`:authority`
/// preserved; taken from Host or the original destination when the client sent none).
pub(crate) fn upstream_uri(
    parts: &http::request::Parts,
    version: HttpVersion,
    orig_dst: SocketAddr,
) -> Uri {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    match version {
        HttpVersion::Http1 => Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/")),
        HttpVersion::Http2 => {
            let authority = parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    parts
                        .headers
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| orig_dst.to_string());
            let scheme = parts.uri.scheme_str().unwrap_or("http");
            Uri::try_from(format!("{scheme}://{authority}{path}"))
                .unwrap_or_else(|_| parts.uri.clone())
        }
    }
}

pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_2
        && req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The response for an error the proxy produced.
pub fn error_response(err: &ProxyError, grpc: bool) -> Response<BoxBody> {
    let cause = HeaderValue::from_static(err.cause());
    let message = format!("{}: {err}", err.cause());
    let mut rsp = if grpc {
        // Trailers-only gRPC response: HTTP 200, the status in the headers.
        let code = match err.status() {
            StatusCode::GATEWAY_TIMEOUT => "4", // DEADLINE_EXCEEDED
            StatusCode::FORBIDDEN => "7",       // PERMISSION_DENIED
            _ => "14",                          // UNAVAILABLE
        };
        let mut rsp = Response::new(empty());
        let h = rsp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(msg) = HeaderValue::from_str(&grpc_percent_encode(&message)) {
            h.insert("grpc-message", msg);
        }
        rsp
    } else {
        let mut rsp = Response::new(full(format!("{message}\n")));
        *rsp.status_mut() = err.status();
        rsp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        rsp
    };
    rsp.headers_mut().insert(ERROR_HEADER, cause);
    rsp
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest percent-encoded.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> BoxBody {
    full(Bytes::new())
}

/// Copies bytes both ways between the client and the upstream after a `101 Switching Protocols`.
pub(crate) async fn bridge_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "protocol upgrade did not complete"),
    }
}

/// Authority and path of a request, for logs.
pub(crate) struct RequestSummary {
    pub authority: String,
    pub path: String,
}

impl RequestSummary {
    pub fn of<B>(req: &Request<B>) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        Self {
            authority,
            path: req.uri().path().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: Option<&str>) -> http::request::Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn http1_targets_are_origin_form_and_http2_keeps_the_authority() {
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let p = parts("http://reviews:9080/a?b=1", Some("reviews:9080"));
        assert_eq!(upstream_uri(&p, HttpVersion::Http1, dst), "/a?b=1");
        assert_eq!(
            upstream_uri(&p, HttpVersion::Http2, dst),
            "http://reviews:9080/a?b=1"
        );
        let p = parts("/x", None);
        assert_eq!(
            upstream_uri(&p, HttpVersion::Http2, dst),
            "http://10.0.0.2:8080/x"
        );
    }

    #[test]
    fn grpc_errors_are_trailers_only_unavailable() {
        let err = ProxyError::ConnectRefused {
            addr: "10.0.0.2:80".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let rsp = error_response(&err, true);
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()[ERROR_HEADER], "connect-refused");
        let rsp = error_response(&err, false);
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
