//! The server side of the mesh: recognising mesh TLS, terminating it, and deciding who may call.
//!
//! A connection whose first bytes are a TLS ClientHello offering a mesh ALPN (`trellis/*`) is
//! a peer proxy: the handshake requires a client certificate from the mesh trust anchors, and
//! the negotiated ALPN says what is inside (HTTP/2, HTTP/1.1 or opaque TCP), so nothing is
//! detected twice. Anything else is plaintext (including TLS the app itself speaks).
//!
//! The ServerPolicy selecting this workload and port decides (../shared/DESIGN.md "Scoping and
//! precedence"): none — permissive, allow all; `mtls: strict` refuses plaintext; `allow` admits
//! only the identities listed (exact, `spiffe://<td>/ns/<ns>/*`, or `*`), and never a plaintext
//! caller. A refused HTTP request gets 403 with `trellis-error: unauthorized` and the reason; a
//! refused opaque connection is closed. Every refusal is counted and logged with the peer.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use trellis_identity::SpiffeId;
use trellis_proto::policy::{Mtls, ServerPolicy};

/// The largest ClientHello we wait for (TLS allows 16 KiB records; hellos are far smaller).
const MAX_HELLO: usize = 16 * 1024;

/// Whether `buf` (extended with reads from `io` as needed) holds a ClientHello offering a mesh
/// ALPN. Reads nothing if the first byte is not a TLS handshake record.
pub async fn is_mesh_hello<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(verdict) = mesh_hello_verdict(buf) {
            return Ok(verdict);
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok(false),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// The verdict on a connection's first bytes: `Some(true)` for a ClientHello offering a mesh
/// ALPN, `Some(false)` for anything else, `None` for an incomplete ClientHello (read more).
///
/// Only the first [`MAX_HELLO`] bytes are judged, so the verdict never depends on how the bytes
/// were split across reads: once decided, more bytes cannot change it.
pub fn mesh_hello_verdict(buf: &[u8]) -> Option<bool> {
    if buf.first() != Some(&0x16) {
        return Some(false);
    }
    let judged = &buf[..buf.len().min(MAX_HELLO)];
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = judged;
    while !rest.is_empty() {
        if acceptor.read_tls(&mut rest).is_err() {
            return Some(false);
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(
            accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut protos| protos.any(|p| p.starts_with(b"trellis/"))),
        ),
        Ok(None) if judged.len() >= MAX_HELLO => Some(false),
        Ok(None) => None,
        Err(_) => Some(false),
    }
}

/// The ServerPolicy for `port` among those selecting this workload: one naming the port beats
/// one for every port.
pub fn policy_for(policies: &[ServerPolicy], port: u16) -> Option<&ServerPolicy> {
    policies
        .iter()
        .find(|p| p.port == Some(port))
        .or_else(|| policies.iter().find(|p| p.port.is_none()))
}

/// Whether a caller may use the port: `Ok`, or the reason it may not.
pub fn authorize(policy: Option<&ServerPolicy>, peer: Option<&SpiffeId>) -> Result<(), String> {
    let Some(policy) = policy else {
        return Ok(());
    };
    let name = format!("ServerPolicy {}/{}", policy.namespace, policy.name);
    let allowed: Vec<&String> = policy.allow.iter().flat_map(|a| &a.identities).collect();
    match peer {
        None if policy.mtls == Mtls::Strict => Err(format!(
            "plaintext refused: {name} requires mutual TLS (mtls: strict)"
        )),
        None if !allowed.is_empty() => Err(format!(
            "plaintext refused: {name} allows only listed mesh identities"
        )),
        None => Ok(()),
        Some(_) if allowed.is_empty() => Ok(()),
        Some(id) if allowed.iter().any(|pattern| id.matches(pattern)) => Ok(()),
        Some(id) => Err(format!("{id} is not allowed by {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::policy::PolicySet;

    fn policies(yaml: &str) -> Vec<ServerPolicy> {
        PolicySet::parse(yaml).unwrap().server
    }

    #[test]
    fn strict_permissive_and_allow() {
        let set = policies(
            "apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {name: web}\nspec: {port: 8080, mtls: strict, allow: [{identities: [\"spiffe://cluster.local/ns/shop/*\"]}]}\n---\napiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {name: rest}\nspec: {mtls: permissive}\n",
        );
        let web = policy_for(&set, 8080);
        assert_eq!(web.unwrap().name, "web");
        let shop = SpiffeId::new("cluster.local", "shop", "cart");
        let other = SpiffeId::new("cluster.local", "ads", "cart");
        assert!(authorize(web, Some(&shop)).is_ok());
        let err = authorize(web, Some(&other)).unwrap_err();
        assert!(
            err.contains("spiffe://cluster.local/ns/ads/sa/cart is not allowed"),
            "{err}"
        );
        assert!(
            authorize(web, None)
                .unwrap_err()
                .contains("plaintext refused")
        );
        let rest = policy_for(&set, 9090);
        assert_eq!(rest.unwrap().name, "rest");
        assert!(authorize(rest, None).is_ok());
        assert!(authorize(rest, Some(&other)).is_ok());
        assert!(authorize(None, None).is_ok());
    }

    #[tokio::test]
    async fn recognises_mesh_client_hellos_only() {
        trellis_identity::install_crypto_provider();
        let (ca, ..) = trellis_identity::ca::Ca::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "default", "web");
        let (issued, key) = ca.issue(&id, Duration::from_secs(60), &[], &[]).unwrap();
        let creds = trellis_identity::tls::Credentials::from_pem(
            issued.chain_pem.as_bytes(),
            key.as_bytes(),
            ca.bundle_pem().as_bytes(),
        )
        .unwrap();
        for (alpn, mesh) in [(&b"trellis/h2"[..], true), (&b"h2"[..], false)] {
            let config = creds.client_config(&[alpn]).unwrap();
            let mut conn = rustls::ClientConnection::new(
                config,
                rustls::pki_types::ServerName::try_from("10.0.0.1").unwrap(),
            )
            .unwrap();
            let mut hello = Vec::new();
            conn.write_tls(&mut hello).unwrap();
            // Delivered in two pieces: the rest is read from the connection.
            let mut buf = BytesMut::from(&hello[..10]);
            let mut rest = &hello[10..];
            assert_eq!(
                is_mesh_hello(&mut rest, &mut buf, Duration::from_secs(1))
                    .await
                    .unwrap(),
                mesh
            );
        }
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(
            !is_mesh_hello(&mut &b""[..], &mut buf, Duration::from_secs(1))
                .await
                .unwrap()
        );
    }
}
