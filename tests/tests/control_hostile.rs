//! Hostile input to the control plane, end to end with the real binary: malformed, truncated,
//! oversized and not-gRPC requests to its gRPC port, every policy field invalid through
//! `trellis-control apply`, and CSRs that ask for more than the caller proved. Each gets a
//! clear status naming what is wrong; nothing is issued or applied; bystanders are unaffected.
//!
//! Hostile peers of a pod (strict mTLS, the admin port, secrets) are in `security.rs`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::codegen::Service;
use trellis_proto::pb::identity_service_client::IdentityServiceClient;
use trellis_proto::pb::policy_service_client::PolicyServiceClient;
use trellis_proto::pb::{
    Ack, ApplyRequest, CertifyRequest, CertifyResponse, ProxyMessage, Subscribe, proxy_message,
};
use trellis_tests::harness::{ControlPlane, simulated_proxy};

/// A gRPC message frame: not compressed, `len` as its length prefix, then `body`.
fn frame(len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// POSTs `body` to `path` over `channel` (TLS, HTTP/2) with `content_type`: the HTTP status and
/// the gRPC status (from the headers of a trailers-only answer, else from the trailers).
async fn raw(
    channel: &tonic::transport::Channel,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, tonic::Status) {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("te", "trailers");
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
        .unwrap();
    let mut ch = channel.clone();
    std::future::poll_fn(|cx| Service::poll_ready(&mut ch, cx))
        .await
        .unwrap();
    let rsp = Service::call(&mut ch, req).await.unwrap();
    let (parts, body) = rsp.into_parts();
    let http = parts.status.as_u16();
    if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
        return (http, status);
    }
    let trailers = body
        .collect()
        .await
        .ok()
        .and_then(|c| c.trailers().cloned())
        .unwrap_or_default();
    let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status");
    (http, status)
}

/// A raw request and what must come back: (what, as admin, method, content-type, body, gRPC
/// status, HTTP status, what the message says).
type RawCase<'a> = (
    &'a str,
    bool,
    &'a str,
    Option<&'a str>,
    Vec<u8>,
    Code,
    u16,
    &'a str,
);

/// A proxy stream that subscribes as `workload`, acknowledges every snapshot and reports its
/// version.
async fn bystander(
    channel: tonic::transport::Channel,
    workload: &str,
    seen: mpsc::UnboundedSender<String>,
) {
    let subscribe = Subscribe {
        workload: workload.into(),
        ..Default::default()
    };
    simulated_proxy(channel, subscribe, None, move |version| {
        let _ = seen.send(version);
    })
    .await;
}

