//! Policy files in the proxy: loading, matching, hot reload without dropping connections, and
//! rejection of invalid versions with every error named while the policy in force stays.

use std::time::Duration;

use trellis_tests::harness::{Mesh, Pod, wait_for};

const GOOD: &str = "
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: default}
spec:
  destination: {host: web.default.svc.cluster.local, port: 8080}
  retries: {maxRetries: 2, on: [gateway-error], budget: {percent: 100, minPerSecond: 100}}
";

const BAD: &str = "
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: default}
spec:
  destination: {host: web, port: 8080}
  timeout: fast
  retries: {maxRetry: 2, perTryTimeout: 5x}
";

fn config(pod: &Pod) -> serde_json::Value {
    let (status, body) = pod.admin_get("/config");
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_policy_file_applies_by_host_reloads_live_and_invalid_versions_are_rejected() {
    let Some(mesh) = Mesh::new("policy_reload") else {
        return;
    };
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.start_sidecar(&[]);
    let client = mesh.pod("client");
    let file = mesh.write_file("policy.yaml", GOOD);
    client.start_sidecar(&[
        "--policy-file",
        &file.to_string_lossy(),
        "--policy-poll-interval",
        "100ms",
    ]);

    let v1 = config(&client);
    assert_eq!(v1["source"], format!("file:{}", file.display()));
    assert_eq!(v1["policy"]["traffic"][0]["name"], "web");
    let version = v1["version"].as_str().unwrap().to_string();

    // Matched by the short name `web`: the flaky endpoint's two 503s are retried away.
    let url = server.url(8080, "/flaky?fail=2&key=a");
    let rsp = client.curl(&["-H", "Host: web:8080", &url]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    // Another host does not match: the built-in default does not retry 503s.
    let rsp = client.curl(&[
        "-H",
        "Host: other:8080",
        &server.url(8080, "/flaky?fail=1&key=b"),
    ]);
    assert_eq!(rsp.status, 503);
    let m = client.metrics();
    assert_eq!(
        m.sum(
            "trellis_retries_total",
            &[("policy", "default/web"), ("reason", "gateway-error")]
        ),
        2.0
    );
    assert_eq!(
        m.sum("trellis_retries_total", &[("policy", "default")]),
        0.0
    );

    // An open opaque connection must survive reloads.
    server.spawn_app(&["tcp-echo", "--listen", "0.0.0.0:7000"]);
    let long_lived = std::thread::scope(|scope| {
        let conn = scope.spawn(|| {
            client.testapp(&[
                "tcp-call",
                "--connect",
                &server.addr(7000).to_string(),
                "--hold-ms",
                "3000",
                "--send",
                "x",
            ])
        });
        std::thread::sleep(Duration::from_millis(200));

        // An invalid version: rejected with every error named; the version in force stays.
        mesh.write_file("policy.yaml", BAD);
        wait_for(
            "the rejection to be counted",
            Duration::from_secs(10),
            || {
                client
                    .metrics()
                    .sum("trellis_policy_loads_total", &[("result", "rejected")])
                    == 1.0
            },
        );
        let log = client.proxy_log();
        for expected in [
            "spec.timeout: \\\"fast\\\" is not a duration",
            "spec.retries.maxRetry: unknown field (did you mean maxRetries?)",
            "spec.retries.perTryTimeout: \\\"5x\\\" is not a duration",
            "policy file rejected; the policy in force stays",
        ] {
            assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
        }
        assert_eq!(config(&client)["version"], version.as_str());
        let rsp = client.curl(&[
            "-H",
            "Host: web:8080",
            &server.url(8080, "/flaky?fail=2&key=c"),
        ]);
        assert_eq!(rsp.status, 200, "the policy in force still retries");

        // A valid change applies without a restart.
        mesh.write_file(
            "policy.yaml",
            &GOOD.replace("maxRetries: 2", "maxRetries: 0"),
        );
        wait_for("the new version", Duration::from_secs(10), || {
            config(&client)["version"] != version.as_str()
        });
        let rsp = client.curl(&[
            "-H",
            "Host: web:8080",
            &server.url(8080, "/flaky?fail=1&key=d"),
        ]);
        assert_eq!(rsp.status, 503, "maxRetries: 0 is in force");
        conn.join().unwrap()
    });
    // The connection opened before both reloads still carried its bytes after them.
    assert_eq!(long_lived["received"], "x");
    assert_eq!(
        client
            .metrics()
            .sum("trellis_policy_loads_total", &[("result", "applied")]),
        2.0
    );
}

#[test]
fn an_invalid_policy_file_at_start_stops_the_proxy_with_every_error() {
    let Some(mesh) = Mesh::new("policy_invalid_start") else {
        return;
    };
    let pod = mesh.pod("pod");
    let file = mesh.write_file("bad.yaml", BAD);
    let out = pod.exec(
        &trellis_tests::harness::proxy_bin().to_string_lossy(),
        &[
            "run",
            "--policy-file",
            &file.to_string_lossy(),
            "--admin-addr",
            "127.0.0.1:4999",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 error(s) in policy"), "{stderr}");
    assert!(stderr.contains("document 1 (TrafficPolicy default/web): spec.retries.perTryTimeout: \"5x\" is not a duration"), "{stderr}");
}
