//! The control plane's one client for the Kubernetes API server, and what it does with it besides
//! TokenReview: putting the mesh CA into the sidecar injector's MutatingWebhookConfiguration.
//!
//! - [`config`]: where the API server is (flags, a kubeconfig, or the pod's service account).
//! - [`watch`]: list-then-watch of one resource kind, as a stream of changes to a projection.
//! - [`ca_secret`]: the mesh CA and admin token every replica shares, kept in a Secret.
//!
//! [`KubeClient`] is deliberately small: HTTPS only (it carries a bearer token), the API server
//! verified against the configured CA, one connection per request, every request bounded by 10 s
//! (a watch: until its answer's headers; then each read by an idle timeout). A token file is
//! re-read on every request because kubelet rotates projected tokens in place; no token ever
//! appears in an error message or a log line.
//!
//! [`patch_webhook_ca_bundle`] writes `caBundle` into every webhook of the configuration with a
//! JSON patch that first tests `metadata.resourceVersion`: another writer (Helm, an operator, a
//! person with kubectl) may change the object between our read and our write, and a patch built
//! from a stale read must fail rather than silently undo their change. [`keep_webhook_ca_bundle`]
//! is the start-up task that retries it until the API server has taken it once.

pub mod ca_secret;
pub mod config;
pub mod watch;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// How long one request (connect, TLS, send, read the whole answer) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest line a watch stream may send (one event, i.e. one object). Anything longer is a
/// broken server, and buffering it without bound would let it exhaust our memory.
pub const MAX_LINE: usize = 16 << 20;
/// Re-reads after a resourceVersion conflict before giving up on one patch.
const CONFLICT_RETRIES: usize = 3;
/// Backoff bounds of [`keep_webhook_ca_bundle`].
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where the API server is and how to trust and authenticate to it. [`config::resolve`] builds
/// one from the flags, a kubeconfig or the pod's service account.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// The API server's base URL, e.g. `https://kubernetes.default.svc:443`.
    pub url: String,
    /// Trust anchors for the API server.
    pub ca: KubeCa,
    /// The control plane's own credential for the API server.
    pub token: Option<KubeToken>,
}

/// The API server's trust anchors (PEM).
#[derive(Debug, Clone)]
pub enum KubeCa {
    /// A file named by `--kube-ca`, read when the client is built.
    File(PathBuf),
    /// Certificates already read; `origin` says from where, for error messages (e.g. "kubeconfig
    /// /root/.kube/config, cluster \"kind\", certificate-authority-data").
    Pem { pem: Vec<u8>, origin: String },
}

/// The control plane's bearer token for the API server.
#[derive(Clone)]
pub enum KubeToken {
    /// A file re-read on every request: kubelet rotates projected tokens in place.
    File(PathBuf),
    /// A kubeconfig's inline `token`, kept in memory only; `origin` names where it came from.
    Inline { token: String, origin: String },
}

impl fmt::Debug for KubeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Inline { origin, .. } => f
                .debug_struct("Inline")
                .field("origin", origin)
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

pub struct KubeClient {
    config: KubeConfig,
    /// `host[:port]` as written in the URL, for the Host header.
    authority: String,
    /// The host without IPv6 brackets, for connecting and for the TLS server name.
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    /// Where the trust anchors came from, for TLS errors.
    ca_origin: String,
}

