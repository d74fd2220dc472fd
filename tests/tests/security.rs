//! Security defaults against hostile peers of a pod, end to end with the real binaries.
//!
//! - Strict mTLS admits nobody without a valid mesh certificate: plaintext, TLS that is not
//!   mesh TLS, no client certificate, a self-signed one, one from another CA, an expired one
//!   from the mesh CA itself (`openssl s_client` as the peer; the app counts what reaches it).
//! - The admin port: loopback by default; exposed, `/config` and `/shutdown` answer loopback
//!   peers only (IPv4, IPv6 and IPv4-mapped peers on a dual-stack socket).
//! - Secrets (join tokens, the admin token, private keys) never reach a log line at debug level,
//!   `/config`, `/metrics` or the CLI's output; the state dir and its secrets are private.
//!
//! Hostile input to the control plane itself (gRPC, policy fields, CSRs) is in
//! `control_hostile.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use trellis_identity::SpiffeId;
use trellis_identity::ca::Ca;
use trellis_tests::harness::{
    Mesh, PROXY_UID, Pod, Proc, control_bin, free_port, proxy_bin, wait_for,
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

const STRICT_SERVER: &str = "apiVersion: trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: server}
spec:
  selector: {serviceAccount: server}
  mtls: strict
";

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `script` with `sh -c` in `pod`: stdout and stderr together.
fn sh(pod: &Pod, script: &str) -> String {
    let out = pod.exec("sh", &["-c", script]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn apply_in(mesh: &Mesh, control: &Pod, yaml: &str) {
    let file = mesh.write_file("policy.yaml", yaml);
    let out = control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]);
    assert!(
        out.status.success(),
        "apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How many requests with `key` the server pod's app has answered, asked on loopback (which
/// the sidecar never intercepts); the question itself is not counted.
fn app_requests(server: &Pod, key: &str) -> u64 {
    let out = sh(
        server,
        &format!("curl -sS http://127.0.0.1:8080/flaky?fail=1000000\\&key={key}"),
    );
    // "failure N from server": N counts this request too.
    let n: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer from the app: {out}"));
    n - 1
}

/// `openssl s_client` from `pod` to `target` with the mesh ALPN `alpn`, presenting
/// `cert`/`key` if given, then an HTTP/1.1 request for `/flaky?fail=0&key=KEY` sent as soon as
/// the handshake is done — before any alert of the server can arrive (TLS 1.3).
fn s_client(
    pod: &Pod,
    target: &str,
    alpn: &str,
    cert: Option<(&Path, &Path)>,
    key: &str,
) -> String {
    let creds = cert.map_or(String::new(), |(c, k)| {
        format!("-cert {} -key {}", c.display(), k.display())
    });
    let alpn = if alpn.is_empty() {
        String::new()
    } else {
        format!("-alpn {alpn}")
    };
    sh(
        pod,
        &format!(
            "(printf 'GET /flaky?fail=0&key={key} HTTP/1.1\\r\\nHost: server\\r\\nConnection: close\\r\\n\\r\\n'; sleep 2) \
             | timeout 15 openssl s_client -connect {target} {alpn} {creds} -ign_eof 2>&1"
        ),
    )
}

/// A caller strict mTLS must refuse: (what, the certificate and key it presents, the TLS alert
/// openssl reports, the cause the proxy logs).
type RefusalCase<'a> = (
    &'a str,
    Option<(&'a Path, &'a Path)>,
    &'a [&'a str],
    &'a str,
);

#[test]
fn strict_mtls_admits_nobody_without_a_valid_mesh_certificate() {
    let Some(mesh) = Mesh::new("security_strict") else {
        return;
    };
    let control = mesh.pod("control");
    let state = mesh.log_dir().join("control-state");
    control.start_control_plane(&state);
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.start_sidecar(&strs(&control.mesh_flags(
        &mesh,
        "default/server",
        "server",
    )));
    apply_in(&mesh, &control, STRICT_SERVER);
    let outsider = mesh.pod("outsider");
    let target = server.addr(8080).to_string();
    let handshake_errors = || {
        server.metrics().sum(
            "trellis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "error")],
        )
    };
    let errors_before = handshake_errors();

    // The mesh CA, and certificates for the client's identity from it and from elsewhere.
    let pem = |name: &str| std::fs::read_to_string(state.join(name)).unwrap();
    let mesh_ca = Ca::load(&pem("ca.pem"), &pem("ca-key.pem"), "cluster.local").unwrap();
    let client = SpiffeId::new("cluster.local", "default", "client");
    let write_creds = |ca: &Ca, name: &str, ttl: Duration| {
        let (issued, key) = ca.issue(&client, ttl, &[], &[]).unwrap();
        (
            mesh.write_file(&format!("{name}-cert.pem"), &issued.chain_pem),
            mesh.write_file(&format!("{name}-key.pem"), &key),
        )
    };
    let good = write_creds(&mesh_ca, "good", Duration::from_secs(600));
    let (other_ca, ..) = Ca::generate("cluster.local").unwrap();
    let foreign = write_creds(&other_ca, "foreign", Duration::from_secs(600));
    let expired = write_creds(&mesh_ca, "expired", Duration::from_secs(1));
    let dir = mesh.log_dir().display().to_string();
    let out = sh(
        &outsider,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
             -keyout {dir}/self-key.pem -out {dir}/self-cert.pem -subj /O=Trellis \
             -addext subjectAltName=URI:{CLIENT_ID} -addext basicConstraints=critical,CA:FALSE 2>&1"
        ),
    );
    let self_signed = (
        mesh.log_dir().join("self-cert.pem"),
        mesh.log_dir().join("self-key.pem"),
    );
    assert!(self_signed.0.is_file(), "openssl req: {out}");

    // The control: a valid mesh certificate gets its request through to the app.
    let out = s_client(
        &outsider,
        &target,
        "trellis/h1",
        Some((&good.0, &good.1)),
        "legit",
    );
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert_eq!(app_requests(&server, "legit"), 1);

    // Plaintext HTTP: refused by the proxy, with the reason.
    let rsp = outsider.curl(&[&server.url(8080, "/flaky?fail=0&key=hostile")]);
    assert_eq!(rsp.status, 403, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("unauthorized"));
    assert!(rsp.body.contains("plaintext refused"), "{}", rsp.body);
    // TLS that is not mesh TLS (no trellis ALPN) is not a mesh peer either: closed unanswered.
    let out = s_client(&outsider, &target, "", None, "hostile");
    assert!(!out.contains("HTTP/1.1"), "{out}");

    // Mesh TLS without a valid mesh certificate: refused at the handshake (TLS 1.3 alerts).
    std::thread::sleep(Duration::from_millis(2500)); // the 1 s certificate has expired
    let check = sh(
        &outsider,
        &format!(
            "openssl x509 -noout -checkend 0 -in {}",
            expired.0.display()
        ),
    );
    assert!(check.contains("will expire"), "not expired yet: {check}");
    // Another CA with the same name as the mesh CA fails on the signature, not the name.
    #[rustfmt::skip]
    let cases: [RefusalCase; 4] = [
        ("no certificate", None, &["certificate required", "alert number 116"], "peer sent no certificates"),
        ("self-signed", Some((&self_signed.0, &self_signed.1)), &["unknown ca", "alert number 48"], "UnknownIssuer"),
        ("another CA", Some((&foreign.0, &foreign.1)), &["decrypt error", "alert number 51"], "BadSignature"),
        ("expired, from the mesh CA", Some((&expired.0, &expired.1)), &["certificate expired", "alert number 45"], "xpired"),
    ];
    for (what, creds, alerts, _) in cases {
        let out = s_client(&outsider, &target, "trellis/h1", creds, "hostile");
        assert!(
            alerts.iter().any(|a| out.contains(a)),
            "{what}: expected one of {alerts:?}:\n{out}"
        );
        assert!(!out.contains("HTTP/1.1"), "{what}: got an answer:\n{out}");
        eprintln!(
            "{what}: refused ({})",
            alerts.iter().find(|a| out.contains(*a)).unwrap()
        );
    }

    // The app received nothing; the proxy counted and named every refusal.
    assert_eq!(
        app_requests(&server, "hostile"),
        0,
        "a hostile request reached the app"
    );
    let refused = handshake_errors() - errors_before;
    assert_eq!(refused, 4.0, "handshakes refused");
    let s = server.metrics();
    let unauthorized = s.sum(
        "trellis_proxy_errors_total",
        &[("direction", "inbound"), ("cause", "unauthorized")],
    );
    assert!(
        unauthorized >= 2.0,
        "plaintext and non-mesh TLS: {}",
        s.text
    );
    let log = server.proxy_log();
    let peer = outsider.ip.to_string();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("mesh TLS handshake refused") && l.contains(&peer))
        .collect();
    assert_eq!(refusals.len(), 4, "{log}");
    for (what, _, _, cause) in cases {
        assert!(
            refusals.iter().any(|l| l.contains(cause)),
            "{what}: no refusal names {cause:?}:\n{}",
            refusals.join("\n")
        );
    }
    eprintln!(
        "app requests: 1 legit, 0 hostile; {refused} handshakes refused, {unauthorized} plaintext refusals"
    );
}

