//! Transparent interception: the proxy's own connections are not redirected again (no loops),
//! loopback traffic bypasses the proxy, and connections aimed at the proxy's own listeners are
//! refused rather than dialled.

use trellis_tests::harness::Mesh;

#[test]
fn each_request_crosses_exactly_one_outbound_and_one_inbound_proxy() {
    let Some(mesh) = Mesh::new("no_loop") else {
        return;
    };
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    server.start_sidecar(&[]);
    let client = mesh.pod("client");
    client.start_sidecar(&[]);

    for _ in 0..10 {
        assert_eq!(client.curl(&[&server.url(8080, "/")]).status, 200);
    }
    let (c, s) = (client.metrics(), server.metrics());
    let requests = |m: &trellis_tests::harness::Scrape, d| {
        m.sum("trellis_requests_total", &[("direction", d)])
    };
    assert_eq!(requests(&c, "outbound"), 10.0);
    assert_eq!(requests(&c, "inbound"), 0.0);
    assert_eq!(requests(&s, "inbound"), 10.0);
    // The server proxy's connections to its app were not intercepted as the pod's outbound.
    assert_eq!(requests(&s, "outbound"), 0.0);
    assert_eq!(
        s.sum(
            "trellis_tcp_connections_opened_total",
            &[("direction", "outbound")]
        ),
        0.0
    );
    // The client proxy's connections to the server were not intercepted again by its own rules.
    assert_eq!(
        c.sum(
            "trellis_tcp_connections_opened_total",
            &[("direction", "outbound")]
        ),
        10.0
    );
}

#[test]
fn loopback_traffic_is_not_intercepted() {
    let Some(mesh) = Mesh::new("loopback") else {
        return;
    };
    let pod = mesh.pod("pod");
    pod.spawn_app(&["http", "--listen", "127.0.0.1:9000", "--name", "local"]);
    pod.start_sidecar(&[]);
    let rsp = pod.curl(&["http://127.0.0.1:9000/"]);
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.body, "hello from local\n");
    let m = pod.metrics();
    assert_eq!(
        m.sum("trellis_tcp_connections_opened_total", &[]),
        0.0,
        "{}",
        m.text
    );
}

#[test]
fn connections_to_the_proxys_own_listeners_are_refused_not_dialled() {
    let Some(mesh) = Mesh::new("self_loop") else {
        return;
    };
    let server = mesh.pod("server");
    server.start_sidecar(&[]);
    let client = mesh.pod("client");
    client.start_sidecar(&[]);

    // From another pod straight at the inbound port: not redirected, so no original destination.
    let rsp = client.curl(&[&server.url(4143, "/")]);
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("no-original-destination"));
    assert!(rsp.body.contains("refusing to loop"), "{}", rsp.body);

    // From inside the pod to its own listener over loopback: refused the same way.
    let rsp = server.curl(&["http://127.0.0.1:4143/"]);
    assert_eq!(rsp.status, 502);
    assert_eq!(rsp.header("trellis-error"), Some("no-original-destination"));
    let m = server.metrics();
    assert_eq!(
        m.sum(
            "trellis_proxy_errors_total",
            &[("cause", "no-original-destination")]
        ),
        2.0
    );
    // Nothing was dialled on the proxy's behalf.
    assert_eq!(m.sum("trellis_upstream_connections_opened_total", &[]), 0.0);
}
