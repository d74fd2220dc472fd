//! Hostile and malformed input against the proxy's own HTTP and TCP servers, in real pods: every
//! bad client gets a clear answer (a status, a GOAWAY, or a closed connection) within a bound,
//! nothing it sent reaches the app, the proxy's memory and file descriptors stay bounded, and
//! the proxy keeps serving normal requests afterwards.
//!
//! Attacks come from two places: the `client` pod's app (through iptables OUTPUT into its
//! sidecar's outbound listener) and an `attacker` pod without a sidecar (through the server pod's
//! PREROUTING into the server sidecar's inbound listener). The `server` pod's app is a recorder
//! in this test process that counts every connection and request it receives.
//!
//! The recording app is `harness::Recorder`; the raw sockets, HTTP/2 frames and ClientHello
//! the attacks are made of are in `harness::raw`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use trellis_tests::harness::raw::{
    GET_HEADER_BLOCK, client_hello, connect, flood, frame, goaway_code, h2_start, parse_frames,
    peer_closed, send_and_read,
};
use trellis_tests::harness::{Mesh, Pod, Recorder, wait_for};
use trellis_tests::procfs;

const PORT: u16 = 8080;
/// `trellis_proxy_errors_total`, the counter every refusal below is checked against.
const ERRORS: &str = "trellis_proxy_errors_total";

/// server (recorder app + sidecar started with `server_args`), client (sidecar with
/// `client_args`), attacker (no sidecar).
struct Pods {
    _mesh: Mesh,
    server: Pod,
    client: Pod,
    attacker: Pod,
    app: Recorder,
}

fn pods(test: &str, server_args: &[&str], client_args: &[&str]) -> Option<Pods> {
    let mesh = Mesh::new(test)?;
    let server = mesh.pod("server");
    let app = Recorder::start(&server, PORT);
    server.start_sidecar(server_args);
    let client = mesh.pod("client");
    client.start_sidecar(client_args);
    let attacker = mesh.pod("attacker");
    Some(Pods {
        _mesh: mesh,
        server,
        client,
        attacker,
        app,
    })
}

