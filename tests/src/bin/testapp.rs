//! `trellis-testapp`: the applications and clients the end-to-end tests and the demo run inside
//! pods. Servers: `http` (HTTP/1.1 and h2c), `grpc`, `tcp-echo`, `banner`. Clients print one JSON
//! object on stdout: `http-get`, `grpc-call`, `tcp-call`, `ws-call`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::Stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_tests::echo::echo_client::EchoClient;
use trellis_tests::echo::echo_server::{Echo, EchoServer};
use trellis_tests::echo::{EchoReply, EchoRequest, FailRequest, StreamRequest};

#[derive(Parser)]
#[command(
    name = "trellis-testapp",
    about = "Test applications and clients for Trellis pods"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 + h2c server: / /headers /upload /stream /slow /status/N, WebSocket-style echo.
    Http {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "app")]
        name: String,
    },
    /// gRPC server (trellis.test.echo.Echo).
    Grpc {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "app")]
        name: String,
    },
    /// TCP echo: echoes until the client half-closes, then half-closes too.
    TcpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Server-speaks-first TCP: writes a banner on accept, then echoes.
    Banner {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "220 banner ready\r\n")]
        banner: String,
    },
    /// GET (or POST) a URL and report status, headers, body size and timing.
    HttpGet {
        #[arg(long)]
        url: http::Uri,
        #[arg(long)]
        h2: bool,
    },
    /// Call the Echo service: unary, stream or fail.
    GrpcCall {
        #[arg(long)]
        target: String,
        #[arg(long)]
        call: String,
        #[arg(long, default_value_t = 3)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        code: i32,
    },
    /// Open a TCP connection: optionally read a banner first, send data, half-close, read to EOF.
    TcpCall {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "")]
        send: String,
        #[arg(long)]
        read_banner: bool,
    },
    /// HTTP/1.1 Upgrade handshake, then send bytes on the upgraded connection and read the echo.
    WsCall {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "ping over upgrade")]
        send: String,
    },
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match Cli::parse().cmd {
        Cmd::Http { listen, name } => serve_http(listen, name).await,
        Cmd::Grpc { listen, name } => {
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoSvc { name }))
                .serve(listen)
                .await?;
            Ok(())
        }
        Cmd::TcpEcho { listen } => serve_tcp(listen, None).await,
        Cmd::Banner { listen, banner } => serve_tcp(listen, Some(banner)).await,
        Cmd::HttpGet { url, h2 } => http_get(url, h2).await,
        Cmd::GrpcCall {
            target,
            call,
            count,
            code,
        } => grpc_call(target, &call, count, code).await,
        Cmd::TcpCall {
            connect,
            send,
            read_banner,
        } => tcp_call(connect, send, read_banner).await,
        Cmd::WsCall { connect, send } => ws_call(connect, send).await,
    }
}

// ---- HTTP server ----

