//! The control plane as CA and as the guard of policy: who may get which certificate
//! (`IdentityService.Certify`: join tokens, Kubernetes service-account tokens through a
//! TokenReview stand-in, renewal with the current certificate), and who may change policy
//! (`PolicyService`, `TokenService`: the admin credential only).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tonic::Code;
use trellis_identity::SpiffeId;
use trellis_identity::tls::{CertInfo, Credentials};
use trellis_proto::pb::identity_service_client::IdentityServiceClient;
use trellis_proto::pb::policy_service_client::PolicyServiceClient;
use trellis_proto::pb::token_service_client::TokenServiceClient;
use trellis_proto::pb::{CertifyRequest, CertifyResponse, CreateTokenRequest, ListRequest};
use trellis_tests::harness::{ControlPlane, FakeApiServer};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Calls Certify for `identity` (NS/SA) over `channel`, with `token` as the bearer if any.
/// Returns the response and the key that goes with it.
async fn certify(
    channel: tonic::transport::Channel,
    identity: &str,
    token: Option<&str>,
) -> Result<(CertifyResponse, String), tonic::Status> {
    let (ns, sa) = identity.split_once('/').unwrap();
    let (key, csr) =
        trellis_identity::ca::new_key_and_csr(&SpiffeId::new("cluster.local", ns, sa)).unwrap();
    let mut req = tonic::Request::new(CertifyRequest {
        identity: identity.to_string(),
        csr_pem: csr,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let rsp = IdentityServiceClient::new(channel).certify(req).await?;
    Ok((rsp.into_inner(), key))
}

fn join_token(cp: &ControlPlane, identity: &str, ttl: &str) -> String {
    let out = cp.cli(&["token", "create", "--identity", identity, "--ttl", ttl]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn certify_signs_only_the_identity_the_caller_proves() {
    let dir = std::env::temp_dir().join(format!("trellis-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = HashMap::from([
        (
            "sa-token-shop-cart".to_string(),
            ("shop".into(), "cart".into(), vec!["trellis".to_string()]),
        ),
        (
            "sa-token-for-the-api".to_string(),
            (
                "shop".into(),
                "cart".into(),
                vec!["https://kubernetes.default.svc".to_string()],
            ),
        ),
    ]);
    let apiserver = FakeApiServer::start(&dir, tokens, "control-plane-own-token");
    let own_token = dir.join("own-token");
    std::fs::write(&own_token, "control-plane-own-token\n").unwrap();
    let cp = ControlPlane::start_with(
        "certify",
        &[
            "--cert-ttl",
            "1h",
            "--tokenreview-url",
            &apiserver.url,
            "--tokenreview-ca",
            &apiserver.ca_file.to_string_lossy(),
            "--tokenreview-token-file",
            &own_token.to_string_lossy(),
        ],
    );
    let join = join_token(&cp, "shop/cart", "1h");
    let expired = join_token(&cp, "shop/web", "1s");
    std::thread::sleep(Duration::from_millis(1100));
    let rt = rt();
    // Channels spawn their connection task on the runtime in context.
    let _guard = rt.enter();
    let call = |identity: &str, token: Option<&str>| {
        rt.block_on(certify(cp.channel(false), identity, token))
    };

    // No credential at all.
    let err = call("shop/cart", None).unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("no credential"), "{}", err.message());
    // A token nobody issued: not a join token, and the API server does not know it either.
    let err = call("shop/cart", Some("trellis-join-0000")).unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("invalid bearer token"),
        "{}",
        err.message()
    );
    // A valid join token, for another identity than the one asked for.
    let err = call("shop/web", Some(&join)).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("the join token proves shop/cart, but the request asks for shop/web"),
        "{}",
        err.message()
    );
    // An expired join token.
    let err = call("shop/web", Some(&expired)).unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());
    // A service-account token for another audience.
    let err = call("shop/cart", Some("sa-token-for-the-api")).unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("audience"), "{}", err.message());

    // The join token, reusable until it expires: a certificate whose only SAN is the identity.
    for _ in 0..2 {
        let (rsp, key) = call("shop/cart", Some(&join)).unwrap();
        assert_eq!(rsp.identity, "spiffe://cluster.local/ns/shop/sa/cart");
        let creds = Credentials::from_pem(
            rsp.certificate_chain_pem.as_bytes(),
            key.as_bytes(),
            rsp.trust_anchors_pem.as_bytes(),
        )
        .unwrap();
        let info = CertInfo::parse(&creds.chain[0]).unwrap();
        assert_eq!(info.uris, vec![rsp.identity.clone()]);
        assert!(info.dns_names.is_empty());
        let left = creds.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
    }
    // A Kubernetes service-account token, checked with TokenReview (audience trellis, the
    // control plane's own credential).
    let (rsp, key) = call("shop/cart", Some("sa-token-shop-cart")).unwrap();
    assert_eq!(rsp.identity, "spiffe://cluster.local/ns/shop/sa/cart");
    let reviews = apiserver.reviews.lock().unwrap().clone();
    let review = reviews
        .iter()
        .find(|r| r.token == "sa-token-shop-cart")
        .unwrap();
    assert_eq!(review.authorization, "Bearer control-plane-own-token");
    assert_eq!(review.audiences, vec!["trellis".to_string()]);

    // Renewal: the current certificate is the credential, no token needed; it proves only
    // its own identity.
    let creds = Credentials::from_pem(
        rsp.certificate_chain_pem.as_bytes(),
        key.as_bytes(),
        rsp.trust_anchors_pem.as_bytes(),
    )
    .unwrap();
    let with_cert = cp.channel_with(creds.client_config(&[b"h2"]).unwrap());
    let (renewed, _) = rt
        .block_on(certify(with_cert.clone(), "shop/cart", None))
        .unwrap();
    assert_eq!(renewed.identity, "spiffe://cluster.local/ns/shop/sa/cart");
    let err = rt
        .block_on(certify(with_cert, "kube-system/admin", None))
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("current certificate proves shop/cart")
    );

    // Refusals are counted by reason and logged; no token ever reaches the log.
    let m = cp.metrics();
    for reason in [
        "no-credential",
        "invalid-token",
        "wrong-identity",
        "expired-token",
    ] {
        assert!(
            m.sum(
                "trellis_control_certificates_total",
                &[("result", "rejected"), ("reason", reason)]
            ) >= 1.0,
            "{reason}: {}",
            m.text
        );
    }
    assert_eq!(
        m.sum(
            "trellis_control_certificates_total",
            &[("result", "issued")]
        ),
        4.0
    );
    let log = cp.log();
    assert!(log.contains("certificate request refused"), "{log}");
    for secret in [
        &join,
        &expired,
        "sa-token-shop-cart",
        "control-plane-own-token",
    ] {
        assert!(!log.contains(secret), "a token leaked into the log");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_the_admin_credential_may_change_policy_or_create_tokens() {
    let cp = ControlPlane::start("admin");
    let rt = rt();
    let _guard = rt.enter();
    // Without a credential: refused, with the reason.
    let err = rt
        .block_on(PolicyServiceClient::new(cp.channel(false)).list(ListRequest::default()))
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("requires the admin credential"),
        "{}",
        err.message()
    );
    let err = rt
        .block_on(
            TokenServiceClient::new(cp.channel(false)).create(CreateTokenRequest {
                identity: "default/web".into(),
                ttl_seconds: 60,
            }),
        )
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A workload certificate is not the admin credential either.
    let token = join_token(&cp, "default/web", "10m");
    let (rsp, key) = rt
        .block_on(certify(cp.channel(false), "default/web", Some(&token)))
        .unwrap();
    let workload = Credentials::from_pem(
        rsp.certificate_chain_pem.as_bytes(),
        key.as_bytes(),
        rsp.trust_anchors_pem.as_bytes(),
    )
    .unwrap();
    let err = rt
        .block_on(
            PolicyServiceClient::new(cp.channel_with(workload.client_config(&[b"h2"]).unwrap()))
                .list(ListRequest::default()),
        )
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message()
            .contains("spiffe://cluster.local/ns/default/sa/web does not hold it")
    );

    // The CLI on the control plane's host uses the state dir's credential by default...
    let file = cp.dir.join("p.yaml");
    std::fs::write(&file, "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {timeout: 1s}\n").unwrap();
    let out = cp.cli(&["apply", "-f", &file.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...or the admin token, by flag.
    let out = std::process::Command::new(trellis_tests::harness::control_bin())
        .args(["get", "--server", &cp.url, "--state-dir", "/nonexistent"])
        .arg("--ca-file")
        .arg(cp.dir.join("ca.pem"))
        .arg("--admin-token-file")
        .arg(cp.dir.join("admin-token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("web"));
    // Elsewhere, without it: refused, and nothing changed.
    let out = std::process::Command::new(trellis_tests::harness::control_bin())
        .args(["delete", "-f"])
        .arg(&file)
        .args(["--server", &cp.url, "--state-dir", "/nonexistent"])
        .arg("--ca-file")
        .arg(cp.dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("requires the admin credential"), "{stderr}");
    let out = cp.cli(&["get", "TrafficPolicy"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("web"));
    // A plaintext URL is refused by the CLI before anything is sent.
    let out = std::process::Command::new(trellis_tests::harness::control_bin())
        .args(["get", "--server", "http://127.0.0.1:1", "--state-dir"])
        .arg(&cp.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cp.metrics()
            .sum("trellis_control_unauthorized_calls_total", &[])
            >= 4.0
    );
}

#[test]
fn an_operators_ca_is_used_and_a_wrong_one_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("trellis-own-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_, cert, key) = trellis_identity::ca::Ca::generate("cluster.local").unwrap();
    std::fs::write(dir.join("tls.crt"), &cert).unwrap();
    std::fs::write(dir.join("tls.key"), &key).unwrap();
    let cp = ControlPlane::start_with(
        "own-ca",
        &[
            "--ca-cert",
            &dir.join("tls.crt").to_string_lossy(),
            "--ca-key",
            &dir.join("tls.key").to_string_lossy(),
        ],
    );
    // Workload certificates chain to the operator's CA; its key is not copied anywhere.
    let token = join_token(&cp, "default/web", "10m");
    let rt = rt();
    let _guard = rt.enter();
    let (rsp, key_pem) = rt
        .block_on(certify(cp.channel(false), "default/web", Some(&token)))
        .unwrap();
    assert_eq!(rsp.trust_anchors_pem, cert);
    Credentials::from_pem(
        rsp.certificate_chain_pem.as_bytes(),
        key_pem.as_bytes(),
        cert.as_bytes(),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(cp.dir.join("ca.pem")).unwrap(),
        cert
    );
    assert!(!cp.dir.join("ca-key.pem").exists());
    drop(cp);

    // A key that does not belong to the certificate: the control plane does not start, and
    // says why.
    let (_, _, other_key) = trellis_identity::ca::Ca::generate("cluster.local").unwrap();
    std::fs::write(dir.join("other.key"), &other_key).unwrap();
    let out = std::process::Command::new(trellis_tests::harness::control_bin())
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--ca-cert")
        .arg(dir.join("tls.crt"))
        .arg("--ca-key")
        .arg(dir.join("other.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ca-cert") && stderr.contains("does not belong to the CA certificate"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
