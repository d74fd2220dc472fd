//! The control plane with real proxies in pods: policy pushed over gRPC under load, `apply
//! --wait`, NACKs, the control plane away and back, and a restart from its state dir.

use std::time::{Duration, Instant};

use trellis_tests::harness::{Mesh, Pod, wait_for};

const RETRY_503: &str = "apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: server}
spec:
  destination: {addresses: [\"SERVER:8080\"]}
  retries: {maxRetries: MAX, on: [gateway-error]}
";

fn policy(server: &Pod, max_retries: u32) -> String {
    RETRY_503
        .replace("SERVER", &server.ip.to_string())
        .replace("MAX", &max_retries.to_string())
}

/// A control plane, a server pod (HTTP app) and a client pod, both sidecars following it.
fn setup(test: &str) -> Option<(Mesh, Pod, Pod, Pod, std::path::PathBuf)> {
    let mesh = Mesh::new(test)?;
    let control = mesh.pod("control");
    let state = mesh.log_dir().join("control-state");
    control.start_control_plane(&state);
    let cp = control.control_flags(&mesh);
    let cp: Vec<&str> = cp.iter().map(String::as_str).collect();
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.start_sidecar(
        &[
            &cp[..],
            &[
                "--workload",
                "default/server",
                "--service-account",
                "server",
            ],
        ]
        .concat(),
    );
    let client = mesh.pod("client");
    client.start_sidecar(
        &[
            &cp[..],
            &[
                "--workload",
                "default/client",
                "--service-account",
                "client",
            ],
        ]
        .concat(),
    );
    Some((mesh, control, server, client, state))
}

fn run_ok(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn config_version(pod: &Pod) -> String {
    let config: serde_json::Value = serde_json::from_str(&pod.admin_get("/config").1).unwrap();
    config["version"].as_str().unwrap_or("").to_string()
}

#[test]
fn a_policy_applied_under_load_takes_effect_with_zero_failed_requests() {
    let Some((mesh, control, server, client, _state)) = setup("control_apply_under_load") else {
        return;
    };
    assert_eq!(
        client
            .curl(&[&server.url(8080, "/flaky?fail=1&key=before")])
            .status,
        503,
        "no retries on 503 yet"
    );

    let file = mesh.write_file("retry.yaml", &policy(&server, 2));
    let (load, applied) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            client.testapp(&[
                "load",
                "--url",
                &server.url(8080, "/"),
                "--requests",
                "3000",
                "--concurrency",
                "4",
            ])
        });
        std::thread::sleep(Duration::from_millis(300));
        let applied = run_ok(control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]));
        (load.join().unwrap(), applied)
    });
    assert_eq!(load["failed"], 0, "{load}");
    assert!(
        applied.contains("TrafficPolicy default/server"),
        "{applied}"
    );
    assert!(
        applied.contains("2 proxies converged on version 1"),
        "{applied}"
    );
    assert_eq!(config_version(&client), "1");
    assert_eq!(
        client
            .curl(&[&server.url(8080, "/flaky?fail=1&key=after")])
            .status,
        200,
        "the retry policy is in force"
    );
}

#[test]
fn apply_wait_reports_each_proxys_acknowledgement() {
    let Some(mesh) = Mesh::new("control_apply_wait") else {
        return;
    };
    let control = mesh.pod("control");
    control.start_control_plane(&mesh.log_dir().join("state"));
    let cp = control.control_flags(&mesh);
    let cp: Vec<&str> = cp.iter().map(String::as_str).collect();
    let pods: Vec<Pod> = (1..=3)
        .map(|i| {
            let pod = mesh.pod(&format!("web-{i}"));
            let workload = format!("default/web-{i}");
            pod.start_sidecar(&[&cp[..], &["--workload", &workload]].concat());
            pod
        })
        .collect();
    let file = mesh.write_file("p.yaml", "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: all}\nspec: {timeout: 3s}\n");
    let out = run_ok(control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]));
    for i in 1..=3 {
        assert!(
            out.contains(&format!("acknowledged by default/web-{i}@")),
            "{out}"
        );
    }
    assert!(out.contains("3 proxies converged on version 1"), "{out}");
    for pod in &pods {
        assert_eq!(config_version(pod), "1");
    }
    let status = run_ok(control.control(&["status", "-o", "json"]));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let acked: Vec<_> = status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ackedVersion"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(acked, ["1", "1", "1"]);
    // The control plane's own metrics saw the three proxies and their acknowledgements.
    let metrics = run_ok(control.exec("curl", &["-s", "127.0.0.1:9990/metrics"]));
    for line in [
        "trellis_control_proxies_connected 3",
        "trellis_control_snapshot_answers_total{result=\"ack\"} 6",
        "trellis_control_convergence_seconds_count 3",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    // Applying the same documents again changes nothing and waits for nobody.
    let out = run_ok(control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]));
    assert_eq!(out.trim(), "unchanged (version 1)");
}

