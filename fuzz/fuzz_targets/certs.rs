//! Fuzz target `certs`: certificates, CSRs and SPIFFE IDs from outside.
//!
//! The first byte picks what the rest is fed to; parts are separated by `\n--8<--\n`:
//! - 0: `IdentityService.Certify` as the control plane runs it (`Authority::certify`), with a
//!   valid join token for `shop/cart`: part 1 is the requested identity, part 2 the CSR (PEM as
//!   is, anything else wrapped as the DER inside a `CERTIFICATE REQUEST` PEM block). An issued
//!   certificate must name exactly the identity the token proves, whatever the CSR says; the
//!   same request renewing with the admin identity must be refused.
//! - 1: a DER certificate read as the proxy reads a peer's (`CertInfo::parse`,
//!   `peer_identity`, `expect_identity`).
//! - 2: PEM credentials as `--identity-dir` and the CA loader read them
//!   (`Credentials::from_pem`, `roots_from_pem`, `Ca::load`).
//! - 3: SPIFFE IDs and `allow` patterns (`SpiffeId::from_str`, `matches`).
//!
//! Everything returns an error or a value; nothing may panic.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use trellis_control::identity::{Authority, IdentityConfig};
use trellis_control::tls::PeerInfo;
use trellis_identity::SpiffeId;
use trellis_identity::ca::{Ca, pem_encode};
use trellis_identity::tls::{
    CertInfo, Credentials, expect_identity, peer_identity, roots_from_pem,
};
use trellis_proto::pb::CertifyRequest;

const SEPARATOR: &[u8] = b"\n--8<--\n";
const PROVEN: &str = "spiffe://cluster.local/ns/shop/sa/cart";

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let parts = split(rest);
    match which % 4 {
        0 => certify(
            parts.first().copied().unwrap_or(b""),
            parts.get(1).copied().unwrap_or(b""),
        ),
        1 => peer_certificate(rest),
        2 => credentials(&parts),
        _ => spiffe(&parts),
    }
});

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        parts.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

struct Setup {
    runtime: Runtime,
    authority: Arc<Authority>,
    token: String,
}

/// One control plane (CA, join tokens) for the whole run, bootstrapped in a directory that is
/// removed again at once: nothing below reads it.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        trellis_identity::install_crypto_provider();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let dir = std::env::temp_dir().join(format!("trellis-fuzz-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a state dir");
        let config = IdentityConfig {
            trust_domain: "cluster.local".into(),
            namespace: "trellis-system".into(),
            cert_ttl: Duration::from_secs(24 * 3600),
            ca_cert: None,
            ca_key: None,
            extra_sans: Vec::new(),
            tokenreview: None,
        };
        let authority = Authority::bootstrap(
            &dir,
            config,
            "127.0.0.1:7443".parse().expect("an address"),
            Arc::new(trellis_control::admin::Metrics::default()),
        )
        .expect("the control plane's CA bootstraps");
        let (token, _) = authority
            .tokens
            .create("shop/cart", Duration::from_secs(3600))
            .expect("a join token");
        let _ = std::fs::remove_dir_all(&dir);
        Setup {
            runtime,
            authority,
            token,
        }
    })
}

fn certify(identity: &[u8], csr: &[u8]) {
    let setup = setup();
    let csr_pem = if csr.starts_with(b"-----BEGIN") {
        String::from_utf8_lossy(csr).into_owned()
    } else {
        pem_encode("CERTIFICATE REQUEST", csr)
    };
    let request = CertifyRequest {
        identity: String::from_utf8_lossy(identity).into_owned(),
        csr_pem,
    };
    let result = setup.runtime.block_on(setup.authority.certify(
        None,
        Some(&setup.token),
        request.clone(),
    ));
    match result {
        Err(status) => assert!(!status.message().is_empty(), "a refusal without a reason"),
        Ok(rsp) => {
            assert_eq!(
                request.identity, "shop/cart",
                "issued for a request the token does not prove"
            );
            assert_eq!(rsp.identity, PROVEN);
            let chain: Vec<_> = rustls_pem_certs(&rsp.certificate_chain_pem);
            let leaf = chain.first().expect("an issued chain has a leaf");
            let info = CertInfo::parse(leaf).expect("the issued leaf parses");
            assert_eq!(
                info.uris,
                [PROVEN],
                "the leaf names only the proven identity"
            );
            assert!(info.dns_names.is_empty(), "a CSR smuggled in a DNS name");
            assert!(!info.is_ca, "a workload certificate that is a CA");
            assert!(info.not_after > SystemTime::now());
            assert_eq!(
                peer_identity(&chain).map(|id| id.to_string()).as_deref(),
                Some(PROVEN)
            );
        }
    }
    // Renewal presenting the admin identity never gets a workload certificate.
    let admin = PeerInfo {
        addr: None,
        identity: Some(setup.authority.admin_identity.clone()),
    };
    let renewal = setup
        .runtime
        .block_on(setup.authority.certify(Some(&admin), None, request));
    assert!(
        renewal.is_err(),
        "the admin identity obtained a workload certificate"
    );
}

fn rustls_pem_certs(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("the issued chain is PEM")
}

fn peer_certificate(der: &[u8]) {
    let info = CertInfo::parse(der);
    let cert = rustls_pki_types::CertificateDer::from(der.to_vec());
    let id = peer_identity(std::slice::from_ref(&cert));
    if let Some(id) = &id {
        let info = info
            .as_ref()
            .expect("an identity from a certificate that does not parse");
        assert!(
            info.uris.contains(&id.to_string()),
            "{id} is not among {:?}",
            info.uris
        );
    }
    match expect_identity(Some(std::slice::from_ref(&cert)), PROVEN) {
        Ok(found) => assert_eq!(found.to_string(), PROVEN),
        Err(e) => assert!(id.as_ref().is_none_or(|id| id.to_string() != PROVEN), "{e}"),
    }
}

fn credentials(parts: &[&[u8]]) {
    let part = |i: usize| parts.get(i).copied().unwrap_or(b"");
    let _ = roots_from_pem(part(0));
    if let Ok(creds) = Credentials::from_pem(part(0), part(1), part(2)) {
        assert!(!creds.chain.is_empty());
        let _ = creds.certified_key();
    }
    if let (Ok(cert), Ok(key)) = (std::str::from_utf8(part(0)), std::str::from_utf8(part(1))) {
        let _ = Ca::load(cert, key, "cluster.local");
    }
}

fn spiffe(parts: &[&[u8]]) {
    let text = String::from_utf8_lossy(parts.first().copied().unwrap_or(b""));
    let pattern = String::from_utf8_lossy(parts.get(1).copied().unwrap_or(b""));
    match text.parse::<SpiffeId>() {
        Ok(id) => {
            assert_eq!(
                id.to_string(),
                text,
                "a SPIFFE ID prints differently than it parsed"
            );
            assert!(id.matches(&text) && id.matches("*"));
            let _ = id.matches(&pattern);
            let _ = id.short();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
