//! The applications the tests run in pods: HTTP/h2c, gRPC, TCP echo and banner servers.
//!
//! HTTP routes: `/` (hello), `/headers` (the request as the app saw it, in JSON), `/upload`
//! (length and checksum of the body), `/stream?chunks=N&interval_ms=M`, `/slow?ms=N`,
//! `/status/N`, `/flaky?fail=N&key=K` (503 for the first N calls with K),
//! `/reset-once?key=K` (the first call with K is reset), `/call?to=HOST:PORT&path=/P` (the app
//! calls `http://HOST:PORT/P` itself, forwarding the trace context it received, and answers
//! with the downstream's status and body), and WebSocket-style upgrades (echo).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use trellis_tests::echo::echo_server::Echo;
use trellis_tests::echo::{EchoReply, EchoRequest, FailRequest, StreamRequest};

use crate::Body;

// ---- HTTP server ----

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Per-key call counts for /flaky, /reset-once and the gRPC Fail call.
fn bump(key: &str) -> u64 {
    static COUNTS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, u64>>> =
        std::sync::OnceLock::new();
    let mut counts = COUNTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let n = counts.entry(key.to_string()).or_insert(0);
    *n += 1;
    *n
}

pub(crate) async fn serve_http(
    listen: SocketAddr,
    name: String,
    delay_ms: u64,
) -> Result<(), BoxError> {
    let listener = TcpListener::bind(listen).await?;
    let name: &'static str = Box::leak(name.into_boxed_str());
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| async move {
                if delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                handle_http(req, name, peer).await
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle_http(
    mut req: Request<Incoming>,
    name: &'static str,
    peer: SocketAddr,
) -> Result<Response<Body>, std::io::Error> {
    if req.headers().contains_key(http::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "testecho")
            .body(full(""))
            .unwrap_or_default());
    }
    let path = req.uri().path().to_string();
    let query: std::collections::HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let num = |k: &str, d: u64| query.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let rsp = match path.as_str() {
        "/headers" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                .collect();
            let body = json!({
                "version": format!("{:?}", req.version()),
                "uri": req.uri().to_string(),
                "headers": headers,
                "peer": peer.to_string(),
                "from": name,
            });
            Response::new(full(body.to_string()))
        }
        "/call" => call(req.headers(), &query).await,
        "/flaky" => {
            // The first `fail` requests with this key get 503, the rest 200.
            let key = query.get("key").cloned().unwrap_or_default();
            let n = bump(&format!("flaky/{key}"));
            if n <= num("fail", 2) {
                status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("failure {n} from {name}\n"),
                )
            } else {
                Response::new(full(format!(
                    "success after {} failures from {name}\n",
                    n - 1
                )))
            }
        }
        "/reset-once"
            if bump(&format!(
                "reset/{}",
                query.get("key").cloned().unwrap_or_default()
            )) == 1 =>
        {
            // Abort the connection without a response (hyper closes it on a service error).
            return Err(std::io::Error::other(
                "resetting this connection on purpose",
            ));
        }
        "/upload" | "/reset-once" => {
            let mut body = req.into_body();
            let (mut bytes, mut hash) = (0u64, Fnv::new());
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(data) = f.data_ref() {
                            bytes += data.len() as u64;
                            hash.update(data);
                        }
                    }
                    Err(e) => {
                        return Ok(status(StatusCode::BAD_REQUEST, format!("body error: {e}")));
                    }
                }
            }
            Response::new(full(
                json!({"bytes": bytes, "fnv64": format!("{:016x}", hash.0), "from": name})
                    .to_string(),
            ))
        }
        "/stream" => {
            let (chunks, interval) = (
                num("chunks", 5),
                Duration::from_millis(num("interval_ms", 100)),
            );
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i >= chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk {i}\n")))),
                    i + 1,
                ))
            });
            let stream: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>> =
                Box::pin(stream);
            Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(num("ms", 1000))).await;
            Response::new(full(format!("slow response from {name}\n")))
        }
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..]
                .parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok());
            status(
                code.unwrap_or(StatusCode::BAD_REQUEST),
                format!("status from {name}\n"),
            )
        }
        _ => {
            let mut rsp = Response::new(full(format!("hello from {name}\n")));
            // An app must not be able to forge the proxy's error header.
            rsp.headers_mut().insert(
                "trellis-error",
                http::HeaderValue::from_static("forged-by-app"),
            );
            rsp
        }
    };
    Ok(rsp)
}

