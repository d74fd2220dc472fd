//! The control plane as certificate authority: who may get which identity.
//!
//! On first start [`Authority::bootstrap`] generates a root CA in the state dir (`ca.pem`,
//! `ca-key.pem` 0600), unless the operator supplies one (`--ca-cert/--ca-key`, e.g. an
//! intermediate from cert-manager). It also writes the admin credential the CLI on this host
//! uses by default: a client certificate for `spiffe://<td>/ns/<ns>/sa/trellis-admin`
//! (`admin-cert.pem`, `admin-key.pem` 0600) and an admin token (`admin-token` 0600).
//!
//! [`Authority::certify`] signs a CSR for the identity the caller *proves*: its current mesh
//! certificate (renewal), a join token, or a Kubernetes service-account token (TokenReview).
//! A refusal says why, is logged with the peer address and counted; tokens are never logged.

pub mod tokenreview;
pub mod tokens;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tonic::Status;
use trellis_identity::SpiffeId;
use trellis_identity::ca::Ca;
use trellis_identity::tls::Credentials;
use trellis_proto::pb::{CertifyRequest, CertifyResponse};

use crate::admin::Metrics;
use crate::store::write_atomic;
use crate::tls::PeerInfo;
use tokenreview::{TokenReviewConfig, TokenReviewer};
use tokens::{Check, JoinTokens};

/// The control plane's own service account, part of the identity proxies verify.
pub const CONTROL_SA: &str = "trellis-control";
/// The service account of the admin credential.
pub const ADMIN_SA: &str = "trellis-admin";

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub trust_domain: String,
    /// The control plane's namespace (its identity: spiffe://<td>/ns/<namespace>/sa/trellis-control).
    pub namespace: String,
    /// Lifetime of workload certificates.
    pub cert_ttl: Duration,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Extra DNS names / IPs for the serving certificate (clients that verify names).
    pub extra_sans: Vec<String>,
    pub tokenreview: Option<TokenReviewConfig>,
}

