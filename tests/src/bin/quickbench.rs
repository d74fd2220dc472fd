//! `trellis-quickbench`: early performance signals through real pods (not part of the test
//! suite; numbers go in the README). Measures `wrk -t1 -c50` against the test HTTP app directly
//! (pods without sidecars), through both sidecars in plaintext, and through both sidecars over
//! mutual TLS (certificates from a control plane), plus the proxies' idle and loaded RSS and CPU
//! time per request; and the cost of telemetry: both sidecars tracing 100 % of requests to an
//! OTLP receiver, then also writing a JSON access log. The side-by-side benchmark against
//! haproxy is a separate, later tool.
//!
//! Usage: trellis-quickbench [SECONDS] [--no-telemetry]   (root; wrk installed)

use std::process::ExitCode;

use trellis_tests::harness::{Mesh, OtlpReceiver, Pod, missing_privileges};

fn main() -> ExitCode {
    if let Some(reason) = missing_privileges() {
        eprintln!("trellis-quickbench {reason}");
        return ExitCode::from(2);
    }
    let secs: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mesh = Mesh::create();
    let plain_server = mesh.pod("plain-server");
    plain_server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "plain"]);
    let plain_client = mesh.pod("plain-client");
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "meshed"]);
    server.start_sidecar(&["--access-log", "off"]);
    let client = mesh.pod("client");
    client.start_sidecar(&["--access-log", "off"]);

    let idle = (
        client.proxy_status_kb("VmRSS"),
        server.proxy_status_kb("VmRSS"),
    );
    println!(
        "idle RSS: client proxy {} kB, server proxy {} kB",
        idle.0, idle.1
    );

    let direct = wrk(&plain_client, &plain_server.url(8080, "/"), secs);
    println!("direct          : {direct}");
    measure("through 2 sidecars", &client, &server, secs);
    if !std::env::args().any(|a| a == "--no-telemetry") {
        telemetry(&mesh, secs);
    }

    // The same over mutual TLS: identities from a control plane, a strict server.
    let control = mesh.pod("control");
    control.start_control_plane(&mesh.log_dir().join("control-state"));
    let tls_server = mesh.pod("tls-server");
    tls_server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "mtls"]);
    let tls_client = mesh.pod("tls-client");
    for (pod, sa) in [(&tls_server, "server"), (&tls_client, "client")] {
        let mut flags = control.mesh_flags(&mesh, &format!("default/{sa}"), sa);
        flags.extend(["--access-log".into(), "off".into()]);
        pod.start_sidecar(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let policy = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: server}}\nspec:\n  \
         destination: {{addresses: [\"{}\"]}}\n  \
         tls: {{mode: mutual, serverIdentity: spiffe://cluster.local/ns/default/sa/server}}\n---\n\
         apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {{name: server}}\nspec: {{selector: {{serviceAccount: server}}, mtls: strict}}\n",
        tls_server.addr(8080)
    );
    let file = mesh.write_file("mtls.yaml", &policy);
    let out = control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    measure("over mutual TLS", &tls_client, &tls_server, secs);
    println!(
        "mesh handshakes accepted by the server proxy: {}",
        tls_server
            .metrics()
            .sum("trellis_tls_handshakes_total", &[("direction", "inbound")])
    );
    ExitCode::SUCCESS
}

/// Plaintext sidecars that trace every request (and then also log it as JSON).
fn telemetry(mesh: &Mesh, secs: u32) {
    let collector = mesh.pod("collector");
    let receiver = OtlpReceiver::start(&collector);
    for (label, access_log) in [
        ("2 sidecars, 100 % traced", "off"),
        ("2 sidecars, 100 % traced + JSON access log", "json"),
    ] {
        let tag = if access_log == "off" { "t" } else { "tl" };
        let server = mesh.pod(&format!("{tag}-server"));
        server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "traced"]);
        let client = mesh.pod(&format!("{tag}-client"));
        for (pod, name) in [(&server, "server"), (&client, "client")] {
            let workload = format!("bench/{name}");
            pod.start_sidecar(&[
                "--access-log",
                access_log,
                "--otlp-endpoint",
                &receiver.url(),
                "--trace-sample-ratio",
                "1.0",
                "--workload",
                &workload,
            ]);
        }
        let before = receiver.spans().len();
        measure(label, &client, &server, secs);
        std::thread::sleep(std::time::Duration::from_secs(2));
        let dropped = |pod: &Pod| pod.metrics().sum("trellis_trace_spans_dropped_total", &[]);
        println!(
            "  spans received {}, dropped by the proxies {} / {}",
            receiver.spans().len() - before,
            dropped(&client),
            dropped(&server)
        );
    }
}

/// wrk from `client` to `server`'s app through both sidecars; throughput, latency, CPU per
/// request of each proxy, and their RSS afterwards.
fn measure(label: &str, client: &Pod, server: &Pod, secs: u32) {
    let cpu_before = (cpu_time(client), cpu_time(server));
    let result = wrk(client, &server.url(8080, "/"), secs);
    let cpu_after = (cpu_time(client), cpu_time(server));
    println!("{label}: {result}");
    let requests = result.requests.max(1.0);
    println!(
        "  CPU per request: client proxy {:.1} µs, server proxy {:.1} µs",
        (cpu_after.0 - cpu_before.0).as_secs_f64() * 1e6 / requests,
        (cpu_after.1 - cpu_before.1).as_secs_f64() * 1e6 / requests,
    );
    println!(
        "  RSS after load: client proxy {} kB, server proxy {} kB",
        client.proxy_status_kb("VmRSS"),
        server.proxy_status_kb("VmRSS")
    );
}

struct WrkResult {
    rps: f64,
    requests: f64,
    p50: String,
    p99: String,
    errors: String,
}

impl std::fmt::Display for WrkResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>9.0} req/s  p50 {:>8}  p99 {:>8}  {}",
            self.rps, self.p50, self.p99, self.errors
        )
    }
}

fn wrk(pod: &Pod, url: &str, secs: u32) -> WrkResult {
    let out = pod.exec(
        "wrk",
        &["-t1", "-c50", &format!("-d{secs}s"), "--latency", url],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let errors = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    WrkResult {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        requests,
        p50: field("50%"),
        p99: field("99%"),
        errors: if errors.is_empty() {
            "no errors".into()
        } else {
            errors
        },
    }
}

/// utime + stime of the pod's proxy.
fn cpu_time(pod: &Pod) -> std::time::Duration {
    trellis_tests::procfs::cpu_time(pod.proxy_pid()).unwrap_or_default()
}
