//! A test client of the stand-in API server, shared by the tests of the stand-in itself
//! (`tests/tests/apiserver.rs`, `tests/tests/apiserver_writes.rs`): [`Api`] pairs a server
//! with a [`KubeClient`] holding the token it expects, and [`Watch`] reads a watch stream as a
//! client reads it, chunk by chunk. Not part of the harness's API.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_control::kube::{KubeCa, KubeClient, KubeConfig, KubeToken};

use super::FakeApiServer;

/// The bearer token the stand-in expects of [`Api`]'s client and of every [`Watch`].
pub const TOKEN: &str = "control-plane-own-token";
/// How long a watch event may take to arrive.
pub const EVENT_WAIT: Duration = Duration::from_secs(5);

/// A stand-in API server and a client holding the token it expects.
pub struct Api {
    pub server: FakeApiServer,
    pub client: KubeClient,
    pub dir: PathBuf,
}

impl Api {
    pub fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("trellis-apiserver-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = FakeApiServer::start(&dir, HashMap::new(), TOKEN);
        let client = client_with_token(&server, &dir, TOKEN);
        Self {
            server,
            client,
            dir,
        }
    }

    /// One request; the answer's status and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let content_type = match method {
            Method::PATCH => Some("application/merge-patch+json"),
            _ => body.as_ref().map(|_| "application/json"),
        };
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes) = self
            .client
            .request(method, path, content_type, body)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"));
        (status, json)
    }

    pub async fn get_ok(&self, path: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// Opens a watch (`path` with its query) with a reader of our own that sees every chunk.
    pub async fn watch(&self, path: &str) -> Watch {
        Watch::open(&self.server, path).await
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn client_with_token(server: &FakeApiServer, dir: &std::path::Path, token: &str) -> KubeClient {
    let token_file = dir.join(format!("token-{token}"));
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    KubeClient::new(KubeConfig {
        url: server.url.clone(),
        ca: KubeCa::File(server.ca_file.clone()),
        token: Some(KubeToken::File(token_file)),
    })
    .unwrap()
}

/// A watch stream read as a client reads it: events as they arrive, one JSON line each.
pub struct Watch {
    pub status: StatusCode,
    pub content_type: String,
    pub chunked: bool,
    events: mpsc::UnboundedReceiver<Value>,
    /// Chunks that held more than one event (the server must flush each event on its own).
    pub merged_chunks: Arc<AtomicUsize>,
    /// The reader; dropping the watch stops it, which closes the connection.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Watch {
    pub async fn open(server: &FakeApiServer, path: &str) -> Self {
        let authority = server.url.strip_prefix("https://").unwrap().to_string();
        let pem = std::fs::read(&server.ca_file).unwrap();
        let roots = trellis_identity::tls::roots_from_pem(&pem).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let host = authority.rsplit_once(':').unwrap().0.to_string();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from(host).unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, &authority)
            .header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let rsp = sender.send_request(req).await.unwrap();
        let header = |name| {
            rsp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        let content_type = header(http::header::CONTENT_TYPE);
        let chunked = header(http::header::TRANSFER_ENCODING) == "chunked";
        let status = rsp.status();
        let mut body = rsp.into_body();
        let (events_tx, events) = mpsc::unbounded_channel();
        let merged_chunks = Arc::new(AtomicUsize::new(0));
        let merged = merged_chunks.clone();
        let reader = tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                if data.iter().filter(|b| **b == b'\n').count() > 1 {
                    merged.fetch_add(1, Ordering::SeqCst);
                }
                pending.extend_from_slice(data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let event: Value = serde_json::from_slice(&line).unwrap();
                    let _ = events_tx.send(event);
                }
            }
        });
        Self {
            status,
            content_type,
            chunked,
            events,
            merged_chunks,
            reader,
        }
    }

    /// The next event; fails the test if none comes within 5 s or the stream ended.
    pub async fn next(&mut self) -> Value {
        tokio::time::timeout(EVENT_WAIT, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no watch event within {EVENT_WAIT:?}"))
            .expect("the watch stream ended")
    }

    /// The next event that is not a bookmark.
    pub async fn next_change(&mut self) -> Value {
        loop {
            let event = self.next().await;
            if event["type"] != "BOOKMARK" {
                return event;
            }
        }
    }

    /// Waits for the end of the stream; fails the test if another event comes first.
    pub async fn ends(&mut self) {
        match tokio::time::timeout(EVENT_WAIT, self.events.recv()).await {
            Ok(None) => {}
            Ok(Some(event)) => panic!("expected the end of the watch, got {event}"),
            Err(_) => panic!("the watch did not end within {EVENT_WAIT:?}"),
        }
    }

    /// The events that arrived without waiting.
    pub fn arrived(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    /// Waits for the end of the stream, letting bookmarks pass.
    pub async fn ends_after_bookmarks(&mut self) {
        loop {
            match tokio::time::timeout(EVENT_WAIT, self.events.recv()).await {
                Ok(None) => return,
                Ok(Some(event)) if event["type"] == "BOOKMARK" => {}
                Ok(Some(event)) => panic!("expected the end of the watch, got {event}"),
                Err(_) => panic!("the watch did not end within {EVENT_WAIT:?}"),
            }
        }
    }
}

/// The object's `metadata.resourceVersion`, as a number.
pub fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// `namespace/name` of each object of a list's `items`.
pub fn names(items: &Value) -> Vec<String> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// An Opaque Secret with one key.
pub fn secret(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace}, "data": {"key": "dmFsdWU="}})
}
