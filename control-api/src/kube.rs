//! The control plane's one client for the Kubernetes API server, and what it does with it besides
//! TokenReview: putting the mesh CA into the sidecar injector's MutatingWebhookConfiguration.
//!
//! [`KubeClient`] is deliberately small: HTTPS only (it carries a service-account token), the API
//! server verified against `--kube-ca`, one connection per request, every request bounded by 10 s.
//! The bearer token is re-read from `--kube-token-file` on every request because kubelet rotates
//! projected tokens in place; it never appears in an error message or a log line.
//!
//! [`patch_webhook_ca_bundle`] writes `caBundle` into every webhook of the configuration with a
//! JSON patch that first tests `metadata.resourceVersion`: another writer (Helm, an operator, a
//! person with kubectl) may change the object between our read and our write, and a patch built
//! from a stale read must fail rather than silently undo their change. [`keep_webhook_ca_bundle`]
//! is the start-up task that retries it until the API server has taken it once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// How long one request (connect, TLS, send, read the whole answer) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Re-reads after a resourceVersion conflict before giving up on one patch.
const CONFLICT_RETRIES: usize = 3;
/// Backoff bounds of [`keep_webhook_ca_bundle`].
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where the API server is and how to trust and authenticate to it.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// The API server's base URL, e.g. `https://kubernetes.default.svc:443`.
    pub url: String,
    /// PEM trust anchors for the API server.
    pub ca_file: PathBuf,
    /// The control plane's own credential for the API server (re-read on every request).
    pub token_file: Option<PathBuf>,
}

pub struct KubeClient {
    config: KubeConfig,
    /// `host[:port]` as written in the URL, for the Host header.
    authority: String,
    /// The host without IPv6 brackets, for connecting and for the TLS server name.
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl KubeClient {
    /// Checks everything that can be checked before the first request: the URL, the CA file,
    /// and that the token file can be read.
    pub fn new(config: KubeConfig) -> Result<Self, String> {
        let url = &config.url;
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("--kube-api-url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "--kube-api-url {url:?}: must be https:// (a service-account token is never sent over plaintext)"
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "--kube-api-url {url:?}: give the API server's base URL, without a path"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--kube-api-url {url:?}: no host"))?
            .to_string();
        let host = uri
            .host()
            .ok_or_else(|| format!("--kube-api-url {url:?}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let ca = config.ca_file.display();
        let pem = std::fs::read(&config.ca_file).map_err(|e| format!("--kube-ca {ca}: {e}"))?;
        let roots = trellis_identity::tls::roots_from_pem(&pem)
            .map_err(|e| format!("--kube-ca {ca}: {e}"))?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        if let Some(path) = &config.token_file {
            read_token(path)?;
        }
        Ok(Self {
            port: uri.port_u16().unwrap_or(443),
            authority,
            host,
            config,
            tls: Arc::new(tls),
        })
    }

    /// The API server's base URL, for messages.
    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// One request to the API server. Any HTTP answer is `Ok` — status and body are the caller's
    /// to interpret; `Err` means there was no answer (unreachable, TLS, timeout, token file).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let what = format!("{method} {path}");
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.request_inner(method, path, content_type, body),
        )
        .await
        .map_err(|_| {
            format!(
                "the Kubernetes API at {} did not answer {what} within {}s",
                self.config.url,
                REQUEST_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("{what} to the Kubernetes API at {}: {e}", self.config.url))
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::ACCEPT, "application/json");
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        if let Some(path) = &self.config.token_file {
            req = req.header(http::header::AUTHORIZATION, read_token(path)?);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("invalid request: {e}"))?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| format!("--kube-api-url host {:?}: {e}", self.host))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS failed (is --kube-ca the API server's CA?): {e}"))?;
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
            .map_err(|e| format!("answer {status} cut short: {e}"))?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// The `Authorization` header for the token in `path`. Errors name the file, never its content.
fn read_token(path: &std::path::Path) -> Result<http::HeaderValue, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("--kube-token-file {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("--kube-token-file {}: empty", path.display()));
    }
    let mut value = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        format!(
            "--kube-token-file {}: not a token (characters not allowed in an HTTP header)",
            path.display()
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The first 200 characters of an answer, for error messages.
pub fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}

/// Sets `caBundle` (base64 of `ca_pem`) in every webhook of the MutatingWebhookConfiguration
/// `name`; returns how many webhooks it patched. The patch tests the resourceVersion it was built
/// from; on a conflict it reads the object again, up to [`CONFLICT_RETRIES`] times.
pub async fn patch_webhook_ca_bundle(
    client: &KubeClient,
    name: &str,
    ca_pem: &str,
) -> Result<usize, String> {
    let what = format!("MutatingWebhookConfiguration {name:?}");
    // A Kubernetes object name (DNS subdomain); anything else could change the request path.
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "{what}: not a Kubernetes object name (lowercase letters, digits, '-', '.')"
        ));
    }
    let path =
        format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}");
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut conflict = String::new();
    for _ in 0..=CONFLICT_RETRIES {
        let (status, body) = client.request(Method::GET, &path, None, None).await?;
        if status != StatusCode::OK {
            return Err(format!(
                "cannot read {what}: the Kubernetes API answered {status}{}: {}",
                hint(status),
                excerpt(&body)
            ));
        }
        let object: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            format!("cannot read {what}: the Kubernetes API answered invalid JSON: {e}")
        })?;
        let Some(version) = object["metadata"]["resourceVersion"].as_str() else {
            return Err(format!(
                "{what}: the Kubernetes API answered an object without metadata.resourceVersion"
            ));
        };
        let webhooks = object["webhooks"].as_array().map_or(0, Vec::len);
        if webhooks == 0 {
            return Ok(0);
        }
        let mut ops = vec![serde_json::json!(
            {"op": "test", "path": "/metadata/resourceVersion", "value": version}
        )];
        ops.extend((0..webhooks).map(|i| {
            serde_json::json!(
                {"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}
            )
        }));
        let patch = serde_json::Value::Array(ops).to_string().into_bytes();
        let (status, body) = client
            .request(
                Method::PATCH,
                &path,
                Some("application/json-patch+json"),
                Some(patch),
            )
            .await?;
        match status {
            StatusCode::OK => return Ok(webhooks),
            // The test op failed (or the server saw a conflict): someone else wrote the object
            // after we read it. Read it again rather than overwrite their change.
            StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY => {
                tracing::debug!(webhook_config = name, %status, resource_version = version, "conflict while patching caBundle; reading again");
                conflict = format!("{status}: {}", excerpt(&body));
            }
            _ => {
                return Err(format!(
                    "cannot patch {what}: the Kubernetes API answered {status}{}: {}",
                    hint(status),
                    excerpt(&body)
                ));
            }
        }
    }
    Err(format!(
        "cannot patch {what}: it changed under every one of {} attempts; the last answer was {conflict}",
        CONFLICT_RETRIES + 1
    ))
}

