//! A request's span name, attributes and status, after the OpenTelemetry semantic conventions
//! for HTTP (and for RPC when the request is gRPC), plus the mesh's own `trellis.*` attributes.
//!
//! Span names stay low-cardinality: `{METHOD} {host}` for HTTP (the host the caller named, or
//! the address it dialled; never the path) and `{service}/{method}` for gRPC.

use std::borrow::Cow;
use std::net::SocketAddr;

use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status};

/// What is known about one request (or one attempt of it) when its span ends.
pub struct HttpFacts<'a> {
    pub kind: SpanKind,
    pub method: &'a http::Method,
    /// `host[:port]` from `:authority` or Host; may be empty.
    pub authority: &'a str,
    pub path: &'a str,
    /// The original destination: the server when the request names no authority.
    pub orig_dst: SocketAddr,
    /// `1.1` or `2`: the version on the hop this span covers.
    pub version: &'static str,
    pub grpc: bool,
    /// The response status, when there was a response (a proxy-made one counts).
    pub status: Option<u16>,
    pub grpc_status: Option<u32>,
    /// The proxy's error cause (`trellis-error`), if it produced the error.
    pub error: Option<&'a str>,
    pub peer_identity: Option<&'a str>,
    pub tls: bool,
    pub policy: Option<&'a str>,
    /// Server spans: who called.
    pub client: Option<SocketAddr>,
    /// Client spans: the endpoint this attempt went to.
    pub upstream: Option<SocketAddr>,
    /// Client spans: 0 for the first attempt, n for the n-th retry.
    pub resend_count: u32,
}

