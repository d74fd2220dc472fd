//! Metrics and access logs end to end: `/metrics` read by Prometheus' own parser with bounded
//! labels under many distinct paths, and the JSON access log on the sidecars' stdout, whose
//! trace ids match the spans a real OTLP receiver got.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::harness::traced::*;
use trellis_tests::harness::{
    Mesh, OtlpReceiver, Pod, SPAN_KIND_CLIENT, SPAN_KIND_SERVER, check_with_prometheus_parser,
    wait_for,
};

#[test]
fn metrics_parse_with_prometheus_and_paths_never_become_labels() {
    let Some(mesh) = Mesh::new("metrics_cardinality") else {
        return;
    };
    let server = mesh.pod("server");
    http_app(&server, "server");
    server.start_sidecar(&[]);
    let client = mesh.pod("client");
    client.start_sidecar(&[]);
    for pod in [&client, &server] {
        let text = pod.metrics().text;
        if let Err(e) = check_with_prometheus_parser(&text) {
            panic!("{}'s /metrics before traffic: {e}\n{text}", pod.name);
        }
    }

    // 1,000 requests, each to a path of its own.
    let out = client.testapp(&[
        "load",
        "--url",
        &server.url(HTTP, "/item/"),
        "--distinct-paths",
        "--requests",
        "1000",
        "--concurrency",
        "10",
    ]);
    assert_eq!(out["ok"], 1000, "{out}");

    let labels: HashSet<&str> = [
        "direction",
        "protocol",
        "destination",
        "status",
        "grpc_status",
        "tls",
        "peer_identity",
    ]
    .into();
    for (pod, direction) in [(&client, "outbound"), (&server, "inbound")] {
        let m = pod.metrics();
        let samples = check_with_prometheus_parser(&m.text)
            .unwrap_or_else(|e| panic!("{}'s /metrics: {e}\n{}", pod.name, m.text));
        assert!(samples > 0, "{}", m.text);
        assert_eq!(
            m.sum("trellis_requests_total", &[("direction", direction)]),
            1000.0
        );
        let series = m.series("trellis_requests_total");
        assert!(
            !series.is_empty() && series.len() < 10,
            "{} series of trellis_requests_total on {}:\n{}",
            series.len(),
            pod.name,
            m.text
        );
        for s in &series {
            let keys: HashSet<&str> = s.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, labels, "{s:?}");
        }
        assert!(
            !m.text.contains("/item/"),
            "a path became a label value on {}:\n{}",
            pod.name,
            m.text
        );
    }
}

/// `2025-01-31T12:34:56.789Z`
fn is_rfc3339_millis_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