/// What to check when the API server refuses us.
fn hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => {
            " (is --kube-token-file the control plane's service-account token?)"
        }
        StatusCode::FORBIDDEN => {
            " (may the control plane's service account get and patch mutatingwebhookconfigurations? see its ClusterRole)"
        }
        StatusCode::NOT_FOUND => " (not found: is the sidecar injector's webhook installed?)",
        _ => "",
    }
}

/// Patches the webhook configuration's caBundle, retrying with jittered exponential backoff
/// (1 s, doubling to 30 s) until the API server has accepted it once; returns how many webhooks
/// were patched. Meant to be spawned at start: the API server or the object may not be there yet.
pub async fn keep_webhook_ca_bundle(client: &KubeClient, name: &str, ca_pem: &str) -> usize {
    let mut backoff = BACKOFF_FIRST;
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match patch_webhook_ca_bundle(client, name, ca_pem).await {
            Ok(webhooks) => {
                tracing::info!(
                    webhook_config = name,
                    webhooks,
                    attempt,
                    "caBundle set in the MutatingWebhookConfiguration"
                );
                return webhooks;
            }
            Err(error) => {
                let wait = jitter(backoff, attempt);
                tracing::warn!(webhook_config = name, attempt, retry_in = ?wait, %error, "cannot set the webhook caBundle yet");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// A duration between half of `d` and `d`, so that many control planes restarted together do not
/// retry in step. The randomness is std's per-process hash keys: no RNG dependency for this.
fn jitter(d: Duration, salt: u64) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(salt);
    let fraction = 0.5 + (r % 1000) as f64 / 2000.0;
    d.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all_of_the_backoff() {
        for salt in 0..100 {
            let d = jitter(Duration::from_secs(8), salt);
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(8),
                "{d:?}"
            );
        }
    }

    #[test]
    fn refuses_plaintext_and_paths_and_names_the_flag() {
        let config = |url: &str| KubeConfig {
            url: url.into(),
            ca_file: "/nonexistent".into(),
            token_file: None,
        };
        let err = KubeClient::new(config("http://127.0.0.1:6443"))
            .err()
            .unwrap();
        assert!(
            err.contains("--kube-api-url") && err.contains("https://"),
            "{err}"
        );
        let err = KubeClient::new(config("https://127.0.0.1:6443/api"))
            .err()
            .unwrap();
        assert!(err.contains("without a path"), "{err}");
        let err = KubeClient::new(config("https://127.0.0.1:6443"))
            .err()
            .unwrap();
        assert!(err.contains("--kube-ca /nonexistent"), "{err}");
    }
}
