//! TLS for the mesh: credentials, the rustls configurations built from them, and reading
//! identities out of certificates.
//!
//! Stock rustls checks a server's DNS name, which a workload certificate does not have (its only
//! SAN is a `spiffe://` URI). The client side here verifies the chain against the mesh trust
//! anchors and leaves the identity check to the caller, which compares the peer's URI SAN with
//! the identity it expected right after the handshake, before a byte of application data is
//! sent ([`expect_identity`]). The server side verifies client chains with rustls's WebPKI
//! client verifier; who may call is decided after the handshake, by policy.
//!
//! Mesh connections are TLS 1.3 only; their ALPN names the protocol inside ([`ALPN_H2`],
//! [`ALPN_H1`], [`ALPN_TCP`]), so the server side never has to detect it again.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::SpiffeId;

/// HTTP (HTTP/1.1 and HTTP/2 requests alike) multiplexed as HTTP/2 between proxies.
pub const ALPN_H2: &[u8] = b"trellis/h2";
/// HTTP/1.1 between proxies, one client connection per mesh connection (protocol upgrades).
pub const ALPN_H1: &[u8] = b"trellis/h1";
/// Opaque TCP between proxies, one client connection per mesh connection.
pub const ALPN_TCP: &[u8] = b"trellis/tcp";
/// Every mesh ALPN, in the server's order of preference.
pub const MESH_ALPNS: [&[u8]; 3] = [ALPN_H2, ALPN_H1, ALPN_TCP];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// What the mesh needs to know about a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// The subject public key (the BIT STRING's content).
    pub public_key: Vec<u8>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                    _ => {}
                }
            }
        }
        let at = |t: i64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
        Ok(Self {
            uris,
            dns_names,
            not_before: at(cert.validity().not_before.timestamp()),
            not_after: at(cert.validity().not_after.timestamp()),
            is_ca: cert.is_ca(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }
}

/// The SPIFFE ID in a peer's leaf certificate, if it has exactly one workload URI SAN.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let info = CertInfo::parse(certs.first()?).ok()?;
    let mut ids = info.uris.iter().filter_map(|u| u.parse::<SpiffeId>().ok());
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// Why a verified peer is still not the one expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate has no workload SPIFFE ID")]
    NoIdentity,
    #[error("the peer is {actual}, not {expected}")]
    Mismatch { expected: String, actual: String },
}

/// Checks, after a handshake, that the peer is `expected` (a full SPIFFE ID).
pub fn expect_identity(
    certs: Option<&[CertificateDer<'_>]>,
    expected: &str,
) -> Result<SpiffeId, IdentityError> {
    let certs = certs
        .filter(|c| !c.is_empty())
        .ok_or(IdentityError::NoCertificate)?;
    let id = peer_identity(certs).ok_or(IdentityError::NoIdentity)?;
    if id.to_string() != expected {
        return Err(IdentityError::Mismatch {
            expected: expected.to_string(),
            actual: id.to_string(),
        });
    }
    Ok(id)
}

/// Trust anchors from PEM (one or more certificates).
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} is not a usable trust anchor: {e}", n + 1))?;
        n += 1;
    }
    if n == 0 {
        return Err("no certificate found".into());
    }
    Ok(roots)
}

/// A workload's credentials: its certificate chain and key, and the trust anchors it verifies
/// peers with.
pub struct Credentials {
    pub identity: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses and checks credentials: the leaf names exactly one workload SPIFFE ID, the key
    /// belongs to it, and the chain verifies against the anchors now.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], anchors_pem: &[u8]) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: not PEM: {e}"))?;
        let leaf = chain.first().ok_or("certificate: no certificate found")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
        let roots =
            Arc::new(roots_from_pem(anchors_pem).map_err(|e| format!("trust anchors: {e}"))?);
        let info = CertInfo::parse(leaf).map_err(|e| format!("certificate: {e}"))?;
        let identity = peer_identity(&chain).ok_or_else(|| {
            format!(
                "certificate: no workload SPIFFE ID among its URI SANs {:?}",
                info.uris
            )
        })?;
        let signer = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| format!("key: {e}"))?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signer);
        certified
            .keys_match()
            .map_err(|_| "key: it does not belong to the certificate".to_string())?;
        let parsed = ParsedCertificate::try_from(leaf).map_err(|e| format!("certificate: {e}"))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| format!("certificate: does not verify against the trust anchors: {e}"))?;
        Ok(Self {
            identity,
            chain,
            key,
            roots,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// The chain and signing key, for a rustls certificate resolver.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, rustls::Error> {
        let signer = provider()
            .key_provider
            .load_private_key(self.key.clone_key())?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signer,
        )))
    }

    /// A client configuration presenting these credentials and verifying servers against the
    /// trust anchors (identity checked by the caller, see [`expect_identity`]).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, rustls::Error> {
        client_config(
            self.roots.clone(),
            Some((self.chain.clone(), self.key.clone_key())),
            alpn,
        )
    }

    /// A server configuration presenting these credentials and requiring a client certificate
    /// that verifies against the trust anchors.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, rustls::Error> {
        server_config(
            self.roots.clone(),
            self.chain.clone(),
            self.key.clone_key(),
            true,
            alpn,
        )
    }
}

/// A TLS 1.3 client configuration verifying servers against `roots` (not their names).
pub fn client_config(
    roots: Arc<RootCertStore>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(MeshServerVerifier {
        roots,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS 1.3 server configuration; client certificates verify against `roots`, and are
/// required unless `require_client_cert` is false.
pub fn server_config(
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    require_client_cert: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = if require_client_cert {
        verifier.build()
    } else {
        verifier.allow_unauthenticated().build()
    }
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Verifies a server's chain against the mesh trust anchors; its SPIFFE ID is checked by the
/// caller after the handshake.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use std::time::Duration;

    fn creds(ca: &Ca, id: &SpiffeId) -> Credentials {
        let (issued, key) = ca.issue(id, Duration::from_secs(600), &[], &[]).unwrap();
        Credentials::from_pem(
            issued.chain_pem.as_bytes(),
            key.as_bytes(),
            ca.bundle_pem().as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn credentials_are_checked_against_their_anchors() {
        let (ca, ..) = Ca::generate("cluster.local").unwrap();
        let (other, ..) = Ca::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "default", "web");
        let c = creds(&ca, &id);
        assert_eq!(c.identity, id);
        assert_eq!(peer_identity(&c.chain), Some(id.clone()));
        assert!(expect_identity(Some(&c.chain), &id.to_string()).is_ok());
        assert_eq!(
            expect_identity(Some(&c.chain), "spiffe://cluster.local/ns/default/sa/db"),
            Err(IdentityError::Mismatch {
                expected: "spiffe://cluster.local/ns/default/sa/db".into(),
                actual: id.to_string()
            })
        );
        let (issued, key) = ca.issue(&id, Duration::from_secs(600), &[], &[]).unwrap();
        let err = Credentials::from_pem(
            issued.chain_pem.as_bytes(),
            key.as_bytes(),
            other.bundle_pem().as_bytes(),
        )
        .unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        let (_, other_key) = ca.issue(&id, Duration::from_secs(600), &[], &[]).unwrap();
        let err = Credentials::from_pem(
            issued.chain_pem.as_bytes(),
            other_key.as_bytes(),
            ca.bundle_pem().as_bytes(),
        )
        .unwrap_err();
        assert!(err.contains("does not belong"), "{err}");
        assert!(c.client_config(&[ALPN_H2]).is_ok());
        assert!(c.server_config(&MESH_ALPNS).is_ok());
    }
}