pub fn http_span(f: &HttpFacts<'_>) -> (Cow<'static, str>, Vec<KeyValue>, Status) {
    let (host, port) = split_host_port(f.authority, f.orig_dst);
    let grpc_path = f.grpc.then(|| grpc_parts(f.path)).flatten();
    let name = match grpc_path {
        Some((service, method)) => format!("{service}/{method}"),
        None => format!("{} {host}", f.method),
    };
    let mut attrs = Vec::with_capacity(20);
    attrs.push(KeyValue::new(
        "http.request.method",
        f.method.as_str().to_string(),
    ));
    attrs.push(KeyValue::new("url.path", f.path.to_string()));
    attrs.push(KeyValue::new("url.scheme", "http"));
    attrs.push(KeyValue::new("server.address", host.to_string()));
    attrs.push(KeyValue::new("server.port", i64::from(port)));
    attrs.push(KeyValue::new("network.protocol.name", "http"));
    attrs.push(KeyValue::new("network.protocol.version", f.version));
    if let Some(status) = f.status {
        attrs.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    if let Some(client) = f.client {
        attrs.push(KeyValue::new("client.address", client.ip().to_string()));
        attrs.push(KeyValue::new("client.port", i64::from(client.port())));
    }
    if let Some(upstream) = f.upstream {
        attrs.push(KeyValue::new(
            "network.peer.address",
            upstream.ip().to_string(),
        ));
        attrs.push(KeyValue::new(
            "network.peer.port",
            i64::from(upstream.port()),
        ));
    }
    if f.resend_count > 0 {
        attrs.push(KeyValue::new(
            "http.request.resend_count",
            i64::from(f.resend_count),
        ));
    }
    if let Some((service, method)) = grpc_path {
        attrs.push(KeyValue::new("rpc.system", "grpc"));
        attrs.push(KeyValue::new("rpc.service", service.to_string()));
        attrs.push(KeyValue::new("rpc.method", method.to_string()));
    }
    if let Some(code) = f.grpc_status {
        attrs.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
    }
    attrs.push(KeyValue::new("trellis.tls", f.tls));
    if let Some(peer) = f.peer_identity {
        attrs.push(KeyValue::new("trellis.peer_identity", peer.to_string()));
    }
    if let Some(policy) = f.policy {
        attrs.push(KeyValue::new("trellis.policy", policy.to_string()));
    }
    if let Some(cause) = f.error {
        attrs.push(KeyValue::new("trellis.error", cause.to_string()));
    }
    let error_type = error_type(f);
    let status = match &error_type {
        Some(t) => Status::error(t.clone()),
        None => Status::Unset,
    };
    if let Some(t) = error_type {
        attrs.push(KeyValue::new("error.type", t));
    }
    (name.into(), attrs, status)
}

/// `error.type`: the proxy's cause when it failed the request; otherwise an error status —
/// any 4xx/5xx for a client span, 5xx for a server span (HTTP conventions), or a non-OK gRPC
/// status (its number).
fn error_type(f: &HttpFacts<'_>) -> Option<String> {
    if let Some(cause) = f.error {
        return Some(cause.to_string());
    }
    if let Some(code) = f.grpc_status.filter(|c| *c != 0) {
        return Some(code.to_string());
    }
    let status = f.status?;
    let bad = match f.kind {
        SpanKind::Client => status >= 400,
        _ => status >= 500,
    };
    bad.then(|| status.to_string())
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
fn grpc_parts(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// The host and port the caller named, or the address it dialled.
fn split_host_port(authority: &str, orig_dst: SocketAddr) -> (Cow<'_, str>, u16) {
    if authority.is_empty() {
        return (orig_dst.ip().to_string().into(), orig_dst.port());
    }
    let (host, port) = crate::policy::routes::split_authority(authority);
    (host.into(), port.unwrap_or(orig_dst.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(method: &'a http::Method, path: &'a str) -> HttpFacts<'a> {
        HttpFacts {
            kind: SpanKind::Client,
            method,
            authority: "reviews.shop:9080",
            path,
            orig_dst: "10.0.0.9:9080".parse().unwrap(),
            version: "1.1",
            grpc: false,
            status: Some(200),
            grpc_status: None,
            error: None,
            peer_identity: Some("spiffe://cluster.local/ns/shop/sa/reviews"),
            tls: true,
            policy: Some("shop/reviews"),
            client: None,
            upstream: Some("10.0.0.9:9080".parse().unwrap()),
            resend_count: 2,
        }
    }

    fn get<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a opentelemetry::Value> {
        attrs
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn http_spans_follow_the_conventions_without_paths_in_names() {
        let m = http::Method::GET;
        let (name, attrs, status) = http_span(&facts(&m, "/items/42"));
        assert_eq!(name, "GET reviews.shop");
        assert_eq!(get(&attrs, "url.path").unwrap().as_str(), "/items/42");
        assert_eq!(
            get(&attrs, "server.port"),
            Some(&opentelemetry::Value::I64(9080))
        );
        assert_eq!(
            get(&attrs, "http.request.resend_count"),
            Some(&opentelemetry::Value::I64(2))
        );
        assert_eq!(status, Status::Unset);
        assert!(get(&attrs, "error.type").is_none());
    }

    #[test]
    fn errors_set_error_type_and_status() {
        let m = http::Method::POST;
        let mut f = facts(&m, "/");
        f.status = Some(503);
        f.error = Some("connect-refused");
        let (_, attrs, status) = http_span(&f);
        assert_eq!(
            get(&attrs, "error.type").unwrap().as_str(),
            "connect-refused"
        );
        assert_eq!(
            get(&attrs, "trellis.error").unwrap().as_str(),
            "connect-refused"
        );
        assert!(matches!(status, Status::Error { .. }));
        // A 404 is an error for the client, not for the server.
        f.error = None;
        f.status = Some(404);
        assert!(get(&http_span(&f).1, "error.type").is_some());
        f.kind = SpanKind::Server;
        assert!(get(&http_span(&f).1, "error.type").is_none());
    }

    #[test]
    fn grpc_spans_name_the_service_and_method() {
        let m = http::Method::POST;
        let mut f = facts(&m, "/trellis.test.echo.Echo/Unary");
        f.grpc = true;
        f.grpc_status = Some(14);
        f.version = "2";
        let (name, attrs, status) = http_span(&f);
        assert_eq!(name, "trellis.test.echo.Echo/Unary");
        assert_eq!(
            get(&attrs, "rpc.service").unwrap().as_str(),
            "trellis.test.echo.Echo"
        );
        assert_eq!(get(&attrs, "rpc.method").unwrap().as_str(), "Unary");
        assert_eq!(
            get(&attrs, "rpc.grpc.status_code"),
            Some(&opentelemetry::Value::I64(14))
        );
        assert!(matches!(status, Status::Error { .. }));
    }

    #[test]
    fn hosts_come_from_the_authority_or_the_original_destination() {
        let dst: SocketAddr = "10.0.0.9:80".parse().unwrap();
        assert_eq!(split_host_port("", dst), ("10.0.0.9".into(), 80));
        assert_eq!(split_host_port("a.b", dst), ("a.b".into(), 80));
        assert_eq!(
            split_host_port("[fd00::1]:8080", dst),
            ("fd00::1".into(), 8080)
        );
    }
}
