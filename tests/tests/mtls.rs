//! Mutual TLS between sidecars: identities from the control plane's CA, strict and permissive
//! servers, `allow`, the peer-identity header, probes through the admin port, and rotation.
//!
//! Every pod's sidecar joins with a join token and gets its certificate before `/ready`. Real TLS
//! peers check what is on the wire: `openssl s_client` from a pod without a sidecar (an
//! "outsider", as a kubelet or a non-meshed client would be).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use trellis_tests::harness::{Capture, CurlResult, Mesh, Pod, contains, wait_for};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

struct Meshed {
    mesh: Mesh,
    control: Pod,
    server: Pod,
    client: Pod,
    state: PathBuf,
}

/// The server's probes as the injector would declare them (`--probes`): the only probe paths its
/// admin port serves beyond loopback.
const SERVER_PROBES: &str =
    "/probe/http/8080/headers?x=1,/probe/http/8080/status/503,/probe/tcp/9000,/probe/tcp/9999";

/// A control plane, a server pod (HTTP app on 8080, TCP echo on 9000, admin on 0.0.0.0:4191,
/// probes `SERVER_PROBES` declared) and a client pod, both meshed; `policy` (with SERVER replaced by the server's IP) applied
/// and acknowledged before returning.
fn meshed(test: &str, control_args: &[&str], policy: &str) -> Option<Meshed> {
    let mesh = Mesh::new(test)?;
    let control = mesh.pod("control");
    let state = mesh.log_dir().join("control-state");
    control.start_control_plane_with(&state, control_args);
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.spawn_app(&["tcp-echo", "--listen", "0.0.0.0:9000"]);
    let mut flags = control.mesh_flags(&mesh, "default/server", "server");
    flags.extend([
        "--admin-addr".into(),
        "0.0.0.0:4191".into(),
        "--probes".into(),
        SERVER_PROBES.into(),
    ]);
    server.start_sidecar(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let client = mesh.pod("client");
    let flags = control.mesh_flags(&mesh, "default/client", "client");
    client.start_sidecar(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let m = Meshed {
        mesh,
        control,
        server,
        client,
        state,
    };
    m.apply(policy);
    Some(m)
}

impl Meshed {
    fn apply(&self, policy: &str) {
        let yaml = policy.replace("SERVER", &self.server.ip.to_string());
        let file = self.mesh.write_file("policy.yaml", &yaml);
        let out = self
            .control
            .control(&["apply", "--wait", "-f", &file.to_string_lossy()]);
        assert!(
            out.status.success(),
            "apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What the server's TCP echo app sent back to the client for `data`.
    fn echo(&self, data: &str) -> String {
        let out = self.client.testapp(&[
            "tcp-call",
            "--connect",
            &self.server.addr(9000).to_string(),
            "--send",
            data,
        ]);
        out["received"].as_str().unwrap_or_default().to_string()
    }

    fn get(&self, path: &str) -> CurlResult {
        self.client.curl(&[&self.server.url(8080, path)])
    }
}

/// TrafficPolicies asking for mutual TLS to the server (HTTP on 8080, opaque TCP on 9000).
fn mtls_to_server(server_identity: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: server-http}}
spec:
  destination: {{addresses: [\"SERVER:8080\"]}}
  tls: {{mode: mutual, serverIdentity: {server_identity}}}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: server-tcp}}
spec:
  destination: {{addresses: [\"SERVER:9000\"]}}
  protocol: opaque
  tls: {{mode: mutual, serverIdentity: {server_identity}}}
"
    )
}

fn server_policy(mtls: &str, allow: Option<&str>) -> String {
    let allow = allow
        .map(|id| format!("\n  allow:\n    - identities: [\"{id}\"]"))
        .unwrap_or_default();
    format!(
        "---
apiVersion: trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {{name: server}}
spec:
  selector: {{serviceAccount: server}}
  mtls: {mtls}{allow}
"
    )
}

fn strict_mesh() -> String {
    mtls_to_server(SERVER_ID) + &server_policy("strict", None)
}

/// Runs a shell command in `pod`, returning (success, stdout + stderr).
fn sh(pod: &Pod, script: &str) -> (bool, String) {
    let out = pod.exec("sh", &["-c", script]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A TCP echo call from `from` to `server`'s port 9000 is closed (or reset) before `data`
/// comes back.
fn assert_tcp_refused(from: &Pod, server: &Pod, data: &str) {
    let out = from.exec(
        &trellis_tests::harness::testapp_bin().to_string_lossy(),
        &[
            "tcp-call",
            "--connect",
            &server.addr(9000).to_string(),
            "--send",
            data,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains(&format!("\"received\":\"{data}\"")),
        "the echo came back: {stdout}"
    );
}

fn headers_seen(rsp: &CurlResult) -> serde_json::Value {
    let body: serde_json::Value =
        serde_json::from_str(&rsp.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", rsp.body));
    body["headers"].clone()
}

#[test]
fn meshed_calls_are_mutual_tls_and_the_app_sees_the_callers_identity() {
    let Some(m) = meshed("mtls_basic", &[], &strict_mesh()) else {
        return;
    };
    // HTTP/1.1 from the app; a forged identity header is replaced by the verified one. What
    // crosses the bridge is TLS: the mesh ALPN in the ClientHello, then nothing readable.
    let capture = Capture::start(m.mesh.hub(), Duration::from_secs(2));
    let rsp = m.client.curl(&[
        "-H",
        "trellis-peer-identity: spiffe://cluster.local/ns/kube-system/sa/admin",
        &m.server.url(8080, "/headers"),
    ]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let headers = headers_seen(&rsp);
    assert_eq!(headers["trellis-peer-identity"], CLIENT_ID, "{headers}");
    let wire = capture.finish();
    assert!(
        contains(&wire, b"trellis/h2"),
        "no mesh ClientHello on the wire"
    );
    assert!(
        contains(&wire, &[0x17, 0x03, 0x03]),
        "no TLS application data records on the wire"
    );
    for plaintext in [&b"/headers"[..], b"kube-system", CLIENT_ID.as_bytes()] {
        assert!(
            !contains(&wire, plaintext),
            "{:?} crossed the wire in clear",
            String::from_utf8_lossy(plaintext)
        );
    }
    assert!(headers.get("trellis-orig-proto").is_none(), "{headers}");
    // It reached the app as HTTP/1.1 although it crossed the mesh as HTTP/2.
    let body: serde_json::Value = serde_json::from_str(&rsp.body).unwrap();
    assert_eq!(body["version"], "HTTP/1.1");

    // HTTP/2 and opaque TCP ride mutual TLS too.
    let rsp = m
        .client
        .curl(&["--http2-prior-knowledge", &m.server.url(8080, "/headers")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(headers_seen(&rsp)["trellis-peer-identity"], CLIENT_ID);
    assert_eq!(m.echo("over mtls"), "over mtls");

    // The server proxy counts the requests by peer identity, over TLS.
    let s = m.server.metrics();
    let by_client = s.sum(
        "trellis_requests_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", CLIENT_ID),
        ],
    );
    assert_eq!(by_client, 2.0, "{}", s.text);
    assert_eq!(
        s.sum("trellis_requests_total", &[("tls", "false")]),
        0.0,
        "nothing arrived in plaintext"
    );
    let c = m.client.metrics();
    assert_eq!(
        c.sum(
            "trellis_requests_total",
            &[("direction", "outbound"), ("peer_identity", SERVER_ID)]
        ),
        2.0,
        "{}",
        c.text
    );

    // A thousand new client connections cost a handful of proxy-to-proxy handshakes: the HTTP
    // requests of every client connection share the pooled HTTP/2 connection.
    let before = m
        .server
        .metrics()
        .sum("trellis_tls_handshakes_total", &[("direction", "inbound")]);
    let load = m.client.testapp(&[
        "load",
        "--url",
        &m.server.url(8080, "/"),
        "--requests",
        "1000",
        "--concurrency",
        "20",
        "--fresh-connections",
    ]);
    assert_eq!(load["failed"], 0, "{load}");
    let s = m.server.metrics();
    let handshakes = s.sum("trellis_tls_handshakes_total", &[("direction", "inbound")]) - before;
    let client_conns = m.client.metrics().sum(
        "trellis_tcp_connections_opened_total",
        &[("direction", "outbound")],
    );
    eprintln!(
        "client connections accepted by the client proxy: {client_conns}; new proxy-to-proxy handshakes: {handshakes}"
    );
    assert!(client_conns >= 1000.0, "{client_conns}");
    assert!(
        handshakes <= 2.0,
        "{handshakes} handshakes for 1000 connections"
    );
}

#[test]
fn openssl_sees_the_spiffe_certificate_and_strict_refuses_other_clients() {
    let Some(m) = meshed("mtls_openssl", &[], &strict_mesh()) else {
        return;
    };
    let outsider = m.mesh.pod("outsider");
    let target = m.server.addr(8080).to_string();
    let ca = m.state.join("ca.pem");
    // The server certificate names the server's SPIFFE ID, and only it.
    let (_, out) = sh(
        &outsider,
        &format!(
            "echo | openssl s_client -connect {target} -alpn trellis/h2 -tls1_3 -CAfile {ca} -showcerts 2>&1 \
             | openssl x509 -noout -ext subjectAltName",
            ca = ca.display()
        ),
    );
    assert!(out.contains(&format!("URI:{SERVER_ID}")), "{out}");
    assert!(!out.contains("DNS:"), "{out}");

    // Without a client certificate: the handshake is refused (TLS 1.3 alert 116).
    let (_, out) = sh(
        &outsider,
        &format!(
            "(sleep 1; echo) | openssl s_client -connect {target} -alpn trellis/h2 -CAfile {ca} 2>&1",
            ca = ca.display()
        ),
    );
    assert!(
        out.contains("certificate required") || out.contains("alert number 116"),
        "{out}"
    );
    let refused = m.server.metrics().sum(
        "trellis_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "error")],
    );
    assert!(refused >= 1.0);

    // With a certificate for a mesh identity from the mesh CA: accepted.
    let ca_obj = trellis_identity::ca::Ca::load(
        &std::fs::read_to_string(&ca).unwrap(),
        &std::fs::read_to_string(m.state.join("ca-key.pem")).unwrap(),
        "cluster.local",
    )
    .unwrap();
    let id = trellis_identity::SpiffeId::new("cluster.local", "default", "client");
    // openssl s_client from the outsider presenting a certificate for `id` from `issuer`.
    let present = |issuer: &trellis_identity::ca::Ca, name: &str| {
        let (issued, key) = issuer
            .issue(&id, Duration::from_secs(300), &[], &[])
            .unwrap();
        let cert_file = m
            .mesh
            .write_file(&format!("{name}-cert.pem"), &issued.chain_pem);
        let key_file = m.mesh.write_file(&format!("{name}-key.pem"), &key);
        sh(
            &outsider,
            &format!(
                "(sleep 1; echo) | openssl s_client -connect {target} -alpn trellis/h2 -CAfile {ca} -cert {} -key {} 2>&1",
                cert_file.display(),
                key_file.display(),
                ca = ca.display()
            ),
        )
        .1
    };
    let out = present(&ca_obj, "good");
    assert!(out.contains("ALPN protocol: trellis/h2"), "{out}");
    assert!(!out.contains("certificate required"), "{out}");

    // The same identity from another CA: refused.
    let (other_ca, ..) = trellis_identity::ca::Ca::generate("cluster.local").unwrap();
    let out = present(&other_ca, "other");
    assert!(
        out.contains("unknown ca")
            || out.contains("alert number 48")
            || out.contains("alert number 51")
            || out.contains("bad certificate"),
        "{out}"
    );
    let log = m.server.proxy_log();
    assert!(log.contains("mesh TLS handshake refused"), "{log}");
}

#[test]
fn plaintext_is_refused_by_strict_servers_and_served_by_permissive_ones() {
    let Some(m) = meshed("mtls_plaintext", &[], &strict_mesh()) else {
        return;
    };
    let outsider = m.mesh.pod("outsider");
    // A plaintext caller that forges the identity header.
    let forged = [
        "-H",
        "trellis-peer-identity: spiffe://cluster.local/ns/default/sa/client",
    ];
    let url = m.server.url(8080, "/headers");
    let rsp = outsider.curl(&[&forged[..], &[url.as_str()]].concat());
    assert_eq!(rsp.status, 403, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("unauthorized"));
    assert!(rsp.body.contains("plaintext refused"), "{}", rsp.body);
    // Opaque plaintext is closed.
    assert_tcp_refused(&outsider, &m.server, "hello");
    let s = m.server.metrics();
    assert!(
        s.sum(
            "trellis_proxy_errors_total",
            &[("direction", "inbound"), ("cause", "unauthorized")]
        ) >= 2.0,
        "{}",
        s.text
    );
    let log = m.server.proxy_log();
    assert!(
        log.contains("plaintext connection refused")
            && log.contains("request refused")
            && log.contains(&outsider.ip.to_string()),
        "the refusal names the peer: {log}"
    );

    // Permissive: plaintext is served, and the forged header never reaches the app.
    m.apply(&(mtls_to_server(SERVER_ID) + &server_policy("permissive", None)));
    let rsp = outsider.curl(&[&forged[..], &[url.as_str()]].concat());
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert!(
        headers_seen(&rsp).get("trellis-peer-identity").is_none(),
        "{}",
        rsp.body
    );
    // Meshed callers still arrive with their identity.
    assert_eq!(
        headers_seen(&m.get("/headers"))["trellis-peer-identity"],
        CLIENT_ID
    );
}

#[test]
fn only_allowed_identities_get_in() {
    let policy = mtls_to_server(SERVER_ID)
        + &server_policy(
            "strict",
            Some("spiffe://cluster.local/ns/default/sa/frontend"),
        );
    let Some(m) = meshed("mtls_allow", &[], &policy) else {
        return;
    };
    let rsp = m.get("/headers");
    assert_eq!(rsp.status, 403, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("unauthorized"));
    assert!(
        rsp.body.contains(&format!(
            "{CLIENT_ID} is not allowed by ServerPolicy default/server"
        )),
        "{}",
        rsp.body
    );
    assert_tcp_refused(&m.client, &m.server, "let me in");
    assert_eq!(
        m.server.metrics().sum(
            "trellis_requests_total",
            &[("direction", "inbound"), ("status", "200")]
        ),
        0.0
    );
    // A namespace wildcard admits the client.
    m.apply(
        &(mtls_to_server(SERVER_ID)
            + &server_policy("strict", Some("spiffe://cluster.local/ns/default/*"))),
    );
    assert_eq!(m.get("/headers").status, 200);
}

#[test]
fn a_server_that_is_not_the_expected_identity_gets_nothing() {
    let impostor = "spiffe://cluster.local/ns/default/sa/payments";
    let Some(m) = meshed(
        "mtls_mismatch",
        &[],
        &(mtls_to_server(impostor) + &server_policy("strict", None)),
    ) else {
        return;
    };
    let rsp = m.get("/headers");
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("tls-identity-mismatch"));
    assert!(
        rsp.body
            .contains(&format!("the peer is {SERVER_ID}, not {impostor}")),
        "{}",
        rsp.body
    );
    assert_eq!(
        m.server
            .metrics()
            .sum("trellis_requests_total", &[("direction", "inbound")]),
        0.0,
        "nothing reached the app"
    );
    assert_eq!(
        m.client.metrics().sum(
            "trellis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "identity-mismatch")]
        ),
        1.0
    );
}

#[test]
fn probes_through_the_admin_port_reach_an_app_behind_a_strict_server() {
    let Some(m) = meshed("mtls_probes", &[], &strict_mesh()) else {
        return;
    };
    let kubelet = m.mesh.pod("kubelet");
    let probe = |path: &str| kubelet.curl(&[&m.server.url(4191, path)]);
    // The app's own port refuses the kubelet (plaintext)...
    assert_eq!(kubelet.curl(&[&m.server.url(8080, "/headers")]).status, 403);
    // ...its declared probes, rewritten to the admin port, reach it: the app's answer as it is.
    let rsp = probe("/probe/http/8080/headers?x=1");
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let body: serde_json::Value = serde_json::from_str(&rsp.body).unwrap();
    assert_eq!(body["uri"], "/headers?x=1");
    assert_eq!(probe("/probe/http/8080/status/503").status, 503);
    assert_eq!(probe("/probe/tcp/9000").status, 200);
    assert_eq!(
        probe("/probe/tcp/9999").status,
        503,
        "declared, nothing listens"
    );

    // Any other probe path from another pod is refused, naming why: the admin port (open on
    // the pod IP for kubelet) is no way around the strict server to the app's loopback ports.
    let undeclared = [
        "/probe/http/8080/headers",
        "/probe/http/8080/headers?x=2",
        "/probe/http/8080/headers?x=1&y=2",
        "/probe/http/8080/status/200",
        "/probe/http/9000/",
        "/probe/tcp/8080",
        "/probe/tcp/22",
        "/probe/grpc/8080",
        "/probe/http/8080/flaky?key=sneak&fail=100",
        "/probe/http/8080/flaky?key=sneak&fail=100",
        "/probe/http/8080/flaky?key=sneak&fail=100",
    ];
    for path in undeclared {
        let rsp = probe(path);
        assert_eq!(rsp.status, 403, "{path}: {rsp:?}");
        assert!(
            rsp.body.contains(&format!("probe not declared: {path};"))
                && rsp.body.contains("TRELLIS_PROBES"),
            "{path}: {}",
            rsp.body
        );
    }
    // None of them reached the app: its per-key counter sees the first /flaky call only now,
    // from loopback (inside the pod, as the pod itself or kubectl exec), where any probe path
    // works.
    let (status, body) = m
        .server
        .admin_get("/probe/http/8080/flaky?key=sneak&fail=100");
    assert_eq!(
        (status, body.as_str()),
        (503, "failure 1 from server\n"),
        "the 3 refused /flaky probes must not have reached the app"
    );
    let (status, body) = m.server.admin_get("/probe/http/8080/headers");
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["uri"], "/headers");
    assert_eq!(m.server.admin_get("/probe/tcp/8080").0, 200);
    assert_eq!(m.server.admin_get("/probe/tcp/22").0, 503);
    // The declared probes are in /config.
    let config: serde_json::Value = serde_json::from_str(&m.server.admin_get("/config").1).unwrap();
    assert_eq!(
        config["proxy"]["probes"].as_array().map(Vec::len),
        Some(4),
        "{}",
        config["proxy"]
    );

    // The admin port's loopback-only endpoints stay closed to the kubelet.
    assert_eq!(probe("/config").status, 403);
}

#[test]
fn ten_second_certificates_rotate_under_load_without_a_failed_request() {
    let Some(m) = meshed("mtls_rotation", &["--cert-ttl", "10s"], &strict_mesh()) else {
        return;
    };
    let start = Instant::now();
    let mut requests = 0u64;
    let mut rounds = 0;
    // At least 60 s of continuous load, in rounds of new client connections.
    while start.elapsed() < Duration::from_secs(62) {
        let load = m.client.testapp(&[
            "load",
            "--url",
            &m.server.url(8080, "/"),
            "--requests",
            "400",
            "--concurrency",
            "8",
        ]);
        assert_eq!(load["failed"], 0, "round {rounds}: {load}");
        requests += 400;
        rounds += 1;
        assert!(rounds < 10_000);
    }
    for pod in [&m.client, &m.server] {
        let s = pod.metrics();
        let issued = s.sum("trellis_identity_certificates_total", &[("result", "ok")]);
        assert!(
            issued >= 6.0,
            "{}: only {issued} certificates in 60 s",
            pod.name
        );
        let expiry = s.sum("trellis_identity_expiry_timestamp_seconds", &[]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            expiry > now,
            "{}: the certificate in force has expired",
            pod.name
        );
        eprintln!("{}: {issued} certificates issued", pod.name);
    }
    // Each renewal reaches the wire: new requests go on a connection with the new certificate.
    let handshakes = m.server.metrics().sum(
        "trellis_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "ok")],
    );
    assert!(
        handshakes >= 5.0,
        "{handshakes} mesh handshakes in 60 s of rotation"
    );
    eprintln!("{requests} requests in {rounds} rounds, 0 failed; {handshakes} mesh handshakes");
}

#[test]
fn the_current_certificate_keeps_serving_while_the_ca_is_away() {
    let Some(m) = meshed("mtls_ca_away", &["--cert-ttl", "20s"], &strict_mesh()) else {
        return;
    };
    assert_eq!(m.get("/").status, 200);
    let issued = |pod: &Pod, result: &str| {
        pod.metrics()
            .sum("trellis_identity_certificates_total", &[("result", result)])
    };
    let before = issued(&m.client, "ok");
    m.control.kill_apps();
    // Renewal (at ~70 % of 20 s) fails: the proxy says so and keeps its certificate.
    wait_for("a failed renewal", Duration::from_secs(25), || {
        issued(&m.client, "error") >= 1.0
    });
    assert!(
        m.client
            .proxy_log()
            .contains("certificate renewal failed; the current certificate stays in force")
    );
    assert_eq!(m.get("/").status, 200, "still serving");
    // The CA returns (same state dir): the proxy recovers by itself.
    m.control.start_control_plane(&m.state);
    wait_for("a renewed certificate", Duration::from_secs(30), || {
        issued(&m.client, "ok") > before
    });
    assert_eq!(m.get("/").status, 200);
}

#[test]
fn an_identity_dir_is_used_and_reloaded_when_it_changes() {
    let Some(mesh) = Mesh::new("mtls_identity_dir") else {
        return;
    };
    let control = mesh.pod("control");
    let state = mesh.log_dir().join("control-state");
    control.start_control_plane(&state);
    let ca = trellis_identity::ca::Ca::load(
        &std::fs::read_to_string(state.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(state.join("ca-key.pem")).unwrap(),
        "cluster.local",
    )
    .unwrap();
    // cert-manager (here: the test) writes the server's credentials into a directory.
    let dir = mesh.log_dir().join("server-identity");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |ttl: u64| {
        let id = trellis_identity::SpiffeId::new("cluster.local", "default", "server");
        let (issued, key) = ca.issue(&id, Duration::from_secs(ttl), &[], &[]).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        std::fs::write(dir.join("cert.pem"), issued.chain_pem).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.bundle_pem()).unwrap();
    };
    write(600);
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    let mut flags = control.control_flags(&mesh);
    flags.extend(
        [
            "--identity-dir",
            &dir.to_string_lossy(),
            "--workload",
            "default/server",
            "--service-account",
            "server",
        ]
        .map(String::from),
    );
    server.start_sidecar(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let client = mesh.pod("client");
    let flags = control.mesh_flags(&mesh, "default/client", "client");
    client.start_sidecar(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let policy = (mtls_to_server(SERVER_ID) + &server_policy("strict", None))
        .replace("SERVER", &server.ip.to_string());
    let file = mesh.write_file("policy.yaml", &policy);
    let out = control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]);
    assert!(out.status.success());
    let get = || client.curl(&[&server.url(8080, "/headers")]);
    assert_eq!(headers_seen(&get())["trellis-peer-identity"], CLIENT_ID);
    let expiry = || {
        server
            .metrics()
            .sum("trellis_identity_expiry_timestamp_seconds", &[])
    };
    let first = expiry();

    // A half-written update (a key that does not match) is refused; the certificate stays.
    std::fs::write(dir.join("key.pem"), rcgen_free_key(&ca)).unwrap();
    wait_for(
        "the bad update to be refused",
        Duration::from_secs(10),
        || {
            server.metrics().sum(
                "trellis_identity_certificates_total",
                &[("result", "error")],
            ) >= 1.0
        },
    );
    assert_eq!(expiry(), first);
    assert_eq!(get().status, 200);
    // A complete new set is picked up.
    write(1200);
    wait_for("the new certificate", Duration::from_secs(10), || {
        expiry() > first + 500.0
    });
    assert_eq!(get().status, 200);
}

/// A key that belongs to no certificate in the directory.
fn rcgen_free_key(ca: &trellis_identity::ca::Ca) -> String {
    let id = trellis_identity::SpiffeId::new("cluster.local", "default", "other");
    ca.issue(&id, Duration::from_secs(60), &[], &[]).unwrap().1
}

#[test]
fn meshed_pods_are_called_over_mutual_tls_without_a_traffic_policy() {
    // Only a strict ServerPolicy: no TrafficPolicy asks for TLS.
    let Some(m) = meshed("mtls_auto", &[], &server_policy("strict", None)) else {
        return;
    };
    // The control plane told the client's proxy that the server's pod is meshed, and as whom.
    wait_for(
        "the server pod to be known as meshed",
        Duration::from_secs(10),
        || {
            let config: serde_json::Value =
                serde_json::from_str(&m.client.admin_get("/config").1).unwrap_or_default();
            config["meshedPods"].as_u64() >= Some(2)
        },
    );
    let rsp = m.get("/headers");
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(headers_seen(&rsp)["trellis-peer-identity"], CLIENT_ID);
    assert_eq!(m.echo("auto"), "auto");
    assert_eq!(
        m.client.metrics().sum(
            "trellis_requests_total",
            &[("direction", "outbound"), ("peer_identity", SERVER_ID)]
        ),
        1.0
    );
    // gRPC (HTTP/2 end to end) and a WebSocket-style upgrade (its own `trellis/h1` mesh
    // connection) ride mutual TLS too.
    m.server
        .spawn_app(&["grpc", "--listen", "0.0.0.0:50051", "--name", "grpc-server"]);
    let target = format!("http://{}:50051", m.server.ip);
    let unary = m
        .client
        .testapp(&["grpc-call", "--target", &target, "--call", "unary"]);
    assert_eq!(unary["ok"], true, "{unary}");
    let stream = m.client.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "stream",
        "--count",
        "3",
    ]);
    assert_eq!(
        stream["items"].as_array().map(Vec::len),
        Some(3),
        "{stream}"
    );
    let ws = m.client.testapp(&[
        "ws-call",
        "--connect",
        &m.server.addr(8080).to_string(),
        "--send",
        "ping over a mesh upgrade",
    ]);
    assert_eq!(ws["status_line"], "HTTP/1.1 101 Switching Protocols");
    assert_eq!(ws["echo"], "ping over a mesh upgrade");
    let s = m.server.metrics();
    for protocol in ["http1", "http2"] {
        assert!(
            s.sum(
                "trellis_requests_total",
                &[
                    ("direction", "inbound"),
                    ("protocol", protocol),
                    ("peer_identity", CLIENT_ID)
                ]
            ) >= 1.0,
            "{protocol}: {}",
            s.text
        );
    }
    // The meshed pod's admin port stays plaintext (kubelet, Prometheus).
    assert_eq!(m.client.curl(&[&m.server.url(4191, "/live")]).status, 200);
    // A TrafficPolicy can still turn TLS off for a destination: the strict server refuses.
    m.apply(
        &("apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: plain}
spec:
  destination: {addresses: [\"SERVER:8080\"]}
  tls: {mode: disabled}
"
        .to_string()
            + &server_policy("strict", None)),
    );
    let rsp = m.get("/headers");
    assert_eq!(rsp.status, 403, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("unauthorized"));
}