#[test]
fn traffic_keeps_its_policy_while_the_control_plane_is_away_and_everything_resyncs_after_a_restart()
{
    let Some((mesh, control, server, client, state)) = setup("control_away") else {
        return;
    };
    let file = mesh.write_file("retry.yaml", &policy(&server, 2));
    run_ok(control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]));

    // The control plane dies for 30 s. Traffic flows with the last good policy.
    control.kill_apps();
    let down = Instant::now();
    let load = client.testapp(&[
        "load",
        "--url",
        &server.url(8080, "/"),
        "--requests",
        "1500",
        "--concurrency",
        "4",
    ]);
    assert_eq!(load["failed"], 0, "{load}");
    assert_eq!(
        client
            .curl(&[&server.url(8080, "/flaky?fail=1&key=away")])
            .status,
        200,
        "retries still in force"
    );
    assert_eq!(client.admin_get("/ready").0, 200);
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));

    // Back from the same state dir: policies and version restored, proxies resync on their own.
    control.start_control_plane(&state);
    let listed = run_ok(control.control(&["get", "TrafficPolicy", "-o", "yaml"]));
    assert!(listed.contains("name: server"), "{listed}");
    wait_for("both proxies to reconnect", Duration::from_secs(40), || {
        let status: serde_json::Value =
            serde_json::from_str(&run_ok(control.control(&["status", "-o", "json"]))).unwrap();
        status["version"] == 1
            && status["proxies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["connected"] == true && p["ackedVersion"] == "1")
                .count()
                == 2
    });
    // A new version reaches both: maxRetries 0, so a 503 is no longer hidden.
    let file = mesh.write_file("retry.yaml", &policy(&server, 0));
    let out = run_ok(control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]));
    assert!(out.contains("2 proxies converged on version 2"), "{out}");
    assert_eq!(
        client
            .curl(&[&server.url(8080, "/flaky?fail=1&key=back")])
            .status,
        503
    );
}

#[test]
fn a_full_disk_rejects_the_apply_and_keeps_the_state_in_force() {
    let Some(mesh) = Mesh::new("control_disk_full") else {
        return;
    };
    let control = mesh.pod("control");
    // The control plane runs in a mount namespace of its own, on a 40 KiB tmpfs (room for the
    // CA and the admin credential, 4 KiB blocks each, and a small state).
    let state = mesh.log_dir().join("tiny-state");
    std::fs::create_dir_all(&state).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=40k tmpfs {dir} && exec {bin} serve --grpc-addr 127.0.0.1:7443 --admin-addr 127.0.0.1:9990 --state-dir {dir}",
        dir = state.display(),
        bin = trellis_tests::harness::control_bin().display()
    );
    let mut cmd = control.netns().command("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let mut cp = trellis_tests::harness::Proc::spawn(
        "control plane on tmpfs",
        cmd,
        &mesh.log_dir().join("cp.log"),
    );
    // The CLI runs in the control plane's mount namespace: its credential is on the tmpfs.
    let pid = cp.pid().to_string();
    let cli = |args: &[&str]| {
        std::process::Command::new("nsenter")
            .args(["-t", &pid, "-m", "-n", "--"])
            .arg(trellis_tests::harness::control_bin())
            .args(args)
            .env("TRELLIS_STATE_DIR", &state)
            .output()
            .unwrap()
    };
    wait_for("the control plane", Duration::from_secs(10), || {
        cli(&["get"]).status.success()
    });

    let small = mesh.write_file("small.yaml", "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: small}\nspec: {timeout: 1s}\n");
    run_ok(cli(&["apply", "-f", &small.to_string_lossy()]));
    // 600 policies do not fit.
    let big: String = (0..600)
        .map(|i| format!("---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p{i}}}\nspec: {{destination: {{host: service-{i}}}, timeout: 2s}}\n"))
        .collect();
    let big = mesh.write_file("big.yaml", &big);
    let out = cli(&["apply", "-f", &big.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot write the state to") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the policy in force is unchanged"),
        "{stderr}"
    );
    let listed = run_ok(cli(&["get"]));
    assert!(
        listed.contains("small") && !listed.contains("p599") && listed.contains("version 1"),
        "{listed}"
    );
    let metrics = run_ok(control.exec("curl", &["-s", "127.0.0.1:9990/metrics"]));
    assert!(
        metrics.contains("trellis_control_apply_errors_total{reason=\"storage\"} 1"),
        "{metrics}"
    );
    cp.signal(libc::SIGTERM);
    cp.wait_timeout(Duration::from_secs(5));
}

#[test]
fn ready_waits_for_the_first_snapshot_then_gives_up_after_the_ready_timeout() {
    let Some(mesh) = Mesh::new("control_ready") else {
        return;
    };
    let control = mesh.pod("control");
    let pod = mesh.pod("pod");
    // The CA exists (an operator prepared the state dir) but the control plane is not running
    // yet: readiness waits, and then gives up after 2 s.
    let state = mesh.log_dir().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (_, ca_cert, ca_key) = trellis_identity::ca::Ca::generate("cluster.local").unwrap();
    std::fs::write(state.join("ca.pem"), &ca_cert).unwrap();
    std::fs::write(state.join("ca-key.pem"), &ca_key).unwrap();
    let anchors = mesh.write_file("anchors.pem", &ca_cert);
    let anchors = anchors.to_string_lossy();
    let url = control.control_url();
    let start = Instant::now();
    pod.start_sidecar(&[
        "--control-plane",
        &url,
        "--trust-anchors",
        &anchors,
        "--ready-timeout",
        "2s",
        "--workload",
        "default/pod",
    ]);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "ready after {waited:?}, before the first snapshot or the timeout"
    );
    let log = pod.proxy_log();
    assert!(log.contains("ready without a policy snapshot"), "{log}");
    assert!(
        log.contains("control plane unreachable; keeping the policy in force"),
        "{log}"
    );

    // A second proxy with a running control plane is ready as soon as its first snapshot is in force.
    control.start_control_plane(&state);
    let other = mesh.pod("other");
    let start = Instant::now();
    other.start_sidecar(&[
        "--control-plane",
        &url,
        "--trust-anchors",
        &anchors,
        "--workload",
        "default/other",
    ]);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        other
            .proxy_log()
            .contains("ready: the first policy snapshot is in force")
    );
    // The first proxy finds the control plane by itself.
    wait_for(
        "the first proxy to subscribe",
        Duration::from_secs(15),
        || pod.proxy_log().contains("subscribed to the control plane"),
    );
}