pub struct Authority {
    ca: Ca,
    config: IdentityConfig,
    pub tokens: JoinTokens,
    reviewer: Option<TokenReviewer>,
    pub admin_identity: SpiffeId,
    admin_token_hash: String,
    pub control_identity: SpiffeId,
    serving: RwLock<Arc<CertifiedKey>>,
    metrics: Arc<Metrics>,
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    write_atomic(path, text.as_bytes(), mode)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

impl Authority {
    pub fn bootstrap(
        dir: &Path,
        config: IdentityConfig,
        grpc_addr: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let td = &config.trust_domain;
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
            || td.is_empty()
        {
            return Err(format!(
                "--trust-domain {td:?}: use lowercase letters, digits, '-', '.', '_'"
            ));
        }
        // Secrets an operator (or an older version) left readable by others are narrowed first.
        for name in [
            "ca-key.pem",
            "admin-key.pem",
            "admin-token",
            "join-tokens.json",
        ] {
            crate::store::private_file(&dir.join(name));
        }
        let ca = match (&config.ca_cert, &config.ca_key) {
            (Some(cert), Some(key)) => {
                let ca = Ca::load(&read(cert, "--ca-cert")?, &read(key, "--ca-key")?, td).map_err(
                    |e| {
                        format!(
                            "--ca-cert {} / --ca-key {}: {e}",
                            cert.display(),
                            key.display()
                        )
                    },
                )?;
                write(&dir.join("ca.pem"), ca.bundle_pem(), 0o644)?;
                tracing::info!(cert = %cert.display(), "using the operator's CA");
                ca
            }
            (None, None) => {
                let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
                if key_path.exists() {
                    Ca::load(
                        &read(&cert_path, "the CA")?,
                        &read(&key_path, "the CA key")?,
                        td,
                    )
                    .map_err(|e| format!("the CA in {}: {e}", dir.display()))?
                } else {
                    let (ca, cert, key) = Ca::generate(td).map_err(|e| e.to_string())?;
                    write(&key_path, &key, 0o600)?;
                    write(&cert_path, &cert, 0o644)?;
                    tracing::info!(path = %cert_path.display(), "generated the mesh root CA");
                    ca
                }
            }
            _ => return Err("--ca-cert and --ca-key go together".into()),
        };
        let admin_identity = SpiffeId::new(td, &config.namespace, ADMIN_SA);
        ensure_admin_cert(dir, &ca, &admin_identity)?;
        let token_path = dir.join("admin-token");
        let admin_token = match std::fs::read_to_string(&token_path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => {
                let t = tokens::random_secret("trellis-admin-");
                write(&token_path, &format!("{t}\n"), 0o600)?;
                t
            }
        };
        let reviewer = config
            .tokenreview
            .clone()
            .map(TokenReviewer::new)
            .transpose()?;
        let control_identity = SpiffeId::new(td, &config.namespace, CONTROL_SA);
        let serving = issue_serving(&ca, &control_identity, &config, grpc_addr)?;
        Ok(Arc::new(Self {
            tokens: JoinTokens::open(dir)?,
            reviewer,
            admin_identity,
            admin_token_hash: tokens::sha256_hex(&admin_token),
            control_identity,
            serving: RwLock::new(serving),
            ca,
            config,
            metrics,
        }))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// The TLS configuration of the gRPC port: the serving certificate (renewed in the
    /// background), client certificates optional (token callers have none) but verified.
    pub fn server_tls(
        self: &Arc<Self>,
        grpc_addr: SocketAddr,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let roots = Arc::new(
            trellis_identity::tls::roots_from_pem(self.ca.bundle_pem().as_bytes())
                .map_err(|e| format!("trust anchors: {e}"))?,
        );
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| e.to_string())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Serving(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // Renew the serving certificate at half its lifetime.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SERVING_TTL / 2).await;
                let Some(me) = me.upgrade() else { return };
                match issue_serving(&me.ca, &me.control_identity, &me.config, grpc_addr) {
                    Ok(key) => *me.serving.write().unwrap_or_else(|p| p.into_inner()) = key,
                    Err(e) => tracing::error!(error = %e, "cannot renew the serving certificate"),
                }
            }
        });
        Ok(Arc::new(config))
    }

    /// The mesh trust anchors (PEM): what proxies verify the control plane and each other with.
    pub fn ca_pem(&self) -> &str {
        self.ca.bundle_pem()
    }

    /// The TLS configuration of the admission webhook: the same serving certificate as the gRPC
    /// port (its DNS names come from `--tls-san`), TLS 1.2 or 1.3 as the API server likes, no
    /// client certificate.
    pub fn webhook_tls(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Serving(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Whether the caller holds the admin credential (certificate or token).
    pub fn is_admin(&self, peer: Option<&PeerInfo>, bearer: Option<&str>) -> bool {
        peer.and_then(|p| p.identity.as_ref()) == Some(&self.admin_identity)
            || bearer.is_some_and(|t| tokens::sha256_hex(t) == self.admin_token_hash)
    }

    /// Signs the caller's CSR for the identity it proves.
    pub async fn certify(
        &self,
        peer: Option<&PeerInfo>,
        bearer: Option<&str>,
        req: CertifyRequest,
    ) -> Result<CertifyResponse, Status> {
        let from = peer
            .and_then(|p| p.addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let result = self.authenticate(peer, bearer, &req.identity).await;
        let (id, how) = match result {
            Ok(ok) => ok,
            Err((reason, status)) => {
                self.metrics.certify("rejected", reason);
                tracing::warn!(peer = %from, requested = %req.identity, reason, error = %status.message(), "certificate request refused");
                return Err(status);
            }
        };
        let issued = self
            .ca
            .sign_csr(&req.csr_pem, &id, self.config.cert_ttl)
            .map_err(|e| {
                self.metrics.certify("rejected", "bad-csr");
                tracing::warn!(peer = %from, identity = %id, error = %e, "certificate request refused");
                Status::invalid_argument(e.to_string())
            })?;
        self.metrics.certify("issued", how);
        let not_after = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        tracing::info!(peer = %from, identity = %id, via = how, not_after, "certificate issued");
        Ok(CertifyResponse {
            identity: id.to_string(),
            certificate_chain_pem: issued.chain_pem,
            trust_anchors_pem: self.ca.bundle_pem().to_string(),
            not_after_unix: not_after,
        })
    }

    /// The identity the caller proves, and how; or (metric reason, status) if it proves none
    /// matching its request.
    async fn authenticate(
        &self,
        peer: Option<&PeerInfo>,
        bearer: Option<&str>,
        requested: &str,
    ) -> Result<(SpiffeId, &'static str), (&'static str, Status)> {
        let td = &self.config.trust_domain;
        let Some((ns, sa)) = requested.split_once('/') else {
            return Err((
                "bad-request",
                Status::invalid_argument(format!(
                    "identity {requested:?} is not NAMESPACE/SERVICE_ACCOUNT"
                )),
            ));
        };
        let wanted: SpiffeId = format!("spiffe://{td}/ns/{ns}/sa/{sa}").parse().map_err(
            |e: trellis_identity::spiffe::ParseError| {
                ("bad-request", Status::invalid_argument(e.to_string()))
            },
        )?;
        let check = |proven: SpiffeId, how: &'static str| {
            if proven == wanted {
                Ok((proven, how))
            } else {
                Err((
                    "wrong-identity",
                    Status::permission_denied(format!(
                        "the {how} proves {}, but the request asks for {}",
                        proven.short(),
                        wanted.short()
                    )),
                ))
            }
        };
        if let Some(current) = peer.and_then(|p| p.identity.clone()) {
            if current == self.admin_identity || current == self.control_identity {
                return Err((
                    "wrong-identity",
                    Status::permission_denied(
                        "the admin and control-plane identities cannot request workload certificates",
                    ),
                ));
            }
            return check(current, "current certificate");
        }
        let Some(token) = bearer else {
            return Err((
                "no-credential",
                Status::unauthenticated(
                    "no credential: send a join token or a service-account token as `authorization: Bearer <token>`, or renew with the current certificate",
                ),
            ));
        };
        match self.tokens.check(token) {
            Check::Valid { identity } => {
                let (ns, sa) = identity.split_once('/').unwrap_or(("", ""));
                return check(SpiffeId::new(td, ns, sa), "join token");
            }
            Check::Expired { identity, at } => {
                return Err((
                    "expired-token",
                    Status::unauthenticated(format!(
                        "the join token {} for {identity} expired at {} (unix); create a new one with `trellis-control token create`",
                        tokens::fingerprint(token),
                        at
                    )),
                ));
            }
            Check::Unknown => {}
        }
        let Some(reviewer) = &self.reviewer else {
            return Err((
                "unknown-token",
                Status::unauthenticated(format!(
                    "the token {} is not a join token this control plane issued (and TokenReview is not configured)",
                    tokens::fingerprint(token)
                )),
            ));
        };
        match reviewer.review(token).await {
            Ok((ns, sa)) => check(SpiffeId::new(td, &ns, &sa), "service-account token"),
            Err(e) => Err(("invalid-token", Status::unauthenticated(e))),
        }
    }
}

const SERVING_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const ADMIN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

struct Serving(Arc<Authority>);

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serving")
    }
}