#[test]
fn hostile_grpc_gets_a_clear_status_and_harms_no_other_stream() {
    let cp = ControlPlane::start("hostile-grpc");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let anon = cp.channel(false);
        let admin = cp.channel(true);
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        tokio::spawn(bystander(cp.channel(false), "default/bystander", seen_tx));
        let first = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.unwrap();
        assert_eq!(first.as_deref(), Some("0"));
        // A TCP connection that never says anything, held open throughout.
        let _silent = tokio::net::TcpStream::connect(cp.url.trim_start_matches("https://")).await.unwrap();

        let mut seen_statuses = Vec::new();
        let mut expect = |what: &str, (http, status): (u16, tonic::Status), code: Code, http_status: u16, says: &str| {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert_eq!(http, http_status, "{what}: HTTP status");
            assert!(status.message().contains(says), "{what}: {:?} does not say {says:?}", status.message());
            seen_statuses.push(format!("{what}: {:?} {:?}", status.code(), status.message()));
        };
        // Bytes that do not parse as the message get the gRPC spec's INTERNAL; the admin check
        // of PolicyService comes before any decoding.
        let garbage = frame(8, &[0x0a, 0x04, 0xff, 0xfe, 0xfd, 0xfc, 0x12, 0x7f]);
        let (grpc, decode) = (Some("application/grpc"), "failed to decode Protobuf message");
        let subscribe_first = ProxyMessage { kind: Some(proxy_message::Kind::Ack(Ack::default())) };
        let bad_workload = ProxyMessage {
            kind: Some(proxy_message::Kind::Subscribe(Subscribe { workload: "../../etc".into(), ..Default::default() })),
        };
        let bad_pod_ip = ProxyMessage {
            kind: Some(proxy_message::Kind::Subscribe(Subscribe { workload: "default/x".into(), pod_ip: "\u{1b}[2J".into(), ..Default::default() })),
        };
        let encode = |m: &ProxyMessage| {
            let bytes = prost::Message::encode_to_vec(m);
            frame(bytes.len() as u32, &bytes)
        };
        let (certify, apply, stream) = (
            "IdentityService/Certify",
            "PolicyService/Apply",
            "ConfigService/Stream",
        );
        #[rustfmt::skip]
        let cases: Vec<RawCase> = vec![
            ("garbage protobuf", false, certify, grpc, garbage.clone(), Code::Internal, 200, decode),
            ("a 64 MiB length prefix", false, certify, grpc, frame(64 << 20, b"tiny"), Code::ResourceExhausted, 200, "the limit is: 4194304 bytes"),
            ("a truncated frame", false, certify, grpc, frame(100, &[0x0a; 10]), Code::Internal, 200, "Unexpected EOF"),
            ("text/plain", false, certify, Some("text/plain"), frame(0, b""), Code::InvalidArgument, 415, "content-type \"text/plain\" is not gRPC"),
            ("JSON", false, certify, Some("application/json"), frame(0, b""), Code::InvalidArgument, 415, "content-type \"application/json\" is not gRPC"),
            ("no content-type", false, certify, None, frame(0, b""), Code::InvalidArgument, 415, "no content-type is not gRPC"),
            ("garbage Apply, anonymous", false, apply, grpc, garbage.clone(), Code::Unauthenticated, 200, "requires the admin credential"),
            ("garbage Apply, admin", true, apply, grpc, garbage.clone(), Code::Internal, 200, decode),
            ("garbage Subscribe", false, stream, grpc, garbage.clone(), Code::Internal, 200, decode),
            ("an Ack first", false, stream, grpc, encode(&subscribe_first), Code::InvalidArgument, 200, "the first message must be a Subscribe"),
            ("a bad workload", false, stream, grpc, encode(&bad_workload), Code::InvalidArgument, 200, "Subscribe.workload \"../../etc\" is not NAMESPACE/NAME"),
            ("a bad pod IP", false, stream, grpc, encode(&bad_pod_ip), Code::InvalidArgument, 200, "Subscribe.pod_ip \"\\u{1b}[2J\" is not an IP address"),
        ];
        for (what, as_admin, method, ct, body, code, http, says) in cases {
            let channel = if as_admin { &admin } else { &anon };
            let answer = raw(channel, &format!("/trellis.v1.{method}"), ct, body).await;
            expect(what, answer, code, http, says);
        }
        // Real messages over the limit, from a real client.
        let huge = "#".repeat(5 << 20);
        let err = IdentityServiceClient::new(anon.clone())
            .certify(CertifyRequest { identity: "default/web".into(), csr_pem: huge.clone() })
            .await
            .unwrap_err();
        expect("5 MiB Certify", (200, err), Code::ResourceExhausted, 200, "decoded message length too large");
        let err = PolicyServiceClient::new(admin.clone())
            .apply(ApplyRequest { yaml: huge })
            .await
            .unwrap_err();
        expect("5 MiB Apply", (200, err), Code::ResourceExhausted, 200, "decoded message length too large");
        // Plaintext HTTP/2 on the TLS port: the handshake fails, the connection is closed.
        let mut plain = tokio::net::TcpStream::connect(cp.url.trim_start_matches("https://")).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert!(n == 0 || buf[0] == 0x15, "plaintext got an answer: {:?}", &buf[..n]);

        // The control plane is up, nothing was issued or applied, and the bystander's stream
        // still gets what an admin applies.
        let rsp = PolicyServiceClient::new(admin.clone())
            .apply(ApplyRequest { yaml: "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: after}\nspec: {timeout: 1s}\n".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rsp.version, 1, "a hostile Apply changed the version");
        assert_eq!(rsp.affected_proxies.len(), 1);
        let next = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.unwrap();
        assert_eq!(next.as_deref(), Some("1"), "the bystander missed the new version");
        for line in &seen_statuses {
            eprintln!("{line}");
        }
    });
    let m = cp.metrics();
    assert_eq!(
        m.sum(
            "trellis_control_certificates_total",
            &[("result", "issued")]
        ),
        0.0
    );
    assert_eq!(
        m.sum("trellis_control_proxies_connected", &[]),
        1.0,
        "{}",
        m.text
    );
    let log = cp.log();
    assert!(log.contains("TLS handshake refused"), "{log}");
    assert!(log.contains("refused a request that is not gRPC"), "{log}");
}

