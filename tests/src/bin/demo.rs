//! `trellis-demo`: the local mesh demo (the README's first command).
//!
//! Three pods in network namespaces with real interception rules and real sidecars; traffic of
//! every kind flows from one to the other; the report shows each hop from the proxies' own access
//! logs and the trace its spans form, a failure the proxy names, and the proxies' key metrics.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::harness::{
    Mesh, OtlpReceiver, Pod, SPAN_KIND_SERVER, Scrape, missing_privileges,
};

fn main() -> ExitCode {
    if let Some(reason) = missing_privileges() {
        eprintln!("trellis-demo {reason}.\nRun it as root, e.g.: sudo ./scripts/demo");
        return ExitCode::from(2);
    }
    println!("Trellis local mesh demo");
    println!("=======================\n");
    let mesh = Mesh::create();
    // The control plane runs in a pod of its own; every sidecar follows it.
    let control = mesh.pod("control");
    control.start_control_plane(&mesh.log_dir().join("control-state"));
    // Spans go to TRELLIS_DEMO_OTLP_ENDPOINT (a Jaeger reachable from the pods' bridge) or to a
    // small OTLP receiver of the demo's own, in a pod of its own.
    let own_endpoint = std::env::var("TRELLIS_DEMO_OTLP_ENDPOINT").ok();
    let collector = own_endpoint.is_none().then(|| mesh.pod("collector"));
    let receiver = collector.as_ref().map(OtlpReceiver::start);
    let otlp = own_endpoint
        .clone()
        .or_else(|| receiver.as_ref().map(OtlpReceiver::url))
        .unwrap_or_default();
    // Every sidecar joins the mesh with a join token: its certificate comes from the control
    // plane's CA before it reports ready.
    let sidecar = |pod: &Pod, sa: &str| {
        let mut flags = control.mesh_flags(&mesh, &format!("default/{}", pod.name), sa);
        flags.extend(["--otlp-endpoint".into(), otlp.clone()]);
        flags.extend(["--trace-sample-ratio".into(), "1.0".into()]);
        flags.extend(["--pod-name".into(), format!("{}-0", pod.name)]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        pod.start_sidecar(&flags);
    };
    let reviews = mesh.pod("reviews");
    reviews.spawn_app(&["http", "--listen", "0.0.0.0:9080", "--name", "reviews"]);
    reviews.spawn_app(&[
        "grpc",
        "--listen",
        "0.0.0.0:50051",
        "--name",
        "reviews-grpc",
    ]);
    reviews.spawn_app(&["tcp-echo", "--listen", "[::]:7000"]);
    sidecar(&reviews, "reviews");
    // A second "reviews" instance whose app is down: its sidecar answers connect-refused.
    let broken = mesh.pod("reviews-down");
    sidecar(&broken, "reviews");
    let productpage = mesh.pod("productpage");
    sidecar(&productpage, "productpage");

    println!(
        "Three pods and a control plane, each a network namespace on one bridge; each pod has `trellis-proxy init` rules"
    );
    println!("and a sidecar (`trellis-proxy run`, UID 2102):\n");
    println!("  {:<12} {:<10} {:<8} apps", "pod", "IPv4", "IPv6");
    if let Some(c) = &collector {
        println!(
            "  {:<12} {:<10} {:<8} an OTLP/gRPC receiver on :4317 standing in for Jaeger",
            c.name, c.ip, c.ip6
        );
    }
    println!(
        "  {:<12} {:<10} {:<8} curl and trellis-testapp clients",
        productpage.name, productpage.ip, productpage.ip6
    );
    println!(
        "  {:<12} {:<10} {:<8} HTTP :9080, gRPC :50051, TCP echo :7000",
        reviews.name, reviews.ip, reviews.ip6
    );
    println!(
        "  {:<12} {:<10} {:<8} a second reviews instance whose app is down (used in step 6)",
        broken.name, broken.ip, broken.ip6
    );
    println!(
        "  {:<12} {:<10} {:<8} trellis-control serve on :7443 (no sidecar): policy and certificates",
        control.name, control.ip, control.ip6
    );
    println!(
        "\nInterception rules in {} (nat table, IPv4; the same for IPv6):",
        reviews.name
    );
    for rule in reviews
        .nat_rules(false, "nft")
        .lines()
        .filter(|l| l.contains("TRELLIS") && l.starts_with("-A"))
    {
        println!("  {rule}");
    }

    section(
        1,
        "HTTP/1.1, 5 requests",
        &format!("curl http://{}:9080/", reviews.ip),
    );
    let statuses: Vec<String> = (0..5)
        .map(|_| productpage.curl(&[&reviews.url(9080, "/")]))
        .map(|r| r.status.to_string())
        .collect();
    println!("   statuses: {}", statuses.join(" "));
    let trace_id = hops(&productpage, &reviews, "http1");
    trace(
        receiver.as_ref(),
        own_endpoint.as_deref(),
        trace_id.as_deref(),
    );

    section(
        2,
        "HTTP/2 (h2c prior knowledge)",
        &format!(
            "curl --http2-prior-knowledge http://{}:9080/headers",
            reviews.ip
        ),
    );
    let rsp = productpage.curl(&["--http2-prior-knowledge", &reviews.url(9080, "/headers")]);
    let seen: Value = serde_json::from_str(&rsp.body).unwrap_or(Value::Null);
    println!(
        "   status {}; the app saw {} from {}",
        rsp.status, seen["version"], seen["peer"]
    );
    hops(&productpage, &reviews, "http2");

    section(
        3,
        "gRPC unary and server streaming",
        &format!("Echo/Unary and Echo/ServerStream on {}:50051", reviews.ip),
    );
    let target = format!("http://{}:50051", reviews.ip);
    let unary = productpage.testapp(&["grpc-call", "--target", &target, "--call", "unary"]);
    let stream = productpage.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "stream",
        "--count",
        "3",
    ]);
    println!(
        "   unary: {} from {}; stream: {} messages, ok={}",
        unary["message"],
        unary["from"],
        stream["items"].as_array().map(Vec::len).unwrap_or(0),
        stream["ok"]
    );

    section(
        4,
        "Opaque TCP over IPv6 (not HTTP: forwarded byte for byte, half-close kept)",
        &format!("[{}]:7000", reviews.ip6),
    );
    let echo = productpage.testapp(&[
        "tcp-call",
        "--connect",
        &reviews.addr6(7000).to_string(),
        "--send",
        "bytes, not HTTP",
    ]);
    println!("   sent \"bytes, not HTTP\", echoed {}", echo["received"]);
    hops(&productpage, &reviews, "opaque");

    section(
        5,
        "A failure the proxy names",
        &format!("curl http://{}:9081/ (no app listens on 9081)", reviews.ip),
    );
    let rsp = productpage.curl(&[&reviews.url(9081, "/")]);
    println!(
        "   status {}, trellis-error: {}",
        rsp.status,
        rsp.header("trellis-error").unwrap_or("-")
    );
    println!("   body: {}", rsp.body.trim());

    section(
        6,
        "A retry hides a failing instance",
        &format!(
            "TrafficPolicy reviews, pushed by the control plane: endpoints {} (up) and {} (app down)",
            reviews.addr(9080),
            broken.addr(9080)
        ),
    );
    let policy = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: reviews}}\nspec:\n  \
         destination: {{host: reviews, port: 9080, endpoints: [\"{}\", \"{}\"]}}\n  \
         retries: {{maxRetries: 2, on: [connect-failure, gateway-error]}}\n  \
         ejection: {{consecutiveFailures: 2, baseTime: 10s}}\n",
        reviews.addr(9080),
        broken.addr(9080)
    );
    let file = mesh.write_file("reviews-policy.yaml", &policy);
    println!("   $ trellis-control apply --wait -f reviews-policy.yaml");
    let out = control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]);
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("     {line}");
    }
    let statuses: Vec<String> = (0..10)
        .map(|_| productpage.curl(&["-H", "Host: reviews:9080", &reviews.url(9080, "/")]))
        .map(|r| r.status.to_string())
        .collect();
    let m = productpage.metrics();
    println!("   10 calls to reviews: {}", statuses.join(" "));
    println!(
        "   retries on connect-failure: {}; endpoint {} ejected {} time(s)",
        m.sum(
            "trellis_retries_total",
            &[("policy", "default/reviews"), ("reason", "connect-failure")]
        ),
        broken.addr(9080),
        m.sum(
            "trellis_endpoint_ejections_total",
            &[("endpoint", &broken.addr(9080).to_string())]
        ),
    );
    let config: Value =
        serde_json::from_str(&productpage.admin_get("/config").1).unwrap_or(Value::Null);
    for e in config["endpoints"].as_array().into_iter().flatten() {
        let state = match e["ejectedForMs"].as_u64() {
            Some(ms) => format!("ejected for another {:.1} s", ms as f64 / 1e3),
            None => "healthy".to_string(),
        };
        println!(
            "   /config: {} {state}, latency estimate {:.2} ms",
            e["address"].as_str().unwrap_or("?"),
            e["latencyEwmaMs"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "   policy version in force: {} ({})",
        config["version"].as_str().unwrap_or("?"),
        config["source"].as_str().unwrap_or("?")
    );
    println!("   $ trellis-control status");
    for line in String::from_utf8_lossy(&control.control(&["status"]).stdout).lines() {
        println!("     {line}");
    }

    section(
        7,
        "Mutual TLS with workload identities",
        "TrafficPolicy reviews-mtls (tls: mutual) and ServerPolicy reviews (mtls: strict)",
    );
    let policy = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: reviews-mtls}}\nspec:\n  \
         destination: {{addresses: [\"{}\"]}}\n  \
         tls: {{mode: mutual, serverIdentity: spiffe://cluster.local/ns/default/sa/reviews}}\n\
         ---\napiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {{name: reviews}}\nspec:\n  \
         selector: {{serviceAccount: reviews}}\n  port: 9080\n  mtls: strict\n  \
         allow: [{{identities: [\"spiffe://cluster.local/ns/default/sa/productpage\"]}}]\n",
        reviews.addr(9080)
    );
    let file = mesh.write_file("mtls-policy.yaml", &policy);
    println!("   $ trellis-control apply --wait -f mtls-policy.yaml");
    let out = control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("     {line}");
    }
    let rsp = productpage.curl(&[&reviews.url(9080, "/headers")]);
    let seen: Value = serde_json::from_str(&rsp.body).unwrap_or(Value::Null);
    println!(
        "   productpage → reviews: status {}; the app saw trellis-peer-identity: {}",
        rsp.status, seen["headers"]["trellis-peer-identity"]
    );
    let rsp = control.curl(&[&reviews.url(9080, "/headers")]);
    println!(
        "   control pod (no sidecar, plaintext) → reviews: status {}, trellis-error: {}",
        rsp.status,
        rsp.header("trellis-error").unwrap_or("-")
    );
    let m = reviews.metrics();
    println!(
        "   reviews' proxy: {} inbound requests over TLS from productpage, {} mesh handshakes accepted; certificate expires at unix {}",
        m.sum(
            "trellis_requests_total",
            &[
                ("direction", "inbound"),
                (
                    "peer_identity",
                    "spiffe://cluster.local/ns/default/sa/productpage"
                )
            ]
        ),
        m.sum(
            "trellis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        m.sum("trellis_identity_expiry_timestamp_seconds", &[])
    );

    println!("\nProxy metrics (GET 127.0.0.1:4191/metrics in each pod)\n");
    println!(
        "  {:<12} {:>9} {:>9} {:>7} {:>12} {:>12} {:>10} {:>9}",
        "pod", "out reqs", "in reqs", "errors", "conns in/out", "bytes read", "p50 (in)", "RSS"
    );
    for pod in [&productpage, &reviews] {
        let m = pod.metrics();
        println!(
            "  {:<12} {:>9} {:>9} {:>7} {:>12} {:>12} {:>10} {:>7.1}MB",
            pod.name,
            m.sum("trellis_requests_total", &[("direction", "outbound")]),
            m.sum("trellis_requests_total", &[("direction", "inbound")]),
            m.sum("trellis_proxy_errors_total", &[]),
            format!(
                "{}/{}",
                m.sum(
                    "trellis_tcp_connections_opened_total",
                    &[("direction", "inbound")]
                ),
                m.sum(
                    "trellis_tcp_connections_opened_total",
                    &[("direction", "outbound")]
                )
            ),
            m.sum("trellis_tcp_read_bytes_total", &[]),
            p50(&m),
            pod.proxy_status_kb("VmRSS") as f64 / 1024.0,
        );
    }
    println!("\nErrors by cause: {}", causes(&reviews.metrics()));
    println!(
        "Logs of every process are in {} while the demo runs.",
        mesh.log_dir().display()
    );
    println!("Done: namespaces, rules and processes are removed on exit.");
    ExitCode::SUCCESS
}

fn section(n: u32, title: &str, what: &str) {
    println!("\n{n}. {title}\n   {what}");
}

/// Prints the request's two hops from the proxies' access logs: the client sidecar's last
/// outbound line for `protocol`, and the server sidecar's line for the same request (same kind,
/// authority and path; between meshed sidecars an HTTP/1.1 request may travel as HTTP/2).
fn hops(client: &Pod, server: &Pod, protocol: &str) -> Option<String> {
    // A sidecar writes a line once the response has ended: allow it a moment.
    let wait = std::time::Duration::from_secs(2);
    let out = client.access_log_line(wait, |v| {
        v["direction"] == "outbound" && v["protocol"] == protocol
    });
    let inb = out.as_ref().and_then(|o| {
        server.access_log_line(wait, |v| {
            v["direction"] == "inbound"
                && v["kind"] == o["kind"]
                && (o["kind"] == "tcp"
                    || (v["authority"] == o["authority"] && v["path"] == o["path"]))
        })
    });
    for (hop, pod, direction, line) in [
        (1, client, "outbound", out.as_ref()),
        (2, server, "inbound", inb.as_ref()),
    ] {
        let Some(v) = line else {
            println!(
                "   hop {hop}  {:<11} {direction:<8} (no access log line)",
                pod.name
            );
            continue;
        };
        let what = match v["kind"].as_str() {
            Some("tcp") => format!(
                "tcp {} bytes sent, {} received",
                v["request_bytes"], v["response_bytes"]
            ),
            _ => format!(
                "{} {}{} ({})  → {}",
                v["method"].as_str().unwrap_or("?"),
                v["authority"].as_str().unwrap_or(""),
                v["path"].as_str().unwrap_or(""),
                v["protocol"].as_str().unwrap_or("?"),
                v["status"]
            ),
        };
        println!(
            "   hop {hop}  {:<11} {direction:<8} from {:<22} to {:<22} {what}  {:.2} ms",
            pod.name,
            v["client"].as_str().unwrap_or("?"),
            v["upstream"].as_str().unwrap_or("?"),
            v["duration_ms"].as_f64().unwrap_or(0.0)
        );
    }
    out.and_then(|o| o["trace_id"].as_str().map(str::to_string))
}

/// Prints the trace id of the last request and the spans its hops sent.
fn trace(receiver: Option<&OtlpReceiver>, endpoint: Option<&str>, trace_id: Option<&str>) {
    let Some(trace_id) = trace_id else {
        println!("   (no trace id in the access log)");
        return;
    };
    println!("   trace id {trace_id}  (Jaeger: http://<jaeger>:16686/trace/{trace_id})");
    let Some(receiver) = receiver else {
        println!("   spans sent to {}", endpoint.unwrap_or("?"));
        return;
    };
    // Two spans per request: the client sidecar's CLIENT span, the server sidecar's SERVER span.
    let spans = receiver.wait_until(Duration::from_secs(5), |spans| {
        spans.iter().filter(|s| s.trace_id == trace_id).count() >= 2
    });
    let mut spans: Vec<_> = spans
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    spans.sort_by_key(|s| s.start_unix_nanos);
    println!(
        "   spans the demo's OTLP receiver got for it (set TRELLIS_DEMO_OTLP_ENDPOINT to use a Jaeger):"
    );
    for s in &spans {
        let depth = usize::from(!s.is_root()) * 2;
        let kind = if s.kind == SPAN_KIND_SERVER {
            "SERVER"
        } else {
            "CLIENT"
        };
        println!(
            "     {:depth$}{kind} {:<22} service={:<12} span {} parent {:<16} status {} {:.2} ms",
            "",
            s.name,
            s.service_name,
            s.span_id,
            if s.is_root() { "-" } else { &s.parent_span_id },
            s.attr("http.response.status_code").unwrap_or_default(),
            (s.end_unix_nanos.saturating_sub(s.start_unix_nanos)) as f64 / 1e6,
        );
    }
}

/// The median inbound request latency from the histogram buckets, as "≤ X ms".
fn p50(m: &Scrape) -> String {
    let total = m.sum(
        "trellis_request_duration_seconds_count",
        &[("direction", "inbound")],
    );
    if total == 0.0 {
        return "-".into();
    }
    let mut bounds: Vec<f64> = m
        .text
        .lines()
        .filter(|l| {
            l.starts_with("trellis_request_duration_seconds_bucket")
                && l.contains("direction=\"inbound\"")
        })
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    for le in bounds {
        let count = m.sum(
            "trellis_request_duration_seconds_bucket",
            &[("direction", "inbound"), ("le", &format_le(le))],
        );
        if count >= total / 2.0 {
            return format!("≤{:.1}ms", le * 1e3);
        }
    }
    "-".into()
}

fn format_le(le: f64) -> String {
    // prometheus-client prints bucket bounds with Rust's default float formatting.
    format!("{le}")
}

fn causes(m: &Scrape) -> String {
    let found: Vec<String> = m
        .text
        .lines()
        .filter(|l| l.starts_with("trellis_proxy_errors_total{"))
        .map(|l| l.replace("trellis_proxy_errors_total", ""))
        .collect();
    if found.is_empty() {
        "none".into()
    } else {
        found.join(", ")
    }
}