/// The trace-context headers (W3C and B3) an instrumented app copies from the request it serves
/// onto the calls it makes while serving it: that is what joins its calls to the same trace.
const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// `/call?to=HOST:PORT&path=/P`: GET `http://HOST:PORT/P` over a new HTTP/1.1 connection, as an
/// app calling another service does (in a pod, its sidecar intercepts the call).
async fn call(
    headers: &http::HeaderMap,
    query: &std::collections::HashMap<String, String>,
) -> Response<Body> {
    let Some(to) = query.get("to") else {
        return status(
            StatusCode::BAD_REQUEST,
            "/call needs ?to=HOST:PORT (and optionally &path=/P)\n".into(),
        );
    };
    let path = query
        .get("path")
        .map(|p| trellis_tests::query::percent_decode(p))
        .unwrap_or_else(|| "/".into());
    let forwarded: Vec<(&str, http::HeaderValue)> = TRACE_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name).iter().map(|v| (*name, v.clone())))
        .collect();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        call_downstream(to, &path, forwarded),
    )
    .await;
    match outcome {
        Ok(Ok((code, body))) => {
            let mut rsp = Response::new(full(body));
            *rsp.status_mut() = code;
            rsp
        }
        Ok(Err(e)) => status(
            StatusCode::BAD_GATEWAY,
            format!("call to http://{to}{path} failed: {e}\n"),
        ),
        Err(_) => status(
            StatusCode::GATEWAY_TIMEOUT,
            format!("call to http://{to}{path} took over 30 s\n"),
        ),
    }
}

async fn call_downstream(
    to: &str,
    path: &str,
    headers: Vec<(&str, http::HeaderValue)>,
) -> Result<(StatusCode, Bytes), BoxError> {
    let stream = tokio::net::TcpStream::connect(to).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header(http::header::HOST, to);
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let rsp = send
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    let code = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((code, body))
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed_unsync()
}

fn status(code: StatusCode, body: String) -> Response<Body> {
    let mut rsp = Response::new(full(body));
    *rsp.status_mut() = code;
    rsp
}

/// FNV-1a 64: a dependency-free checksum to compare bodies end to end.
struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Self(0xcbf29ce484222325)
    }
    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

// ---- gRPC server ----

pub(crate) struct EchoSvc {
    pub name: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoSvc {
    async fn unary(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let message = req.into_inner().message;
        Ok(tonic::Response::new(EchoReply {
            message,
            from: self.name.clone(),
            seq: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, tonic::Status> {
        let StreamRequest { count, interval_ms } = req.into_inner();
        let from = self.name.clone();
        let stream = futures_util::stream::unfold(0u32, move |seq| {
            let from = from.clone();
            async move {
                if seq >= count {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(u64::from(interval_ms))).await;
                Some((
                    Ok(EchoReply {
                        message: format!("item {seq}"),
                        from,
                        seq,
                    }),
                    seq + 1,
                ))
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn fail(
        &self,
        req: tonic::Request<FailRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let FailRequest {
            code,
            message,
            key,
            times,
        } = req.into_inner();
        if times > 0 && bump(&format!("grpc/{key}")) > u64::from(times) {
            return Ok(tonic::Response::new(EchoReply {
                message: "recovered".into(),
                from: self.name.clone(),
                seq: 0,
            }));
        }
        let mut status = tonic::Status::new(tonic::Code::from(code), message);
        status.metadata_mut().insert(
            "x-detail",
            "from-the-app"
                .parse()
                .map_err(|_| tonic::Status::internal("metadata"))?,
        );
        Err(status)
    }
}

// ---- TCP servers ----

pub(crate) async fn serve_tcp(
    listen: SocketAddr,
    banner: Option<String>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        // Like request/response servers (databases, brokers) do: without it, an echo written
        // in two pieces waits for the peer's delayed ACK (Nagle), ~40 ms per round trip.
        stream.set_nodelay(true)?;
        let banner = banner.clone();
        tokio::spawn(async move {
            if let Some(b) = banner
                && stream.write_all(b.as_bytes()).await.is_err()
            {
                return;
            }
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}
