//! Retries, budgets and timeouts through two sidecars, each scenario with the policy a user
//! would write.

use std::time::Instant;

use trellis_tests::harness::{Mesh, Pod};

/// A policy document for the calls to `addresses`/`host`, with `spec` lines appended.
fn policy(name: &str, destination: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  destination: {destination}\n{spec}\n"
    )
}

/// A server pod with the HTTP app (and gRPC app) and a client pod with `policies`.
fn setup(test: &str, policies: &str) -> Option<(Mesh, Pod, Pod)> {
    let mesh = Mesh::new(test)?;
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.spawn_app(&["grpc", "--listen", "0.0.0.0:50051", "--name", "grpc-server"]);
    server.start_sidecar(&[]);
    let client = mesh.pod("client");
    let file = mesh.write_file(
        "policy.yaml",
        &policies.replace("SERVER", &server.ip.to_string()),
    );
    client.start_sidecar(&["--policy-file", &file.to_string_lossy()]);
    Some((mesh, client, server))
}

fn retries(pod: &Pod, policy: &str, reason: &str) -> f64 {
    pod.metrics().sum(
        "trellis_retries_total",
        &[("policy", policy), ("reason", reason)],
    )
}

#[test]
fn two_503s_are_hidden_by_two_retries() {
    let p = policy(
        "web",
        "{addresses: [\"SERVER:8080\"]}",
        "  retries: {maxRetries: 2, on: [gateway-error]}",
    );
    let Some((_mesh, client, server)) = setup("retry_503", &p) else {
        return;
    };
    let rsp = client.curl(&[&server.url(8080, "/flaky?fail=2&key=a")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(rsp.body, "success after 2 failures from server\n");
    assert_eq!(retries(&client, "default/web", "gateway-error"), 2.0);
    // A third failure is beyond maxRetries: the client sees the upstream's own 503.
    let rsp = client.curl(&[&server.url(8080, "/flaky?fail=3&key=b")]);
    assert_eq!(rsp.status, 503);
    assert_eq!(retries(&client, "default/web", "gateway-error"), 4.0);
}

#[test]
fn retries_stay_within_the_budget_against_an_always_failing_upstream() {
    let p = policy(
        "web",
        "{addresses: [\"SERVER:8080\"]}",
        "  retries: {maxRetries: 2, on: [gateway-error], backoff: {base: 1ms, max: 5ms}, budget: {percent: 20, minPerSecond: 10}}",
    );
    let Some((_mesh, client, server)) = setup("retry_budget", &p) else {
        return;
    };
    let start = Instant::now();
    let out = client.testapp(&[
        "load",
        "--url",
        &server.url(8080, "/status/503"),
        "--requests",
        "600",
        "--concurrency",
        "10",
    ]);
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(out["statuses"]["503"], 600, "{out}");

    let m = client.metrics();
    let sent = m.sum("trellis_retries_total", &[("policy", "default/web")]);
    let refused = m.sum(
        "trellis_retry_budget_exhausted_total",
        &[("policy", "default/web")],
    );
    // 20 % of the requests plus 10 per second of the (at most 10 s) window.
    let allowed = 0.2 * 600.0 + 10.0 * (secs.ceil() + 1.0).min(10.0);
    eprintln!(
        "600 requests in {secs:.2} s: {sent} retries sent, {refused} refused by the budget (allowed ≤ {allowed})"
    );
    assert!(
        sent <= allowed,
        "{sent} retries exceed the budget of {allowed}"
    );
    assert!(sent >= 100.0, "the budget allows at least 20 % ({sent})");
    assert!(
        refused > 0.0,
        "without a budget 1,200 retries would have been sent"
    );
    // The upstream saw exactly the first attempts plus the retries that were allowed.
    let upstream = server
        .metrics()
        .sum("trellis_requests_total", &[("direction", "inbound")]);
    assert_eq!(upstream, 600.0 + sent);
}

#[test]
fn the_overall_timeout_ends_the_call_with_a_named_504() {
    let p = policy("web", "{addresses: [\"SERVER:8080\"]}", "  timeout: 1s");
    let Some((_mesh, client, server)) = setup("overall_timeout", &p) else {
        return;
    };
    let rsp = client.curl(&[&server.url(8080, "/slow?ms=3000")]);
    assert_eq!(rsp.status, 504, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("timeout"));
    assert!(
        (0.9..2.5).contains(&rsp.time_total),
        "504 after {} s for a 1 s timeout",
        rsp.time_total
    );
    let m = client.metrics();
    assert_eq!(
        m.sum(
            "trellis_proxy_errors_total",
            &[("direction", "outbound"), ("cause", "timeout")]
        ),
        1.0
    );
    let line = client.expect_access_log_line("for the 504", |l| l["status"] == 504);
    assert_eq!(
        line["attempts"], 1,
        "the access log names the attempt count: {line}"
    );
    assert_eq!(line["trellis_error"], "timeout", "{line}");
}

#[test]
fn post_bodies_are_replayed_only_when_that_is_safe() {
    let policies = [
        policy(
            "replay",
            "{host: replay, port: 8080}",
            "  retries: {maxRetries: 2, on: [reset], nonIdempotent: true}",
        ),
        policy(
            "no-replay",
            "{host: noreplay, port: 8080}",
            "  retries: {maxRetries: 2, on: [reset, connect-failure]}",
        ),
    ]
    .concat();
    let Some((mesh, client, server)) = setup("post_replay", &policies) else {
        return;
    };
    let small = mesh.write_file("small.bin", &"s".repeat(10 * 1024));
    let large = mesh.write_file("large.bin", &"L".repeat(1024 * 1024));
    let post = |host: &str, file: &std::path::Path, key: &str| {
        client.curl(&[
            "-H",
            &format!("Host: {host}:8080"),
            "-H",
            "Expect:",
            "--data-binary",
            &format!("@{}", file.display()),
            &server.url(8080, &format!("/reset-once?key={key}")),
        ])
    };

    // 10 KiB, opted in: the app resets the first attempt; the replayed body arrives whole.
    let rsp = post("replay", &small, "p1");
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let seen: serde_json::Value = serde_json::from_str(&rsp.body).unwrap();
    assert_eq!(seen["bytes"], 10 * 1024);
    assert_eq!(retries(&client, "default/replay", "reset"), 1.0);

    // 1 MiB is over the 64 KiB replay buffer: sent once, the reset reaches the client.
    let rsp = post("replay", &large, "p2");
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("upstream-reset"));
    assert_eq!(
        retries(&client, "default/replay", "reset"),
        1.0,
        "no retry for a body over the buffer"
    );

    // Without the opt-in, a POST that may have reached the app is not retried.
    let rsp = post("noreplay", &small, "p3");
    assert_eq!(rsp.status, 502);
    assert_eq!(retries(&client, "default/no-replay", "reset"), 0.0);
}

#[test]
fn a_post_that_never_reached_an_app_is_retried_on_another_endpoint() {
    let Some(mesh) = Mesh::new("post_failover") else {
        return;
    };
    let alive = mesh.pod("alive");
    alive.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "alive"]);
    alive.start_sidecar(&[]);
    let dead = mesh.pod("dead"); // a sidecar, but no app: it answers connect-refused
    dead.start_sidecar(&[]);
    let client = mesh.pod("client");
    let p = policy(
        "failover",
        &format!(
            "{{host: failover, port: 8080, endpoints: [\"{}\", \"{}\"]}}",
            dead.addr(8080),
            alive.addr(8080)
        ),
        "  retries: {maxRetries: 2, on: [connect-failure]}",
    );
    let file = mesh.write_file("policy.yaml", &p);
    client.start_sidecar(&["--policy-file", &file.to_string_lossy()]);
    for _ in 0..10 {
        let rsp = client.curl(&[
            "-H",
            "Host: failover:8080",
            "--data-binary",
            "order=42",
            &alive.url(8080, "/upload"),
        ]);
        assert_eq!(rsp.status, 200, "{rsp:?}");
        assert!(rsp.body.contains("\"from\":\"alive\""), "{}", rsp.body);
    }
    let retried = retries(&client, "default/failover", "connect-failure");
    assert!(
        retried >= 1.0,
        "P2C picked the dead endpoint at least once in 10 calls: {retried}"
    );
    assert_eq!(
        dead.metrics().sum(
            "trellis_proxy_errors_total",
            &[("cause", "connect-refused")]
        ),
        retried
    );
}

