//! Control-plane faults the mesh must ride out, each with the real parts in pods: the control
//! plane SIGKILLed for a minute under load, its state dir full or read-only, and the CA away
//! when certificates are due for renewal.
//!
//! Every test says in its comment what a user would see, and checks it with numbers. Loads are
//! bounded (a fixed number of requests at a fixed pace); all traffic stays inside the test's
//! namespaces. Data-path faults (apps, partitions, sidecars) are in `faults.rs`.

use std::path::Path;
use std::process::Output;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use trellis_tests::harness::meshed::{
    cert_expiry, certificates, meshed, meshed_policy, run_ok, strs, unix_now,
};
use trellis_tests::harness::{Mesh, Mount, Pod, StopOnDrop, wait_for};

/// The CLI's stderr; fails the test when it succeeded.
fn run_err(what: &str, out: Output) -> String {
    assert!(
        !out.status.success(),
        "{what} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------------
// 1. The control plane killed for a minute under load.

/// What a user sees: the control plane is SIGKILLed and stays away for 60 s while calls flow
/// over mutual TLS. Not one call fails (the sidecars keep their certificates and the last good
/// policy, version 1); when it is started again from its state dir, both sidecars reconnect by
/// themselves, still hold version 1, `trellis-control status` lists them as connected again,
/// and a new version reaches both.
#[test]
fn the_control_plane_killed_for_a_minute_under_load_costs_no_request() {
    let Some(m) = meshed("fault_control_kill", &[]) else {
        return;
    };
    assert_eq!(m.client.config_version(), "1");
    let before = m.mtls_requests_from_client(0.0);
    let stop = AtomicBool::new(false);
    let url = m.url();
    let (totals, checks, reconnect) = std::thread::scope(|scope| {
        let load = scope.spawn(|| m.client.load_until(&url, &stop, 40));
        let stop_load = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(1));
        m.control.kill_apps();
        let down = Instant::now();
        // While it is away: both sidecars stay ready with version 1.
        let mut checks = 0;
        while down.elapsed() < Duration::from_secs(60) {
            let left = Duration::from_secs(60).saturating_sub(down.elapsed());
            std::thread::sleep(left.min(Duration::from_secs(10)));
            for pod in [&m.client, &m.server] {
                assert_eq!(pod.admin_get("/ready").0, 200, "{} not ready", pod.name);
                assert_eq!(pod.config_version(), "1", "{}", pod.name);
            }
            checks += 1;
        }
        assert!(!load.is_finished(), "the load ended during the outage");
        m.control.start_control_plane(&m.state);
        let back = Instant::now();
        wait_for(
            "both sidecars to reconnect with version 1",
            Duration::from_secs(30),
            || m.control.connected_proxies("1") == ["default/client", "default/server"],
        );
        let reconnect = back.elapsed();
        drop(stop_load);
        (load.join().unwrap(), checks, reconnect)
    });
    let mtls = m.mtls_requests_from_client(before + totals.requests as f64) - before;
    eprintln!(
        "control plane away 60 s: {} requests in {} rounds, {} ok, {} failed; {checks} checks of \
         /ready and /config during the outage; reconnected {reconnect:?} after the restart; \
         {mtls} requests over mTLS from the client",
        totals.requests, totals.rounds, totals.ok, totals.failed
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.failures);
    // At most 40 a second: 1,600 requests take 40 s or more, most of the outage.
    assert!(totals.requests >= 1600, "only {} requests", totals.requests);
    assert!(mtls >= totals.requests as f64, "{mtls} over mTLS");
    for pod in [&m.client, &m.server] {
        assert_eq!(pod.config_version(), "1", "{}", pod.name);
    }
    let listed = m.control.control_status();
    assert_eq!(listed["version"], 1, "{listed}");
    let out = m.apply(&meshed_policy(&m.server, "  timeout: 10s"));
    assert!(out.contains("2 proxies converged on version 2"), "{out}");
    assert_eq!(m.client.config_version(), "2");
    assert_eq!(m.server.config_version(), "2");
}

// ---------------------------------------------------------------------------------------------
// 2. The control plane's state dir full or read-only.

const SMALL: &str = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: small}\nspec: {timeout: 1s}\n";
const NEXT: &str = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: next}\nspec: {destination: {host: next}, timeout: 2s}\n";

