//! Only gRPC on the gRPC port: a request whose content-type is not `application/grpc` (or
//! `application/grpc+proto`, `application/grpc;…`) is answered with HTTP 415 and the gRPC
//! status INVALID_ARGUMENT naming what was sent, as the gRPC HTTP/2 spec asks — tonic itself
//! would decode the body whatever the content-type said.
//!
//! It also answers a request message over the 4 MiB limit with RESOURCE_EXHAUSTED, as the gRPC
//! status-code spec and the other gRPC stacks do, where tonic says OUT_OF_RANGE (only for an
//! answer that is a status alone, i.e. before any response message: a unary call, or the first
//! message of a stream).
//!
//! [`GrpcOnly`] wraps one generated service and keeps its name, so routing is unchanged.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use crate::tls::PeerInfo;

/// A generated gRPC service that refuses non-gRPC requests (see the module docs).
#[derive(Clone)]
pub struct GrpcOnly<S>(pub S);

impl<S: NamedService> NamedService for GrpcOnly<S> {
    const NAME: &'static str = S::NAME;
}

/// Whether `content_type` is one the gRPC spec allows on a request.
fn is_grpc(content_type: &str) -> bool {
    let ct = content_type.trim().to_ascii_lowercase();
    ct == "application/grpc"
        || ct.starts_with("application/grpc+")
        || ct.starts_with("application/grpc;")
}

/// Turns tonic's OUT_OF_RANGE for an oversized request message into RESOURCE_EXHAUSTED.
fn too_large_is_exhausted(rsp: http::Response<Body>) -> http::Response<Body> {
    match tonic::Status::from_header_map(rsp.headers()) {
        Some(status)
            if status.code() == tonic::Code::OutOfRange
                && status
                    .message()
                    .contains("decoded message length too large") =>
        {
            let mut exhausted =
                tonic::Status::resource_exhausted(status.message().to_string()).into_http::<Body>();
            *exhausted.status_mut() = rsp.status();
            exhausted
        }
        _ => rsp,
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;

impl<S, B> Service<http::Request<Body>> for GrpcOnly<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if content_type.as_deref().is_some_and(is_grpc) {
            let call = self.0.call(req);
            return Box::pin(async move {
                call.await
                    .map(|rsp| too_large_is_exhausted(rsp.map(Body::new)))
            });
        }
        let sent = content_type.map_or_else(
            || "no content-type".to_string(),
            |c| format!("content-type {c:?}"),
        );
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(%peer, path = req.uri().path(), sent, "refused a request that is not gRPC");
        let status = tonic::Status::invalid_argument(format!(
            "{sent} is not gRPC: {} answers application/grpc only",
            req.uri().path()
        ));
        let mut rsp = status.into_http::<Body>();
        *rsp.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Box::pin(async move { Ok(rsp) })
    }
}

#[cfg(test)]
mod tests {
    use super::is_grpc;

    #[test]
    fn grpc_content_types() {
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "Application/gRPC; charset=x",
        ] {
            assert!(is_grpc(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/json",
            "application/grpc-web",
            "application/grpcx",
            "",
        ] {
            assert!(!is_grpc(bad), "{bad}");
        }
    }
}
