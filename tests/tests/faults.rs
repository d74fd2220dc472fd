//! Data-path faults the mesh must ride out, each with the real parts in pods: an app killed
//! and restarted under load, a network partition between two pods, a sidecar SIGKILLed and
//! restarted, and a sidecar restarted after its join token expired.
//!
//! Every test says in its comment what a user would see, and checks it with numbers. Loads are
//! bounded (a fixed number of requests at a fixed pace); all traffic stays inside the test's
//! namespaces. Control-plane faults (killed, state dir full or read-only, CA away at renewal)
//! are in `control_faults.rs`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use trellis_tests::harness::meshed::{
    CLIENT_ID, SERVER_ID, cert_expiry, certificates, counted, meshed, run_ok, strs, unix_now,
};
use trellis_tests::harness::{CurlResult, Mesh, Pod, wait_for};

// ---------------------------------------------------------------------------------------------
// 1. An upstream app killed and restarted under load.

const VIP: &str = "10.77.0.250:8080"; // a "ClusterIP": no pod has it, the policy lists its endpoints

/// What a user sees: a service has two replicas; one replica's app crashes (SIGKILL) while
/// 3,000 GETs run at a fixed pace, and comes back 1 s later. Not one GET fails: calls that hit
/// the dead replica (connection refused behind its sidecar, or reset mid-request) are retried
/// on the live one (`retries.on: [connect-failure, reset]`), and the restarted replica takes
/// its share of the calls again. Two endpoints, not a restart gap: full-jitter backoff can
/// spend three attempts within a few milliseconds, so no retry count covers a restart gap on a
/// busy machine for certain.
#[test]
fn an_app_killed_and_restarted_under_load_costs_no_idempotent_request() {
    let Some(mesh) = Mesh::new("fault_app_restart") else {
        return;
    };
    let app = |name: &str| -> Vec<String> {
        ["http", "--listen", "0.0.0.0:8080", "--name", name]
            .map(String::from)
            .to_vec()
    };
    let replicas: Vec<Pod> = ["web-1", "web-2"]
        .into_iter()
        .map(|name| {
            let pod = mesh.pod(name);
            pod.spawn_app(&strs(&app(name)));
            pod.start_sidecar(&[]);
            pod
        })
        .collect();
    let client = mesh.pod("client");
    let policy = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web}}\nspec:\n  \
         destination: {{host: web, port: 8080, addresses: [\"{VIP}\"], endpoints: [\"{}\", \"{}\"]}}\n  \
         retries: {{maxRetries: 2, on: [connect-failure, reset]}}\n  \
         ejection: {{consecutiveFailures: 2, baseTime: 500ms, maxTime: 2s}}\n",
        replicas[0].addr(8080),
        replicas[1].addr(8080)
    );
    let file = mesh.write_file("policy.yaml", &policy);
    client.start_sidecar(&["--policy-file", &file.to_string_lossy()]);

    let served = |pod: &Pod| {
        pod.metrics().sum(
            "trellis_requests_total",
            &[("direction", "inbound"), ("status", "200")],
        )
    };
    let victim = &replicas[1];
    let (out, at_kill, at_restart, restarted_in) = std::thread::scope(|scope| {
        // 3,000 GETs, 6 connections, each pausing 10 ms between requests: at most 600/s.
        let load = scope.spawn(|| {
            client.testapp(&[
                "load",
                "--url",
                &format!("http://{VIP}/"),
                "--requests",
                "3000",
                "--concurrency",
                "6",
                "--pace-ms",
                "10",
            ])
        });
        wait_for(
            "the victim to take part in the load",
            Duration::from_secs(20),
            || served(victim) >= 150.0,
        );
        let at_kill = served(victim);
        victim.kill_apps();
        std::thread::sleep(Duration::from_secs(1));
        let restart = Instant::now();
        victim.spawn_app(&strs(&app("web-2")));
        let restarted_in = restart.elapsed();
        let at_restart = served(victim);
        assert!(
            !load.is_finished(),
            "the load ended before the app was back: make it longer"
        );
        (load.join().unwrap(), at_kill, at_restart, restarted_in)
    });
    let after = served(victim);
    let m = client.metrics();
    let retries = m.sum("trellis_retries_total", &[("policy", "default/web")]);
    let ejections = m.sum(
        "trellis_endpoint_ejections_total",
        &[("endpoint", &victim.addr(8080).to_string())],
    );
    eprintln!(
        "3000 GETs in {:.0} ms: {} failed, statuses {}; victim served {at_kill} before the kill, \
         {at_restart} when back ({restarted_in:?} to listen), {after} at the end; {retries} retries, \
         {ejections} ejections; survivor served {}",
        out["elapsed_ms"].as_f64().unwrap_or(0.0),
        out["failed"],
        out["statuses"],
        served(&replicas[0])
    );
    assert_eq!(out["failed"], 0, "{out}");
    assert_eq!(out["statuses"]["200"], 3000, "{out}");
    assert!(retries >= 1.0, "the dead replica was never hit: {retries}");
    assert!(
        after - at_restart >= 50.0,
        "the restarted replica took only {} calls",
        after - at_restart
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A network partition between two pods.

/// What a user sees: the network between the client and the server pod goes silent (every
/// packet dropped, no reset: a partition). A call on the pooled connection fails after the
/// policy's 2 s with `504` and `trellis-error: timeout`; a call that needs a new connection
/// fails after `--connect-timeout 1s` with `trellis-error: connect-timeout`; neither hangs.
/// Once the network heals, calls succeed again with nothing restarted. No retries, so each
/// call shows its own timeout. Plaintext sidecars (pooled HTTP/1.1 between them).
#[test]
fn a_partition_fails_plaintext_calls_within_the_timeouts_and_healing_needs_no_restart() {
    partition("fault_partition", false);
}

/// The same partition between meshed sidecars: the hop is mutual TLS over one pooled HTTP/2
/// connection per endpoint, which must not keep later calls waiting once the network heals.
#[test]
fn a_partition_fails_mtls_calls_within_the_timeouts_and_healing_needs_no_restart() {
    partition("fault_partition_mtls", true);
}

/// `rsp` is a 504 naming `cause`, and came after the `configured` seconds (within 2 s more).
fn assert_timed_out(rsp: &CurlResult, cause: &str, configured: f64) {
    let (status, named, secs) = (rsp.status, rsp.header("trellis-error"), rsp.time_total);
    eprintln!("partitioned: {status} {named:?} after {secs:.2} s ({configured} s configured)");
    assert_eq!((status, named), (504, Some(cause)), "{rsp:?}");
    assert!(
        (configured - 0.1..configured + 2.0).contains(&secs),
        "{cause} after {secs} s, {configured} s configured"
    );
}

fn partition(test: &str, mtls: bool) {
    let Some(mesh) = Mesh::new(test) else {
        return;
    };
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.spawn_app(&["http", "--listen", "0.0.0.0:8081", "--name", "other"]);
    let client = mesh.pod("client");
    let control = mesh.pod("control");
    let tls = if mtls {
        format!("  tls: {{mode: mutual, serverIdentity: {SERVER_ID}}}\n")
    } else {
        String::new()
    };
    let policy = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: server}}\nspec:\n  \
         destination: {{addresses: [\"{ip}:8080\", \"{ip}:8081\"]}}\n  timeout: 2s\n  \
         retries: {{maxRetries: 0}}\n{tls}",
        ip = server.ip
    );
    let file = mesh.write_file("policy.yaml", &policy);
    if mtls {
        control.start_control_plane(&mesh.log_dir().join("control-state"));
        server.start_sidecar(&strs(&control.mesh_flags(
            &mesh,
            "default/server",
            "server",
        )));
        let mut flags = control.mesh_flags(&mesh, "default/client", "client");
        flags.extend(["--connect-timeout".into(), "1s".into()]);
        client.start_sidecar(&strs(&flags));
        run_ok(
            "apply",
            control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]),
        );
    } else {
        server.start_sidecar(&[]);
        client.start_sidecar(&[
            "--policy-file",
            &file.to_string_lossy(),
            "--connect-timeout",
            "1s",
        ]);
    }
    // A pooled connection to 8080; none to 8081 yet.
    let rsp = client.curl(&[&server.url(8080, "/")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let tls_label = [("tls", "true")];
    let over_tls = counted(&server, "trellis_requests_total", &tls_label, 1.0);
    assert_eq!(over_tls, if mtls { 1.0 } else { 0.0 });

    let client_ip = client.ip.to_string();
    let rule = ["INPUT", "-s", client_ip.as_str(), "-j", "DROP"];
    let iptables = |action: &str| {
        let out = server.exec("iptables", &[&["-w", action][..], &rule[..]].concat());
        assert!(
            out.status.success(),
            "iptables {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    iptables("-I");
    assert_timed_out(&client.curl(&[&server.url(8080, "/")]), "timeout", 2.0);
    assert_timed_out(
        &client.curl(&[&server.url(8081, "/")]),
        "connect-timeout",
        1.0,
    );
    let m = client.metrics();
    let errors = |cause: &str| {
        m.sum(
            "trellis_proxy_errors_total",
            &[("direction", "outbound"), ("cause", cause)],
        )
    };
    assert_eq!(errors("timeout"), 1.0, "{}", m.text);
    assert_eq!(errors("connect-timeout"), 1.0, "{}", m.text);

    // Heal. Nothing is restarted: the very next calls, on the pooled port and the new one,
    // succeed, and so does a load after them.
    iptables("-D");
    let pids = (client.proxy_pid(), server.proxy_pid());
    for port in [8080, 8081] {
        let rsp = client.curl(&[&server.url(port, "/")]);
        assert_eq!(
            rsp.status, 200,
            "first call to {port} after healing: {rsp:?}"
        );
    }
    let load = client.testapp(&[
        "load",
        "--url",
        &server.url(8080, "/"),
        "--requests",
        "200",
        "--concurrency",
        "2",
    ]);
    eprintln!("after healing: {load}");
    assert_eq!(load["failed"], 0, "{load}");
    assert_eq!(
        (client.proxy_pid(), server.proxy_pid()),
        pids,
        "nothing was restarted"
    );
    // Every call went over mutual TLS when meshed (the timed-out one may arrive late), and
    // none did when not.
    let over_tls = counted(&server, "trellis_requests_total", &tls_label, 203.0);
    if mtls {
        assert!(over_tls >= 203.0, "{over_tls} requests over mTLS");
    } else {
        assert_eq!(over_tls, 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A sidecar killed and restarted.

/// What a user sees: a sidecar is SIGKILLed (the OOM killer) and restarted with the same
/// arguments, as a kubelet restarts a container. With no operator action — the join token it
/// joined with is reusable until its TTL (1 h) — it gets a certificate again, the policy
/// version comes back from the control plane, calls run over mutual TLS with the client's
/// identity, and plaintext is still refused by the strict server.
#[test]
fn a_sidecar_killed_and_restarted_recovers_its_identity_and_policy_by_itself() {
    let Some(m) = meshed("fault_proxy_kill", &[]) else {
        return;
    };
    let outsider = m.mesh.pod("outsider");
    let headers = m.server.url(8080, "/headers");
    let peer_seen = |rsp: &CurlResult| -> String {
        let body: serde_json::Value = serde_json::from_str(&rsp.body).unwrap_or_default();
        body["headers"]["trellis-peer-identity"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let rsp = m.client.curl(&[&headers]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(peer_seen(&rsp), CLIENT_ID);

    for (pod, flags) in [(&m.server, &m.server_flags), (&m.client, &m.client_flags)] {
        let token = flag_value(flags, "--identity-token-file");
        let token_before = std::fs::read(&token).expect("the join token file");
        let old_pid = pod.proxy_pid();
        pod.signal_proxy(libc::SIGKILL);
        assert_eq!(
            pod.wait_proxy_exit(Duration::from_secs(5)),
            Some(-1),
            "{}'s sidecar did not die of SIGKILL",
            pod.name
        );
        // While it is down, calls through it fail: the kill is real.
        let down = m.client.curl(&[&headers]);
        assert_ne!(down.status, 200, "{} down: {down:?}", pod.name);

        let start = Instant::now();
        pod.start_proxy(&strs(flags));
        let ready_in = start.elapsed();
        assert_ne!(pod.proxy_pid(), old_pid);
        assert_eq!(
            std::fs::read(&token).expect("the join token file"),
            token_before,
            "the token file was not changed"
        );
        let issued = certificates(pod, "ok");
        let expires_in = cert_expiry(pod) - unix_now();
        eprintln!(
            "{}'s sidecar restarted: ready in {ready_in:?}, {issued} certificate, expires in \
             {expires_in:.0} s, policy version {}",
            pod.name,
            pod.config_version()
        );
        assert_eq!(issued, 1.0, "a certificate again, from the join token");
        assert!(expires_in > 23.0 * 3600.0, "a fresh 24 h certificate");
        assert_eq!(pod.config_version(), "1", "{}", pod.name);
        assert!(
            pod.proxy_log()
                .contains("ready: the first policy snapshot is in force"),
            "{}",
            pod.proxy_log()
        );

        let before = m.mtls_requests_from_client(0.0);
        let rsp = m.client.curl(&[&headers]);
        assert_eq!(rsp.status, 200, "after restarting {}: {rsp:?}", pod.name);
        assert_eq!(peer_seen(&rsp), CLIENT_ID);
        assert_eq!(m.mtls_requests_from_client(before + 1.0) - before, 1.0);
        let refused = outsider.curl(&[&headers]);
        assert_eq!(refused.status, 403, "{refused:?}");
        assert_eq!(refused.header("trellis-error"), Some("unauthorized"));
    }
    wait_for(
        "both restarted sidecars in status",
        Duration::from_secs(10),
        || m.control.connected_proxies("1") == ["default/client", "default/server"],
    );
}

/// What a user sees: a sidecar joined with a short-lived join token (`--ttl 2s`) and is
/// SIGKILLed after the token expired. Restarted, it stays not ready (no certificate) and its
/// log says why — the join token expired, and how to get a new one. Writing a new token into
/// the same file is enough: the file is re-read on every attempt, and the sidecar becomes ready
/// without another restart.
#[test]
fn a_sidecar_restarted_after_its_join_token_expired_says_so_and_takes_a_new_token() {
    let Some(mesh) = Mesh::new("fault_token_expired") else {
        return;
    };
    let control = mesh.pod("control");
    control.start_control_plane(&mesh.log_dir().join("control-state"));
    let token = |ttl: &str| {
        let out = control.control(&["token", "create", "--identity", "default/web", "--ttl", ttl]);
        let token = run_ok("token create", out).trim().to_string();
        mesh.write_file("web-token", &token)
    };
    let file = token("2s");
    let mut flags = control.control_flags(&mesh);
    flags.extend(
        [
            "--identity-token-file",
            &file.to_string_lossy(),
            "--workload",
            "default/web",
            "--service-account",
            "web",
        ]
        .map(String::from),
    );
    let web = mesh.pod("web");
    web.start_sidecar(&strs(&flags));
    std::thread::sleep(Duration::from_secs(3));
    web.signal_proxy(libc::SIGKILL);
    assert_eq!(web.wait_proxy_exit(Duration::from_secs(5)), Some(-1));

    web.spawn_proxy(&strs(&flags));
    wait_for(
        "the sidecar to say why it has no certificate",
        Duration::from_secs(15),
        || web.proxy_log().contains("expired at"),
    );
    let log = web.proxy_log();
    let line = log
        .lines()
        .find(|l| l.contains("expired at"))
        .unwrap_or_default();
    eprintln!("restarted with an expired join token: {line}");
    assert!(
        line.contains("cannot obtain a certificate yet")
            && line.contains("the join token")
            && line.contains("default/web")
            && line.contains("trellis-control token create"),
        "{line}"
    );
    assert_ne!(
        web.admin_get("/ready").0,
        200,
        "ready without a certificate"
    );
    assert_eq!(certificates(&web, "ok"), 0.0);

    token("1h");
    let start = Instant::now();
    wait_for(
        "the sidecar to use the new token",
        Duration::from_secs(20),
        || web.admin_get("/ready").0 == 200,
    );
    eprintln!(
        "ready {:?} after the new token was written",
        start.elapsed()
    );
    assert_eq!(certificates(&web, "ok"), 1.0);
    let version = control.control_status()["version"].to_string();
    assert_eq!(
        web.config_version(),
        version,
        "the control plane's policy version"
    );
}

fn flag_value(flags: &[String], name: &str) -> PathBuf {
    let i = flags
        .iter()
        .position(|f| f == name)
        .unwrap_or_else(|| panic!("no {name} in {flags:?}"));
    PathBuf::from(&flags[i + 1])
}
