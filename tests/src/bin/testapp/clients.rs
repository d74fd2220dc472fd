//! The clients the tests run in pods; each prints one JSON object on stdout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::echo::echo_client::EchoClient;
use trellis_tests::echo::{EchoRequest, FailRequest, StreamRequest};

use crate::servers::BoxError;

// ---- clients ----

pub(crate) async fn http_get(
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

pub(crate) async fn grpc_call(
    target: String,
    call: &str,
    (count, interval_ms): (u32, u32),
    (code, key, times): (i32, String, u32),
) -> Result<(), BoxError> {
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
            .server_stream(StreamRequest { count, interval_ms })
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
                key,
                times,
            })
            .await
        {
            Ok(rsp) => json!({"ok": true, "message": rsp.into_inner().message}),
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

pub(crate) async fn tcp_call(
    connect: SocketAddr,
    send: String,
    read_banner: bool,
    hold_ms: u64,
) -> Result<(), BoxError> {
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
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
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

pub(crate) async fn ws_call(
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

// ---- load ----

/// How many requests, over how many connections at once, whether each gets its own, and
/// whether each goes to a path of its own (the request's number appended to the URL's path).
pub(crate) struct LoadShape {
    pub requests: u64,
    pub concurrency: u64,
    pub fresh_connections: bool,
    pub distinct_paths: bool,
    /// Each worker waits this long between its requests (0: none), so a run lasts about
    /// requests × pace / concurrency.
    pub pace: std::time::Duration,
}

pub(crate) async fn load(
    url: http::Uri,
    host: Option<String>,
    shape: LoadShape,
    method: String,
    body_bytes: usize,
) -> Result<(), BoxError> {
    let LoadShape {
        requests,
        concurrency,
        fresh_connections,
        distinct_paths,
        pace,
    } = shape;
    use std::sync::atomic::{AtomicU64, Ordering};
    let addr = format!(
        "{}:{}",
        url.host().ok_or("url has no host")?,
        url.port_u16().unwrap_or(80)
    );
    let host = host.unwrap_or_else(|| url.authority().map(|a| a.to_string()).unwrap_or_default());
    let path = url
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let method: http::Method = method.parse()?;
    let body = Bytes::from(vec![b'x'; body_bytes]);
    let next = std::sync::Arc::new(AtomicU64::new(0));
    let results = std::sync::Arc::new(std::sync::Mutex::new((
        std::collections::BTreeMap::<String, u64>::new(),
        std::collections::BTreeMap::<String, u64>::new(),
    )));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (addr, host, path, method, body, next, results) = (
            addr.clone(),
            host.clone(),
            path.clone(),
            method.clone(),
            body.clone(),
            next.clone(),
            results.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    break;
                }
                if !pace.is_zero() && n >= concurrency {
                    tokio::time::sleep(pace).await;
                }
                if fresh_connections {
                    sender = None;
                }
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    sender = match TcpStream::connect(&addr).await {
                        Ok(stream) => {
                            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                            {
                                Ok((s, conn)) => {
                                    tokio::spawn(conn);
                                    Some(s)
                                }
                                Err(e) => {
                                    *results
                                        .lock()
                                        .unwrap()
                                        .1
                                        .entry(format!("handshake: {e}"))
                                        .or_default() += 1;
                                    continue;
                                }
                            }
                        }
                        Err(e) => {
                            *results
                                .lock()
                                .unwrap()
                                .1
                                .entry(format!("connect: {e}"))
                                .or_default() += 1;
                            continue;
                        }
                    };
                }
                let Some(s) = sender.as_mut() else { continue };
                let req = Request::builder()
                    .method(method.clone())
                    .uri(if distinct_paths {
                        format!("{path}{n}")
                    } else {
                        path.clone()
                    })
                    .header("host", host.as_str())
                    .body(Full::new(body.clone()));
                let outcome = match req {
                    Ok(req) => match s.send_request(req).await {
                        Ok(rsp) => {
                            let code = rsp.status().as_u16().to_string();
                            match rsp.into_body().collect().await {
                                Ok(_) => Ok(code),
                                Err(e) => Err(format!("body: {e}")),
                            }
                        }
                        Err(e) => Err(format!("request: {e}")),
                    },
                    Err(e) => Err(format!("build: {e}")),
                };
                let mut r = results.lock().unwrap();
                match outcome {
                    Ok(code) => *r.0.entry(code).or_default() += 1,
                    Err(e) => {
                        *r.1.entry(e).or_default() += 1;
                        sender = None;
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let (statuses, errors) = results.lock().unwrap().clone();
    let ok = statuses.get("200").copied().unwrap_or(0);
    println!(
        "{}",
        json!({
            "ok": ok, "failed": requests - ok, "statuses": statuses, "errors": errors,
            "elapsed_ms": start.elapsed().as_secs_f64() * 1e3,
        })
    );
    Ok(())
}