fn is_hex(v: &Value, len: usize) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[test]
fn the_access_log_has_one_json_line_per_request_with_its_hops_trace() {
    let Some(mesh) = Mesh::new("access_log_json") else {
        return;
    };
    let collector = mesh.pod("collector");
    let otlp = OtlpReceiver::start(&collector);
    let server = mesh.pod("server");
    http_app(&server, "server");
    server.spawn_app(&["tcp-echo", "--listen", "0.0.0.0:9000"]);
    traced(&server, &otlp.url(), "api", "1.0", &[]);
    let client = mesh.pod("client");
    traced(&client, &otlp.url(), "web", "1.0", &[]);

    // Three requests: a plain 200, an app's 404, and a body streamed over 200 ms.
    let requests = [
        ("/", 200),
        ("/status/404", 404),
        ("/stream?chunks=3&interval_ms=100", 200),
    ];
    let mut bodies = Vec::new();
    for (path, status) in requests {
        let rsp = client.curl(&[&server.url(HTTP, path)]);
        assert_eq!(rsp.status, status, "{rsp:?}");
        bodies.push(rsp.body.len());
    }
    let spans = otlp.wait_for(6, EXPORT_WAIT);
    assert_eq!(spans.len(), 6, "{}", show(&spans));
    // One opaque TCP connection: 12 bytes each way.
    let out = client.testapp(&[
        "tcp-call",
        "--connect",
        &server.addr(9000).to_string(),
        "--send",
        "hello opaque",
    ]);
    assert_eq!(out["received"], "hello opaque");
    let lines_of = |pod: &Pod, kind: &str, n: usize| {
        wait_for(
            &format!("{n} {kind} access log lines from {}", pod.name),
            Duration::from_secs(10),
            || {
                pod.access_log_json()
                    .iter()
                    .filter(|l| l["kind"] == kind)
                    .count()
                    >= n
            },
        );
        // Every line of stdout is a JSON object: nothing else is written there.
        let text = pod.access_log();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let parsed: Result<Value, _> = serde_json::from_str(line);
            assert!(
                parsed.as_ref().is_ok_and(Value::is_object),
                "{}'s stdout has a line that is no JSON object: {line:?}",
                pod.name
            );
        }
        let lines: Vec<Value> = pod
            .access_log_json()
            .into_iter()
            .filter(|l| l["kind"] == kind)
            .collect();
        assert_eq!(lines.len(), n, "one line per request:\n{text}");
        lines
    };

    let mut traces_by_path = std::collections::HashMap::new();
    for (pod, direction, service, kind) in [
        (&client, "outbound", "web", SPAN_KIND_CLIENT),
        (&server, "inbound", "api", SPAN_KIND_SERVER),
    ] {
        let lines = lines_of(pod, "http", 3);
        for ((path, status), body_len) in requests.iter().zip(&bodies) {
            let want_path = path.split('?').next().unwrap_or(path);
            let line = lines
                .iter()
                .find(|l| {
                    l["path"]
                        .as_str()
                        .is_some_and(|p| p.split('?').next() == Some(want_path))
                })
                .unwrap_or_else(|| panic!("no {direction} line for {path}: {lines:?}"));
            let time = line["time"].as_str().unwrap_or("");
            assert!(is_rfc3339_millis_utc(time), "time {time:?}: {line}");
            assert_eq!(line["direction"], direction, "{line}");
            assert_eq!(line["protocol"], "http1", "{line}");
            assert_eq!(line["method"], "GET", "{line}");
            assert_eq!(line["authority"], server.addr(HTTP).to_string(), "{line}");
            assert_eq!(line["status"], *status, "{line}");
            assert_eq!(line["grpc_status"], Value::Null, "{line}");
            assert_eq!(line["request_bytes"], 0, "{line}");
            assert_eq!(line["response_bytes"], *body_len, "{line}");
            assert_eq!(line["attempts"], 1, "{line}");
            assert!(line["policy"].is_string(), "{line}");
            assert_eq!(line["peer_identity"], Value::Null, "{line}");
            assert_eq!(line["tls"], false, "{line}");
            assert_eq!(line["trellis_error"], Value::Null, "{line}");
            assert_eq!(line["error_detail"], Value::Null, "{line}");
            for addr in ["client", "upstream"] {
                assert!(
                    line[addr]
                        .as_str()
                        .is_some_and(|a| a.parse::<SocketAddr>().is_ok()),
                    "{addr}: {line}"
                );
            }
            let (total, headers) = (
                line["duration_ms"].as_f64().unwrap_or(-1.0),
                line["response_headers_ms"].as_f64().unwrap_or(-1.0),
            );
            assert!(0.0 <= headers && headers <= total, "{line}");
            if path.starts_with("/stream") {
                // Two 100 ms pauses between chunks, after the headers: the duration covers the body.
                assert!(total >= 190.0 && total - headers >= 150.0, "{line}");
            }
            // The line names this hop's span.
            assert!(
                is_hex(&line["trace_id"], 32) && is_hex(&line["span_id"], 16),
                "{line}"
            );
            let span = spans
                .iter()
                .find(|s| line["span_id"] == s.span_id.as_str())
                .unwrap_or_else(|| {
                    panic!(
                        "no span {} in the receiver: {}",
                        line["span_id"],
                        show(&spans)
                    )
                });
            assert_eq!(line["trace_id"], span.trace_id.as_str(), "{line}");
            assert_eq!(
                (span.service_name.as_str(), span.kind),
                (service, kind),
                "{line}"
            );
            // Both hops of a request are in one trace.
            let trace = traces_by_path
                .entry(*path)
                .or_insert_with(|| span.trace_id.clone());
            assert_eq!(*trace, span.trace_id, "{path}: the two hops' traces differ");
        }
        let tcp = lines_of(pod, "tcp", 1);
        let line = &tcp[0];
        assert_eq!(line["direction"], direction, "{line}");
        assert_eq!(line["protocol"], "opaque", "{line}");
        assert_eq!(line["request_bytes"], 12, "{line}");
        assert_eq!(line["response_bytes"], 12, "{line}");
        assert_eq!(line["tls"], false, "{line}");
        assert_eq!(line["trellis_error"], Value::Null, "{line}");
        assert!(
            is_rfc3339_millis_utc(line["time"].as_str().unwrap_or("")),
            "{line}"
        );
    }
}
