//! `trellis-testapp`: the applications and clients the end-to-end tests and the demo run inside
//! pods. Servers: `http` (HTTP/1.1 and h2c; its routes are listed in `servers.rs`, among them
//! `/call`, which makes the app call another server forwarding the trace context it received, as
//! an instrumented app does), `grpc`, `tcp-echo`, `banner`. Clients print one JSON object on
//! stdout: `http-get`, `grpc-call`, `tcp-call`, `ws-call`, `load`.

mod clients;
mod servers;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::combinators::UnsyncBoxBody;
use trellis_tests::echo::echo_server::EchoServer;

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
    /// HTTP/1.1 + h2c server: / /headers /upload /stream /slow /status/N /flaky /reset-once
    /// /call?to=HOST:PORT&path=/P (calls another server, forwarding the trace context),
    /// WebSocket-style echo.
    Http {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "app")]
        name: String,
        /// Delay every response by this many milliseconds (a slow endpoint).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
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
        #[arg(long, default_value_t = 20)]
        interval_ms: u32,
        #[arg(long, default_value_t = 0)]
        code: i32,
        /// With --call fail: fail only the first TIMES calls with --key.
        #[arg(long, default_value = "")]
        key: String,
        #[arg(long, default_value_t = 0)]
        times: u32,
    },
    /// Send N requests with C concurrent keep-alive connections; report statuses and errors.
    Load {
        #[arg(long)]
        url: http::Uri,
        /// Host header (defaults to the URL's authority).
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value_t = 1000)]
        requests: u64,
        #[arg(long, default_value_t = 10)]
        concurrency: u64,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        /// A new connection for every request (no keep-alive).
        #[arg(long)]
        fresh_connections: bool,
        /// Append the request's number to the URL's path (`/item/` → `/item/0`, `/item/1`, ...).
        #[arg(long)]
        distinct_paths: bool,
        /// Milliseconds each connection waits between its requests.
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
    },
    /// Open a TCP connection: optionally read a banner first, send data, half-close, read to EOF.
    TcpCall {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "")]
        send: String,
        #[arg(long)]
        read_banner: bool,
        /// Keep the connection open this long before sending.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// HTTP/1.1 Upgrade handshake, then send bytes on the upgraded connection and read the echo.
    WsCall {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "ping over upgrade")]
        send: String,
    },
}

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match Cli::parse().cmd {
        Cmd::Http {
            listen,
            name,
            delay_ms,
        } => servers::serve_http(listen, name, delay_ms).await,
        Cmd::Grpc { listen, name } => {
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(servers::EchoSvc { name }))
                .serve(listen)
                .await?;
            Ok(())
        }
        Cmd::TcpEcho { listen } => servers::serve_tcp(listen, None).await,
        Cmd::Banner { listen, banner } => servers::serve_tcp(listen, Some(banner)).await,
        Cmd::HttpGet { url, h2 } => clients::http_get(url, h2).await,
        Cmd::GrpcCall {
            target,
            call,
            count,
            interval_ms,
            code,
            key,
            times,
        } => clients::grpc_call(target, &call, (count, interval_ms), (code, key, times)).await,
        Cmd::Load {
            url,
            host,
            requests,
            concurrency,
            method,
            body_bytes,
            fresh_connections,
            distinct_paths,
            pace_ms,
        } => {
            let shape = clients::LoadShape {
                requests,
                concurrency,
                fresh_connections,
                distinct_paths,
                pace: std::time::Duration::from_millis(pace_ms),
            };
            clients::load(url, host, shape, method, body_bytes).await
        }
        Cmd::TcpCall {
            connect,
            send,
            read_banner,
            hold_ms,
        } => clients::tcp_call(connect, send, read_banner, hold_ms).await,
        Cmd::WsCall { connect, send } => clients::ws_call(connect, send).await,
    }
}
