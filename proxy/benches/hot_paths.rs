//! Microbenchmarks of the proxy's per-connection and per-request hot paths, without sockets:
//! protocol detection on a connection's first bytes (`detect::classify`, and
//! `inbound::is_mesh_hello` for the mesh ClientHello check), the TrafficPolicy lookup
//! (`RouteTable::route`/`route_with`) over tables of 10 and 1,000 policies, trace-context
//! extraction and injection (`telemetry::context`), and the metrics one finished request records
//! (`Metrics::request`, which `http::exchange` calls once per request).
//!
//! These numbers are the baseline performance work compares against. Run with
//! `cargo bench -p trellis-proxy --bench hot_paths -- --warm-up-time 1 --measurement-time 3`.

use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceId};
use trellis_proto::policy::PolicySet;
use trellis_proxy::detect::{Protocol, classify};
use trellis_proxy::inbound::is_mesh_hello;
use trellis_proxy::metrics::{Direction, Metrics, RequestRecord};
use trellis_proxy::policy::routes::{ClientScope, Route, RouteTable};
use trellis_proxy::telemetry::context::{Incoming, inject};

// ---------------------------------------------------------------------------------------------
// 1. Protocol detection
// ---------------------------------------------------------------------------------------------

const HTTP1_GET: &[u8] = b"GET /api/v1/reviews/42?expand=ratings HTTP/1.1\r\n\
Host: reviews.default.svc.cluster.local:9080\r\n\
User-Agent: curl/8.5.0\r\n\
Accept: application/json\r\n\
X-Request-Id: 6b0d3f0e-93c1-4e61-8d0a-1f2e3d4c5b6a\r\n\
\r\n";

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The bytes of a real ClientHello offering `alpn`, as a mesh client (or an app) would send it.
fn client_hello(alpn: &[u8]) -> Vec<u8> {
    trellis_identity::install_crypto_provider();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("10.96.0.12").expect("an IP address");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).expect("a client connection");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("writing to a Vec");
    hello
}

/// Polls `fut` once: the whole input is already buffered, so the functions benched never wait,
/// and no runtime overhead is measured.
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the input is fully buffered: nothing should wait"),
    }
}

fn detection(c: &mut Criterion) {
    let mesh_hello = client_hello(b"trellis/h2");
    let app_hello = client_hello(b"h2");
    let mut random = vec![0u8; 64];
    fastrand::Rng::with_seed(7).fill(&mut random);

    let mut group = c.benchmark_group("detect/classify");
    for (name, bytes, want) in [
        ("http1_get_with_headers", HTTP1_GET, Protocol::Http1),
        ("http2_preface", H2_PREFACE, Protocol::Http2),
        ("tls_hello_mesh_alpn", &mesh_hello[..], Protocol::Opaque),
        ("tls_hello_app_alpn", &app_hello[..], Protocol::Opaque),
        ("random_64_bytes", &random[..], Protocol::Opaque),
    ] {
        assert_eq!(classify(bytes), Some(want), "{name}");
        group.bench_function(name, |b| b.iter(|| classify(black_box(bytes))));
    }
    group.finish();

    // The inbound listener asks this first: a mesh peer's ClientHello, an app's own TLS, or
    // plaintext (rejected from the first byte).
    let mut group = c.benchmark_group("inbound/is_mesh_hello");
    for (name, bytes, want) in [
        ("tls_hello_mesh_alpn", &mesh_hello[..], true),
        ("tls_hello_app_alpn", &app_hello[..], false),
        ("http1_get_with_headers", HTTP1_GET, false),
    ] {
        // A complete hello is not modified, so one buffer serves every iteration.
        let mut buf = BytesMut::from(bytes);
        let check = |buf: &mut BytesMut| {
            ready(is_mesh_hello(
                &mut &b""[..],
                black_box(buf),
                Duration::from_secs(1),
            ))
            .expect("reading from a slice")
        };
        assert_eq!(check(&mut buf), want, "{name}");
        group.bench_function(name, |b| b.iter(|| check(&mut buf)));
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. Policy match
// ---------------------------------------------------------------------------------------------

fn scope() -> ClientScope {
    ClientScope {
        namespace: "default".into(),
        cluster_domain: "cluster.local".into(),
    }
}

/// `n` TrafficPolicies in namespace `default`: policy `i` is for host `svc-i` on port 8080 and,
/// for even `i`, also for the ClusterIP `10.96.x.y:8080`. With `namespace_default`, the last one
/// is instead a namespace default (neither host nor addresses).
fn policies_yaml(n: usize, namespace_default: bool) -> String {
    let mut yaml = String::new();
    for i in 0..n {
        let spec = if namespace_default && i == n - 1 {
            "{timeout: 5s}".to_string()
        } else if i % 2 == 0 {
            format!(
                "{{destination: {{host: svc-{i}, port: 8080, addresses: [\"{}\"]}}}}",
                cluster_ip(i)
            )
        } else {
            format!("{{destination: {{host: svc-{i}, port: 8080}}}}")
        };
        yaml.push_str(&format!(
            "---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\n\
             metadata: {{name: policy-{i}}}\nspec: {spec}\n"
        ));
    }
    yaml
}

fn cluster_ip(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 96, (i / 256) as u8, (i % 256) as u8], 8080))
}