#[test]
fn grpc_unavailable_is_retried_and_not_found_is_not() {
    let p = policy(
        "grpc",
        "{addresses: [\"SERVER:50051\"]}",
        "  retries: {maxRetries: 2, on: [unavailable]}",
    );
    let Some((_mesh, client, server)) = setup("grpc_retry", &p) else {
        return;
    };
    let target = format!("http://{}:50051", server.ip);
    let out = client.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "fail",
        "--code",
        "14",
        "--key",
        "g1",
        "--times",
        "1",
    ]);
    assert_eq!(out["ok"], true, "UNAVAILABLE once, then retried: {out}");
    assert_eq!(out["message"], "recovered");
    assert_eq!(retries(&client, "default/grpc", "grpc-status"), 1.0);

    let out = client.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "fail",
        "--code",
        "5",
        "--key",
        "g2",
        "--times",
        "1",
    ]);
    assert_eq!(out["code"], 5, "NOT_FOUND reaches the caller: {out}");
    assert_eq!(
        retries(&client, "default/grpc", "grpc-status"),
        1.0,
        "NOT_FOUND is not retried"
    );
}

#[test]
fn a_grpc_stream_outlives_the_request_timeout() {
    let p = policy(
        "grpc",
        "{addresses: [\"SERVER:50051\"]}",
        "  timeout: 500ms",
    );
    let Some((_mesh, client, server)) = setup("grpc_stream_timeout", &p) else {
        return;
    };
    let target = format!("http://{}:50051", server.ip);
    // Six messages 200 ms apart: 1.2 s, well past the 500 ms timeout to the response headers.
    let out = client.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "stream",
        "--count",
        "6",
        "--interval-ms",
        "200",
    ]);
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["items"].as_array().unwrap().len(), 6);
}