/// One invalid field per line, `DOCUMENT => the error it must produce (field path: reason)`;
/// documents are YAML flow mappings, `TP`/`SP` standing for the apiVersion and kind.
const INVALID_FIELDS: &str = r#"
{apiVersion: trellis.dev/v2, kind: TrafficPolicy, metadata: {name: v2}} => apiVersion: "trellis.dev/v2" is not supported
{apiVersion: trellis.dev/v1alpha1, kind: Gateway, metadata: {name: gw}} => kind: "Gateway" is not a policy kind
{TP, metadata: {name: Bad_Name}} => metadata.name: "Bad_Name" is not a valid name
{TP, metadata: {name: ns, namespace: Shop!}} => metadata.namespace: "Shop!" is not a valid name
{TP, metadata: {name: owner, owner: me}} => metadata.owner: unknown field
{TP, metadata: {name: t-spec}, spec: {timeouts: 1s}} => spec.timeouts: unknown field (did you mean timeout?)
{TP, metadata: {name: t-host}, spec: {destination: {host: "bad host!"}}} => spec.destination.host: "bad host!" is not a host name
{TP, metadata: {name: t-port}, spec: {destination: {host: a, port: 0}}} => spec.destination.port: 0 is not a port (1-65535)
{TP, metadata: {name: t-addr}, spec: {destination: {addresses: ["10.0.0.1"]}}} => spec.destination.addresses[0]: "10.0.0.1" is not ip:port
{TP, metadata: {name: t-ep}, spec: {destination: {host: a, endpoints: ["nowhere:80"]}}} => spec.destination.endpoints[0]: "nowhere:80" is not ip:port
{TP, metadata: {name: t-ep-alone}, spec: {destination: {endpoints: ["10.0.0.1:80"]}}} => spec.destination.endpoints: need a host or addresses
{TP, metadata: {name: t-dest}, spec: {destination: {hosts: [a]}}} => spec.destination.hosts: unknown field (did you mean host?)
{TP, metadata: {name: t-proto}, spec: {protocol: http3}} => spec.protocol: "http3" is not one of auto, http1, http2, grpc, opaque
{TP, metadata: {name: t-timeout}, spec: {timeout: fast}} => spec.timeout: "fast" is not a duration
{TP, metadata: {name: t-idle}, spec: {idleTimeout: 5}} => spec.idleTimeout: 5 is not a duration: write a unit
{TP, metadata: {name: t-max}, spec: {retries: {maxRetries: 11}}} => spec.retries.maxRetries: 11 is not a whole number from 0 to 10
{TP, metadata: {name: t-on}, spec: {retries: {on: connect-failure}}} => spec.retries.on: must be a list
{TP, metadata: {name: t-on-item}, spec: {retries: {on: [teapot]}}} => spec.retries.on[0]: "teapot" is not a retry condition
{TP, metadata: {name: t-per-try}, spec: {retries: {perTryTimeout: -1s}}} => spec.retries.perTryTimeout: "-1s" is not a duration
{TP, metadata: {name: t-base}, spec: {retries: {backoff: {base: soon}}}} => spec.retries.backoff.base: "soon" is not a duration
{TP, metadata: {name: t-bmax}, spec: {retries: {backoff: {max: 10}}}} => spec.retries.backoff.max: 10 is not a duration: write a unit
{TP, metadata: {name: t-border}, spec: {retries: {backoff: {base: 1s, max: 10ms}}}} => spec.retries.backoff: base 1s is larger than max 10ms
{TP, metadata: {name: t-pct}, spec: {retries: {budget: {percent: 101}}}} => spec.retries.budget.percent: 101 is not a number from 0 to 100
{TP, metadata: {name: t-mps}, spec: {retries: {budget: {minPerSecond: -1}}}} => spec.retries.budget.minPerSecond: -1 is not a whole number from 0 to 100000
{TP, metadata: {name: t-nonidem}, spec: {retries: {nonIdempotent: "yes"}}} => spec.retries.nonIdempotent: "yes" is not true or false
{TP, metadata: {name: t-buf}, spec: {retries: {bodyBufferBytes: 17000000}}} => spec.retries.bodyBufferBytes: 17000000 is not a whole number from 0 to 16777216
{TP, metadata: {name: t-cf}, spec: {ejection: {consecutiveFailures: 0}}} => spec.ejection.consecutiveFailures: 0 is not a whole number from 1 to 1000
{TP, metadata: {name: t-ebase}, spec: {ejection: {baseTime: x}}} => spec.ejection.baseTime: "x" is not a duration
{TP, metadata: {name: t-emax}, spec: {ejection: {maxTime: forever}}} => spec.ejection.maxTime: "forever" is not a duration
{TP, metadata: {name: t-mode}, spec: {tls: {mode: optional}}} => spec.tls.mode: "optional" is not one of mutual, disabled
{TP, metadata: {name: t-sid}, spec: {tls: {serverIdentity: reviews}}} => spec.tls.serverIdentity: "reviews" is not a SPIFFE ID
{SP, metadata: {name: s-sa}, spec: {selector: {serviceAccount: 42}}} => spec.selector.serviceAccount: 42 is not a string
{SP, metadata: {name: s-sel}, spec: {selector: {app: web}}} => spec.selector.app: unknown field
{SP, metadata: {name: s-port}, spec: {port: 65536}} => spec.port: 65536 is not a port (1-65535)
{SP, metadata: {name: s-mtls}, spec: {mtls: sometimes}} => spec.mtls: "sometimes" is not one of strict, permissive
{SP, metadata: {name: s-allow}, spec: {allow: everyone}} => spec.allow: "everyone" is not a list of {identities: [...]}
{SP, metadata: {name: s-rule}, spec: {allow: [{names: [web]}]}} => spec.allow[0].names: unknown field
{SP, metadata: {name: s-id}, spec: {allow: [{identities: [web]}]}} => spec.allow[0].identities[0]: "web" is not a SPIFFE ID
{SP, metadata: {name: s-opaque}, spec: {opaquePorts: [3306, 0]}} => spec.opaquePorts[1]: 0 is not a port (1-65535)
"#;