async fn serve_http(
    listen: SocketAddr,
    name: String,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind(listen).await?;
    let name: &'static str = Box::leak(name.into_boxed_str());
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle_http(req, name, peer));
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
) -> Result<Response<Body>, Infallible> {
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
        "/upload" => {
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

struct EchoSvc {
    name: String,
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
        let FailRequest { code, message } = req.into_inner();
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

async fn serve_tcp(
    listen: SocketAddr,
    banner: Option<String>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
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

// ---- clients ----

async fn http_get(
    url: http::Uri,
    h2: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let host = url
        .host()
        .ok_or("url has no host")?
        .trim_matches(['[', ']'])
        .to_string();
    let port = url.port_u16().unwrap_or(80);
    let start = Instant::now();
    let stream = TcpStream::connect((host.as_str(), port)).await?;
    let io = TokioIo::new(stream);
    let req = Request::get(url.clone())
        .header("host", url.authority().map(|a| a.as_str()).unwrap_or(&host))
        .body(Full::new(Bytes::new()))?;
    let rsp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = url
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()?;
        send.send_request(req).await?
    };
    let headers_ms = start.elapsed().as_secs_f64() * 1e3;
    let status = rsp.status().as_u16();
    let headers: serde_json::Map<String, serde_json::Value> = rsp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    let mut body = rsp.into_body();
    let (mut first_body_ms, mut bytes, mut text) = (None, 0usize, Vec::new());
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            first_body_ms.get_or_insert(start.elapsed().as_secs_f64() * 1e3);
            bytes += data.len();
            if text.len() < 64 * 1024 {
                text.extend_from_slice(data);
            }
        }
    }
    let out = json!({
        "status": status, "headers": headers, "bytes": bytes,
        "body": String::from_utf8_lossy(&text), "headers_ms": headers_ms,
        "first_body_ms": first_body_ms, "total_ms": start.elapsed().as_secs_f64() * 1e3,
    });
    println!("{out}");
    Ok(())
}

async fn grpc_call(
    target: String,
    call: &str,
    count: u32,
    code: i32,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut client = EchoClient::connect(target).await?;
    let out = match call {
        "unary" => match client
            .unary(EchoRequest {
                message: "hello over grpc".into(),
            })
            .await
        {
            Ok(rsp) => {
                let r = rsp.into_inner();
                json!({"ok": true, "message": r.message, "from": r.from})
            }
            Err(s) => status_json(&s),
        },
        "stream" => match client
            .server_stream(StreamRequest {
                count,
                interval_ms: 20,
            })
            .await
        {
            Ok(rsp) => {
                let mut stream = rsp.into_inner();
                let mut items = Vec::new();
                let mut end = json!({"ok": true});
                loop {
                    match stream.message().await {
                        Ok(Some(item)) => {
                            items.push(json!({"seq": item.seq, "message": item.message}))
                        }
                        Ok(None) => break,
                        Err(s) => {
                            end = status_json(&s);
                            break;
                        }
                    }
                }
                json!({"ok": end["ok"], "items": items, "end": end})
            }
            Err(s) => status_json(&s),
        },
        "fail" => match client
            .fail(FailRequest {
                code,
                message: "failing on purpose".into(),
            })
            .await
        {
            Ok(_) => json!({"ok": true}),
            Err(s) => status_json(&s),
        },
        other => return Err(format!("unknown call {other:?}: use unary, stream or fail").into()),
    };
    println!("{out}");
    Ok(())
}

fn status_json(s: &tonic::Status) -> serde_json::Value {
    let metadata: serde_json::Map<String, serde_json::Value> = s
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.to_string(), json!(v.to_str().unwrap_or(""))))
            }
            _ => None,
        })
        .collect();
    json!({"ok": false, "code": s.code() as i32, "message": s.message(), "metadata": metadata})
}

async fn tcp_call(
    connect: SocketAddr,
    send: String,
    read_banner: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(connect).await?;
    let mut banner = String::new();
    let mut first_byte_ms = None;
    if read_banner {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await??;
        first_byte_ms = Some(start.elapsed().as_secs_f64() * 1e3);
        banner = String::from_utf8_lossy(&buf[..n]).into_owned();
    }
    stream.write_all(send.as_bytes()).await?;
    stream.shutdown().await?; // half-close: the echo must still come back
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut received)).await??;
    let out = json!({
        "banner": banner, "received": String::from_utf8_lossy(&received),
        "first_byte_ms": first_byte_ms, "total_ms": start.elapsed().as_secs_f64() * 1e3,
    });
    println!("{out}");
    Ok(())
}

async fn ws_call(
    connect: SocketAddr,
    send: String,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut stream = TcpStream::connect(connect).await?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {connect}\r\nConnection: Upgrade\r\nUpgrade: testecho\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err("connection closed during the upgrade".into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    stream.write_all(send.as_bytes()).await?;
    let mut echo = vec![0u8; send.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echo)).await??;
    let status_line = head.lines().next().unwrap_or("").to_string();
    println!(
        "{}",
        json!({"status_line": status_line, "echo": String::from_utf8_lossy(&echo)})
    );
    Ok(())
}