/// The addresses something listens on for TCP port `port` in `pod` (`ss -ltn`).
fn listeners(pod: &Pod, port: u16) -> Vec<String> {
    let out = pod.exec("ss", &["-Hltn", &format!("sport = :{port}")]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

#[test]
fn the_admin_port_is_loopback_only_by_default_and_guards_config_and_shutdown_when_exposed() {
    let Some(mesh) = Mesh::new("security_admin") else {
        return;
    };
    let neighbour = mesh.pod("neighbour");
    // By default: bound to loopback, unreachable from other pods.
    let quiet = mesh.pod("quiet");
    quiet.start_sidecar(&[]);
    assert_eq!(listeners(&quiet, 4191), ["127.0.0.1:4191"]);
    let rsp = neighbour.curl(&["--connect-timeout", "3", &quiet.url(4191, "/live")]);
    assert_eq!(rsp.status, 0, "{rsp:?}");
    assert!(rsp.stderr.contains("Couldn't connect"), "{}", rsp.stderr);

    // Exposed on every address (what the injector does, for kubelet and Prometheus).
    let exposed = mesh.pod("exposed");
    exposed.start_sidecar(&["--admin-addr", "0.0.0.0:4191"]);
    assert_eq!(listeners(&exposed, 4191), ["0.0.0.0:4191"]);
    let dual = mesh.pod("dual");
    dual.start_sidecar(&["--admin-addr", "[::]:4191"]);
    let v6 = format!("http://[{}]:4191", dual.ip6);
    let v4 = format!("http://{}:4191", dual.ip);
    let mut refused = 0;
    for base in [format!("http://{}:4191", exposed.ip), v4, v6] {
        for (method, path) in [
            ("GET", "/config"),
            ("POST", "/shutdown"),
            ("GET", "/shutdown"),
        ] {
            // Headers that claim loopback change nothing: the peer address decides.
            let rsp = neighbour.curl(&[
                "-g",
                "-X",
                method,
                "-H",
                "Host: 127.0.0.1:4191",
                "-H",
                "X-Forwarded-For: 127.0.0.1",
                &format!("{base}{path}"),
            ]);
            assert_eq!(rsp.status, 403, "{method} {base}{path}: {rsp:?}");
            assert!(rsp.body.contains("loopback clients only"), "{}", rsp.body);
            refused += 1;
        }
        // What the kubelet and Prometheus need still answers.
        assert_eq!(neighbour.curl(&["-g", &format!("{base}/live")]).status, 200);
        assert_eq!(
            neighbour.curl(&["-g", &format!("{base}/metrics")]).status,
            200
        );
    }
    assert_eq!(refused, 9);
    for pod in [&exposed, &dual] {
        assert_eq!(
            pod.wait_proxy_exit(Duration::from_millis(300)),
            None,
            "{} exited",
            pod.name
        );
        assert_eq!(pod.admin_get("/ready").0, 200);
        // From loopback (on the dual-stack socket: an IPv4-mapped ::ffff:127.0.0.1) they work.
        let (status, body) = pod.admin_get("/config");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("/config is JSON");
    }
    let (status, body) = exposed.admin_request("POST", "/shutdown");
    assert_eq!((status, body.trim()), (200, "draining"));
    assert_eq!(exposed.wait_proxy_exit(Duration::from_secs(30)), Some(0));
    assert_eq!(
        dual.admin_get("/live").0,
        200,
        "the other proxy is not affected"
    );
}

/// Secret values to look for: a whole token, or each base64 line of a PEM key's body.
fn secret_lines(pem_or_token: &str) -> Vec<String> {
    pem_or_token
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect()
}

#[test]
fn no_secret_reaches_a_log_line_config_metrics_or_cli_output() {
    let Some(mesh) = Mesh::new("security_secrets") else {
        return;
    };
    // A control plane logging at debug level (the harness's helper does not set the level).
    let control = mesh.pod("control");
    let state = mesh.log_dir().join("debug-state");
    let mut cmd = control.netns().command(&control_bin().to_string_lossy());
    cmd.args([
        "serve",
        "--grpc-addr",
        "0.0.0.0:7443",
        "--admin-addr",
        "127.0.0.1:9990",
    ])
    .arg("--state-dir")
    .arg(&state)
    .env("TRELLIS_LOG", "debug");
    let cp_log = mesh.log_dir().join("control-debug.log");
    let cp = Proc::spawn("control plane (debug)", cmd, &cp_log);
    wait_for("the control plane", Duration::from_secs(15), || {
        control
            .netns()
            .enter(|| std::net::TcpStream::connect("127.0.0.1:7443").is_ok())
    });
    let cli = |args: &[&str]| {
        let out = control
            .netns()
            .command(&control_bin().to_string_lossy())
            .args(args)
            .env("TRELLIS_STATE_DIR", &state)
            .env("TRELLIS_LOG", "debug")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let mut cli_output = String::new();
    let mut token = |identity: &str| {
        let (ok, text) = cli(&["token", "create", "--identity", identity, "--ttl", "1h"]);
        assert!(ok, "{text}");
        // The token itself is printed once on stdout, by design; the rest must not repeat it.
        let (token, rest) = text.split_once('\n').unwrap();
        cli_output.push_str(rest);
        token.trim().to_string()
    };
    let server_token = token("default/server");
    let rogue_token = token("default/other");
    let anchors = mesh.write_file(
        "anchors.pem",
        &std::fs::read_to_string(state.join("ca.pem")).unwrap(),
    );
    let debug = [("TRELLIS_LOG", "debug")];
    let cp_flags = |extra: &[&str]| -> Vec<String> {
        [
            &[
                "--control-plane",
                &control.control_url(),
                "--trust-anchors",
                &anchors.to_string_lossy(),
            ][..],
            extra,
        ]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // The server joins with a join token; the client uses an identity dir (key.pem on disk).
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    let token_file = mesh.write_file("server-token", &server_token);
    let flags = cp_flags(&[
        "--identity-token-file",
        &token_file.to_string_lossy(),
        "--workload",
        "default/server",
        "--service-account",
        "server",
    ]);
    server.start_sidecar_with_env(&strs(&flags), &debug);
    let ca = Ca::load(
        &std::fs::read_to_string(state.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(state.join("ca-key.pem")).unwrap(),
        "cluster.local",
    )
    .unwrap();
    let (issued, client_key) = ca
        .issue(
            &SpiffeId::new("cluster.local", "default", "client"),
            Duration::from_secs(600),
            &[],
            &[],
        )
        .unwrap();
    let id_dir = mesh.log_dir().join("client-identity");
    std::fs::create_dir_all(&id_dir).unwrap();
    std::fs::set_permissions(&id_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(id_dir.join("cert.pem"), &issued.chain_pem).unwrap();
    std::fs::write(id_dir.join("key.pem"), &client_key).unwrap();
    std::fs::write(id_dir.join("ca.pem"), ca.bundle_pem()).unwrap();
    let client = mesh.pod("client");
    let flags = cp_flags(&[
        "--identity-dir",
        &id_dir.to_string_lossy(),
        "--workload",
        "default/client",
        "--service-account",
        "client",
    ]);
    client.start_sidecar_with_env(&strs(&flags), &debug);

    // A rogue proxy whose (real) join token proves another identity: refused, and logged.
    let rogue = mesh.pod("rogue");
    let rogue_file = mesh.write_file("rogue-token", &rogue_token);
    let uid = PROXY_UID.to_string();
    let mut cmd = rogue.netns().command("setpriv");
    cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
        .arg(proxy_bin())
        .args(["run", "--log-format", "json"])
        .args(cp_flags(&[
            "--identity-token-file",
            &rogue_file.to_string_lossy(),
            "--workload",
            "default/rogue",
            "--service-account",
            "rogue",
        ]))
        .env("TRELLIS_LOG", "debug");
    let rogue_proxy = Proc::spawn("rogue proxy", cmd, &mesh.log_dir().join("rogue.log"));
    wait_for("the rogue's refusal", Duration::from_secs(15), || {
        rogue_proxy
            .log()
            .contains("cannot obtain a certificate yet")
    });
    assert!(
        rogue_proxy
            .log()
            .contains("the join token proves default/other"),
        "{}",
        rogue_proxy.log()
    );

    // Policy and traffic over mutual TLS, so every secret has been used.
    let file = mesh.write_file("strict.yaml", STRICT_SERVER);
    let (ok, text) = cli(&["apply", "--wait", "-f", &file.to_string_lossy()]);
    assert!(ok, "{text}");
    cli_output.push_str(&text);
    let rsp = client.curl(&[&server.url(8080, "/headers")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert!(rsp.body.contains(CLIENT_ID), "{}", rsp.body);
    // The admin token by flag, and a wrong one (a token of another cluster, say).
    let admin_token = std::fs::read_to_string(state.join("admin-token")).unwrap();
    let wrong_admin = format!("trellis-admin-{}", "5e".repeat(32));
    let wrong_file = mesh.write_file("wrong-admin-token", &wrong_admin);
    for (file, expect_ok) in [(state.join("admin-token"), true), (wrong_file, false)] {
        let (ok, text) = cli(&[
            "get",
            "--state-dir",
            "/nonexistent",
            "--ca-file",
            &anchors.to_string_lossy(),
            "--admin-token-file",
            &file.to_string_lossy(),
        ]);
        assert_eq!(ok, expect_ok, "{text}");
        cli_output.push_str(&text);
    }
    let (ok, text) = cli(&["status", "-o", "json"]);
    assert!(ok, "{text}");
    cli_output.push_str(&text);

    // Every secret, and everywhere it must not be.
    let pem = |name: &str| std::fs::read_to_string(state.join(name)).unwrap();
    let mut secrets: Vec<(&str, String)> = vec![
        ("server join token", server_token.clone()),
        ("rogue join token", rogue_token.clone()),
        ("admin token", admin_token.trim().to_string()),
        ("wrong admin token", wrong_admin.clone()),
    ];
    for (what, key) in [
        ("CA key", pem("ca-key.pem")),
        ("admin key", pem("admin-key.pem")),
        ("identity-dir key", client_key.clone()),
    ] {
        let lines = secret_lines(&key);
        assert!(lines.len() >= 2, "{what}: {key}");
        secrets.extend(lines.into_iter().map(|l| (what, l)));
    }
    let mut places: Vec<(String, String)> = vec![
        ("control plane log".into(), cp.log()),
        ("CLI output".into(), cli_output),
        ("rogue proxy log".into(), rogue_proxy.log()),
    ];
    for pod in [&server, &client] {
        places.push((format!("{} proxy log", pod.name), pod.proxy_log()));
        places.push((format!("{} access log", pod.name), pod.access_log()));
        places.push((format!("{} /config", pod.name), pod.admin_get("/config").1));
        places.push((format!("{} /metrics", pod.name), pod.metrics().text));
    }
    places.push((
        "control plane /metrics".into(),
        control.control_metrics().text,
    ));
    // Debug level was really on, and the logs are not empty.
    for (name, text) in &places[..3] {
        assert!(text.lines().count() >= 3, "{name} is nearly empty:\n{text}");
    }
    assert!(
        places[0].1.contains("DEBUG"),
        "the control plane did not log at debug level"
    );
    assert!(
        server.proxy_log().contains("\"level\":\"DEBUG\""),
        "the proxy did not log at debug level"
    );
    let mut checked = 0;
    for (place, text) in &places {
        assert!(
            !text.contains("PRIVATE KEY"),
            "a private key in the {place}"
        );
        for (what, secret) in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "the {what} leaked into the {place}"
            );
            checked += 1;
        }
    }
    let bytes: usize = places.iter().map(|(_, t)| t.len()).sum();
    eprintln!(
        "{} secret values checked against {} places ({bytes} bytes): {checked} checks, none found",
        secrets.len(),
        places.len()
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn the_state_dir_and_its_secrets_are_private_even_under_a_permissive_umask() {
    let dir = std::env::temp_dir().join(format!("trellis-perms-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = dir.with_extension("log");
    let (grpc, admin) = (free_port(), free_port());
    let start = || {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!(
                "umask 000 && exec {} serve --grpc-addr 127.0.0.1:{grpc} --admin-addr 127.0.0.1:{admin} --state-dir {}",
                control_bin().display(),
                dir.display()
            ),
        ]);
        let cp = Proc::spawn("control plane", cmd, &log);
        wait_for("the control plane", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok()
        });
        cp
    };
    let cli = |args: &[&str]| {
        let out = Command::new(control_bin())
            .args(args)
            .args(["--server", &format!("https://127.0.0.1:{grpc}")])
            .arg("--state-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut cp = start();
    cli(&[
        "token",
        "create",
        "--identity",
        "default/web",
        "--ttl",
        "1h",
    ]);
    let policy = dir.with_extension("yaml");
    std::fs::write(&policy, "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {timeout: 1s}\n").unwrap();
    cli(&["apply", "-f", &policy.to_string_lossy()]);
    let expected = [
        ("", 0o700),
        ("ca-key.pem", 0o600),
        ("admin-key.pem", 0o600),
        ("admin-token", 0o600),
        ("join-tokens.json", 0o600),
        ("ca.pem", 0o644),
        ("admin-cert.pem", 0o644),
        ("state.json", 0o644),
    ];
    let modes = || -> Vec<(&str, u32)> {
        expected
            .iter()
            .map(|(name, _)| (*name, mode(&dir.join(name))))
            .collect()
    };
    assert_eq!(modes(), expected, "modes (umask 000)");
    // Nothing else in it: every file is accounted for.
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), expected.len() - 1, "{files:?}");

    // An operator loosened them (or an older version wrote them so): narrowed at the next start.
    cp.signal(libc::SIGTERM);
    cp.wait_timeout(Duration::from_secs(5));
    for (name, loose) in [("", 0o755), ("ca-key.pem", 0o644), ("admin-token", 0o640)] {
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(loose)).unwrap();
    }
    let cp = start();
    assert_eq!(modes(), expected, "modes after a restart");
    let text = cp.log();
    assert!(
        text.contains("narrowed to 0600") && text.contains("narrowed to 0700"),
        "{text}"
    );
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&policy);
}