#[test]
fn every_policy_field_has_an_invalid_case_named_by_its_path_and_nothing_is_applied() {
    let cp = ControlPlane::start("policy-fields");
    let cases: Vec<(String, &str)> = INVALID_FIELDS
        .lines()
        .filter_map(|l| l.split_once(" => "))
        .map(|(doc, error)| {
            let doc = doc
                .replace(
                    "{TP,",
                    "{apiVersion: trellis.dev/v1alpha1, kind: TrafficPolicy,",
                )
                .replace(
                    "{SP,",
                    "{apiVersion: trellis.dev/v1alpha1, kind: ServerPolicy,",
                );
            (doc, error)
        })
        .collect();
    // One valid document among them: it must not be applied either.
    let mut docs: Vec<String> = cases.iter().map(|(d, _)| d.clone()).collect();
    docs.push("{apiVersion: trellis.dev/v1alpha1, kind: TrafficPolicy, metadata: {name: good}, spec: {timeout: 1s}}".into());
    let file = std::env::temp_dir().join(format!("trellis-fields-{}.yaml", std::process::id()));
    std::fs::write(&file, docs.join("\n---\n")).unwrap();
    let out = cp.cli(&["apply", "-f", &file.to_string_lossy()]);
    std::fs::remove_file(&file).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let reported: Vec<&str> = stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("document "))
        .collect();
    for (i, (_, error)) in cases.iter().enumerate() {
        let (doc, doc_colon) = (
            format!("document {} (", i + 1),
            format!("document {}: ", i + 1),
        );
        assert!(
            reported
                .iter()
                .any(|l| (l.contains(&doc) || l.contains(&doc_colon)) && l.contains(error)),
            "no {error:?} for document {} in:\n{stderr}",
            i + 1
        );
    }
    assert_eq!(
        reported.len(),
        cases.len(),
        "one error per document:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("{} error(s) in policy", cases.len())),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was applied"), "{stderr}");
    let listed = cp.cli(&["get"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("version 0") && !listed.contains("good"),
        "{listed}"
    );
    let m = cp.metrics();
    assert_eq!(
        m.sum(
            "trellis_control_apply_errors_total",
            &[("reason", "invalid")]
        ),
        1.0
    );
    eprintln!(
        "{} invalid fields, each reported with its path; nothing applied",
        cases.len()
    );
}

