//! gRPC (HTTP/2 with trailers) through two sidecars with a real tonic client and server.

use trellis_tests::harness::{Mesh, Pod};

fn client_and_grpc_server(test: &str) -> Option<(Mesh, Pod, Pod)> {
    Mesh::client_and_server(
        test,
        &["grpc", "--listen", "0.0.0.0:50051", "--name", "grpc-server"],
        &[],
    )
}

#[test]
fn grpc_unary_streaming_and_error_statuses_pass_through_unchanged() {
    let Some((_mesh, client, server)) = client_and_grpc_server("grpc") else {
        return;
    };
    let target = format!("http://{}:50051", server.ip);

    let unary = client.testapp(&["grpc-call", "--target", &target, "--call", "unary"]);
    assert_eq!(unary["ok"], true, "{unary}");
    assert_eq!(unary["message"], "hello over grpc");
    assert_eq!(unary["from"], "grpc-server");

    let stream = client.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "stream",
        "--count",
        "5",
    ]);
    assert_eq!(stream["ok"], true, "{stream}");
    let seqs: Vec<u64> = stream["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4]);

    // NOT_FOUND (5) with a message and trailing metadata, carried in trailers by both proxies.
    let fail = client.testapp(&[
        "grpc-call",
        "--target",
        &target,
        "--call",
        "fail",
        "--code",
        "5",
    ]);
    assert_eq!(fail["ok"], false);
    assert_eq!(fail["code"], 5, "{fail}");
    assert_eq!(fail["message"], "failing on purpose");
    assert_eq!(fail["metadata"]["x-detail"], "from-the-app");

    // Three calls per hop, labelled as gRPC with their status: unary and stream OK (0), the
    // failing call NOT_FOUND (5) even though the app sent it in trailers.
    let (c, s) = (client.metrics(), server.metrics());
    for (m, direction) in [(&c, "outbound"), (&s, "inbound")] {
        let calls = |grpc_status| {
            m.sum(
                "trellis_requests_total",
                &[
                    ("direction", direction),
                    ("protocol", "grpc"),
                    ("status", "200"),
                    ("grpc_status", grpc_status),
                ],
            )
        };
        assert_eq!((calls("0"), calls("5")), (2.0, 1.0), "{direction}");
    }
    // One pooled HTTP/2 connection per hop carried all three calls' worth of requests.
    assert!(
        c.sum(
            "trellis_upstream_connections_opened_total",
            &[("protocol", "http2")]
        ) <= 3.0
    );
}

#[test]
fn grpc_callers_get_unavailable_with_the_cause_when_the_proxy_fails() {
    let Some((_mesh, client, server)) = client_and_grpc_server("grpc_errors") else {
        return;
    };
    // No server on 50052: the server's sidecar answers a trailers-only UNAVAILABLE.
    let out = client.testapp(&[
        "grpc-call",
        "--target",
        &format!("http://{}:50052", server.ip),
        "--call",
        "unary",
    ]);
    assert_eq!(out["ok"], false);
    assert_eq!(out["code"], 14, "UNAVAILABLE: {out}");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .starts_with("connect-refused"),
        "{out}"
    );
    assert_eq!(out["metadata"]["trellis-error"], "connect-refused");
}
