//! Full mutual-TLS handshakes per second per core, each side timed on its own: the mesh's real
//! configurations (TLS 1.3, the mesh CA's ECDSA P-256 certificates, the server requiring a
//! client certificate, the client verifying the chain and then the SPIFFE identity), in memory,
//! session resumption disabled, each side's thread CPU time counted so every handshake is full. Not part of the test suite.
//!
//! `cargo bench -p trellis-identity --bench handshake [-- HANDSHAKES]` (default 2,000)

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use trellis_identity::SpiffeId;
use trellis_identity::ca::Ca;
use trellis_identity::tls::{Credentials, expect_identity};

/// This thread's CPU time (not wall-clock: the machine may be shared, and a preempted thread
/// must not count as a slow handshake).
#[derive(Clone, Copy)]
struct Instant(Duration);

impl Instant {
    fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Self(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    fn elapsed(self) -> Duration {
        Self::now().0.saturating_sub(self.0)
    }
}

fn main() {
    trellis_identity::install_crypto_provider();
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000);
    let (ca, _, _) = Ca::generate("cluster.local").expect("CA");
    let anchors = ca.bundle_pem().to_string();
    let credentials = |sa: &str| {
        let id = SpiffeId::new("cluster.local", "default", sa);
        let (issued, key) = ca
            .issue(&id, Duration::from_secs(3600), &[], &[])
            .expect("issue");
        Credentials::from_pem(
            issued.chain_pem.as_bytes(),
            key.as_bytes(),
            anchors.as_bytes(),
        )
        .expect("credentials")
    };
    let server = credentials("server")
        .server_config(&[b"h2"])
        .expect("server config");
    let mut client = (*credentials("client")
        .client_config(&[b"h2"])
        .expect("client config"))
    .clone();
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    let expected = SpiffeId::new("cluster.local", "default", "server").to_string();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());

    let mut spent = (Duration::ZERO, Duration::ZERO);
    for i in 0..(n + n / 10) {
        let (c, s) = handshake(&client, &server, &name, &expected);
        // The first tenth warms caches and is not counted.
        if i >= n / 10 {
            spent.0 += c;
            spent.1 += s;
        }
    }
    let per_sec = |d: Duration| f64::from(n) / d.as_secs_f64();
    println!(
        "{n} full mutual-TLS 1.3 handshakes (ECDSA P-256 certificates, client certificate \
         required, SPIFFE identity checked), CPU time per side on one core:"
    );
    println!(
        "  client: {:.0} µs each, {:.0} handshakes/s per core",
        spent.0.as_secs_f64() * 1e6 / f64::from(n),
        per_sec(spent.0)
    );
    println!(
        "  server: {:.0} µs each, {:.0} handshakes/s per core",
        spent.1.as_secs_f64() * 1e6 / f64::from(n),
        per_sec(spent.1)
    );
}

/// One handshake; returns the time spent in the client's and in the server's work.
fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    name: &ServerName<'static>,
    expected: &str,
) -> (Duration, Duration) {
    let (mut c_time, mut s_time) = (Duration::ZERO, Duration::ZERO);
    let t = Instant::now();
    let mut c = ClientConnection::new(client.clone(), name.clone()).expect("client");
    c_time += t.elapsed();
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).expect("server");
    s_time += t.elapsed();
    let mut wire = Vec::with_capacity(8 * 1024);
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        let t = Instant::now();
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("client write");
        }
        c_time += t.elapsed();
        let t = Instant::now();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("server read");
            s.process_new_packets().expect("server handshake");
        }
        let mut back = Vec::with_capacity(8 * 1024);
        while s.wants_write() {
            s.write_tls(&mut back).expect("server write");
        }
        s_time += t.elapsed();
        let t = Instant::now();
        let mut rd = &back[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("client read");
            c.process_new_packets().expect("client handshake");
        }
        c_time += t.elapsed();
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake stuck"
    );
    let t = Instant::now();
    expect_identity(c.peer_certificates(), expected).expect("server identity");
    c_time += t.elapsed();
    (c_time, s_time)
}
