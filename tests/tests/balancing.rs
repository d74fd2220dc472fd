//! Endpoint load balancing: a slow endpoint is left behind by per-try timeouts, and an endpoint
//! whose app dies under load is ejected with zero failed requests.

use std::time::Duration;

use trellis_tests::harness::Mesh;

const VIP: &str = "10.77.0.250:8080"; // a "ClusterIP": no pod has it, the policy lists its endpoints

#[test]
fn per_try_timeouts_move_calls_from_a_slow_endpoint_to_a_fast_one() {
    let Some(mesh) = Mesh::new("per_try_timeout") else {
        return;
    };
    let slow = mesh.pod("slow");
    slow.spawn_app(&[
        "http",
        "--listen",
        "0.0.0.0:8080",
        "--name",
        "slow",
        "--delay-ms",
        "2000",
    ]);
    slow.start_sidecar(&[]);
    let fast = mesh.pod("fast");
    fast.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "fast"]);
    fast.start_sidecar(&[]);
    let client = mesh.pod("client");
    let p = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web}}\nspec:\n  \
         destination: {{host: web, port: 8080, addresses: [\"{VIP}\"], endpoints: [\"{}\", \"{}\"]}}\n  \
         retries: {{maxRetries: 2, on: [gateway-error], perTryTimeout: 300ms}}\n",
        slow.addr(8080),
        fast.addr(8080)
    );
    let file = mesh.write_file("policy.yaml", &p);
    client.start_sidecar(&["--policy-file", &file.to_string_lossy()]);
    for _ in 0..8 {
        let rsp = client.curl(&[&format!("http://{VIP}/")]);
        assert_eq!(rsp.status, 200, "{rsp:?}");
        assert_eq!(rsp.body, "hello from fast\n");
        assert!(
            rsp.time_total < 1.5,
            "{} s: the slow endpoint was waited for",
            rsp.time_total
        );
    }
}

#[test]
fn an_endpoint_whose_app_dies_under_load_is_ejected_with_zero_failed_requests() {
    let Some(mesh) = Mesh::new("endpoint_kill") else {
        return;
    };
    let servers: Vec<_> = (1..=3)
        .map(|i| {
            let pod = mesh.pod(&format!("web-{i}"));
            pod.spawn_app(&[
                "http",
                "--listen",
                "0.0.0.0:8080",
                "--name",
                &format!("web-{i}"),
            ]);
            pod.start_sidecar(&[]);
            pod
        })
        .collect();
    let client = mesh.pod("client");
    let endpoints: Vec<String> = servers
        .iter()
        .map(|s| format!("\"{}\"", s.addr(8080)))
        .collect();
    let p = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web}}\nspec:\n  \
         destination: {{host: web, port: 8080, addresses: [\"{VIP}\"], endpoints: [{}]}}\n  \
         retries: {{maxRetries: 2, on: [connect-failure, reset, gateway-error]}}\n",
        endpoints.join(", ")
    );
    let file = mesh.write_file("policy.yaml", &p);
    client.start_sidecar(&["--policy-file", &file.to_string_lossy()]);

    let victim = &servers[1];
    let out = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            client.testapp(&[
                "load",
                "--url",
                &format!("http://{VIP}/"),
                "--requests",
                "3000",
                "--concurrency",
                "8",
            ])
        });
        // Kill the victim's app once it has demonstrably taken part in the load.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while victim
            .metrics()
            .sum("trellis_requests_total", &[("direction", "inbound")])
            < 200.0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the load never reached the victim"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        victim.kill_apps();
        load.join().unwrap()
    });
    let m = client.metrics();
    let served: Vec<f64> = servers
        .iter()
        .map(|s| {
            s.metrics().sum(
                "trellis_requests_total",
                &[("direction", "inbound"), ("status", "200")],
            )
        })
        .collect();
    let ejections = m.sum(
        "trellis_endpoint_ejections_total",
        &[("endpoint", &victim.addr(8080).to_string())],
    );
    let retries = m.sum("trellis_retries_total", &[("policy", "default/web")]);
    eprintln!(
        "3000 requests in {:.0} ms: {} failed; served by web-1/2/3: {served:?}; {retries} retries; victim ejected {ejections} times",
        out["elapsed_ms"].as_f64().unwrap_or(0.0),
        out["failed"]
    );
    assert_eq!(out["failed"], 0, "{out}");
    assert_eq!(out["statuses"]["200"], 3000);
    assert!(ejections >= 1.0, "the dead endpoint was never ejected");
    assert!(served[1] > 0.0, "the victim served traffic before it died");
    assert!(
        served[0] > 500.0 && served[2] > 500.0,
        "the survivors carried the load: {served:?}"
    );
}
