//! Graceful shutdown: SIGTERM and POST /shutdown let in-flight requests finish, refuse new
//! connections, and exit 0.

use std::time::Duration;

use trellis_tests::harness::Mesh;

#[test]
fn sigterm_lets_a_slow_request_finish_refuses_new_connections_and_exits_zero() {
    let Some(mesh) = Mesh::new("drain_sigterm") else {
        return;
    };
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.start_sidecar(&["--drain-grace-period", "10s"]);
    let client = mesh.pod("client");
    client.start_sidecar(&[]);

    let slow_url = server.url(8080, "/slow?ms=1500");
    let in_flight = std::thread::scope(|scope| {
        let slow = scope.spawn(|| client.curl(&[&slow_url]));
        // Let the request reach the app, then ask the server's sidecar to stop.
        std::thread::sleep(Duration::from_millis(400));
        server.signal_proxy(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            server.admin_get("/ready").0,
            503,
            "a draining proxy must not report ready"
        );
        // New connections to the server pod now find no listener: the client's sidecar says so.
        let refused = client.curl(&[&server.url(8080, "/")]);
        assert_eq!(refused.status, 503, "{refused:?}");
        assert_eq!(refused.header("trellis-error"), Some("connect-refused"));
        slow.join().unwrap()
    });
    assert_eq!(
        in_flight.status, 200,
        "the in-flight request was cut: {in_flight:?}"
    );
    assert_eq!(in_flight.body, "slow response from server\n");
    assert_eq!(
        server.wait_proxy_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        server.proxy_log()
    );
}

#[test]
fn post_shutdown_drains_for_jobs_and_answers_only_loopback() {
    let Some(mesh) = Mesh::new("drain_shutdown") else {
        return;
    };
    let job = mesh.pod("job");
    job.start_sidecar(&["--admin-addr", "0.0.0.0:4191"]);
    let other = mesh.pod("other");

    // From another pod: forbidden, and the proxy keeps running.
    let rsp = other.curl(&["-X", "POST", &job.url(4191, "/shutdown")]);
    assert_eq!(rsp.status, 403);
    assert_eq!(job.admin_get("/ready").0, 200);

    // GET is not a shutdown.
    assert_eq!(job.admin_request("GET", "/shutdown").0, 405);
    let (status, body) = job.admin_request("POST", "/shutdown");
    assert_eq!((status, body.as_str()), (200, "draining\n"));
    assert_eq!(
        job.wait_proxy_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        job.proxy_log()
    );
}
