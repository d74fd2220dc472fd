//! Helpers for the telemetry tests: traced sidecars exporting to a collector pod, and ways to
//! pick, show and check the spans a receiver got.

use std::time::Duration;

use serde_json::Value;

use super::{
    CurlResult, Mesh, OtlpReceiver, Pod, ReceivedSpan, SPAN_KIND_CLIENT, SPAN_KIND_SERVER,
};

pub const HTTP: u16 = 8080;
pub const NAMESPACE: &str = "shop";
/// The longest a span may take to reach the receiver (sidecars export about once a second).
pub const EXPORT_WAIT: Duration = Duration::from_secs(30);

/// Starts `pod`'s sidecar as workload `shop/NAME`, exporting to `otlp` with sample ratio `ratio`.
pub fn traced(pod: &Pod, otlp: &str, name: &str, ratio: &str, extra: &[&str]) {
    traced_with_env(pod, otlp, name, ratio, extra, &[]);
}

pub fn traced_with_env(
    pod: &Pod,
    otlp: &str,
    name: &str,
    ratio: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) {
    let workload = format!("{NAMESPACE}/{name}");
    let mut args = vec![
        "--otlp-endpoint",
        otlp,
        "--trace-sample-ratio",
        ratio,
        "--workload",
        &workload,
        "--pod-name",
        &pod.name,
    ];
    args.extend_from_slice(extra);
    pod.start_sidecar_with_env(&args, env);
}

pub fn http_app(pod: &Pod, name: &str) {
    pod.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", name]);
}

/// A collector, a `server` pod (HTTP app, traced as `api`) and a `client` pod (traced as `web`),
/// both sampling every trace.
pub fn client_and_server(test: &str) -> Option<(Mesh, Pod, OtlpReceiver, Pod, Pod)> {
    let mesh = Mesh::new(test)?;
    let collector = mesh.pod("collector");
    let otlp = OtlpReceiver::start(&collector);
    let server = mesh.pod("server");
    http_app(&server, "server");
    traced(&server, &otlp.url(), "api", "1.0", &[]);
    let client = mesh.pod("client");
    traced(&client, &otlp.url(), "web", "1.0", &[]);
    Some((mesh, collector, otlp, client, server))
}

/// The spans of `service` of `kind`.
pub fn of<'a>(spans: &'a [ReceivedSpan], service: &str, kind: i32) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.service_name == service && s.kind == kind)
        .collect()
}

/// The one span of `service` of `kind`; fails showing every span otherwise.
pub fn only<'a>(spans: &'a [ReceivedSpan], service: &str, kind: i32) -> &'a ReceivedSpan {
    let found = of(spans, service, kind);
    assert_eq!(
        found.len(),
        1,
        "expected one {} span of {service}:\n{}",
        kind_name(kind),
        show(spans)
    );
    found[0]
}

pub fn in_trace(spans: &[ReceivedSpan], trace_id: &str) -> Vec<ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect()
}

pub fn kind_name(kind: i32) -> &'static str {
    match kind {
        SPAN_KIND_SERVER => "SERVER",
        SPAN_KIND_CLIENT => "CLIENT",
        _ => "other",
    }
}

/// One line per span, for failure messages.
pub fn show(spans: &[ReceivedSpan]) -> String {
    let lines: Vec<String> = spans
        .iter()
        .map(|s| {
            let mut attrs: Vec<String> = s
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={}", v.render()))
                .collect();
            attrs.sort();
            format!(
                "  {} {} {:?} trace={} span={} parent={} [{}]",
                s.service_name,
                kind_name(s.kind),
                s.name,
                s.trace_id,
                s.span_id,
                if s.parent_span_id.is_empty() {
                    "-"
                } else {
                    &s.parent_span_id
                },
                attrs.join(" ")
            )
        })
        .collect();
    format!("{} spans:\n{}", spans.len(), lines.join("\n"))
}

/// The request headers the server app saw, from its `/headers` answer.
pub fn app_saw(rsp: &CurlResult) -> Value {
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let seen: Value = serde_json::from_str(&rsp.body)
        .unwrap_or_else(|e| panic!("/headers answered no JSON ({e}): {}", rsp.body));
    seen["headers"].clone()
}

/// `traceparent` split into (trace id, span id, flags); fails unless it has version 00.
pub fn traceparent(value: &Value) -> (String, String, String) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent: {value}"));
    let parts: Vec<&str> = text.split('-').collect();
    assert!(
        parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16,
        "malformed traceparent {text:?}"
    );
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// A trace id and a span id of our own, as an instrumented caller would send (`n` tells them
/// apart).
pub fn ids(n: u8) -> (String, String) {
    (
        format!("4bf92f3577b34da6a3ce929d0e0e47{n:02x}"),
        format!("00f067aa0ba902{n:02x}"),
    )
}

/// Checks the HTTP attributes every span of a plain GET that got a 200 carries.
pub fn assert_http_get_200(span: &ReceivedSpan, path: &str, server: &Pod) {
    let expect = [
        ("http.request.method", Some("GET".to_string())),
        ("http.response.status_code", Some("200".into())),
        ("url.path", Some(path.into())),
        ("server.address", Some(server.ip.to_string())),
        ("server.port", Some(HTTP.to_string())),
        ("network.protocol.version", Some("1.1".into())),
        ("trellis.tls", Some("false".into())),
        ("error.type", None),
    ];
    for (key, value) in expect {
        assert_eq!(
            span.attr(key),
            value,
            "{key} of the {} span of {}: {span:#?}",
            kind_name(span.kind),
            span.service_name
        );
    }
    // Numbers are numbers on the wire, not strings.
    assert_eq!(span.int_attr("http.response.status_code"), Some(200));
    assert_eq!(span.int_attr("server.port"), Some(i64::from(HTTP)));
    assert!(span.end_unix_nanos >= span.start_unix_nanos, "{span:#?}");
}
