//! An upstream app that records what reaches it: every connection and request (HTTP/1.1 and
//! h2c), so a test can assert that nothing a hostile client sent got past the proxy.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Pod;

/// An upstream app (HTTP/1.1 and h2c) that records every connection and request it receives.
#[derive(Clone, Default)]
pub struct Recorder {
    requests: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Recorder {
    /// Starts listening on 0.0.0.0:`port` in `pod`; runs until the test process ends.
    pub fn start(pod: &Pod, port: u16) -> Self {
        let recorder = Self::default();
        let rec = recorder.clone();
        let (bound, ready) = std::sync::mpsc::channel();
        pod.netns().spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the app");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
                    .await
                    .expect("bind the app");
                bound.send(()).expect("signal the app is bound");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    rec.connections.fetch_add(1, Ordering::SeqCst);
                    let rec = rec.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |req: http::Request<Incoming>| {
                                let rec = rec.clone();
                                async move {
                                    let line = format!("{} {}", req.method(), req.uri().path());
                                    rec.requests.lock().expect("requests").push(line);
                                    let _ = req.into_body().collect().await;
                                    Ok::<_, Infallible>(http::Response::new(Full::new(
                                        Bytes::from_static(b"ok\n"),
                                    )))
                                }
                            });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("the recording app did not start");
        recorder
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}
