//! Workload identities for the mesh.
//!
//! - [`spiffe`]: SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), parsing and the `allow`
//!   patterns of ServerPolicies;
//! - [`ca`]: the mesh certificate authority the control plane runs (generated or operator-supplied),
//!   which signs CSRs for an identity established elsewhere (never from the CSR itself);
//! - [`grpc`]: tonic channels to the control plane over TLS, checking its SPIFFE ID;
//! - [`tls`]: credentials (a certificate chain, its key, the trust anchors) and the rustls
//!   configurations built from them: TLS 1.3 only, chains verified against the mesh trust
//!   anchors, and the peer's SPIFFE ID read from its certificate's URI SAN.
//!
//! One crypto provider (aws-lc-rs) is used everywhere; [`install_crypto_provider`] installs it as
//! the process default so no other crate can bring a second one into play.

pub mod ca;
pub mod grpc;
pub mod spiffe;
pub mod tls;

pub use spiffe::SpiffeId;

/// Installs aws-lc-rs as the process's rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
