//! The pod harness: pods are Linux network namespaces on one bridge, with the real
//! `trellis-proxy init` rules inside and the real sidecar running as its own UID.
//!
//! ```no_run
//! # use trellis_tests::harness::Mesh;
//! let Some(mesh) = Mesh::new("example") else { return }; // skipped without privileges (not in CI)
//! let server = mesh.pod("server");
//! server.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", "server"]);
//! server.start_sidecar(&[]);
//! let client = mesh.pod("client");
//! client.start_sidecar(&[]);
//! let rsp = client.curl(&[&server.url(8080, "/")]);
//! assert_eq!(rsp.status, 200);
//! assert_eq!(server.access_log_json()[0]["status"], 200);
//! ```
//!
//! A sidecar's diagnostic log (stderr) is `proxy_log()`, its access log (stdout, JSON lines by
//! default) `access_log()`; an [`OtlpReceiver`] in a pod of its own collects the sidecars' spans.
//!
//! Everything a mesh creates — namespaces, the bridge, processes — is removed when it is
//! dropped, also when a test fails; namespaces left by a killed test run are swept at the next
//! start. Traffic never leaves the machine: all addresses live inside the test's namespaces.

pub mod apiserver;
mod bins;
mod capture;
mod cluster;
mod control;
mod load;
mod mesh;
pub mod meshed;
mod metrics;
mod mount;
mod netns;
mod otlp;
mod process;
pub mod raw;
mod recorder;
pub mod traced;

pub use apiserver::{FakeApiServer, ServicePort, SliceEndpoint};
pub use bins::{control_bin, proxy_bin, testapp_bin};
pub use capture::{Capture, contains};
pub use cluster::{CONTROL_VIP, Cluster, SERVICE_CIDR};
pub use control::{ControlPlane, free_port, simulated_proxy};
pub use load::{LoadTotals, StopOnDrop};
pub use mesh::{CONTROL_IDENTITY, CurlResult, Mesh, Pod};
pub use metrics::{Scrape, check_with_prometheus_parser};
pub use mount::Mount;
pub use netns::Netns;
pub use otlp::{
    AttrValue, OTLP_PORT, OtlpReceiver, ReceivedSpan, SPAN_KIND_CLIENT, SPAN_KIND_SERVER,
    collector_url,
};
pub use process::Proc;
pub use recorder::Recorder;

/// The UID the sidecar runs as in every pod (the `init` default).
pub const PROXY_UID: u32 = 2102;

/// Why this process cannot create network namespaces and iptables rules, if it cannot.
pub fn missing_privileges() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = [
        "ip",
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "setpriv",
        "curl",
    ]
    .into_iter()
    .filter(|tool| !which(tool))
    .collect();
    match (root, missing.is_empty()) {
        (true, true) => None,
        (false, _) => Some(
            "needs root: it creates network namespaces (ip netns), veth pairs and iptables rules, \
             and runs the proxy as UID 2102"
                .to_string(),
        ),
        (true, false) => Some(format!(
            "needs these tools: {} (apt-get install iproute2 iptables util-linux curl)",
            missing.join(", ")
        )),
    }
}

/// Whether a test may run. Without privileges a test fails when `CI=true` (CI runs as root and
/// must run every test) and is skipped otherwise, with the reason printed either way.
pub fn privileged(test: &str) -> bool {
    let Some(reason) = missing_privileges() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {reason}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {test}: {reason}");
    false
}

/// Polls `done` every 50 ms until it holds; fails the test naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(tool).is_file())
}
