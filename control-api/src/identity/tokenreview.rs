//! Kubernetes service-account tokens, checked with the TokenReview API.
//!
//! The proxy sends its pod's projected service-account token (audience `trellis`); the control
//! plane asks the API server whether it is valid for that audience, and derives the identity
//! from the answer (`system:serviceaccount:<ns>:<sa>`) — never from what the proxy asked for.
//! The request is the API's real JSON (`authentication.k8s.io/v1`, kind `TokenReview`) over
//! HTTPS, authenticated with the control plane's own service-account token and verifying the
//! API server against `--tokenreview-ca`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

pub const AUDIENCE: &str = "trellis";

#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// The API server, e.g. `https://kubernetes.default.svc:443`.
    pub url: String,
    /// PEM trust anchors for the API server.
    pub ca_file: PathBuf,
    /// The control plane's own credential for the API server (re-read on every review).
    pub token_file: Option<PathBuf>,
}

pub struct TokenReviewer {
    config: TokenReviewConfig,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl TokenReviewer {
    pub fn new(config: TokenReviewConfig) -> Result<Self, String> {
        let uri: http::Uri = config
            .url
            .parse()
            .map_err(|e| format!("--tokenreview-url {:?}: {e}", config.url))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "--tokenreview-url {:?}: must be https:// (a service-account token is never sent over plaintext)",
                config.url
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("--tokenreview-url {:?}: no host", config.url))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let pem = std::fs::read(&config.ca_file)
            .map_err(|e| format!("--tokenreview-ca {}: {e}", config.ca_file.display()))?;
        let roots = trellis_identity::tls::roots_from_pem(&pem)
            .map_err(|e| format!("--tokenreview-ca {}: {e}", config.ca_file.display()))?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            port: uri.port_u16().unwrap_or(443),
            host,
            config,
            tls: Arc::new(tls),
        })
    }

    /// The (namespace, service account) a token proves, or why it proves nothing.
    pub async fn review(&self, token: &str) -> Result<(String, String), String> {
        tokio::time::timeout(Duration::from_secs(10), self.review_inner(token))
            .await
            .map_err(|_| "the TokenReview API did not answer within 10s".to_string())?
    }

    async fn review_inner(&self, token: &str) -> Result<(String, String), String> {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]},
        });
        let mut req = http::Request::post("/apis/authentication.k8s.io/v1/tokenreviews")
            .header(http::header::HOST, format!("{}:{}", self.host, self.port))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json");
        if let Some(path) = &self.config.token_file {
            let own = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", own.trim()),
            );
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the TokenReview API at {}: {e}",
                    self.config.url
                )
            })?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| format!("--tokenreview-url host {:?}: {e}", self.host))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                format!(
                    "TLS to the TokenReview API at {} failed: {e}",
                    self.config.url
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = rsp.status();
        let bytes = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the TokenReview API answered {status}: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ));
        }
        let review: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the TokenReview API answered invalid JSON: {e}"))?;
        interpret(&review)
    }
}

/// Reads a TokenReview's status: authenticated, for our audience, a service account.
fn interpret(review: &serde_json::Value) -> Result<(String, String), String> {
    let status = &review["status"];
    if status["authenticated"].as_bool() != Some(true) {
        let why = status["error"].as_str().unwrap_or("no reason given");
        return Err(format!("the service-account token was not accepted: {why}"));
    }
    if let Some(audiences) = status["audiences"].as_array()
        && !audiences.iter().any(|a| a.as_str() == Some(AUDIENCE))
    {
        return Err(format!(
            "the service-account token is not for audience {AUDIENCE:?} (project it with `audience: {AUDIENCE}`)"
        ));
    }
    let username = status["user"]["username"].as_str().unwrap_or_default();
    match username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Ok((ns.to_string(), sa.to_string())),
        _ => Err(format!(
            "the token belongs to {username:?}, not to a service account"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_identity_from_the_review_not_the_request() {
        let ok = serde_json::json!({"status": {"authenticated": true, "audiences": ["trellis"],
            "user": {"username": "system:serviceaccount:shop:cart", "uid": "1"}}});
        assert_eq!(interpret(&ok), Ok(("shop".into(), "cart".into())));
        let denied =
            serde_json::json!({"status": {"authenticated": false, "error": "token expired"}});
        assert!(interpret(&denied).unwrap_err().contains("token expired"));
        let other_audience = serde_json::json!({"status": {"authenticated": true, "audiences": ["api"],
            "user": {"username": "system:serviceaccount:shop:cart"}}});
        assert!(interpret(&other_audience).unwrap_err().contains("audience"));
        let user =
            serde_json::json!({"status": {"authenticated": true, "user": {"username": "alice"}}});
        assert!(
            interpret(&user)
                .unwrap_err()
                .contains("not to a service account")
        );
    }
}
