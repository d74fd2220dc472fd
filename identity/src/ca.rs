//! The mesh certificate authority: a signing certificate and key, generated on first start or
//! supplied by the operator (e.g. an intermediate from cert-manager), that issues short-lived
//! workload certificates.
//!
//! A workload certificate's only SAN is its SPIFFE URI, and that identity is always the one the
//! caller *proved* (a token or a current certificate): the CSR contributes its public key and
//! nothing else. A CSR that asks for more — another identity, a DNS name, an IP, a CA — is
//! refused with the reason rather than quietly narrowed, so a confused or hostile caller learns
//! that its request was wrong; so is one whose signature does not verify. The certificate is
//! valid for both TLS server and client authentication, and starts one minute in the past to
//! tolerate clock skew between nodes.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CA certificate is unusable: {0}")]
    BadCaCert(String),
    #[error("the CA key is unusable: {0}")]
    BadCaKey(String),
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A certificate with its chain, as PEM, and when it expires.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf first, then the CA chain.
    pub chain_pem: String,
    pub not_after: SystemTime,
}

pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and any parents, as given (PEM), appended to every issued chain.
    ca_chain_pem: String,
    /// The trust anchor workloads verify against: the last certificate of the CA chain.
    bundle_pem: String,
    not_after: SystemTime,
}

impl Ca {
    /// A new self-signed root for `trust_domain`, valid ten years. Returns the CA and its
    /// certificate and key as PEM, to be stored.
    pub fn generate(trust_domain: &str) -> Result<(Self, String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::BadCaKey(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            format!("Trellis mesh root CA ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let ca = Self::load(&cert_pem, &key_pem, trust_domain)?;
        Ok((ca, cert_pem, key_pem))
    }

    /// Loads a CA from PEM: `cert_pem` holds the signing certificate first and optionally its
    /// parents up to the root; `key_pem` the signing key (PKCS#8, SEC1 or PKCS#1).
    pub fn load(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, CaError> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CaError::BadCaCert(format!("not PEM certificates: {e}")))?;
        let first = certs
            .first()
            .ok_or_else(|| CaError::BadCaCert("no certificate found".into()))?;
        let info = crate::tls::CertInfo::parse(first).map_err(CaError::BadCaCert)?;
        if !info.is_ca {
            return Err(CaError::BadCaCert(
                "the first certificate is not a CA (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
        if info.not_after <= SystemTime::now() {
            return Err(CaError::BadCaCert(format!(
                "it expired at {}",
                humanize(info.not_after)
            )));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadCaKey(e.to_string()))?;
        if key.public_key_raw() != info.public_key.as_slice() {
            return Err(CaError::BadCaKey(
                "it does not belong to the CA certificate".into(),
            ));
        }
        let issuer =
            Issuer::from_ca_cert_der(first, key).map_err(|e| CaError::BadCaCert(e.to_string()))?;
        let pem = |c: &CertificateDer<'_>| pem_encode("CERTIFICATE", c);
        let ca_chain_pem = certs.iter().map(pem).collect::<String>();
        let bundle_pem = pem(certs.last().expect("non-empty"));
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            ca_chain_pem,
            bundle_pem,
            not_after: info.not_after,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors (PEM) workloads need to verify each other.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs the public key of `csr_pem` for `id`, valid `ttl` (capped at the CA's own expiry).
    /// The CSR must be signed by its own key and ask for nothing but `id` (or for no SAN).
    pub fn sign_csr(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<Issued, CaError> {
        let csr = parse_csr(csr_pem)?;
        check_csr_asks_only_for(&csr.params, id)?;
        let params = self.leaf_params(id, ttl, &[], &[])?;
        let not_after = to_system(params.not_after);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.ca_chain_pem),
            not_after,
        })
    }

    /// Issues a certificate and a fresh key for `id` (the control plane's own serving
    /// certificate and the admin credential), with extra DNS/IP SANs for non-mesh clients.
    /// Returns the issued chain and the key as PEM.
    pub fn issue(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        dns: &[String],
        ips: &[IpAddr],
    ) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let params = self.leaf_params(id, ttl, dns, ips)?;
        let not_after = to_system(params.not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let issued = Issued {
            chain_pem: format!("{}{}", cert.pem(), self.ca_chain_pem),
            not_after,
        };
        Ok((issued, key.serialize_pem()))
    }

    fn leaf_params(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        dns: &[String],
        ips: &[IpAddr],
    ) -> Result<CertificateParams, CaError> {
        let mut params = identity_params(id)?;
        for name in dns {
            let name = name
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(format!("DNS name {name:?}: {e}")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        let ttl = time::Duration::try_from(ttl).map_err(|e| CaError::Sign(e.to_string()))?;
        let ca_end = OffsetDateTime::from(self.not_after);
        params.not_after = (now + ttl).min(ca_end);
        Ok(params)
    }
}

/// Parses a PEM CSR and verifies its signature, saying in words what is wrong with a bad one.
fn parse_csr(pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    if !pem.contains("-----BEGIN CERTIFICATE REQUEST-----")
        && !pem.contains("-----BEGIN NEW CERTIFICATE REQUEST-----")
    {
        return Err(CaError::BadCsr(
            "it is not a PEM certificate request (expected -----BEGIN CERTIFICATE REQUEST-----)"
                .into(),
        ));
    }
    CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        CaError::BadCsr(match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "its signature does not verify with the public key it carries (tampered with, or signed with another key)".into()
            }
            rcgen::Error::CouldNotParseCertificationRequest => {
                "it cannot be parsed as a PKCS#10 certificate request".into()
            }
            rcgen::Error::UnsupportedExtension => {
                "it requests an extension a workload certificate cannot carry (only subjectAltName, keyUsage, extendedKeyUsage and basicConstraints are understood)".into()
            }
            rcgen::Error::UnsupportedSignatureAlgorithm => {
                "its key or signature algorithm is not supported (use ECDSA P-256/P-384, Ed25519 or RSA)".into()
            }
            other => other.to_string(),
        })
    })
}

/// Refuses a CSR that asks for anything a certificate for `id` will not hold.
fn check_csr_asks_only_for(csr: &CertificateParams, id: &SpiffeId) -> Result<(), CaError> {
    let wanted = id.to_string();
    let extra: Vec<String> = csr
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) if uri.as_str() == wanted => None,
            SanType::URI(uri) => Some(format!("URI {}", uri.as_str())),
            SanType::DnsName(name) => Some(format!("DNS name {}", name.as_str())),
            SanType::IpAddress(ip) => Some(format!("IP address {ip}")),
            SanType::Rfc822Name(mail) => Some(format!("email {}", mail.as_str())),
            _ => Some("another kind of name".to_string()),
        })
        .collect();
    if !extra.is_empty() {
        return Err(CaError::BadCsr(format!(
            "it asks for {}, but the caller proved {wanted} and a workload certificate names only that",
            extra.join(", ")
        )));
    }
    if matches!(csr.is_ca, IsCa::Ca(_)) {
        return Err(CaError::BadCsr(
            "it asks to be a CA (basicConstraints CA:TRUE); workload certificates never are".into(),
        ));
    }
    Ok(())
}

