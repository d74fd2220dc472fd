//! The mesh certificate authority: a signing certificate and key, generated on first start or
//! supplied by the operator (e.g. an intermediate from cert-manager), that issues short-lived
//! workload certificates.
//!
//! A workload certificate's only SAN is its SPIFFE URI, and that identity is always the one the
//! caller *proved* (a token or a current certificate): the CSR contributes its public key and
//! nothing else. The certificate is valid for both TLS server and client authentication, and
//! starts one minute in the past to tolerate clock skew between nodes.

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
    pub fn sign_csr(&self, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
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

    #[test]
    fn signs_csrs_for_the_proven_identity_only() {
        let (ca, cert_pem, key_pem) = Ca::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "cart");
        // The CSR asks for another identity: the certificate still names the proven one.
        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::default();
        req.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        )];
        let csr = req.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca.sign_csr(&csr, &id, Duration::from_secs(3600)).unwrap();
        let leaf = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let info = CertInfo::parse(&leaf).unwrap();
        assert_eq!(info.uris, vec![id.to_string()]);
        assert!(!info.is_ca);
        let left = info.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        assert_eq!(key.public_key_raw(), info.public_key.as_slice());

        // Reloading the stored CA works; a key from elsewhere is refused.
        Ca::load(&cert_pem, &key_pem, "cluster.local").unwrap();
        let other = KeyPair::generate().unwrap().serialize_pem();
        let err = Ca::load(&cert_pem, &other, "cluster.local").err().unwrap();
        assert!(err.to_string().contains("does not belong"), "{err}");
        assert!(ca.sign_csr("garbage", &id, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn pem_round_trips() {
        let der = b"\x00\x01\x02hello world, this is more than a line of base64 output ....";
        let pem = pem_encode("CERTIFICATE", der);
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der);
    }
}
