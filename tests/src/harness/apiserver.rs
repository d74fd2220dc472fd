//! A stand-in for the Kubernetes API server's TokenReview endpoint — the one piece of Kubernetes
//! the control plane calls that cannot exist on these machines. It is small and honest about
//! what it is: HTTPS on 127.0.0.1 with a certificate of its own CA, `POST
//! /apis/authentication.k8s.io/v1/tokenreviews` answered in the real `authentication.k8s.io/v1`
//! JSON, from a fixed table of tokens. It rejects callers without the expected bearer token, as
//! the API server would, and records every review it was asked for.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// One review the control plane asked for: its own credential and the review's spec.
#[derive(Debug, Clone)]
pub struct Review {
    pub authorization: String,
    pub token: String,
    pub audiences: Vec<String>,
}

pub struct FakeApiServer {
    pub url: String,
    /// The CA (PEM file) that verifies this server.
    pub ca_file: PathBuf,
    pub reviews: Arc<Mutex<Vec<Review>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl FakeApiServer {
    /// `tokens`: service-account token → (namespace, service account, audiences it is valid
    /// for). `caller_token`: the bearer token the control plane must present.
    pub fn start(
        dir: &std::path::Path,
        tokens: HashMap<String, (String, String, Vec<String>)>,
        caller_token: &str,
    ) -> Self {
        let (ca, ..) = trellis_identity::ca::Ca::generate("apiserver.test").expect("CA");
        let id = trellis_identity::SpiffeId::new("apiserver.test", "default", "kubernetes");
        let (issued, key) = ca
            .issue(
                &id,
                Duration::from_secs(3600),
                &["localhost".into()],
                &["127.0.0.1".parse().expect("ip")],
            )
            .expect("issue");
        let ca_file = dir.join("apiserver-ca.pem");
        std::fs::write(&ca_file, ca.bundle_pem()).expect("write CA");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new((tokens, format!("Bearer {caller_token}"), reviews.clone()));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, state) = (acceptor.clone(), state.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(review(req, &state).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        Self {
            url,
            ca_file,
            reviews,
            _thread: thread,
        }
    }
}

type State = (
    HashMap<String, (String, String, Vec<String>)>,
    String,
    Arc<Mutex<Vec<Review>>>,
);

async fn review(req: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let (tokens, caller, reviews) = state;
    let json = |status: StatusCode, body: serde_json::Value| {
        let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
        *rsp.status_mut() = status;
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        rsp
    };
    if req.method() != http::Method::POST
        || req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"kind": "Status", "code": 404}),
        );
    }
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if authorization != *caller {
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "Unauthorized", "reason": "Unauthorized", "code": 401}),
        );
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    reviews.lock().expect("reviews").push(Review {
        authorization,
        token: token.clone(),
        audiences: audiences.clone(),
    });
    let status = match tokens.get(&token) {
        Some((ns, sa, valid_for)) if audiences.iter().any(|a| valid_for.contains(a)) => {
            serde_json::json!({
                "authenticated": true,
                "user": {"username": format!("system:serviceaccount:{ns}:{sa}"), "uid": "0000", "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")]},
                "audiences": audiences.iter().filter(|a| valid_for.contains(a)).collect::<Vec<_>>(),
            })
        }
        Some(_) => {
            serde_json::json!({"authenticated": false, "error": "token audiences do not match the requested audiences"})
        }
        None => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json(
        StatusCode::CREATED,
        serde_json::json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review["spec"],
            "status": status,
        }),
    )
}
