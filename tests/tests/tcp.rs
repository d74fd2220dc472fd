//! Opaque TCP through two sidecars: byte-for-byte echo with half-close, server-first protocols,
//! opaque ports, and IPv6 interception.

use trellis_tests::harness::Mesh;

#[test]
fn opaque_tcp_echo_with_half_close_over_ipv4_and_ipv6() {
    let Some(mesh) = Mesh::new("tcp_echo") else {
        return;
    };
    let server = mesh.pod("server");
    // [::] is dual-stack: one listener for IPv4 and IPv6 clients.
    server.spawn_app(&["tcp-echo", "--listen", "[::]:7000"]);
    server.start_sidecar(&[]);
    let client = mesh.pod("client");
    client.start_sidecar(&[]);

    // The client half-closes after sending; the echo still arrives, then EOF.
    let payload = "\u{1}\u{7f}binary-ish payload that is not HTTP\r\n";
    let out = client.testapp(&[
        "tcp-call",
        "--connect",
        &server.addr(7000).to_string(),
        "--send",
        payload,
    ]);
    assert_eq!(out["received"], payload);

    let out = client.testapp(&[
        "tcp-call",
        "--connect",
        &server.addr6(7000).to_string(),
        "--send",
        "over ipv6",
    ]);
    assert_eq!(out["received"], "over ipv6");

    // Both connections (IPv4 and IPv6) were intercepted on both sides.
    let (c, s) = (client.metrics(), server.metrics());
    assert_eq!(
        c.sum(
            "trellis_tcp_connections_opened_total",
            &[("direction", "outbound"), ("protocol", "opaque")]
        ),
        2.0
    );
    assert_eq!(
        s.sum(
            "trellis_tcp_connections_opened_total",
            &[("direction", "inbound"), ("protocol", "opaque")]
        ),
        2.0
    );
    assert!(
        c.sum("trellis_tcp_read_bytes_total", &[("direction", "outbound")]) >= payload.len() as f64
    );
}

#[test]
fn server_first_protocols_wait_only_for_the_detect_timeout_and_opaque_ports_not_at_all() {
    let Some(mesh) = Mesh::new("server_first") else {
        return;
    };
    let server = mesh.pod("server");
    server.spawn_app(&["banner", "--listen", "0.0.0.0:2525"]);
    server.spawn_app(&[
        "banner",
        "--listen",
        "0.0.0.0:3306",
        "--banner",
        "mysql-ish greeting\r\n",
    ]);
    server.start_sidecar(&["--detect-timeout", "300ms"]);
    let client = mesh.pod("client");
    client.start_sidecar(&["--detect-timeout", "300ms"]);

    // Port 2525 is detected: each sidecar waits its 300 ms detect timeout, then forwards.
    let out = client.testapp(&[
        "tcp-call",
        "--connect",
        &server.addr(2525).to_string(),
        "--read-banner",
        "--send",
        "QUIT\r\n",
    ]);
    assert_eq!(out["banner"], "220 banner ready\r\n");
    assert_eq!(out["received"], "QUIT\r\n");
    let first = out["first_byte_ms"].as_f64().unwrap();
    assert!(
        (300.0..3000.0).contains(&first),
        "banner after {first} ms: expected the detect timeouts, not a stall"
    );

    // 3306 is in the default opaque ports: no detection, no wait for the detect timeout.
    let out = client.testapp(&[
        "tcp-call",
        "--connect",
        &server.addr(3306).to_string(),
        "--read-banner",
        "--send",
        "x",
    ]);
    assert_eq!(out["banner"], "mysql-ish greeting\r\n");
    let first = out["first_byte_ms"].as_f64().unwrap();
    assert!(
        first < 300.0,
        "opaque port banner after {first} ms: it waited for detection"
    );
}

#[test]
fn an_idle_opaque_stream_is_closed_after_the_policy_idle_timeout() {
    let Some(mesh) = Mesh::new("tcp_idle") else {
        return;
    };
    let server = mesh.pod("server");
    server.spawn_app(&["tcp-echo", "--listen", "0.0.0.0:7000"]);
    server.start_sidecar(&[]);
    let client = mesh.pod("client");
    let policy = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: echo}}\n\
         spec: {{destination: {{addresses: [\"{}\"]}}, protocol: opaque, idleTimeout: 500ms}}\n",
        server.addr(7000)
    );
    let file = mesh.write_file("policy.yaml", &policy);
    client.start_sidecar(&["--policy-file", &file.to_string_lossy()]);

    // Active within the idle timeout: the echo comes back.
    let out = client.testapp(&[
        "tcp-call",
        "--connect",
        &server.addr(7000).to_string(),
        "--hold-ms",
        "100",
        "--send",
        "on time",
    ]);
    assert_eq!(out["received"], "on time");
    // Silent for 1.5 s: the client's sidecar closes the stream after 500 ms.
    let late = client.exec(
        &trellis_tests::harness::testapp_bin().to_string_lossy(),
        &[
            "tcp-call",
            "--connect",
            &server.addr(7000).to_string(),
            "--hold-ms",
            "1500",
            "--send",
            "too late",
        ],
    );
    let stdout = String::from_utf8_lossy(&late.stdout);
    assert!(
        !stdout.contains("too late"),
        "the echo came back after the idle timeout: {stdout}"
    );
    let m = client.metrics();
    assert_eq!(
        m.sum(
            "trellis_proxy_errors_total",
            &[("direction", "outbound"), ("cause", "idle-timeout")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "trellis_tcp_connections_opened_total",
            &[("protocol", "opaque")]
        ),
        2.0,
        "protocol: opaque skipped detection"
    );
}
