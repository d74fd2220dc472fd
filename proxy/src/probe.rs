//! Application probes through the admin port, so they work when the app's ports accept only
//! mutual TLS (the injector rewrites kubelet's probes to these paths):
//!
//! - `GET /probe/http/<port>/<path>?<query>` → `GET http://127.0.0.1:<port>/<path>?<query>` with
//!   the probe's headers (minus hop-by-hop ones); the app's status and (up to 64 KiB of) body are
//!   returned as they are, so kubelet judges exactly what it would have judged;
//! - `GET /probe/tcp/<port>` → 200 if a TCP connection to 127.0.0.1:<port> opens, 503 if not;
//! - `GET /probe/grpc/<port>?service=<name>` → the standard gRPC health check
//!   (`grpc.health.v1.Health/Check`) on 127.0.0.1:<port> over cleartext HTTP/2, as kubelet's
//!   own gRPC probe makes it: 200 when the answer is SERVING, 503 with the reason otherwise.
//!
//! The proxy's connections are not redirected (its UID is exempt), and loopback never is.
//! Each probe is bounded by 10 s (kubelet's own timeout is usually shorter); past it, 504.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};

const LIMIT: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);
const USAGE: &str =
    "expected /probe/http/<port>/<path>, /probe/tcp/<port> or /probe/grpc/<port>?service=<name>";

mod declared;

pub use declared::DeclaredProbes;

/// Whether a path is a probe path.
pub fn is_probe(path: &str) -> bool {
    path.starts_with("/probe/")
}

/// Answers a probe request (only its path, query and headers are read).
pub async fn handle<B>(req: Request<B>) -> Response<Full<Bytes>> {
    bounded(TIMEOUT, probe(req)).await
}

async fn bounded(
    limit: Duration,
    probe: impl Future<Output = Response<Full<Bytes>>>,
) -> Response<Full<Bytes>> {
    match tokio::time::timeout(limit, probe).await {
        Ok(rsp) => rsp,
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("probe timed out after {limit:?}\n"),
        ),
    }
}

/// What a probe path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `GET /<path>?<query>` on the app's port.
    Http {
        port: u16,
        target: String,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

/// Reads a probe path (`/probe/...`) and its query; on error, the status to answer and why.
fn parse(path: &str, query: Option<&str>) -> Result<Target, (StatusCode, String)> {
    let usage = || (StatusCode::BAD_REQUEST, USAGE.to_string());
    let rest = path.strip_prefix("/probe/").ok_or_else(usage)?;
    let (kind, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let (port, app_path) = match rest.split_once('/') {
        Some((port, app_path)) => (port, Some(app_path)),
        None => (rest, None),
    };
    let port = match port.parse::<u16>() {
        Ok(0) => return Err((StatusCode::BAD_REQUEST, "port 0 is not 1-65535".into())),
        Ok(port) => port,
        Err(_) => return Err(usage()),
    };
    match kind {
        "http" => {
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            let target = format!("/{}{query}", app_path.unwrap_or_default());
            Ok(Target::Http { port, target })
        }
        "tcp" if app_path.is_none() && query.is_none() => Ok(Target::Tcp { port }),
        "tcp" => Err(usage()),
        "grpc" if app_path.is_none() => {
            let service = grpc_service(query).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
            Ok(Target::Grpc { port, service })
        }
        "grpc" => Err(usage()),
        _ => Err((
            StatusCode::NOT_FOUND,
            format!("unknown probe kind {kind:?} (http, tcp, grpc)"),
        )),
    }
}

async fn probe<B>(req: Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let target = match parse(&path, req.uri().query()) {
        Ok(target) => target,
        Err((status, why)) => return text(status, format!("{path}: {why}\n")),
    };
    let addr = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match target {
        Target::Tcp { port } => match tokio::net::TcpStream::connect(addr(port)).await {
            Ok(_) => text(StatusCode::OK, format!("tcp {}: open\n", addr(port))),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("tcp {}: {e}\n", addr(port)),
            ),
        },
        Target::Http { port, target } => match http_probe(addr(port), &target, req).await {
            Ok(rsp) => rsp,
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("http {}{target}: {e}\n", addr(port)),
            ),
        },
        Target::Grpc { port, service } => {
            let what = match service.as_str() {
                "" => format!("grpc {}", addr(port)),
                name => format!("grpc {} service {name:?}", addr(port)),
            };
            match grpc_probe(addr(port), &service).await {
                Ok(ServingStatus::Serving) => text(StatusCode::OK, format!("{what}: SERVING\n")),
                Ok(status) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{what}: {status}\n"),
                ),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{what}: {e}\n")),
            }
        }
    }
}