fn table(n: usize, namespace_default: bool) -> RouteTable {
    let set = PolicySet::parse(&policies_yaml(n, namespace_default)).expect("valid policies");
    assert_eq!(set.traffic.len(), n);
    let routes = set
        .traffic
        .into_iter()
        .map(|p| Arc::new(Route::new(p, Arc::default(), None)))
        .collect();
    RouteTable::new(
        routes,
        Arc::new(Route::builtin_default(Arc::default())),
        &scope(),
    )
}

fn policy_match(c: &mut Criterion) {
    let s = scope();
    let pod: SocketAddr = "10.1.0.5:8080".parse().expect("an address");
    for n in [10usize, 1_000] {
        let with_default = table(n, true);
        let without_default = table(n, false);
        // The last host policy: the far end of the host list.
        let last_host = if n % 2 == 0 { n - 2 } else { n - 1 };
        let last_short = format!("svc-{last_host}:8080");
        let last_service = format!("svc-{last_host}.default.svc.cluster.local:8080");
        let name = |i: usize| format!("default/policy-{i}");

        let mut group = c.benchmark_group(format!("policy/route/{n}_policies"));
        // The ClusterIP of policy 0 with an authority that names another service: the address wins.
        let vip = cluster_ip(0);
        assert_eq!(
            with_default.route(Some("svc-1"), vip, &s, None).name,
            name(0)
        );
        group.bench_function("address_match", |b| {
            b.iter(|| with_default.route(black_box(Some("svc-1")), black_box(vip), &s, None))
        });
        // A pod IP and a short name, qualified to `svc-i.default.svc.cluster.local`.
        assert_eq!(
            with_default.route(Some(&last_short), pod, &s, None).name,
            name(last_host)
        );
        group.bench_function("host_match_short_name_last_policy", |b| {
            b.iter(|| with_default.route(black_box(Some(&last_short)), black_box(pod), &s, None))
        });
        // The client sent an IP authority; discovery resolved the ClusterIP to the service.
        assert_eq!(
            with_default
                .route(Some("10.1.0.5:8080"), pod, &s, Some(&last_service))
                .name,
            name(last_host)
        );
        group.bench_function("host_match_via_discovered_service", |b| {
            b.iter(|| {
                with_default.route(
                    black_box(Some("10.1.0.5:8080")),
                    black_box(pod),
                    &s,
                    black_box(Some(&last_service)),
                )
            })
        });
        // No address or host matches: the namespace's default policy.
        assert_eq!(
            with_default.route(Some("unknown:8080"), pod, &s, None).name,
            name(n - 1)
        );
        group.bench_function("namespace_default", |b| {
            b.iter(|| with_default.route(black_box(Some("unknown:8080")), black_box(pod), &s, None))
        });
        // Nothing matches and there is no namespace default: the built-in default.
        assert_eq!(
            without_default
                .route(Some("unknown:8080"), pod, &s, None)
                .name,
            "default"
        );
        group.bench_function("miss_builtin_default", |b| {
            b.iter(|| {
                without_default.route(black_box(Some("unknown:8080")), black_box(pod), &s, None)
            })
        });
        group.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Header propagation
// ---------------------------------------------------------------------------------------------

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

/// A typical request's headers plus the trace headers given.
fn request_headers(trace: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "reviews.default.svc.cluster.local:9080"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("x-request-id", "6b0d3f0e-93c1-4e61-8d0a-1f2e3d4c5b6a"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    for (k, v) in trace {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).expect("a header name"),
            HeaderValue::from_str(v).expect("a header value"),
        );
    }
    h
}

fn header_propagation(c: &mut Criterion) {
    let mut group = c.benchmark_group("trace_context/extract");
    for (name, trace) in [
        (
            "w3c_traceparent",
            vec![("traceparent", format!("00-{TRACE}-{SPAN}-01"))],
        ),
        ("b3_single", vec![("b3", format!("{TRACE}-{SPAN}-1"))]),
        (
            "b3_multi",
            vec![
                ("x-b3-traceid", TRACE.to_string()),
                ("x-b3-spanid", SPAN.to_string()),
                ("x-b3-sampled", "1".to_string()),
            ],
        ),
        ("no_trace_headers", vec![]),
    ] {
        let headers = request_headers(&trace);
        let got = Incoming::extract(&headers);
        assert_eq!(got.parent.is_some(), !trace.is_empty(), "{name}");
        group.bench_function(name, |b| b.iter(|| Incoming::extract(black_box(&headers))));
    }
    group.finish();

    let trace = TraceId::from_hex(TRACE).expect("a trace id");
    let span = SpanId::from_hex("1111111111111111").expect("a span id");
    let parent = SpanId::from_hex(SPAN).expect("a span id");
    let mut group = c.benchmark_group("trace_context/inject");
    // Both formats into a request that carried none (the clone is not timed).
    let plain = request_headers(&[]);
    group.bench_function("both_formats_into_untraced_request", |b| {
        b.iter_batched_ref(
            || plain.clone(),
            |h| inject(h, trace, span, None, true),
            BatchSize::SmallInput,
        )
    });
    // The usual case: the caller sent a traceparent; the proxy's span replaces it.
    let traced = request_headers(&[("traceparent", format!("00-{TRACE}-{SPAN}-01"))]);
    group.bench_function("both_formats_over_incoming_traceparent", |b| {
        b.iter_batched_ref(
            || traced.clone(),
            |h| inject(h, trace, span, Some(parent), true),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// 4. Metrics recording
// ---------------------------------------------------------------------------------------------

fn record<'a>(destination: &'a Arc<str>, peer: Option<&'a Arc<str>>) -> RequestRecord<'a> {
    RequestRecord {
        direction: Direction::outbound,
        protocol: "http1",
        destination,
        status: 200,
        grpc_status: None,
        peer,
        latency: Duration::from_micros(1_700),
        request_bytes: 512,
        response_bytes: 4_096,
    }
}

fn metrics_recording(c: &mut Criterion) {
    let peer: Arc<str> = Arc::from("spiffe://cluster.local/ns/default/sa/reviews");
    let mut group = c.benchmark_group("metrics/request");
    // Counter + latency histogram + request and response bytes, all label sets already present.
    let metrics = Metrics::new();
    let dst: Arc<str> = Arc::from("reviews.default.svc.cluster.local:9080");
    metrics.request(&record(&dst, Some(&peer)));
    group.bench_function("existing_label_set", |b| {
        b.iter(|| metrics.request(black_box(&record(&dst, Some(&peer)))))
    });
    // Every request a new destination: each family creates its entry (and a new histogram).
    // Families are rebuilt every CHUNK records so they do not grow without bound; only the
    // records are timed.
    const CHUNK: u64 = 10_000;
    group.bench_function("new_label_set", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                left -= n;
                let metrics = Metrics::new();
                let dsts: Vec<Arc<str>> = (0..n)
                    .map(|i| Arc::from(format!("svc-{i}.default.svc.cluster.local:8080")))
                    .collect();
                let start = Instant::now();
                for dst in &dsts {
                    metrics.request(black_box(&record(dst, Some(&peer))));
                }
                total += start.elapsed();
                drop(metrics);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    detection,
    policy_match,
    header_propagation,
    metrics_recording
);
criterion_main!(benches);