/// A control plane on `state` and one sidecar following it, with SMALL applied (version 1).
fn control_with_one_proxy(mesh: &Mesh, state: &Path) -> (Pod, Pod) {
    let control = mesh.pod("control");
    control.start_control_plane(state);
    let web = mesh.pod("web");
    let flags = control.mesh_flags(mesh, "default/web", "web");
    web.start_sidecar(&strs(&flags));
    let file = mesh.write_file("small.yaml", SMALL);
    let out = run_ok(
        "apply",
        control.control(&["apply", "--wait", "-f", &file.to_string_lossy()]),
    );
    assert!(out.contains("1 proxies converged on version 1"), "{out}");
    (control, web)
}

/// `get`: the policies and the version in force.
fn listed(control: &Pod) -> String {
    run_ok("get", control.control(&["get"]))
}

/// The state after a restart is the state before: version 1 with `small` only, the same CA,
/// and the sidecar reconnects (it verifies the control plane with the CA it had).
fn assert_restarts_with_state_intact(control: &Pod, web: &Pod, state: &Path, ca_before: &[u8]) {
    control.kill_apps();
    control.start_control_plane(state);
    let after = listed(control);
    assert!(
        after.contains("small") && !after.contains("next") && after.contains("version 1"),
        "{after}"
    );
    assert_eq!(
        std::fs::read(state.join("ca.pem")).expect("ca.pem"),
        ca_before,
        "the CA changed"
    );
    wait_for(
        "the sidecar to reconnect to the restarted control plane",
        Duration::from_secs(30),
        || control.connected_proxies("1") == ["default/web"],
    );
    assert_eq!(web.config_version(), "1");
}

/// What a user sees: the control plane's disk fills up. `trellis-control apply` fails, naming
/// the file it could not write, "No space left on device", and that the policy in force is
/// unchanged; `token create` fails the same way. A restart on the still-full disk brings back
/// version 1 and the same CA (the sidecar reconnects), and once space is freed an apply works
/// without another restart.
#[test]
fn a_full_state_dir_rejects_changes_clearly_and_keeps_the_state() {
    let Some(mesh) = Mesh::new("fault_state_full") else {
        return;
    };
    let state = mesh.log_dir().join("state-full");
    let _tmpfs = Mount::tmpfs(&state, "64k");
    let (control, web) = control_with_one_proxy(&mesh, &state);
    let ca_before = std::fs::read(state.join("ca.pem")).expect("ca.pem");

    // Fill the disk (at most 64 KiB in 4 KiB writes).
    let filler = state.join("filler");
    let mut file = std::fs::File::create(&filler).expect("create the filler");
    let mut written = 0;
    let full = loop {
        use std::io::Write;
        match file.write_all(&[0u8; 4096]) {
            Ok(()) => written += 4096,
            Err(e) => break e,
        }
        assert!(written <= 64 * 1024, "the tmpfs does not fill up");
    };
    drop(file);
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");

    let next = mesh.write_file("next.yaml", NEXT);
    let err = run_err(
        "apply on a full disk",
        control.control(&["apply", "-f", &next.to_string_lossy()]),
    );
    eprintln!("apply on a full disk: {err}");
    let state_file = state.join("state.json");
    assert!(
        err.contains(&format!(
            "cannot write the state to {}",
            state_file.display()
        )) && err.contains("No space left on device")
            && err.contains("the policy in force is unchanged"),
        "{err}"
    );
    let token = run_err(
        "token create on a full disk",
        control.control(&["token", "create", "--identity", "default/other"]),
    );
    eprintln!("token create on a full disk: {token}");
    assert!(
        token.contains(&state.display().to_string()) && token.contains("No space left on device"),
        "{token}"
    );
    let now = listed(&control);
    assert!(now.contains("small") && now.contains("version 1"), "{now}");
    assert_eq!(web.config_version(), "1");

    assert_restarts_with_state_intact(&control, &web, &state, &ca_before);

    std::fs::remove_file(&filler).expect("remove the filler");
    let out = run_ok(
        "apply after freeing space",
        control.control(&["apply", "--wait", "-f", &next.to_string_lossy()]),
    );
    assert!(out.contains("1 proxies converged on version 2"), "{out}");
    assert_eq!(web.config_version(), "2");
}