async fn http_probe<B>(
    addr: SocketAddr,
    target: &str,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut out = Request::get(target)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let mut headers = req.headers().clone();
    crate::http::strip_hop_by_hop(&mut headers, false);
    headers.insert(
        header::HOST,
        header::HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?,
    );
    *out.headers_mut() = headers;
    let rsp = sender.send_request(out).await.map_err(|e| e.to_string())?;
    let (parts, body) = rsp.into_parts();
    let body = Limited::new(body, LIMIT)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut rsp = Response::new(Full::new(body));
    *rsp.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::LOCATION] {
        if let Some(v) = parts.headers.get(&name) {
            rsp.headers_mut().insert(name, v.clone());
        }
    }
    Ok(rsp)
}

/// The gRPC health service's method, as kubelet calls it.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// `HealthCheckResponse.status` (grpc/health/v1/health.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingStatus {
    Unknown,
    Serving,
    NotServing,
    ServiceUnknown,
    Other(u64),
}

impl std::fmt::Display for ServingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServingStatus::Unknown => f.write_str("UNKNOWN"),
            ServingStatus::Serving => f.write_str("SERVING"),
            ServingStatus::NotServing => f.write_str("NOT_SERVING"),
            ServingStatus::ServiceUnknown => f.write_str("SERVICE_UNKNOWN"),
            ServingStatus::Other(n) => write!(f, "status {n} (not a HealthCheckResponse status)"),
        }
    }
}

/// The `service` query parameter (percent-decoded); none means the server as a whole ("").
/// Other parameters are refused: a misspelt `service` would otherwise check the whole server
/// and pass.
fn grpc_service(query: Option<&str>) -> Result<String, String> {
    let mut service = String::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("service", value)) => {
                service = percent_decode(value)
                    .ok_or_else(|| format!("service={value}: not a percent-encoded UTF-8 name"))?;
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {pair:?} (only service=<name>)"
                ));
            }
        }
    }
    Ok(service)
}

/// Calls `grpc.health.v1.Health/Check` on `addr` over HTTP/2 with prior knowledge (h2c).
/// Errors are the reason the probe fails, for its 503 answer.
async fn grpc_probe(addr: SocketAddr, service: &str) -> Result<ServingStatus, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    // Bounded too: an app that never answers the HTTP/2 handshake must not keep the connection
    // (and its task) alive after the probe has given up.
    tokio::spawn(tokio::time::timeout(TIMEOUT, conn));
    let req = Request::post(format!("http://{addr}{HEALTH_CHECK}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "trellis-proxy-probe")
        .body(Full::new(encode_check_request(service)))
        .map_err(|e| e.to_string())?;
    let rsp = sender.send_request(req).await.map_err(|e| {
        format!(
            "no HTTP/2 answer (is this a gRPC server?): {}",
            with_sources(&e)
        )
    })?;
    if rsp.status() != StatusCode::OK {
        return Err(format!(
            "HTTP status {} (a gRPC server answers 200)",
            rsp.status()
        ));
    }
    let (parts, body) = rsp.into_parts();
    let body = Limited::new(body, LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    // A failed call is usually "trailers-only": grpc-status arrives with the headers.
    let trailers = body.trailers().cloned().unwrap_or_default();
    let status = match grpc_status(&trailers) {
        Some(status) => status,
        None => grpc_status(&parts.headers).ok_or("the answer has no grpc-status")?,
    };
    if status.0 != 0 {
        return Err(status.to_string());
    }
    decode_check_response(&body.to_bytes())
}

/// An error and its causes, "outer: inner: ...": hyper's own message alone ("connection error")
/// does not say what went wrong.
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A gRPC status and message from response headers or trailers.
struct GrpcStatus(u32, String);

fn grpc_status(headers: &HeaderMap) -> Option<GrpcStatus> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| percent_decode(m).unwrap_or_else(|| m.to_string()))
        .unwrap_or_default();
    Some(GrpcStatus(code, message))
}

impl std::fmt::Display for GrpcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [&str; 17] = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        write!(f, "grpc-status {}", self.0)?;
        if let Some(name) = usize::try_from(self.0).ok().and_then(|i| NAMES.get(i)) {
            write!(f, " ({name})")?;
        }
        if !self.1.is_empty() {
            write!(f, ": {}", self.1)?;
        }
        Ok(())
    }
}

/// A length-prefixed gRPC message holding `HealthCheckRequest { string service = 1; }`.
pub fn encode_check_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 11);
    if !service.is_empty() {
        // Field 1, wire type 2 (length-delimited); proto3 leaves an empty string out.
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0); // not compressed
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