#[test]
fn when_every_endpoint_is_ejected_the_call_fails_with_no_healthy_endpoints() {
    let Some(mesh) = Mesh::new("no_healthy") else {
        return;
    };
    let dead = mesh.pod("dead");
    dead.start_sidecar(&[]);
    let client = mesh.pod("client");
    let p = policy(
        "gone",
        &format!(
            "{{host: gone, port: 8080, endpoints: [\"{}\"]}}",
            dead.addr(8080)
        ),
        "  retries: {maxRetries: 1, on: [connect-failure]}\n  ejection: {consecutiveFailures: 1, baseTime: 30s, maxTime: 60s}",
    );
    let file = mesh.write_file("policy.yaml", &p);
    client.start_sidecar(&["--policy-file", &file.to_string_lossy()]);
    // The only endpoint fails once and is ejected; the retry finds nothing to send to.
    let rsp = client.curl(&["-H", "Host: gone:8080", &dead.url(8080, "/")]);
    assert_eq!(rsp.status, 503, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("no-healthy-endpoints"));
    assert!(
        rsp.body
            .contains("all 1 endpoints of policy default/gone are ejected"),
        "{}",
        rsp.body
    );
    let config: serde_json::Value = serde_json::from_str(&client.admin_get("/config").1).unwrap();
    assert!(
        config["endpoints"][0]["ejectedForMs"].as_u64().unwrap() > 20_000,
        "{config}"
    );
}