impl KubeClient {
    /// Checks everything that can be checked before the first request: the URL, the CA, and
    /// that the token can be read and sent.
    pub fn new(config: KubeConfig) -> Result<Self, String> {
        let url = &config.url;
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("--kube-api-url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "--kube-api-url {url:?}: must be https:// (a bearer token is never sent over plaintext)"
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
        let (pem, ca_origin) = match &config.ca {
            KubeCa::File(path) => {
                let origin = format!("--kube-ca {}", path.display());
                let pem = std::fs::read(path).map_err(|e| format!("{origin}: {e}"))?;
                (pem, origin)
            }
            KubeCa::Pem { pem, origin } => (pem.clone(), origin.clone()),
        };
        let roots =
            trellis_identity::tls::roots_from_pem(&pem).map_err(|e| format!("{ca_origin}: {e}"))?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        if let Some(token) = &config.token {
            authorization(token)?;
        }
        Ok(Self {
            port: uri.port_u16().unwrap_or(443),
            authority,
            host,
            config,
            tls: Arc::new(tls),
            ca_origin,
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
        let exchange = async {
            let (rsp, _connection) = self.send(method, path, content_type, body).await?;
            let status = rsp.status();
            let bytes = rsp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("answer {status} cut short: {e}"))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.timed_out(&what))?
            .map_err(|e: String| self.failed(&what, &e))
    }

    /// A GET whose answer is read as it arrives, one line at a time — a watch. Connecting and
    /// the answer's headers are bounded by the usual 10 s; after that each read may wait `idle`
    /// at most, so that a connection that died silently (no FIN, no RST) is noticed.
    pub async fn watch_stream(
        &self,
        path: &str,
        idle: Duration,
    ) -> Result<(StatusCode, LineReader), String> {
        let what = format!("GET {path}");
        let (rsp, connection) =
            tokio::time::timeout(REQUEST_TIMEOUT, self.send(Method::GET, path, None, None))
                .await
                .map_err(|_| self.timed_out(&what))?
                .map_err(|e| self.failed(&what, &e))?;
        let reader = LineReader {
            status: rsp.status(),
            body: rsp.into_body(),
            lines: Lines::default(),
            idle,
            eof: false,
            what: format!("{what} from the Kubernetes API at {}", self.config.url),
            _connection: connection,
        };
        Ok((reader.status, reader))
    }

    fn timed_out(&self, what: &str) -> String {
        format!(
            "the Kubernetes API at {} did not answer {what} within {}s",
            self.config.url,
            REQUEST_TIMEOUT.as_secs()
        )
    }

    fn failed(&self, what: &str, error: &str) -> String {
        format!(
            "{what} to the Kubernetes API at {}: {error}",
            self.config.url
        )
    }

    /// Connects, sends the request and returns the answer's head; the body is read by the caller
    /// while the returned [`Connection`] is alive.
    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(http::Response<Incoming>, Connection), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::ACCEPT, "application/json");
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        if let Some(token) = &self.config.token {
            req = req.header(http::header::AUTHORIZATION, authorization(token)?);
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
            .map_err(|e| {
                format!(
                    "TLS failed (is {} the API server's CA?): {e}",
                    self.ca_origin
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        let connection = Connection(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        Ok((rsp, connection))
    }
}

/// The task driving one HTTP connection; dropping it closes the connection, so that a watch
/// abandoned halfway (idle timeout, the consumer gone) does not linger.
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The answer of [`KubeClient::watch_stream`], read one line (one watch event) at a time.
pub struct LineReader {
    status: StatusCode,
    body: Incoming,
    lines: Lines,
    idle: Duration,
    eof: bool,
    /// "GET /path from the Kubernetes API at https://...", for errors.
    what: String,
    _connection: Connection,
}

impl LineReader {
    /// The next non-empty line without its `\n`; `None` once the server has ended the answer.
    /// `Err` if the connection broke, stayed silent longer than the idle timeout, or sent a line
    /// over [`MAX_LINE`].
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(line) = self
                .lines
                .next()
                .map_err(|e| format!("{}: {e}", self.what))?
            {
                return Ok(Some(line));
            }
            if self.eof {
                return Ok(self.lines.rest());
            }
            self.read().await?;
        }
    }

    /// The whole remaining answer (at most [`MAX_LINE`], within 10 s), e.g. the Status of a
    /// refused watch.
    pub async fn read_to_end(mut self) -> Result<Bytes, String> {
        let what = self.what.clone();
        let read = async {
            while !self.eof {
                self.read().await?;
                if self.lines.buf.len() > MAX_LINE {
                    return Err(format!(
                        "{what}: answer {} longer than {MAX_LINE} bytes",
                        self.status
                    ));
                }
            }
            Ok(self.lines.buf.split().freeze())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, read)
            .await
            .map_err(|_| {
                format!(
                    "{what}: the answer did not end within {}s",
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
    }

    async fn read(&mut self) -> Result<(), String> {
        match tokio::time::timeout(self.idle, self.body.frame()).await {
            Err(_) => Err(format!(
                "{}: nothing received for {}s; the connection is presumably dead",
                self.what,
                self.idle.as_secs()
            )),
            Ok(None) => {
                self.eof = true;
                Ok(())
            }
            Ok(Some(Err(e))) => Err(format!("{}: the answer broke off: {e}", self.what)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    self.lines.push(&data);
                }
                Ok(())
            }
        }
    }
}

/// Splits bytes arriving in arbitrary pieces into `\n`-terminated lines.
#[derive(Default)]
struct Lines {
    buf: BytesMut,
    /// How much of `buf` is known to hold no `\n`: each byte is searched once.
    scanned: usize,
}

impl Lines {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete non-blank line, without `\n` (or `\r\n`).
    fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > MAX_LINE {
                    return Err(format!("a line longer than {MAX_LINE} bytes"));
                }
                return Ok(None);
            };
            let end = self.scanned + at;
            self.scanned = 0;
            if end > MAX_LINE {
                return Err(format!("a line of {end} bytes, over {MAX_LINE}"));
            }
            let mut line = self.buf.split_to(end + 1).freeze();
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            if !line.trim_ascii().is_empty() {
                return Ok(Some(line));
            }
        }
    }

    /// What is left once the stream has ended: a last line without `\n`, if not blank.
    fn rest(&mut self) -> Option<Bytes> {
        let rest = self.buf.split().freeze();
        self.scanned = 0;
        (!rest.trim_ascii().is_empty()).then_some(rest)
    }
}

/// The `Authorization` header for a token. Errors name the file or origin, never the token.
fn authorization(token: &KubeToken) -> Result<HeaderValue, String> {
    let (text, origin) = match token {
        KubeToken::File(path) => {
            let origin = format!("token file {}", path.display());
            let text = std::fs::read_to_string(path).map_err(|e| format!("{origin}: {e}"))?;
            (std::borrow::Cow::Owned(text), origin)
        }
        KubeToken::Inline { token, origin } => {
            (std::borrow::Cow::Borrowed(token.as_str()), origin.clone())
        }
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{origin}: empty"));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {text}"))
        .map_err(|_| format!("{origin}: not a token (characters not allowed in an HTTP header)"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Whether `name` is a Kubernetes object name (a DNS subdomain): anything else could change the
/// path of a request it is put into.
pub(crate) fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// What the API server says in an error answer: its Status `message`, else the first 200
/// characters.
pub(crate) fn api_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|status| status["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| excerpt(body))
}

/// Jittered exponential backoff between retries.
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
    attempt: u64,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
            attempt: 0,
        }
    }

    /// How long to wait before the next attempt: between half and all of the current step,
    /// which then doubles up to the maximum.
    pub(crate) fn next_wait(&mut self) -> Duration {
        self.attempt += 1;
        let wait = jitter(self.next, self.attempt);
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
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
    if !is_object_name(name) {
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
        StatusCode::UNAUTHORIZED => " (is the token the control plane's service-account token?)",
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
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
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
                let wait = backoff.next_wait();
                tracing::warn!(webhook_config = name, attempt, retry_in = ?wait, %error, "cannot set the webhook caBundle yet");
                tokio::time::sleep(wait).await;
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
    fn lines_are_split_whatever_the_pieces_they_arrive_in() {
        let mut lines = Lines::default();
        lines.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(lines.next().unwrap().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(
            lines.next().unwrap(),
            None,
            "half a line waits for the rest"
        );
        lines.push(b":2}\r\n\n  \n{\"c\":3}");
        assert_eq!(lines.next().unwrap().as_deref(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(lines.next().unwrap(), None, "blank lines are skipped");
        assert_eq!(lines.rest().as_deref(), Some(&b"{\"c\":3}"[..]));
        assert_eq!(lines.rest(), None);
    }

    #[test]
    fn a_line_over_16_mib_is_an_error() {
        let mut lines = Lines::default();
        let mib = vec![b'x'; 1 << 20];
        for _ in 0..16 {
            lines.push(&mib);
            assert_eq!(lines.next().unwrap(), None);
        }
        lines.push(b"x");
        let err = lines.next().unwrap_err();
        assert!(err.contains("longer than 16777216 bytes"), "{err}");

        let mut lines = Lines::default();
        lines.push(&vec![b'x'; MAX_LINE + 1]);
        lines.push(b"\n{}\n");
        let err = lines.next().unwrap_err();
        assert!(err.contains("16777217 bytes"), "{err}");
    }

    #[test]
    fn an_inline_token_shows_neither_in_debug_nor_in_errors() {
        let inline = |token: &str| KubeToken::Inline {
            token: token.into(),
            origin: "kubeconfig /k, user \"u\", token".into(),
        };
        assert!(!format!("{:?}", inline("sekret")).contains("sekret"));
        let err = authorization(&inline("bad\u{7f}sekret")).unwrap_err();
        assert!(
            err.contains("user \"u\"") && err.contains("not a token") && !err.contains("sekret"),
            "{err}"
        );
        let header = authorization(&inline(" abc\n")).unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer abc");
        assert!(header.is_sensitive());
    }

    #[test]
    fn refuses_plaintext_and_paths_and_names_the_flag() {
        let config = |url: &str| KubeConfig {
            url: url.into(),
            ca: KubeCa::File("/nonexistent".into()),
            token: None,
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