/// The `status` of the `HealthCheckResponse` in a gRPC response body (one length-prefixed,
/// uncompressed message; fields other than `status` are skipped).
pub fn decode_check_response(body: &[u8]) -> Result<ServingStatus, String> {
    let bad = |why: &str| format!("not a HealthCheckResponse: {why}");
    let [compressed, l0, l1, l2, l3, rest @ ..] = body else {
        return Err(bad("no gRPC message in the answer"));
    };
    if *compressed != 0 {
        return Err(bad("compressed message (none was accepted)"));
    }
    let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
    let mut message = rest
        .get(..len)
        .ok_or_else(|| bad("message shorter than its length prefix"))?;
    let mut status = 0; // proto3: an absent enum is its zero value, UNKNOWN
    while !message.is_empty() {
        let key = take_varint(&mut message).ok_or_else(|| bad("truncated field key"))?;
        let (field, wire_type) = (key >> 3, key & 7);
        match wire_type {
            0 => {
                let value = take_varint(&mut message).ok_or_else(|| bad("truncated varint"))?;
                if field == 1 {
                    status = value;
                }
            }
            1 | 5 => {
                let n = if wire_type == 1 { 8 } else { 4 };
                message = message
                    .get(n..)
                    .ok_or_else(|| bad("truncated fixed field"))?;
            }
            2 => {
                let n = take_varint(&mut message).ok_or_else(|| bad("truncated length"))?;
                message = usize::try_from(n)
                    .ok()
                    .and_then(|n| message.get(n..))
                    .ok_or_else(|| bad("truncated length-delimited field"))?;
            }
            _ => return Err(bad(&format!("wire type {wire_type} of field {field}"))),
        }
    }
    Ok(match status {
        0 => ServingStatus::Unknown,
        1 => ServingStatus::Serving,
        2 => ServingStatus::NotServing,
        3 => ServingStatus::ServiceUnknown,
        n => ServingStatus::Other(n),
    })
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a protobuf varint off the front of `buf`; `None` if it is truncated or too long.
fn take_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(n);
        }
    }
    None
}

