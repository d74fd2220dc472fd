//! Traces end to end: spans from the sidecars to a real OTLP/gRPC receiver — one connected
//! trace across three workloads, retries as sibling attempts, B3 and W3C context, sampling
//! decisions, gRPC attributes, and a collector that is down.
//!
//! Traced sidecars run as workload `shop/NAME` with `--pod-name` set and export to a `collector`
//! pod that runs the receiver and nothing else. Sidecars export in batches, so every check on
//! spans first waits (bounded) for the spans it expects.

use std::collections::HashSet;
use std::time::Duration;

use trellis_tests::harness::traced::*;
use trellis_tests::harness::{
    Mesh, OtlpReceiver, ReceivedSpan, SPAN_KIND_CLIENT, SPAN_KIND_SERVER, collector_url, wait_for,
};

/// The receiver itself, fed by a plain OTLP client from another pod: when the tests below find
/// no spans, this one tells whether the receiver or the sidecars are at fault.
#[test]
fn the_receiver_records_what_an_otlp_exporter_sends() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value as V};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    let Some(mesh) = Mesh::new("otlp_receiver") else {
        return;
    };
    let collector = mesh.pod("collector");
    let otlp = OtlpReceiver::start(&collector);
    let app = mesh.pod("app");
    let kv = |key: &str, v: V| KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    };
    let span = Span {
        trace_id: vec![0xab; 16],
        span_id: vec![0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08],
        parent_span_id: vec![0; 8],
        name: "GET".into(),
        kind: SPAN_KIND_SERVER,
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 2_000,
        attributes: vec![
            kv("http.request.method", V::StringValue("GET".into())),
            kv("http.response.status_code", V::IntValue(200)),
            kv("trellis.tls", V::BoolValue(false)),
        ],
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", V::StringValue("probe".into())),
                    kv("k8s.namespace.name", V::StringValue(NAMESPACE.into())),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![
                    span.clone(),
                    Span {
                        kind: SPAN_KIND_CLIENT,
                        ..span
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let url = otlp.url();
    let sent = app.netns().enter(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let mut client = TraceServiceClient::connect(url).await?;
            client.export(request).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    });
    assert!(sent.is_ok(), "export to {}: {sent:?}", otlp.url());

    let spans = otlp.wait_for(2, Duration::from_secs(5));
    assert_eq!(spans.len(), 2, "{}", show(&spans));
    assert_eq!(otlp.requests(), 1);
    let s = only(&spans, "probe", SPAN_KIND_SERVER);
    assert_eq!(s.trace_id, "ab".repeat(16));
    assert_eq!(s.span_id, "0102030405060708");
    assert!(s.is_root(), "an all-zero parent is no parent");
    assert_eq!(s.resource["k8s.namespace.name"], NAMESPACE);
    assert_eq!(s.attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(s.int_attr("http.response.status_code"), Some(200));
    assert_eq!(s.attr("trellis.tls").as_deref(), Some("false"));
    assert_eq!((s.start_unix_nanos, s.end_unix_nanos), (1_000, 2_000));
    only(&spans, "probe", SPAN_KIND_CLIENT);
}

#[test]
fn one_trace_follows_a_request_across_three_workloads() {
    let Some(mesh) = Mesh::new("trace_three_workloads") else {
        return;
    };
    let collector = mesh.pod("collector");
    let otlp = OtlpReceiver::start(&collector);
    let c = mesh.pod("c");
    http_app(&c, "c");
    traced(&c, &otlp.url(), "payments", "1.0", &[]);
    let b = mesh.pod("b");
    http_app(&b, "b");
    traced(&b, &otlp.url(), "orders", "1.0", &[]);
    let client = mesh.pod("client");
    traced_with_env(
        &client,
        &otlp.url(),
        "web",
        "1.0",
        &[],
        &[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=e2e,team=checkout",
        )],
    );

    // client → b's app, which calls c's app forwarding the trace context it received.
    let call = format!("/call?to={}&path=/headers", c.addr(HTTP));
    let rsp = client.curl(&[&b.url(HTTP, &call)]);
    let c_saw = app_saw(&rsp);

    otlp.wait_for(4, EXPORT_WAIT);
    // A fifth span would be a bug; it would have left in the same batches, so 2 s is plenty.
    std::thread::sleep(Duration::from_secs(2));
    let spans = otlp.spans();
    assert_eq!(spans.len(), 4, "{}", show(&spans));
    let web = only(&spans, "web", SPAN_KIND_CLIENT);
    let b_in = only(&spans, "orders", SPAN_KIND_SERVER);
    let b_out = only(&spans, "orders", SPAN_KIND_CLIENT);
    let c_in = only(&spans, "payments", SPAN_KIND_SERVER);

    // One trace, and the parent links exactly follow the request.
    let trace = &web.trace_id;
    assert!(
        spans.iter().all(|s| &s.trace_id == trace),
        "{}",
        show(&spans)
    );
    assert!(
        trace.len() == 32 && trace.bytes().any(|b| b != b'0'),
        "{trace}"
    );
    assert!(web.is_root(), "curl sent no context: {}", show(&spans));
    assert_eq!(b_in.parent_span_id, web.span_id, "{}", show(&spans));
    assert_eq!(b_out.parent_span_id, b_in.span_id, "{}", show(&spans));
    assert_eq!(c_in.parent_span_id, b_out.span_id, "{}", show(&spans));
    let distinct: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(distinct.len(), 4, "{}", show(&spans));
    // c's app was told about c's SERVER span, sampled.
    assert_eq!(
        traceparent(&c_saw["traceparent"]),
        (trace.clone(), c_in.span_id.clone(), "01".into()),
        "{c_saw}"
    );
    // Each hop starts after the one that caused it (one clock: all pods share the machine).
    for (child, parent) in [(b_in, web), (b_out, b_in), (c_in, b_out)] {
        assert!(
            child.start_unix_nanos >= parent.start_unix_nanos,
            "{} {} starts before its parent",
            child.service_name,
            kind_name(child.kind)
        );
    }

    // Who sent each span.
    for (span, pod, name) in [
        (web, &client, "web"),
        (b_in, &b, "orders"),
        (b_out, &b, "orders"),
        (c_in, &c, "payments"),
    ] {
        assert_eq!(span.service_name, name);
        assert_eq!(
            span.resource.get("k8s.namespace.name").map(String::as_str),
            Some(NAMESPACE),
            "{:?}",
            span.resource
        );
        assert_eq!(
            span.resource.get("k8s.pod.name"),
            Some(&pod.name),
            "{:?}",
            span.resource
        );
    }
    // OTEL_RESOURCE_ATTRIBUTES adds keys; it does not replace the workload's name.
    assert_eq!(
        web.resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("e2e"),
        "{:?}",
        web.resource
    );
    assert_eq!(
        web.resource.get("team").map(String::as_str),
        Some("checkout")
    );
    assert_eq!(b_in.resource.get("team"), None);

    // The semantic attributes of each hop.
    assert_http_get_200(web, "/call", &b);
    assert_http_get_200(b_in, "/call", &b);
    assert_http_get_200(b_out, "/headers", &c);
    assert_http_get_200(c_in, "/headers", &c);
}

#[test]
fn each_retry_attempt_is_a_client_span_of_its_own() {
    let Some(mesh) = Mesh::new("trace_retries") else {
        return;
    };
    let collector = mesh.pod("collector");
    let otlp = OtlpReceiver::start(&collector);
    let server = mesh.pod("server");
    http_app(&server, "server");
    traced(&server, &otlp.url(), "api", "1.0", &[]);
    let client = mesh.pod("client");
    // In the client's namespace (shop): a TrafficPolicy applies to the clients of its namespace.
    let policy = mesh.write_file(
        "policy.yaml",
        &format!(
            "---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web, namespace: shop}}\n\
             spec:\n  destination: {{addresses: [\"{}\"]}}\n  retries: {{maxRetries: 2, on: [gateway-error]}}\n",
            server.addr(HTTP)
        ),
    );
    traced(
        &client,
        &otlp.url(),
        "web",
        "1.0",
        &["--policy-file", &policy.to_string_lossy()],
    );

    // The caller sent context: both attempts are children of the caller's span.
    let (trace, caller) = ids(1);
    let rsp = client.curl(&[
        "-H",
        &format!("traceparent: 00-{trace}-{caller}-01"),
        &server.url(HTTP, "/flaky?fail=1&key=t1"),
    ]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(rsp.body, "success after 1 failures from server\n");
    let spans = in_trace(
        &otlp.wait_until(EXPORT_WAIT, |s| in_trace(s, &trace).len() >= 4),
        &trace,
    );
    assert_eq!(
        spans.len(),
        4,
        "2 attempts, 2 server spans: {}",
        show(&spans)
    );
    let mut attempts = of(&spans, "web", SPAN_KIND_CLIENT);
    assert_eq!(attempts.len(), 2, "{}", show(&spans));
    attempts.sort_by_key(|s| s.start_unix_nanos);
    let (first, second) = (attempts[0], attempts[1]);
    for attempt in [first, second] {
        assert_eq!(attempt.parent_span_id, caller, "siblings: {}", show(&spans));
    }
    assert_ne!(first.span_id, second.span_id);
    assert_eq!(first.int_attr("http.response.status_code"), Some(503));
    assert!(first.attr("error.type").is_some(), "{first:#?}");
    assert_eq!(first.attr("http.request.resend_count"), None, "{first:#?}");
    assert_eq!(second.int_attr("http.response.status_code"), Some(200));
    assert_eq!(
        second.int_attr("http.request.resend_count"),
        Some(1),
        "{second:#?}"
    );
    assert_eq!(second.attr("error.type"), None, "{second:#?}");
    // The server's sidecar saw each attempt as a request of its own, child of that attempt.
    let served = of(&spans, "api", SPAN_KIND_SERVER);
    assert_eq!(served.len(), 2, "{}", show(&spans));
    for (attempt, status) in [(first, 503), (second, 200)] {
        let server_span = served
            .iter()
            .find(|s| s.parent_span_id == attempt.span_id)
            .unwrap_or_else(|| panic!("no SERVER span under attempt {}", attempt.span_id));
        assert_eq!(
            server_span.int_attr("http.response.status_code"),
            Some(status)
        );
    }

    // The access log has one line for the request, naming both attempts and this hop's trace.
    let lines = client.access_log_json();
    let line = lines
        .iter()
        .find(|l| l["trace_id"] == trace.as_str())
        .unwrap_or_else(|| {
            panic!(
                "no access log line in trace {trace}:\n{}",
                client.access_log()
            )
        });
    assert_eq!(line["attempts"], 2, "{line}");
    assert_eq!(line["policy"], "shop/web", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(
        line["span_id"],
        second.span_id.as_str(),
        "the last attempt's span: {line}"
    );

    // No context from the caller: two root attempts, still one trace.
    let rsp = client.curl(&[&server.url(HTTP, "/flaky?fail=1&key=t2")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let spans = otlp.wait_until(EXPORT_WAIT, |s| {
        of(s, "web", SPAN_KIND_CLIENT)
            .iter()
            .filter(|a| a.trace_id != trace)
            .count()
            >= 2
    });
    let mut attempts: Vec<&ReceivedSpan> = of(&spans, "web", SPAN_KIND_CLIENT)
        .into_iter()
        .filter(|a| a.trace_id != trace)
        .collect();
    assert_eq!(attempts.len(), 2, "{}", show(&spans));
    attempts.sort_by_key(|s| s.start_unix_nanos);
    assert_eq!(
        attempts[0].trace_id,
        attempts[1].trace_id,
        "{}",
        show(&spans)
    );
    assert!(attempts.iter().all(|a| a.is_root()), "{}", show(&spans));
    assert_eq!(attempts[1].int_attr("http.request.resend_count"), Some(1));
    assert!(attempts[0].attr("error.type").is_some());
}

#[test]
fn b3_context_from_the_caller_is_continued_and_sent_on_in_both_formats() {
    let Some((_mesh, _collector, otlp, client, server)) = client_and_server("trace_b3") else {
        return;
    };
    // B3 multi headers, as a Zipkin-instrumented app sends them.
    let (trace, caller) = ids(2);
    let rsp = client.curl(&[
        "-H",
        &format!("X-B3-TraceId: {trace}"),
        "-H",
        &format!("X-B3-SpanId: {caller}"),
        "-H",
        "X-B3-Sampled: 1",
        &server.url(HTTP, "/headers"),
    ]);
    let saw = app_saw(&rsp);
    let spans = in_trace(
        &otlp.wait_until(EXPORT_WAIT, |s| in_trace(s, &trace).len() >= 2),
        &trace,
    );
    assert_eq!(spans.len(), 2, "{}", show(&spans));
    let out = only(&spans, "web", SPAN_KIND_CLIENT);
    let inb = only(&spans, "api", SPAN_KIND_SERVER);
    assert_eq!(out.parent_span_id, caller, "{}", show(&spans));
    assert_eq!(inb.parent_span_id, out.span_id, "{}", show(&spans));
    // The app gets the server sidecar's span in W3C and in B3, one trace id in both.
    assert_eq!(
        traceparent(&saw["traceparent"]),
        (trace.clone(), inb.span_id.clone(), "01".into()),
        "{saw}"
    );
    assert_eq!(saw["x-b3-traceid"], trace.as_str(), "{saw}");
    assert_eq!(saw["x-b3-spanid"], inb.span_id.as_str(), "{saw}");
    assert_eq!(saw["x-b3-sampled"], "1", "{saw}");
    assert_eq!(
        saw["b3"],
        format!("{trace}-{}-1", inb.span_id).as_str(),
        "{saw}"
    );

    // The single b3 header is continued too.
    let (trace, caller) = ids(3);
    let rsp = client.curl(&[
        "-H",
        &format!("b3: {trace}-{caller}-1"),
        &server.url(HTTP, "/headers"),
    ]);
    let saw = app_saw(&rsp);
    let spans = in_trace(
        &otlp.wait_until(EXPORT_WAIT, |s| in_trace(s, &trace).len() >= 2),
        &trace,
    );
    assert_eq!(spans.len(), 2, "{}", show(&spans));
    let out = only(&spans, "web", SPAN_KIND_CLIENT);
    let inb = only(&spans, "api", SPAN_KIND_SERVER);
    assert_eq!(out.parent_span_id, caller, "{}", show(&spans));
    assert_eq!(inb.parent_span_id, out.span_id, "{}", show(&spans));
    assert_eq!(traceparent(&saw["traceparent"]).0, trace, "{saw}");
    assert_eq!(saw["x-b3-traceid"], trace.as_str(), "{saw}");
}

#[test]
fn an_unsampled_caller_gets_no_spans_anywhere_and_the_decision_travels_on() {
    let Some((_mesh, _collector, otlp, client, server)) = client_and_server("trace_unsampled")
    else {
        return;
    };
    let get = |trace: &str, span: &str, flags: &str| {
        app_saw(&client.curl(&[
            "-H",
            &format!("traceparent: 00-{trace}-{span}-{flags}"),
            &server.url(HTTP, "/headers"),
        ]))
    };
    // First, the exporter works: a sampled request shows up.
    let (sampled, span) = ids(4);
    get(&sampled, &span, "01");
    let spans = otlp.wait_until(EXPORT_WAIT, |s| in_trace(s, &sampled).len() >= 2);
    assert_eq!(in_trace(&spans, &sampled).len(), 2, "{}", show(&spans));

    // Five unsampled requests: the app sees the decision, in both formats.
    let mut unsampled = Vec::new();
    for n in 0..5 {
        let (trace, span) = ids(0x10 + n);
        let saw = get(&trace, &span, "00");
        let (seen_trace, _, flags) = traceparent(&saw["traceparent"]);
        assert_eq!(
            (seen_trace.as_str(), flags.as_str()),
            (trace.as_str(), "00"),
            "{saw}"
        );
        assert_eq!(saw["x-b3-sampled"], "0", "{saw}");
        unsampled.push(trace);
    }

    // Then a sampled one. Each sidecar exports its spans in the order they end, so once this
    // one's spans from both sidecars are in, any span of the unsampled requests would be too.
    let (sentinel, span) = ids(5);
    get(&sentinel, &span, "01");
    let spans = otlp.wait_until(EXPORT_WAIT, |s| in_trace(s, &sentinel).len() >= 2);
    assert_eq!(in_trace(&spans, &sentinel).len(), 2, "{}", show(&spans));
    std::thread::sleep(Duration::from_secs(1));
    let spans = otlp.spans();
    for trace in &unsampled {
        assert!(
            in_trace(&spans, trace).is_empty(),
            "spans for the unsampled trace {trace}: {}",
            show(&spans)
        );
    }
    assert_eq!(
        spans.len(),
        4,
        "only the two sampled requests: {}",
        show(&spans)
    );
}

#[test]
fn the_sample_ratio_decides_for_requests_without_context() {
    let Some(mesh) = Mesh::new("trace_ratio") else {
        return;
    };
    let collector = mesh.pod("collector");
    let otlp = OtlpReceiver::start(&collector);
    let server = mesh.pod("server");
    http_app(&server, "server");
    traced(&server, &otlp.url(), "api", "1.0", &[]);
    let none = mesh.pod("none");
    traced(&none, &otlp.url(), "none", "0", &[]);
    let all = mesh.pod("all");
    traced(&all, &otlp.url(), "all", "1.0", &[]);

    // Ratio 0: not sampled, and the server's sidecar follows that decision.
    for _ in 0..10 {
        let saw = app_saw(&none.curl(&[&server.url(HTTP, "/headers")]));
        assert_eq!(traceparent(&saw["traceparent"]).2, "00", "{saw}");
    }
    // Ratio 1: every request. These end after the ratio-0 ones, so once their spans are in,
    // any span of the earlier requests would be too (each sidecar exports in order).
    for _ in 0..10 {
        let saw = app_saw(&all.curl(&[&server.url(HTTP, "/headers")]));
        assert_eq!(traceparent(&saw["traceparent"]).2, "01", "{saw}");
    }
    otlp.wait_for(20, EXPORT_WAIT);
    std::thread::sleep(Duration::from_secs(1));
    let spans = otlp.spans();
    assert!(
        of(&spans, "none", SPAN_KIND_CLIENT).is_empty(),
        "{}",
        show(&spans)
    );
    let sent = of(&spans, "all", SPAN_KIND_CLIENT);
    let served = of(&spans, "api", SPAN_KIND_SERVER);
    assert_eq!(sent.len(), 10, "{}", show(&spans));
    assert_eq!(
        served.len(),
        10,
        "only the sampled requests: {}",
        show(&spans)
    );
    assert_eq!(spans.len(), 20, "{}", show(&spans));
    let traces: HashSet<&str> = sent.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 10, "a new trace per request");
    let parents: HashSet<&str> = sent.iter().map(|s| s.span_id.as_str()).collect();
    assert!(
        served
            .iter()
            .all(|s| parents.contains(s.parent_span_id.as_str())),
        "{}",
        show(&spans)
    );
}

#[test]
fn grpc_calls_are_spans_with_rpc_attributes() {
    let Some(mesh) = Mesh::new("trace_grpc") else {
        return;
    };
    let collector = mesh.pod("collector");
    let otlp = OtlpReceiver::start(&collector);
    let server = mesh.pod("server");
    server.spawn_app(&["grpc", "--listen", "0.0.0.0:50051", "--name", "grpc-server"]);
    traced(&server, &otlp.url(), "api", "1.0", &[]);
    let client = mesh.pod("client");
    traced(&client, &otlp.url(), "web", "1.0", &[]);
    let target = format!("http://{}:50051", server.ip);

    let out = client.testapp(&["grpc-call", "--target", &target, "--call", "unary"]);
    assert_eq!(out["ok"], true, "{out}");
    let out = client.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "fail",
        "--code",
        "5",
    ]);
    assert_eq!(out["code"], 5, "{out}");

    let spans = otlp.wait_for(4, EXPORT_WAIT);
    assert_eq!(spans.len(), 4, "{}", show(&spans));
    for (service, kind) in [("web", SPAN_KIND_CLIENT), ("api", SPAN_KIND_SERVER)] {
        let mut calls = of(&spans, service, kind);
        assert_eq!(calls.len(), 2, "{}", show(&spans));
        calls.sort_by_key(|s| s.start_unix_nanos);
        for (span, method, code) in [(calls[0], "Unary", 0), (calls[1], "Fail", 5)] {
            assert_eq!(
                span.attr("rpc.system").as_deref(),
                Some("grpc"),
                "{span:#?}"
            );
            assert_eq!(
                span.attr("rpc.service").as_deref(),
                Some("trellis.test.echo.Echo"),
                "{span:#?}"
            );
            assert_eq!(
                span.attr("rpc.method").as_deref(),
                Some(method),
                "{span:#?}"
            );
            assert_eq!(
                span.int_attr("rpc.grpc.status_code"),
                Some(code),
                "{span:#?}"
            );
            assert_eq!(span.int_attr("http.response.status_code"), Some(200));
            assert_eq!(span.attr("network.protocol.version").as_deref(), Some("2"));
        }
    }
    let line = client
        .access_log_json()
        .into_iter()
        .find(|l| l["grpc_status"] == 5)
        .unwrap_or_else(|| {
            panic!(
                "no access log line for the failed call:\n{}",
                client.access_log()
            )
        });
    assert_eq!(line["protocol"], "grpc", "{line}");
    assert_eq!(line["path"], "/trellis.test.echo.Echo/Fail", "{line}");
}

#[test]
fn a_collector_that_is_down_costs_spans_never_requests() {
    let Some(mesh) = Mesh::new("trace_collector_down") else {
        return;
    };
    // The server's collector refuses connections (a pod with nothing on 4317); the client's is
    // an address no pod has, so its SYNs go unanswered.
    let refusing = mesh.pod("collector");
    let server = mesh.pod("server");
    http_app(&server, "server");
    traced(&server, &collector_url(&refusing), "api", "1.0", &[]);
    let client = mesh.pod("client");
    traced(&client, "http://10.77.0.254:4317", "web", "1.0", &[]);

    let out = client.testapp(&[
        "load",
        "--url",
        &server.url(HTTP, "/"),
        "--requests",
        "200",
        "--concurrency",
        "10",
    ]);
    assert_eq!(out["ok"], 200, "{out}");
    assert_eq!(out["failed"], 0, "{out}");
    let elapsed_ms = out["elapsed_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        elapsed_ms < 10_000.0,
        "200 requests took {elapsed_ms} ms: exporting blocked the requests"
    );

    for pod in [&client, &server] {
        wait_for(
            &format!("{}'s sidecar to count dropped spans", pod.name),
            EXPORT_WAIT,
            || pod.metrics().sum("trellis_trace_spans_dropped_total", &[]) > 0.0,
        );
    }
    // Still serving.
    assert_eq!(client.curl(&[&server.url(HTTP, "/")]).status, 200);
    // And a collector that never answers does not hold up shutdown for long: at most an
    // export in progress (5 s) and the flush window (5 s).
    let start = std::time::Instant::now();
    client.signal_proxy(libc::SIGTERM);
    assert_eq!(client.wait_proxy_exit(Duration::from_secs(20)), Some(0));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(12), "exit took {took:?}");
}

/// Spans still queued when a proxy is told to stop are exported before it exits: the export
/// thread wakes every 500 ms, so the SIGTERM right after the last response finds them queued.
#[test]
fn spans_queued_at_shutdown_are_flushed_before_exit() {
    let Some((_mesh, _collector, otlp, client, server)) = client_and_server("trace_flush") else {
        return;
    };
    for _ in 0..5 {
        let rsp = client.curl(&[&server.url(HTTP, "/")]);
        assert_eq!(rsp.status, 200, "{rsp:?}");
    }
    let before = otlp.spans().len();
    let start = std::time::Instant::now();
    for pod in [&client, &server] {
        pod.signal_proxy(libc::SIGTERM);
    }
    for pod in [&client, &server] {
        let code = pod.wait_proxy_exit(Duration::from_secs(15));
        assert_eq!(code, Some(0), "{} proxy exit", pod.name);
    }
    let took = start.elapsed();
    eprintln!("spans before SIGTERM: {before}, exits took {took:?}");
    // The receiver may still be storing the last batch the proxies sent before exiting.
    let spans = otlp.wait_for(10, Duration::from_secs(2));
    assert_eq!(
        (
            of(&spans, "web", SPAN_KIND_CLIENT).len(),
            of(&spans, "api", SPAN_KIND_SERVER).len()
        ),
        (5, 5),
        "{before} spans had arrived before SIGTERM; after exit: {}",
        show(&spans)
    );
    assert!(took < Duration::from_secs(8), "the exits took {took:?}");
}
