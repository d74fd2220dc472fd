//! HTTP/1.1 and HTTP/2 through two sidecars: client app → client proxy (outbound) → server proxy
//! (inbound) → server app, with real interception rules in both pods.

use trellis_tests::harness::{Mesh, Pod};

const HTTP_PORT: u16 = 8080;

/// A client pod and a server pod running the test HTTP app, both with sidecars.
fn client_and_server(test: &str) -> Option<(Mesh, Pod, Pod)> {
    Mesh::client_and_server(
        test,
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
        &[],
    )
}

#[test]
fn http1_get_and_a_streamed_10mb_post_cross_both_sidecars() {
    let Some((_mesh, client, server)) = client_and_server("http1_get_and_post") else {
        return;
    };

    let rsp = client.curl(&[&server.url(HTTP_PORT, "/")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(rsp.body, "hello from server\n");

    // 10 MiB of pseudo-random bytes, streamed up; the app reports length and checksum.
    let payload: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = std::env::temp_dir().join(format!("trellis-payload-{}", std::process::id()));
    std::fs::write(&file, &payload).unwrap();
    let idle_peak_kb = server.proxy_status_kb("VmHWM");
    let rsp = client.curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        &server.url(HTTP_PORT, "/upload"),
    ]);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let got: serde_json::Value = serde_json::from_str(&rsp.body).unwrap();
    assert_eq!(got["bytes"], 10 * 1024 * 1024);
    assert_eq!(got["fnv64"], format!("{:016x}", fnv64(&payload)));
    // Streamed, not buffered: the proxy's peak memory grows far less than the 10 MiB body.
    let grown_kb = server.proxy_status_kb("VmHWM").saturating_sub(idle_peak_kb);
    eprintln!("peak RSS growth during 10 MiB upload: {grown_kb} kB (idle peak {idle_peak_kb} kB)");
    assert!(
        grown_kb < 6 * 1024,
        "server proxy peak RSS grew by {grown_kb} kB during a 10 MiB upload"
    );

    // Both hops were taken: one outbound request in the client pod, one inbound in the server pod.
    let (c, s) = (client.metrics(), server.metrics());
    let ok = [("status", "200"), ("protocol", "http1")];
    assert_eq!(
        c.sum(
            "trellis_requests_total",
            &[&[("direction", "outbound")][..], &ok].concat()
        ),
        2.0
    );
    assert_eq!(
        s.sum(
            "trellis_requests_total",
            &[&[("direction", "inbound")][..], &ok].concat()
        ),
        2.0
    );
    assert!(
        s.sum("trellis_tcp_read_bytes_total", &[("direction", "inbound")])
            >= 10.0 * 1024.0 * 1024.0
    );
}

#[test]
fn responses_stream_through_both_sidecars_chunk_by_chunk() {
    let Some((_mesh, client, server)) = client_and_server("responses_stream") else {
        return;
    };
    // 5 chunks, 300 ms apart: the first must arrive long before the last is written.
    let out = client.testapp(&[
        "http-get",
        "--url",
        &server.url(HTTP_PORT, "/stream?chunks=5&interval_ms=300"),
    ]);
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    let (first, total) = (
        out["first_body_ms"].as_f64().unwrap(),
        out["total_ms"].as_f64().unwrap(),
    );
    assert!(total >= 1200.0, "4 intervals of 300 ms, got {total} ms");
    assert!(
        first < total - 900.0,
        "first chunk after {first} ms of {total} ms: the proxies buffered"
    );
}