/// Malformed HTTP/1 requests and the status the proxy answers them with.
fn malformed_requests() -> Vec<(&'static str, Vec<u8>, u16)> {
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: x\r\n");
    for i in 0..101 {
        many.push_str(&format!("X-H-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let raw = |s: &str| s.as_bytes().to_vec();
    vec![
        // The head is over --max-header-bytes (64 KiB by default).
        ("70 KiB header", big.into_bytes(), 431),
        // 102 header lines: hyper allows 100.
        ("102 headers", many.into_bytes(), 431),
        (
            "binary garbage after the request line",
            b"GET /garbage HTTP/1.1\r\n\x01\x02\xff\xfe junk\r\n\r\n".to_vec(),
            400,
        ),
        (
            "header line without a colon",
            raw("GET /nocolon HTTP/1.1\r\nHost x\r\n\r\n"),
            400,
        ),
        (
            "space before the colon (obfuscated Transfer-Encoding)",
            raw(
                "POST /te-space HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "two different Content-Length values",
            raw(
                "POST /two-cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            ),
            400,
        ),
        (
            "Content-Length that is not a number",
            raw("POST /cl-x HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello"),
            400,
        ),
        (
            "Transfer-Encoding: chunked, identity",
            raw(
                "POST /te-ci HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "Transfer-Encoding: xchunked",
            raw("POST /te-x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunked, then a second Transfer-Encoding: identity",
            raw(
                "POST /te-2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            raw("POST /te-10 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
    ]
}

/// What a user sees: a malformed or oversized request gets `400 Bad Request` or `431 Request
/// Header Fields Too Large` from the first proxy it meets and the connection is closed; the app
/// never sees the request; `trellis_proxy_errors_total{cause="bad-request"|
/// "request-headers-too-large"}` counts them; well-formed requests keep working.
#[test]
fn malformed_and_smuggling_http1_requests_are_refused_before_the_app() {
    let Some(p) = pods("hostile_http1", &[], &[]) else {
        return;
    };
    let cases = malformed_requests();
    let expect_400 = cases.iter().filter(|c| c.2 == 400).count() as f64;
    for (from, direction, proxy) in [
        (&p.client, "outbound", &p.client),
        (&p.attacker, "inbound", &p.server),
    ] {
        for (what, bytes, status) in &cases {
            let stream = connect(from, p.server.addr(PORT));
            let reply = send_and_read(stream, bytes, Duration::from_secs(10));
            assert_eq!(
                reply.status(),
                *status,
                "{direction}: {what}: got {:?}",
                String::from_utf8_lossy(&reply.data)
            );
            assert!(reply.closed, "{direction}: {what}: connection left open");
        }
        // Counted when hyper gives up the connection, a moment after the client saw it close.
        let counted = |cause: &str| {
            proxy
                .metrics()
                .sum(ERRORS, &[("direction", direction), ("cause", cause)])
        };
        wait_for("the refusals to be counted", Duration::from_secs(5), || {
            counted("bad-request") == expect_400 && counted("request-headers-too-large") == 2.0
        });
    }
    assert_eq!(
        p.app.requests(),
        Vec::<String>::new(),
        "malformed requests reached the app"
    );

    // Content-Length and Transfer-Encoding together (the classic CL.TE smuggling): hyper
    // frames the body by Transfer-Encoding alone, drops Content-Length and closes the
    // connection after the response (RFC 9112 §6.1), so the request hidden in the "body" is
    // never parsed as a request and never reaches the app.
    for (from, direction) in [(&p.client, "outbound"), (&p.attacker, "inbound")] {
        for (order, head) in [
            (
                "CL first",
                "Content-Length: 4\r\nTransfer-Encoding: chunked",
            ),
            (
                "TE first",
                "Transfer-Encoding: chunked\r\nContent-Length: 4",
            ),
        ] {
            let smuggle = format!(
                "POST /cl-te HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n0\r\n\r\n\
                 GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            );
            let stream = connect(from, p.server.addr(PORT));
            let reply = send_and_read(stream, smuggle.as_bytes(), Duration::from_secs(10));
            let text = String::from_utf8_lossy(&reply.data);
            assert!(reply.closed, "{direction} {order}: connection left open");
            assert_eq!(
                text.matches("HTTP/1.1 ").count(),
                1,
                "{direction} {order}: one response, for the outer request only: {text}"
            );
        }
    }
    let seen = p.app.requests();
    assert_eq!(
        seen,
        vec!["POST /cl-te".to_string(); 4],
        "the app saw {seen:?}"
    );

    // Below the limit, a 40 KiB header crosses both proxies; over it, HTTP/2 gets 431 too.
    let header = |kib: usize| format!("X-Big: {}", "b".repeat(kib * 1024));
    let ok = p
        .client
        .curl(&["-H", &header(40), &p.server.url(PORT, "/big-ok")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let h2 = p.attacker.curl(&[
        "--http2-prior-knowledge",
        "-H",
        &header(70),
        &p.server.url(PORT, "/big-h2"),
    ]);
    // HTTP/2 (h2 0.4): 431 when the decoded list is over the limit; when the header block
    // itself, spread over CONTINUATION frames, is over it, the connection gets a GOAWAY
    // (COMPRESSION_ERROR) instead. Either way the request goes no further.
    eprintln!("HTTP/2 with a 70 KiB header: {h2:?}");
    assert!(
        h2.status == 431 || (h2.status == 0 && !h2.stderr.is_empty()),
        "{h2:?}"
    );
    let ok = p
        .attacker
        .curl(&["--http2-prior-knowledge", &p.server.url(PORT, "/after-h2")]);
    assert_eq!(ok.status, 200, "{ok:?}");

    // The proxies keep serving.
    let ok = p.client.curl(&[&p.server.url(PORT, "/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let ok = p.attacker.curl(&[&p.server.url(PORT, "/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let seen = p.app.requests();
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert!(!seen.iter().any(|r| r.contains("/big-h2")), "{seen:?}");
}

/// What a user sees: a client that sends its request head a line at a time and never finishes
/// is disconnected after `--header-read-timeout` (2 s here, 30 s by default) with no response;
/// `trellis_proxy_errors_total{cause="header-read-timeout"}` counts it; the app never hears of
/// it.
#[test]
fn a_slowloris_client_is_cut_off_at_the_header_read_timeout() {
    let args = ["--header-read-timeout", "2s"];
    let Some(p) = pods("hostile_slowloris", &args, &args) else {
        return;
    };
    for (from, direction, proxy) in [
        (&p.client, "outbound", &p.client),
        (&p.attacker, "inbound", &p.server),
    ] {
        let mut stream = connect(from, p.server.addr(PORT));
        let start = Instant::now();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            .expect("write the request line");
        let mut closed_after = None;
        // One header line every 500 ms, for at most 15 s.
        for i in 0..30 {
            std::thread::sleep(Duration::from_millis(500));
            if peer_closed(&stream)
                || stream
                    .write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
                    .is_err()
            {
                closed_after = Some(start.elapsed());
                break;
            }
        }
        let closed_after = closed_after.unwrap_or_else(|| {
            panic!("{direction}: the slow client was still connected after 15 s")
        });
        eprintln!("{direction}: slowloris connection closed after {closed_after:?}");
        assert!(
            closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(10),
            "{direction}: closed after {closed_after:?}, expected about 2 s"
        );
        wait_for(
            "the header-read-timeout to be counted",
            Duration::from_secs(5),
            || {
                proxy.metrics().sum(
                    ERRORS,
                    &[("direction", direction), ("cause", "header-read-timeout")],
                ) == 1.0
            },
        );
    }
    assert!(p.app.requests().is_empty(), "{:?}", p.app.requests());
    let ok = p.client.curl(&[&p.server.url(PORT, "/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
}

/// What a user sees: an HTTP/2 client that opens and cancels streams in a burst (CVE-2023-44487
/// "rapid reset") gets a GOAWAY with ENHANCE_YOUR_CALM and is disconnected; floods of SETTINGS
/// or PING frames are answered or cut off without the proxy's memory growing; the proxy keeps
/// serving.
#[test]
fn http2_rapid_reset_settings_and_ping_floods_stay_bounded() {
    let Some(p) = pods("hostile_h2", &[], &[]) else {
        return;
    };
    for (from, direction, proxy) in [
        (&p.client, "outbound", &p.client),
        (&p.attacker, "inbound", &p.server),
    ] {
        // Warm up first: the pooled upstream connection a request opens is not a leak.
        let warm = from.curl(&["--http2-prior-knowledge", &p.server.url(PORT, "/warm")]);
        assert_eq!(warm.status, 200, "{warm:?}");
        let peak_before = proxy.proxy_status_kb("VmHWM");
        let fds_before = open_fds(proxy);

        // Rapid reset: 5,000 HEADERS + RST_STREAM(CANCEL) pairs.
        let (app_before, cpu_before) = (p.app.requests().len(), cpu_time(proxy));
        let stream = connect(from, p.server.addr(PORT));
        let mut burst = h2_start();
        for i in 0..5_000u32 {
            let id = 2 * i + 1;
            burst.extend(frame(0x1, 0x5, id, &GET_HEADER_BLOCK));
            burst.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
        }
        let reply = flood(stream, &burst, Duration::from_secs(15));
        let frames = parse_frames(&reply.data);
        let goaway = goaway_code(&frames);
        eprintln!(
            "{direction}: rapid reset: {} bytes written, {} frames back, GOAWAY {goaway:?}, closed {}",
            reply.written,
            frames.len(),
            reply.closed
        );
        let reached = p.app.requests().len() - app_before;
        eprintln!(
            "{direction}: rapid reset: {reached} of 5000 streams reached the app, proxy CPU {:?}",
            cpu_time(proxy) - cpu_before
        );
        assert!(
            reached < 5_000,
            "{direction}: every cancelled stream was forwarded"
        );
        assert_eq!(
            goaway,
            Some(0xb),
            "{direction}: expected GOAWAY ENHANCE_YOUR_CALM"
        );
        assert!(
            reply.closed,
            "{direction}: rapid-reset connection left open"
        );

        // SETTINGS flood and PING flood: 50,000 frames each, written without reading replies.
        for (what, one) in [
            ("SETTINGS", frame(0x4, 0, 0, &[])),
            ("PING", frame(0x6, 0, 0, &[7; 8])),
        ] {
            let stream = connect(from, p.server.addr(PORT));
            let mut bytes = h2_start();
            for _ in 0..50_000 {
                bytes.extend_from_slice(&one);
            }
            let reply = flood(stream, &bytes, Duration::from_secs(3));
            let frames = parse_frames(&reply.data);
            let acks = frames
                .iter()
                .filter(|f| f.kind == one[3] && f.flags & 0x1 == 0x1)
                .count();
            eprintln!(
                "{direction}: {what} flood: {} of {} bytes written, {acks} ACKs, GOAWAY {:?}, closed {}",
                reply.written,
                bytes.len(),
                goaway_code(&frames),
                reply.closed
            );
            assert!(
                reply.closed || acks > 0,
                "{direction}: {what} flood neither answered nor closed"
            );
        }

        let grown = proxy.proxy_status_kb("VmHWM").saturating_sub(peak_before);
        eprintln!("{direction}: peak RSS growth over the three floods: {grown} kB");
        assert!(
            grown < 20 * 1024,
            "{direction}: peak RSS grew by {grown} kB"
        );
        wait_for(
            "file descriptors back to baseline",
            Duration::from_secs(10),
            || open_fds(proxy) <= fds_before,
        );
    }
    // Normal traffic, HTTP/1.1 and HTTP/2, through both proxies.
    let ok = p.client.curl(&[&p.server.url(PORT, "/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let ok = p
        .attacker
        .curl(&["--http2-prior-knowledge", &p.server.url(PORT, "/after-h2")]);
    assert_eq!(ok.status, 200, "{ok:?}");
}

/// What a user sees: random bytes or a broken TLS ClientHello sent to a meshed pod whose port
/// requires mutual TLS are dropped within the detect timeout; the app gets no connection at all;
/// the proxy's file descriptors return to where they were, and mesh TLS clients still get in.
#[test]
fn garbage_and_truncated_client_hellos_on_the_inbound_port_are_dropped() {
    let Some(mesh) = Mesh::new("hostile_inbound_tls") else {
        return;
    };
    let server = mesh.pod("server");
    let app = Recorder::start(&server, PORT);
    let (ca, _, _) = trellis_identity::ca::Ca::generate("cluster.local").expect("a CA");
    let identity = |name: &str| {
        let id = trellis_identity::SpiffeId::new("cluster.local", "default", name);
        ca.issue(&id, Duration::from_secs(3600), &[], &[])
            .expect("a certificate")
    };
    let dir = mesh.log_dir().join("server-identity");
    std::fs::create_dir_all(&dir).expect("identity dir");
    let (issued, key) = identity("server");
    std::fs::write(dir.join("cert.pem"), &issued.chain_pem).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), &key).expect("key.pem");
    std::fs::write(dir.join("ca.pem"), ca.bundle_pem()).expect("ca.pem");
    let policy = mesh.write_file(
        "policy.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {name: server}\n\
         spec:\n  selector: {serviceAccount: server}\n  mtls: strict\n",
    );
    server.start_sidecar(&[
        "--identity-dir",
        &dir.to_string_lossy(),
        "--policy-file",
        &policy.to_string_lossy(),
        "--workload",
        "default/server",
        "--service-account",
        "server",
    ]);
    let attacker = mesh.pod("attacker");
    let fds_before = open_fds(&server);
    let peak_before = server.proxy_status_kb("VmHWM");

    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seed = 0x9e37_79b9_u32;
    for n in [1usize, 7, 100, 1_000, 4_096, 16_384, 65_536] {
        let bytes = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        inputs.push((format!("{n} random bytes"), bytes));
    }
    let hello = client_hello();
    for cut in [1usize, 5, 9, 40, hello.len() / 2, hello.len() - 1] {
        inputs.push((
            format!("ClientHello cut at {cut} of {} bytes", hello.len()),
            hello[..cut].to_vec(),
        ));
    }
    // A record header that promises a handshake and then carries garbage.
    inputs.push((
        "TLS record of garbage".into(),
        [&[0x16, 0x03, 0x01, 0x00, 0x20][..], &[0xee; 0x20]].concat(),
    ));
    for (what, bytes) in &inputs {
        let stream = connect(&attacker, server.addr(PORT));
        let reply = send_and_read(stream, bytes, Duration::from_secs(10));
        assert!(reply.closed, "{what}: connection left open");
        assert!(
            reply.data.is_empty(),
            "{what}: got {} bytes back",
            reply.data.len()
        );
        // Within the 500 ms detect timeout (plus the noise of a busy machine).
        assert!(
            reply.elapsed < Duration::from_secs(5),
            "{what}: closed after {:?}",
            reply.elapsed
        );
    }
    assert_eq!(
        app.connections(),
        0,
        "hostile bytes were forwarded to the app"
    );
    let refused = server.metrics().sum(
        ERRORS,
        &[("direction", "inbound"), ("cause", "unauthorized")],
    );
    eprintln!(
        "{} inputs, {refused} counted as unauthorized plaintext",
        inputs.len()
    );
    assert_eq!(refused, inputs.len() as f64);
    wait_for(
        "file descriptors back to baseline",
        Duration::from_secs(10),
        || open_fds(&server) <= fds_before,
    );
    let grown = server.proxy_status_kb("VmHWM").saturating_sub(peak_before);
    assert!(grown < 20 * 1024, "peak RSS grew by {grown} kB");

    // A mesh client with a certificate from the same CA still gets through.
    let (issued, key) = identity("client");
    let creds = trellis_identity::tls::Credentials::from_pem(
        issued.chain_pem.as_bytes(),
        key.as_bytes(),
        ca.bundle_pem().as_bytes(),
    )
    .expect("client credentials");
    let config = creds
        .client_config(&[trellis_identity::tls::ALPN_H1])
        .expect("client TLS config");
    let tcp = connect(&attacker, server.addr(PORT));
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::try_from("server").expect("a name");
    let tls = rustls::ClientConnection::new(config, name).expect("TLS client");
    let mut tls = rustls::StreamOwned::new(tls, tcp);
    tls.write_all(b"GET /mesh HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
        .expect("write over mesh TLS");
    let mut rsp = Vec::new();
    let _ = tls.read_to_end(&mut rsp);
    let rsp = String::from_utf8_lossy(&rsp);
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert_eq!(app.requests(), vec!["GET /mesh".to_string()]);
}

/// What a user sees: past `--max-connections` (50 here) new connections are accepted and closed
/// at once, each counted as `trellis_proxy_errors_total{cause="overloaded"}` and logged as
/// "connection shed"; the connections already in are untouched; memory stays bounded; once the
/// flood ends, new connections work again.
#[test]
fn a_connection_flood_beyond_max_connections_is_shed_and_recovers() {
    let Some(p) = pods("hostile_flood", &["--max-connections", "50"], &[]) else {
        return;
    };
    let fds_before = open_fds(&p.server);
    let peak_before = p.server.proxy_status_kb("VmHWM");
    let addr = p.server.addr(PORT);
    let conns: Vec<TcpStream> = p.attacker.netns().enter(move || {
        (0..300)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
            .collect()
    });
    // Past the 500 ms detect timeout the admitted (silent) connections are opaque TCP to the app.
    wait_for(
        "the admitted connections to reach the app",
        Duration::from_secs(10),
        || p.app.connections() == 50,
    );
    let shed = conns.iter().filter(|c| peer_closed(c)).count();
    eprintln!("300 connections: {shed} shed, {} held", 300 - shed);
    assert_eq!(shed, 250);
    let m = p.server.metrics();
    assert_eq!(
        m.sum(ERRORS, &[("direction", "inbound"), ("cause", "overloaded")]),
        250.0
    );
    assert_eq!(
        m.sum("trellis_tcp_connections_open", &[("direction", "inbound")]),
        50.0
    );
    assert!(p.server.proxy_log().contains("connection shed"));
    let grown = p
        .server
        .proxy_status_kb("VmHWM")
        .saturating_sub(peak_before);
    eprintln!("peak RSS growth: {grown} kB");
    assert!(grown < 20 * 1024, "peak RSS grew by {grown} kB");

    drop(conns);
    wait_for(
        "the flood's connections to close",
        Duration::from_secs(10),
        || {
            p.server
                .metrics()
                .sum("trellis_tcp_connections_open", &[("direction", "inbound")])
                == 0.0
        },
    );
    wait_for(
        "file descriptors back to baseline",
        Duration::from_secs(10),
        || open_fds(&p.server) <= fds_before,
    );
    let ok = p.attacker.curl(&[&p.server.url(PORT, "/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let ok = p.client.curl(&[&p.server.url(PORT, "/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
}

// ---- the proxy's resources ----

/// Open descriptors of `pod`'s proxy.
fn open_fds(pod: &Pod) -> usize {
    let pid = pod.proxy_pid();
    procfs::open_fds(pid).unwrap_or_else(|| panic!("the proxy {pid} is gone"))
}

/// CPU time (user + system) `pod`'s proxy has used so far.
fn cpu_time(pod: &Pod) -> Duration {
    let pid = pod.proxy_pid();
    procfs::cpu_time(pid).unwrap_or_else(|| panic!("the proxy {pid} is gone"))
}