// ---- certificate signing requests ----

/// Runs openssl with `args` in `dir`; its output on failure.
fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CSR (PEM) for key `key` with the extensions `ext` (`-addext` values).
fn openssl_csr(dir: &Path, key: &str, ext: &[&str]) -> String {
    let mut args = vec!["req", "-new", "-key", key, "-subj", "/O=Trellis"];
    for e in ext {
        args.extend(["-addext", e]);
    }
    openssl(dir, &args)
}

/// The TLVs inside a DER SEQUENCE (`der` is the whole SEQUENCE).
fn der_children(der: &[u8]) -> Vec<Vec<u8>> {
    fn header(d: &[u8]) -> (usize, usize) {
        // (header length, content length)
        match d[1] {
            n if n < 0x80 => (2, n as usize),
            n => {
                let k = (n & 0x7f) as usize;
                (
                    2 + k,
                    d[2..2 + k].iter().fold(0, |a, b| (a << 8) | *b as usize),
                )
            }
        }
    }
    let (h, _) = header(der);
    let mut rest = &der[h..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (h, len) = header(rest);
        out.push(rest[..h + len].to_vec());
        rest = &rest[h + len..];
    }
    out
}

fn der_sequence(children: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = children.concat();
    let len = body.len();
    let mut out = vec![0x30];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend(body);
    out
}

fn csr_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