impl ResolvesServerCert for Serving {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .serving
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The control plane's serving certificate: its SPIFFE ID, plus DNS names and IPs for clients
/// that verify names (the CLI, grpcurl, Python's grpcio).
fn issue_serving(
    ca: &Ca,
    id: &SpiffeId,
    config: &IdentityConfig,
    grpc_addr: SocketAddr,
) -> Result<Arc<CertifiedKey>, String> {
    let ns = &config.namespace;
    let mut dns = vec![
        "localhost".to_string(),
        CONTROL_SA.to_string(),
        format!("{CONTROL_SA}.{ns}"),
        format!("{CONTROL_SA}.{ns}.svc"),
        format!("{CONTROL_SA}.{ns}.svc.{}", config.trust_domain),
    ];
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if !grpc_addr.ip().is_unspecified() {
        ips.push(grpc_addr.ip());
    }
    for san in &config.extra_sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(san.clone()),
        }
    }
    let (issued, key) = ca
        .issue(id, SERVING_TTL, &dns, &ips)
        .map_err(|e| e.to_string())?;
    let creds = Credentials::from_pem(
        issued.chain_pem.as_bytes(),
        key.as_bytes(),
        ca.bundle_pem().as_bytes(),
    )?;
    creds.certified_key().map_err(|e| e.to_string())
}

/// Writes (or keeps, if still good for 30 days and from this CA) the admin client credential.
fn ensure_admin_cert(dir: &Path, ca: &Ca, id: &SpiffeId) -> Result<(), String> {
    let (cert_path, key_path) = (dir.join("admin-cert.pem"), dir.join("admin-key.pem"));
    if let (Ok(cert), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path))
        && let Ok(creds) = Credentials::from_pem(&cert, &key, ca.bundle_pem().as_bytes())
        && creds.identity == *id
        && creds.not_after > SystemTime::now() + Duration::from_secs(30 * 24 * 3600)
    {
        return Ok(());
    }
    let (issued, key) = ca
        .issue(id, ADMIN_TTL, &[], &[])
        .map_err(|e| e.to_string())?;
    write(&key_path, &key, 0o600)?;
    write(&cert_path, &issued.chain_pem, 0o644)?;
    tracing::info!(path = %cert_path.display(), identity = %id, "wrote the admin credential");
    Ok(())
}
