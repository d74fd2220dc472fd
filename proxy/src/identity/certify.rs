//! Certificates from the control plane's CA (`IdentityService.Certify`).
//!
//! The first certificate is requested with the token in `--identity-token-file` (re-read on
//! every request: Kubernetes rotates projected tokens); renewals authenticate with the current
//! certificate, so a token is needed only to join. The key is generated in memory for every
//! request and never written anywhere. Renewal starts at about 70 % of the lifetime (±5 %
//! jitter, so proxies started together do not renew together); a failure is retried with
//! jittered backoff (1 s doubling to 10 s) while the current certificate keeps serving. Once it
//! has expired, the token is used again.
//!
//! The control plane is reached over TLS only and must prove `--control-plane-identity`: a
//! token is never sent to anyone else, or over plaintext.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::metadata::MetadataValue;
use trellis_identity::SpiffeId;
use trellis_identity::grpc::{self, ServerCheck};
use trellis_identity::tls::Credentials;
use trellis_proto::pb::CertifyRequest;
use trellis_proto::pb::identity_service_client::IdentityServiceClient;

use super::Installer;

pub struct CertifyConfig {
    pub url: String,
    /// PEM trust anchors that verify the control plane (`--trust-anchors`).
    pub anchors_pem: Vec<u8>,
    /// The control plane's SPIFFE ID.
    pub control_identity: SpiffeId,
    pub token_file: Option<PathBuf>,
    /// The identity asked for.
    pub identity: SpiffeId,
}

/// Keeps the proxy's certificate current until the process exits.
pub async fn run(config: CertifyConfig, installer: Installer) {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(10);
    let mut backoff = FIRST;
    loop {
        match certify(&config, &installer).await {
            Ok(creds) => {
                backoff = FIRST;
                let lifetime = creds
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if let Err(e) = installer.install(&creds, "control plane") {
                    tracing::error!(error = %e, "cannot use the certificate issued");
                    installer.failed();
                    tokio::time::sleep(MAX).await;
                    continue;
                }
                let renew_in = lifetime.mul_f64(0.7 * (0.95 + 0.1 * fastrand::f64()));
                tracing::debug!(renew_in = ?renew_in, "next renewal");
                tokio::time::sleep(renew_in).await;
            }
            Err(e) => {
                installer.failed();
                let in_force = installer.current();
                // While a certificate is still in force, never wait more than a quarter of its
                // remaining life between attempts: with short lifetimes, the backoff alone could
                // outlast a CA outage shorter than the certificate.
                let mut cap = MAX;
                match &in_force {
                    Some(tls) if !tls.expired() => {
                        let left = tls
                            .not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        cap = (left / 4).clamp(Duration::from_millis(100), MAX);
                        tracing::warn!(url = %config.url, error = %e, expires_in = ?left, "certificate renewal failed; the current certificate stays in force");
                    }
                    Some(_) => {
                        tracing::error!(url = %config.url, error = %e, "certificate renewal failed and the current certificate has expired: mesh TLS fails until the CA answers")
                    }
                    None => {
                        tracing::warn!(url = %config.url, error = %e, "cannot obtain a certificate yet")
                    }
                }
                let wait = backoff.min(cap);
                let pause = Duration::from_millis(fastrand::u64(
                    wait.as_millis() as u64 / 2..=wait.as_millis() as u64,
                ));
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(MAX);
            }
        }
    }
}

/// One Certify call: with the current certificate while it is valid, else with the token.
async fn certify(config: &CertifyConfig, installer: &Installer) -> Result<Credentials, String> {
    let current = installer.current().filter(|t| !t.expired());
    let anchors = Arc::new(
        trellis_identity::tls::roots_from_pem(&config.anchors_pem)
            .map_err(|e| format!("--trust-anchors: {e}"))?,
    );
    let tls = match &current {
        Some(tls) => tls.client_grpc.clone(),
        None => trellis_identity::tls::client_config(anchors, None, &[b"h2"])
            .map_err(|e| e.to_string())?,
    };
    let expected = config.control_identity.clone();
    let check: ServerCheck = Arc::new(move |id: Option<SpiffeId>| match id {
        Some(id) if id == expected => Ok(()),
        other => Err(format!(
            "the control plane is {}, not {expected}",
            other.map_or("an unknown identity".into(), |i| i.to_string())
        )),
    });
    let channel = grpc::channel(&config.url, Arc::new(move || tls.clone()), check)?;
    let (key_pem, csr_pem) =
        trellis_identity::ca::new_key_and_csr(&config.identity).map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(CertifyRequest {
        identity: config.identity.short(),
        csr_pem,
    });
    req.set_timeout(Duration::from_secs(10));
    if current.is_none() {
        let path = config
            .token_file
            .as_ref()
            .ok_or("no certificate and no --identity-token-file to obtain one with")?;
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("--identity-token-file {}: {e}", path.display()))?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| format!("--identity-token-file {}: not a token", path.display()))?;
        req.metadata_mut().insert("authorization", value);
    }
    let rsp = IdentityServiceClient::new(channel)
        .certify(req)
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                format!("control plane unreachable: {}", grpc::status_cause(&s))
            }
            _ => format!("refused ({:?}): {}", s.code(), s.message()),
        })?
        .into_inner();
    Credentials::from_pem(
        rsp.certificate_chain_pem.as_bytes(),
        key_pem.as_bytes(),
        rsp.trust_anchors_pem.as_bytes(),
    )
    .map_err(|e| format!("the issued certificate is unusable: {e}"))
}