#[test]
fn csrs_that_ask_for_more_than_the_token_proves_get_nothing() {
    let cp = ControlPlane::start("csr");
    let out = cp.cli(&[
        "token",
        "create",
        "--identity",
        "default/web",
        "--ttl",
        "1h",
    ]);
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = std::env::temp_dir().join(format!("trellis-csr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for key in ["web.key", "other.key"] {
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                key,
            ],
        );
    }
    let web = "URI:spiffe://cluster.local/ns/default/sa/web";
    let san = |extra: &str| format!("subjectAltName={web}{extra}");
    let good = openssl_csr(&dir, "web.key", &[&san("")]);
    // Signed with the wrong key: web.key's request, other.key's signature over another body.
    let other = openssl_csr(&dir, "other.key", &[&san("")]);
    let (mine, theirs) = (
        der_children(&csr_der(&good)),
        der_children(&csr_der(&other)),
    );
    let wrong_key = der_sequence(&[mine[0].clone(), theirs[1].clone(), theirs[2].clone()]);
    let mut tampered = csr_der(&good);
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let pem = |der: &[u8]| trellis_identity::ca::pem_encode("CERTIFICATE REQUEST", der);
    let ca_pem = std::fs::read_to_string(cp.dir.join("ca.pem")).unwrap();
    let bad: Vec<(&str, String, &str)> = vec![
        (
            "another identity too",
            openssl_csr(
                &dir,
                "web.key",
                &[&san(",URI:spiffe://cluster.local/ns/kube-system/sa/admin")],
            ),
            "asks for URI spiffe://cluster.local/ns/kube-system/sa/admin",
        ),
        (
            "a DNS name",
            openssl_csr(&dir, "web.key", &[&san(",DNS:api.example.com")]),
            "asks for DNS name api.example.com",
        ),
        (
            "an IP",
            openssl_csr(&dir, "web.key", &[&san(",IP:10.0.0.1")]),
            "asks for IP address 10.0.0.1",
        ),
        (
            "another identity only",
            openssl_csr(
                &dir,
                "web.key",
                &["subjectAltName=URI:spiffe://cluster.local/ns/default/sa/db"],
            ),
            "asks for URI spiffe://cluster.local/ns/default/sa/db, but the caller proved spiffe://cluster.local/ns/default/sa/web",
        ),
        (
            "a CA",
            openssl_csr(
                &dir,
                "web.key",
                &[&san(""), "basicConstraints=critical,CA:TRUE"],
            ),
            "asks to be a CA",
        ),
        (
            "a tampered signature",
            pem(&tampered),
            "signature does not verify",
        ),
        (
            "another key's signature",
            pem(&wrong_key),
            "signature does not verify",
        ),
        (
            "not PEM",
            "hello, CA".into(),
            "not a PEM certificate request",
        ),
        ("empty", String::new(), "not a PEM certificate request"),
        ("a certificate", ca_pem, "not a PEM certificate request"),
        (
            "garbage in CSR armour",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAAAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .into(),
            "cannot be parsed",
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let call = |identity: &str, csr: &str| -> Result<CertifyResponse, tonic::Status> {
        let mut req = tonic::Request::new(CertifyRequest {
            identity: identity.into(),
            csr_pem: csr.into(),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        rt.block_on(IdentityServiceClient::new(cp.channel(false)).certify(req))
            .map(|r| r.into_inner())
    };
    for (what, csr, says) in &bad {
        let err = call("default/web", csr).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message()
                .contains("the certificate signing request is invalid")
                && err.message().contains(says),
            "{what}: {:?} does not say {says:?}",
            err.message()
        );
        eprintln!("{what}: {}", err.message());
    }
    // A request for another identity than the token's is refused before the CSR is read.
    let err = call("default/db", &good).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("the join token proves default/web, but the request asks for default/db")
    );
    let m = cp.metrics();
    assert_eq!(
        m.sum(
            "trellis_control_certificates_total",
            &[("result", "issued")]
        ),
        0.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "trellis_control_certificates_total",
            &[("result", "rejected"), ("reason", "bad-csr")]
        ),
        bad.len() as f64
    );
    // The same token and key with a proper CSR: issued, for the proven identity only.
    let rsp = call("default/web", &good).unwrap();
    assert_eq!(rsp.identity, "spiffe://cluster.local/ns/default/sa/web");
    let leaf = rsp
        .certificate_chain_pem
        .split("-----END CERTIFICATE-----")
        .next()
        .unwrap()
        .to_string()
        + "-----END CERTIFICATE-----\n";
    std::fs::write(dir.join("issued.pem"), leaf).unwrap();
    let text = openssl(
        &dir,
        &[
            "x509",
            "-in",
            "issued.pem",
            "-noout",
            "-ext",
            "subjectAltName,basicConstraints",
        ],
    );
    assert!(
        text.contains(web)
            && !text.contains("DNS:")
            && !text.contains("IP Address")
            && text.contains("CA:FALSE"),
        "{text}"
    );
    assert_eq!(
        cp.metrics().sum(
            "trellis_control_certificates_total",
            &[("result", "issued")]
        ),
        1.0
    );
    let log = cp.log();
    assert!(!log.contains(&token), "the join token leaked into the log");
    let _ = std::fs::remove_dir_all(&dir);
}