#[test]
fn http2_prior_knowledge_keeps_authority_and_drops_hop_by_hop_headers() {
    let Some((_mesh, client, server)) = client_and_server("http2_h2c") else {
        return;
    };
    let rsp = client.curl(&[
        "--http2-prior-knowledge",
        "-H",
        "x-app-header: kept",
        &server.url(HTTP_PORT, "/headers"),
    ]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let seen: serde_json::Value = serde_json::from_str(&rsp.body).unwrap();
    assert_eq!(seen["version"], "HTTP/2.0");
    assert_eq!(
        seen["uri"],
        format!("http://{}:{HTTP_PORT}/headers", server.ip),
        ":authority preserved"
    );
    assert_eq!(seen["headers"]["x-app-header"], "kept");

    // HTTP/1.1: Host preserved; headers named in Connection and other hop-by-hop headers removed.
    let rsp = client.curl(&[
        "-H",
        "Host: reviews.default.svc.cluster.local:8080",
        "-H",
        "Connection: x-hop-secret",
        "-H",
        "x-hop-secret: must-not-pass",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "trellis-error: forged-by-client",
        &server.url(HTTP_PORT, "/headers"),
    ]);
    let seen: serde_json::Value = serde_json::from_str(&rsp.body).unwrap();
    let headers = &seen["headers"];
    assert_eq!(headers["host"], "reviews.default.svc.cluster.local:8080");
    for dropped in ["x-hop-secret", "keep-alive", "trellis-error"] {
        assert!(
            headers.get(dropped).is_none(),
            "{dropped} reached the app: {headers}"
        );
    }

    let (c, s) = (client.metrics(), server.metrics());
    assert_eq!(
        c.sum(
            "trellis_requests_total",
            &[("direction", "outbound"), ("protocol", "http2")]
        ),
        1.0
    );
    assert_eq!(
        s.sum(
            "trellis_requests_total",
            &[("direction", "inbound"), ("protocol", "http2")]
        ),
        1.0
    );
}

#[test]
fn websocket_style_upgrades_pass_through_both_sidecars() {
    let Some((_mesh, client, server)) = client_and_server("upgrade") else {
        return;
    };
    let out = client.testapp(&[
        "ws-call",
        "--connect",
        &server.addr(HTTP_PORT).to_string(),
        "--send",
        "ping over upgrade",
    ]);
    assert_eq!(out["status_line"], "HTTP/1.1 101 Switching Protocols");
    assert_eq!(out["echo"], "ping over upgrade");
}

#[test]
fn errors_made_by_the_proxy_name_their_cause_and_apps_cannot_forge_it() {
    let Some((_mesh, client, server)) = client_and_server("error_causes") else {
        return;
    };
    // Nothing listens on 8081 in the server pod: the server's sidecar says so.
    let rsp = client.curl(&[&server.url(8081, "/")]);
    assert_eq!(rsp.status, 503);
    assert_eq!(rsp.header("trellis-error"), Some("connect-refused"));
    assert!(
        rsp.body
            .contains(&format!("connection to {}:8081 refused", server.ip)),
        "{}",
        rsp.body
    );
    // The built-in default policy retries connect failures twice (the request never reached an
    // app), so the server's sidecar saw three attempts.
    assert_eq!(
        server.metrics().sum(
            "trellis_proxy_errors_total",
            &[("direction", "inbound"), ("cause", "connect-refused")]
        ),
        3.0
    );
    assert_eq!(
        client.metrics().sum(
            "trellis_retries_total",
            &[("policy", "default"), ("reason", "connect-failure")]
        ),
        2.0
    );
    server.expect_access_log_line("naming the cause", |l| {
        l["trellis_error"] == "connect-refused"
    });

    // The app answers with a forged trellis-error header: the server's sidecar strips it.
    let rsp = client.curl(&[&server.url(HTTP_PORT, "/")]);
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.header("trellis-error"), None);
}

#[test]
fn an_upstream_that_never_answers_the_syn_is_a_named_connect_timeout() {
    let Some(mesh) = Mesh::new("connect_timeout") else {
        return;
    };
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    let client = mesh.pod("client");
    client.start_sidecar(&["--connect-timeout", "400ms"]);
    // Blackhole the client proxy's own SYNs to the server (the app's packets were already
    // redirected to 127.0.0.1:4140 by the nat table, so this rule sees only the proxy's).
    let dst = format!("{}", server.ip);
    let out = client.exec(
        "iptables-nft",
        &[
            "-A", "OUTPUT", "-p", "tcp", "-d", &dst, "--dport", "8080", "-j", "DROP",
        ],
    );
    assert!(out.status.success());

    let rsp = client.curl(&[&server.url(HTTP_PORT, "/")]);
    assert_eq!(rsp.status, 504, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("connect-timeout"));
    assert!(rsp.body.contains("timed out after 400ms"), "{}", rsp.body);
    assert!(
        rsp.time_total < 5.0,
        "took {} s with a 400 ms connect timeout",
        rsp.time_total
    );
    let m = client.metrics();
    assert_eq!(
        m.sum(
            "trellis_proxy_errors_total",
            &[("direction", "outbound"), ("cause", "connect-timeout")]
        ),
        1.0
    );
}

fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}