/// What a user sees: the control plane's state volume is read-only (remounted read-only after
/// a disk error, or mounted so by mistake). The control plane restarts on it and serves what
/// it has (the sidecar reconnects); `apply` fails, naming the file it could not write and
/// "Read-only file system". Once the volume is writable again the state, CA included, is as
/// before and applies work.
#[test]
fn a_read_only_state_dir_rejects_changes_clearly_and_keeps_the_state() {
    let Some(mesh) = Mesh::new("fault_state_ro") else {
        return;
    };
    let state = mesh.log_dir().join("state-ro");
    let (control, web) = control_with_one_proxy(&mesh, &state);
    let ca_before = std::fs::read(state.join("ca.pem")).expect("ca.pem");

    control.kill_apps();
    let mut read_only = Mount::read_only(&state);
    let probe = std::fs::write(state.join("probe"), "x").expect_err("root wrote to a ro mount");
    assert_eq!(probe.raw_os_error(), Some(libc::EROFS), "{probe}");
    control.start_control_plane(&state);
    wait_for(
        "the sidecar to reconnect to the read-only control plane",
        Duration::from_secs(30),
        || control.connected_proxies("1") == ["default/web"],
    );
    let next = mesh.write_file("next.yaml", NEXT);
    let err = run_err(
        "apply on a read-only state dir",
        control.control(&["apply", "-f", &next.to_string_lossy()]),
    );
    eprintln!("apply on a read-only state dir: {err}");
    assert!(
        err.contains(&format!(
            "cannot write the state to {}",
            state.join("state.json").display()
        )) && err.contains("Read-only file system")
            && err.contains("the policy in force is unchanged"),
        "{err}"
    );
    let now = listed(&control);
    assert!(
        now.contains("small") && !now.contains("next") && now.contains("version 1"),
        "{now}"
    );

    control.kill_apps();
    read_only.unmount();
    assert_restarts_with_state_intact(&control, &web, &state, &ca_before);
    let out = run_ok(
        "apply on the writable state dir",
        control.control(&["apply", "--wait", "-f", &next.to_string_lossy()]),
    );
    assert!(out.contains("1 proxies converged on version 2"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// 3. The CA away when certificates are due for renewal.

/// What a user sees: the CA (the control plane) is down exactly when the sidecars' 60 s
/// certificates are due for renewal (at about 70 %, 40–44 s). Calls under load keep
/// succeeding on the current certificates (zero failed requests), each sidecar logs that its
/// renewal failed and the current certificate stays in force, and once the CA is back each
/// renews by itself before its certificate expires.
#[test]
fn the_ca_away_at_renewal_time_costs_no_request_and_renewal_resumes() {
    let Some(m) = meshed("fault_ca_renewal", &["--cert-ttl", "60s"]) else {
        return;
    };
    let pods = [&m.client, &m.server];
    let expiry: Vec<f64> = pods.iter().map(|p| cert_expiry(p)).collect();
    for (pod, exp) in pods.iter().zip(&expiry) {
        assert_eq!(certificates(pod, "ok"), 1.0, "{}", pod.name);
        assert_eq!(certificates(pod, "error"), 0.0, "{}", pod.name);
        assert!(*exp > unix_now() + 40.0, "{}: expires at {exp}", pod.name);
    }
    let stop = AtomicBool::new(false);
    let url = m.url();
    let (totals, failed_at, renewed_at) = std::thread::scope(|scope| {
        let load = scope.spawn(|| m.client.load_until(&url, &stop, 30));
        let stop_load = StopOnDrop(&stop);
        m.control.kill_apps();
        wait_for(
            "both sidecars to fail a renewal",
            Duration::from_secs(55),
            || pods.iter().all(|p| certificates(p, "error") >= 1.0),
        );
        let failed_at = unix_now();
        assert!(!load.is_finished(), "the load ended before the renewals");
        m.control.start_control_plane(&m.state);
        wait_for("both sidecars to renew", Duration::from_secs(20), || {
            pods.iter().all(|p| certificates(p, "ok") >= 2.0)
        });
        let renewed_at = unix_now();
        drop(stop_load);
        (load.join().unwrap(), failed_at, renewed_at)
    });
    let first_expiry = expiry.iter().copied().fold(f64::MAX, f64::min);
    eprintln!(
        "CA away at renewal: {} requests in {} rounds, {} failed; both renewals failed {:.1} s \
         and both renewed {:.1} s before the first certificate expired",
        totals.requests,
        totals.rounds,
        totals.failed,
        first_expiry - failed_at,
        first_expiry - renewed_at
    );
    assert_eq!(totals.failed, 0, "{:?}", totals.failures);
    assert!(failed_at < first_expiry, "the renewal failed after expiry");
    assert!(renewed_at < first_expiry, "renewed only after expiry");
    for (pod, old) in pods.iter().zip(&expiry) {
        assert!(
            cert_expiry(pod) > *old,
            "{}: the certificate in force is the old one",
            pod.name
        );
        assert!(
            pod.proxy_log()
                .contains("certificate renewal failed; the current certificate stays in force"),
            "{}",
            pod.name
        );
    }
    let rsp = m.client.curl(&[&m.url()]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
}
