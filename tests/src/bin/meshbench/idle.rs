//! Memory per idle connection: N client connections from the client pod held open through the
//! Trellis client sidecar (HTTP/1.1 keep-alive after one request each, and opaque TCP over
//! mutual TLS after one echo each), the proxies' RSS before and after, scaled to 10,000.
//! Trellis only: haproxy needs about two descriptors per connection for its `maxconn`, which
//! the 20,000-descriptor hard limit here caps at about 9,000 connections in total.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::procfs;
use crate::topology::{App, Proxy, Side, Tls, Topology};

pub struct IdleResult {
    pub label: &'static str,
    pub connections: usize,
    /// RSS growth per 10,000 connections, kB: client-side and server-side proxy.
    pub per_10k_kb: (f64, f64),
    pub error: Option<String>,
}

/// HTTP keep-alive: 10,000 (one upstream pool at the server); opaque over mutual TLS: 9,000
/// (each holds a client and a mesh connection: 18,000 descriptors in the client proxy).
pub fn measure_all(root: &Path) -> Vec<IdleResult> {
    [
        (
            "HTTP/1.1 keep-alive, plaintext",
            Tls::Plain,
            App::Http1,
            10_000,
        ),
        (
            "opaque TCP over mutual TLS",
            Tls::Mutual,
            App::Opaque,
            9_000,
        ),
    ]
    .into_iter()
    .map(|(label, tls, app, n)| {
        let mut r = IdleResult {
            label,
            connections: n,
            per_10k_kb: (0.0, 0.0),
            error: None,
        };
        let dir = match crate::topology::run_dir(root, &format!("idle-{}", app.port())) {
            Ok(d) => d,
            Err(e) => {
                r.error = Some(e);
                return r;
            }
        };
        let outcome = std::panic::catch_unwind(|| measure(tls, app, n, &dir));
        match outcome {
            Ok(Ok(kb)) => r.per_10k_kb = kb,
            Ok(Err(e)) => r.error = Some(e),
            Err(_) => r.error = Some("panicked (see stderr)".into()),
        }
        r
    })
    .collect()
}

fn measure(tls: Tls, app: App, n: usize, dir: &Path) -> Result<(f64, f64), String> {
    let topo = Topology::build_with(
        Proxy::Trellis,
        tls,
        app,
        dir,
        &["--max-connections", "19500"],
    )?;
    let pids = topo.proxy_pids();
    let pid = |side| pids.iter().find(|(s, _)| *s == side).map(|(_, p)| *p);
    let (client, server) = (
        pid(Side::Client).ok_or("no client proxy")?,
        pid(Side::Server).ok_or("no server proxy")?,
    );
    let rss = |p| procfs::status_kb(p, "VmRSS") as f64;
    let before = (rss(client), rss(server));
    let target = topo.server.addr(app.port());
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let holder = topo.client.netns().spawn_thread(move || {
        let held = open(target, app, n);
        let count = held.as_ref().map(Vec::len).map_err(Clone::clone);
        let _ = opened_tx.send(count);
        // Hold them until measured (bounded), then close them all by dropping.
        let _ = stop_rx.recv_timeout(Duration::from_secs(120));
        drop(held);
    });
    let opened = opened_rx
        .recv_timeout(Duration::from_secs(150))
        .map_err(|_| "opening the connections took over 150 s".to_string())?;
    std::thread::sleep(Duration::from_secs(2));
    let after = (rss(client), rss(server));
    let _ = stop_tx.send(());
    let _ = holder.join();
    let opened = opened?;
    let scale = 10_000.0 / opened.max(1) as f64;
    Ok(((after.0 - before.0) * scale, (after.1 - before.1) * scale))
}

/// Opens `n` connections to `target`, each used once (a request or an echo) and left idle.
fn open(target: SocketAddr, app: App, n: usize) -> Result<Vec<TcpStream>, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut held = Vec::with_capacity(n);
    let mut buf = [0u8; 1024];
    for i in 0..n {
        if Instant::now() > deadline {
            return Err(format!("only {i} of {n} connections opened in 120 s"));
        }
        let fail = |e: std::io::Error| format!("connection {i} of {n} to {target}: {e}");
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).map_err(fail)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(fail)?;
        match app {
            App::Opaque => {
                s.write_all(b"ping").map_err(fail)?;
                s.read_exact(&mut buf[..4]).map_err(fail)?;
            }
            _ => {
                s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                    .map_err(fail)?;
                // The response is small: wait for its body's last byte.
                let mut got = Vec::new();
                while !got.ends_with(crate::nginx::BODY.as_bytes()) {
                    let k = s.read(&mut buf).map_err(fail)?;
                    if k == 0 {
                        return Err(format!("connection {i}: closed before the response"));
                    }
                    got.extend_from_slice(&buf[..k]);
                }
            }
        }
        held.push(s);
    }
    Ok(held)
}