/// `%XX` escapes decoded; `None` if one is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use http_body_util::combinators::BoxBody;
    use hyper::body::Incoming;

    #[test]
    fn the_check_request_is_a_grpc_frame_around_the_service_name() {
        assert_eq!(&encode_check_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &encode_check_request("svc")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b's', b'v', b'c']
        );
        // 200 bytes: the length is a two-byte varint (0xc8 0x01).
        let long = encode_check_request(&"a".repeat(200));
        assert_eq!(&long[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
        assert_eq!(long.len(), 5 + 203);
    }

    #[test]
    fn the_check_response_status_is_read_and_other_fields_skipped() {
        let serving = [0, 0, 0, 0, 2, 0x08, 1];
        assert_eq!(decode_check_response(&serving), Ok(ServingStatus::Serving));
        let not_serving = [0, 0, 0, 0, 2, 0x08, 2];
        assert_eq!(
            decode_check_response(&not_serving),
            Ok(ServingStatus::NotServing)
        );
        // An empty message is status 0 (proto3 leaves default values out).
        assert_eq!(
            decode_check_response(&[0, 0, 0, 0, 0]),
            Ok(ServingStatus::Unknown)
        );
        // Unknown fields before it (string 2 = "x", fixed32 3, fixed64 4) are skipped.
        let with_extras = [
            0, 0, 0, 0, 19, 0x12, 1, b'x', 0x1d, 1, 2, 3, 4, 0x21, 1, 2, 3, 4, 5, 6, 7, 8, 0x08, 3,
        ];
        assert_eq!(with_extras.len(), 5 + 19);
        assert_eq!(
            decode_check_response(&with_extras),
            Ok(ServingStatus::ServiceUnknown)
        );
    }

    #[test]
    fn malformed_check_responses_are_named() {
        let cases: [(&[u8], &str); 5] = [
            (&[], "no gRPC message"),
            (&[1, 0, 0, 0, 2, 0x08, 1], "compressed"),
            (&[0, 0, 0, 0, 9, 0x08, 1], "shorter than its length prefix"),
            (&[0, 0, 0, 0, 1, 0x08], "truncated varint"),
            (&[0, 0, 0, 0, 2, 0x0b, 1], "wire type 3"),
        ];
        for (body, expected) in cases {
            let err = decode_check_response(body).unwrap_err();
            assert!(err.contains(expected), "{body:?}: {err}");
        }
    }

    #[test]
    fn the_service_comes_from_the_query_percent_decoded() {
        assert_eq!(grpc_service(None).unwrap(), "");
        assert_eq!(
            grpc_service(Some("service=my.pkg.Greeter")).unwrap(),
            "my.pkg.Greeter"
        );
        assert_eq!(grpc_service(Some("service=a%20b")).unwrap(), "a b");
        assert!(
            grpc_service(Some("servce=x"))
                .unwrap_err()
                .contains("unknown query parameter \"servce=x\"")
        );
        assert!(
            grpc_service(Some("service=%zz"))
                .unwrap_err()
                .contains("not a percent-encoded")
        );
    }

    /// A gRPC server on h2c that implements only the health check: the service "" and "up"
    /// are SERVING, "down" NOT_SERVING, "slow" never answers, any other is NOT_FOUND (what
    /// grpc-go's health server answers for a service it does not know).
    async fn health_server() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    assert_eq!(req.uri().path(), HEALTH_CHECK);
                    assert_eq!(req.headers()[header::CONTENT_TYPE], "application/grpc");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Infallible>(health_answer(&service_of(&body)).await)
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        port
    }

    /// The service name in a `HealthCheckRequest` frame of fewer than 128 bytes.
    fn service_of(frame: &[u8]) -> String {
        match frame.get(5..) {
            Some([0x0a, len, name @ ..]) if usize::from(*len) == name.len() => {
                String::from_utf8(name.to_vec()).unwrap()
            }
            _ => String::new(),
        }
    }

    async fn health_answer(service: &str) -> Response<BoxBody<Bytes, Infallible>> {
        let status = match service {
            "" | "up" => 1,
            "down" => 2,
            "slow" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                1
            }
            _ => {
                // Trailers-only: the status comes with the headers, and no body.
                return Response::builder()
                    .header(header::CONTENT_TYPE, "application/grpc")
                    .header("grpc-status", "5")
                    .header("grpc-message", "unknown%20service")
                    .body(Empty::new().boxed())
                    .unwrap();
            }
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", header::HeaderValue::from_static("0"));
        let body = Full::new(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))
            .with_trailers(async move { Some(Ok(trailers)) });
        Response::builder()
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(body.boxed())
            .unwrap()
    }

    async fn get(path: String) -> (StatusCode, String) {
        let rsp = handle(Request::get(path).body(()).unwrap()).await;
        let status = rsp.status();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn grpc_probe_passes_when_the_server_is_serving() {
        let port = health_server().await;
        assert_eq!(
            get(format!("/probe/grpc/{port}")).await,
            (StatusCode::OK, format!("grpc 127.0.0.1:{port}: SERVING\n"))
        );
        assert_eq!(
            get(format!("/probe/grpc/{port}?service=up")).await,
            (
                StatusCode::OK,
                format!("grpc 127.0.0.1:{port} service \"up\": SERVING\n")
            )
        );
    }

    #[tokio::test]
    async fn grpc_probe_fails_with_the_reason_when_the_service_is_not_serving() {
        let port = health_server().await;
        assert_eq!(
            get(format!("/probe/grpc/{port}?service=down")).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("grpc 127.0.0.1:{port} service \"down\": NOT_SERVING\n")
            )
        );
        assert_eq!(
            get(format!("/probe/grpc/{port}?service=nope")).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "grpc 127.0.0.1:{port} service \"nope\": grpc-status 5 (NOT_FOUND): unknown service\n"
                )
            )
        );
    }

    #[tokio::test]
    async fn grpc_probe_fails_when_nothing_listens_or_the_path_is_wrong() {
        let port = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let (status, body) = get(format!("/probe/grpc/{port}")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with(&format!("grpc 127.0.0.1:{port}: ")) && body.contains("refused"),
            "{body}"
        );
        let (status, body) = get(format!("/probe/grpc/{port}/extra")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("/probe/grpc/<port>?service=<name>"), "{body}");
    }

    #[tokio::test]
    async fn grpc_probe_fails_against_an_http1_server() {
        // An HTTP/1 server reads the HTTP/2 preface as a bad request and closes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hi"))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        let (status, body) = get(format!("/probe/grpc/{port}")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("is this a gRPC server?"), "{body}");
    }

    #[tokio::test]
    async fn a_probe_past_its_bound_answers_504() {
        let port = health_server().await;
        let req = Request::get(format!("/probe/grpc/{port}?service=slow"))
            .body(())
            .unwrap();
        let rsp = bounded(Duration::from_millis(200), probe(req)).await;
        assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
