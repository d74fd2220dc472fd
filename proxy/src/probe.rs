//! Application probes through the admin port, so they work when the app's ports accept only
//! mutual TLS (the injector rewrites kubelet's probes to these paths):
//!
//! - `GET /probe/http/<port>/<path>?<query>` → `GET http://127.0.0.1:<port>/<path>?<query>` with
//!   the probe's headers (minus hop-by-hop ones); the app's status and (up to 64 KiB of) body are
//!   returned as they are, so kubelet judges exactly what it would have judged;
//! - `GET /probe/tcp/<port>` → 200 if a TCP connection to 127.0.0.1:<port> opens, 503 if not.
//!
//! The proxy's connections are not redirected (its UID is exempt), and loopback never is.
//! Each probe is bounded by 10 s (kubelet's own timeout is usually shorter).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

const LIMIT: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a path is a probe path.
pub fn is_probe(path: &str) -> bool {
    path.starts_with("/probe/")
}

pub async fn handle(req: Request<Incoming>) -> Response<Full<Bytes>> {
    match tokio::time::timeout(TIMEOUT, probe(req)).await {
        Ok(rsp) => rsp,
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("probe timed out after {TIMEOUT:?}\n"),
        ),
    }
}

async fn probe(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/probe/").unwrap_or_default();
    let (kind, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let (port, app_path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(port) = port.parse::<u16>() else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{path}: expected /probe/http/<port>/<path> or /probe/tcp/<port>\n"),
        );
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match kind {
        "tcp" => match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => text(StatusCode::OK, format!("tcp {addr}: open\n")),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("tcp {addr}: {e}\n"),
            ),
        },
        "http" => {
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let target = format!("/{app_path}{query}");
            match http_probe(addr, &target, req).await {
                Ok(rsp) => rsp,
                Err(e) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("http {addr}{target}: {e}\n"),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            format!("{path}: unknown probe kind {kind:?} (http, tcp)\n"),
        ),
    }
}

async fn http_probe(
    addr: SocketAddr,
    target: &str,
    req: Request<Incoming>,
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

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}
