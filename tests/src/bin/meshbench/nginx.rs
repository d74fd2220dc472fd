//! The fast static app in the server pod: nginx, one process (no master), answering every
//! request with the same 13-byte body on :8080 (HTTP/1.1 keep-alive) and :8081 (h2c with prior
//! knowledge: nginx 1.22 has no `http2 on`, and `listen ... http2` on a cleartext port speaks
//! only HTTP/2), with its config, pid, logs and temp files in the run's own folder.

use std::path::Path;

use trellis_tests::harness::{Pod, Proc};

use crate::topology::wait_listening;

/// The body every request gets: 13 bytes.
pub const BODY: &str = "hello, mesh!\n";
pub const HTTP1_PORT: u16 = 8080;
pub const H2C_PORT: u16 = 8081;

/// Starts nginx in `pod` and waits until both ports accept connections.
pub fn start(pod: &Pod, dir: &Path) -> Result<Proc, String> {
    let d = dir.join("nginx");
    std::fs::create_dir_all(d.join("tmp")).map_err(|e| format!("nginx folder: {e}"))?;
    let p = d.to_string_lossy();
    let body = BODY.trim_end();
    let config = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    http2_max_requests 100000000;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen {HTTP1_PORT} backlog=4096;
        location / {{ return 200 "{body}\n"; }}
    }}
    server {{
        listen {H2C_PORT} http2 backlog=4096;
        location / {{ return 200 "{body}\n"; }}
    }}
}}
"#
    );
    let conf = d.join("nginx.conf");
    std::fs::write(&conf, config).map_err(|e| format!("nginx.conf: {e}"))?;
    let mut cmd = pod.netns().command("nginx");
    cmd.arg("-p").arg(&d).arg("-c").arg(&conf);
    let proc = Proc::spawn("nginx", cmd, &d.join("stderr.log"));
    for port in [HTTP1_PORT, H2C_PORT] {
        wait_listening(pod, std::net::SocketAddr::new(pod.ip.into(), port)).map_err(|e| {
            format!(
                "{e}; nginx log: {}",
                std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
            )
        })?;
    }
    Ok(proc)
}