/// A fresh key (ECDSA P-256, never written anywhere) and a CSR for `id`, both PEM: what a
/// proxy sends to `Certify`.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
    let csr = identity_params(id)?
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok((key.serialize_pem(), csr))
}

/// An empty subject and `id` as the only SAN (a URI): what every workload certificate names.
fn identity_params(id: &SpiffeId) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    Ok(params)
}

fn to_system(t: OffsetDateTime) -> SystemTime {
    SystemTime::from(t)
}

pub(crate) fn humanize(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{secs} (unix)"))
}

/// PEM-encodes one DER object.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    const LINE: usize = 64;
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(LINE) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::CertInfo;

    /// A CSR (PEM) signed by `key` asking for `sans` (and to be a CA when `ca`).
    fn csr(key: &KeyPair, sans: Vec<SanType>, ca: bool) -> String {
        let mut req = CertificateParams::default();
        req.subject_alt_names = sans;
        if ca {
            req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        req.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn signs_csrs_for_the_proven_identity_only() {
        let (ca, cert_pem, key_pem) = Ca::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "cart");
        let key = KeyPair::generate().unwrap();
        // The CSR names the proven identity (or nothing): signed, for that identity only.
        for sans in [vec![uri(&id.to_string())], vec![]] {
            let issued = ca
                .sign_csr(&csr(&key, sans, false), &id, Duration::from_secs(3600))
                .unwrap();
            let leaf = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            let info = CertInfo::parse(&leaf).unwrap();
            assert_eq!(info.uris, vec![id.to_string()]);
            assert!(info.dns_names.is_empty());
            assert!(!info.is_ca);
            let left = info.not_after.duration_since(SystemTime::now()).unwrap();
            assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
            assert_eq!(key.public_key_raw(), info.public_key.as_slice());
        }

        // Reloading the stored CA works; a key from elsewhere is refused.
        Ca::load(&cert_pem, &key_pem, "cluster.local").unwrap();
        let other = KeyPair::generate().unwrap().serialize_pem();
        let err = Ca::load(&cert_pem, &other, "cluster.local").err().unwrap();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn refuses_csrs_that_ask_for_more_than_the_proven_identity() {
        let (ca, ..) = Ca::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "cart");
        let key = KeyPair::generate().unwrap();
        let ttl = Duration::from_secs(60);
        let refused = |pem: &str| ca.sign_csr(pem, &id, ttl).unwrap_err().to_string();
        let admin = uri("spiffe://cluster.local/ns/kube-system/sa/admin");
        let err = refused(&csr(&key, vec![admin], false));
        assert!(
            err.contains("asks for URI spiffe://cluster.local/ns/kube-system/sa/admin")
                && err.contains("proved spiffe://cluster.local/ns/shop/sa/cart"),
            "{err}"
        );
        let extra = vec![
            uri(&id.to_string()),
            SanType::DnsName("cart.shop.svc".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
        ];
        let err = refused(&csr(&key, extra, false));
        assert!(
            err.contains("asks for DNS name cart.shop.svc, IP address 10.0.0.1"),
            "{err}"
        );
        let err = refused(&csr(&key, vec![uri(&id.to_string())], true));
        assert!(err.contains("asks to be a CA"), "{err}");
        let err = refused("garbage");
        assert!(err.contains("not a PEM certificate request"), "{err}");
        // One bit of the signature flipped: it no longer verifies.
        let good = csr(&key, vec![uri(&id.to_string())], false);
        let mut der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        let err = refused(&pem_encode("CERTIFICATE REQUEST", &der));
        assert!(err.contains("signature does not verify"), "{err}");
    }

    #[test]
    fn pem_round_trips() {
        let der = b"\x00\x01\x02hello world, this is more than a line of base64 output ....";
        let pem = pem_encode("CERTIFICATE", der);
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der);
    }
}
