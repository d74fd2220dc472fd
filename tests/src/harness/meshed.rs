//! A meshed client and server for fault tests: a control plane, a server pod (HTTP app on
//! 8080) and a client pod whose sidecars joined with join tokens, the mutual-TLS policy between
//! them applied — and the CLI and metric readings the fault tests check them with.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Mesh, Pod};

/// The client pod's identity (service account `client` in `default`).
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
/// The server pod's identity (service account `server` in `default`).
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// The CLI's stdout; fails the test with both outputs when it did not succeed.
pub fn run_ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `v` as the `&str`s the pod helpers take.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Seconds since the Unix epoch, as the expiry metrics count them.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `trellis_identity_certificates_total{result}` of `pod`'s sidecar (`ok` or `error`).
pub fn certificates(pod: &Pod, result: &str) -> f64 {
    pod.metrics()
        .sum("trellis_identity_certificates_total", &[("result", result)])
}

/// `name{labels}` summed in `pod`'s sidecar once it reaches `at_least`, or as it is after 5 s:
/// a request is counted when its response body has ended, a moment after the client saw it.
pub fn counted(pod: &Pod, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = pod.metrics().sum(name, labels);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When the certificate in force in `pod`'s sidecar expires (Unix seconds).
pub fn cert_expiry(pod: &Pod) -> f64 {
    pod.metrics()
        .sum("trellis_identity_expiry_timestamp_seconds", &[])
}

/// TrafficPolicy to the server's port 8080 over mutual TLS with retries on connect failures
/// and resets, and a strict ServerPolicy that admits only the client; `extra` is appended to
/// the TrafficPolicy's spec (to make a new version).
pub fn meshed_policy(server: &Pod, extra: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: server}}
spec:
  destination: {{addresses: [\"{ip}:8080\"]}}
  retries: {{maxRetries: 2, on: [connect-failure, reset]}}
  tls: {{mode: mutual, serverIdentity: {SERVER_ID}}}
{extra}
---
apiVersion: trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {{name: server}}
spec:
  selector: {{serviceAccount: server}}
  mtls: strict
  allow:
    - identities: [\"{CLIENT_ID}\"]
",
        ip = server.ip
    )
}

/// A control plane, a server pod (HTTP app on 8080) and a client pod, both sidecars joined
/// with join tokens (certificates from the control plane's CA), the meshed policy applied and
/// acknowledged as version 1.
pub struct Meshed {
    pub mesh: Mesh,
    pub control: Pod,
    pub server: Pod,
    pub client: Pod,
    pub state: PathBuf,
    /// The flags each sidecar was started with (a restart uses them again, as a kubelet does).
    pub server_flags: Vec<String>,
    pub client_flags: Vec<String>,
}

/// Starts a [`Meshed`] for `test`, the control plane with `control_args`; `None` when the test
/// is skipped (no privileges, not in CI).
pub fn meshed(test: &str, control_args: &[&str]) -> Option<Meshed> {
    let mesh = Mesh::new(test)?;
    let control = mesh.pod("control");
    let state = mesh.log_dir().join("control-state");
    control.start_control_plane_with(&state, control_args);
    let server = mesh.pod("server");
    server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
    let server_flags = control.mesh_flags(&mesh, "default/server", "server");
    server.start_sidecar(&strs(&server_flags));
    let client = mesh.pod("client");
    let client_flags = control.mesh_flags(&mesh, "default/client", "client");
    client.start_sidecar(&strs(&client_flags));
    let m = Meshed {
        mesh,
        control,
        server,
        client,
        state,
        server_flags,
        client_flags,
    };
    let out = m.apply(&meshed_policy(&m.server, ""));
    assert!(out.contains("2 proxies converged on version 1"), "{out}");
    Some(m)
}

impl Meshed {
    /// `apply --wait` of `yaml`; its output.
    pub fn apply(&self, yaml: &str) -> String {
        let file = self.mesh.write_file("policy.yaml", yaml);
        run_ok(
            "apply --wait",
            self.control
                .control(&["apply", "--wait", "-f", &file.to_string_lossy()]),
        )
    }

    /// The server app's URL (`/` on port 8080).
    pub fn url(&self) -> String {
        self.server.url(8080, "/")
    }

    /// Inbound requests the server's sidecar counted over mutual TLS from the client, once
    /// there are `at_least`.
    pub fn mtls_requests_from_client(&self, at_least: f64) -> f64 {
        let labels = [
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", CLIENT_ID),
        ];
        counted(&self.server, "trellis_requests_total", &labels, at_least)
    }
}
