//! Discovery in Kubernetes mode: the control plane learns Services, EndpointSlices and Pods
//! from the (stand-in) API server, and sidecars balance calls to a ClusterIP across exactly the
//! ready pods, with mutual TLS to the meshed ones — no policy written by hand.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::harness::{Cluster, Pod, testapp_bin, wait_for};

const WEB_VIP: &str = "10.96.0.10";

/// The endpoints the client's sidecar holds for `key` (from its `/config`).
fn endpoints(client: &Pod, key: &str) -> Option<BTreeSet<String>> {
    let (status, body) = client.admin_get("/config");
    assert_eq!(status, 200, "{body}");
    let config: Value = serde_json::from_str(&body).expect("config JSON");
    let dest = config["discovery"]["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["key"] == key)?
        .clone();
    Some(
        dest["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e["address"].as_str().map(str::to_string))
            .collect(),
    )
}

/// Waits until the client's sidecar holds exactly `pods`' endpoints for the web service;
/// returns how long that took.
fn converge(client: &Pod, pods: &[&Pod]) -> Duration {
    let want: BTreeSet<String> = pods.iter().map(|p| p.addr(8080).to_string()).collect();
    let key = format!("{WEB_VIP}:80");
    let start = Instant::now();
    wait_for(
        &format!("the client's endpoints to become {want:?}"),
        Duration::from_secs(10),
        || endpoints(client, &key).as_ref() == Some(&want),
    );
    start.elapsed()
}

/// The `shop/web` service at [`WEB_VIP`]:80 with `n` meshed pods `web-1..n`, all ready, and a
/// meshed client pod.
fn web_service(cluster: &Cluster, n: usize) -> (Vec<Pod>, Pod) {
    cluster.service("shop", "web", WEB_VIP, 80);
    let pods: Vec<Pod> = (1..=n)
        .map(|i| cluster.app_pod("shop", &format!("web-{i}"), "web", true))
        .collect();
    let names: Vec<String> = (1..=n).map(|i| format!("web-{i}")).collect();
    let ready: Vec<(&str, bool)> = names.iter().map(|n| (n.as_str(), true)).collect();
    cluster.api.set_service_endpoints("shop", "web", &ready);
    (pods, cluster.client_pod("shop", "client", &[]))
}

/// Inbound requests each pod's sidecar has served.
fn served(pods: &[&Pod]) -> Vec<f64> {
    pods.iter()
        .map(|p| {
            p.metrics()
                .sum("trellis_requests_total", &[("direction", "inbound")])
        })
        .collect()
}

/// `testapp load` from `client` to the web service, in the background.
fn background_load(client: &Pod, requests: u32, pace_ms: u32) -> std::thread::JoinHandle<Value> {
    let mut cmd = client.netns().command(&testapp_bin().to_string_lossy());
    cmd.args([
        "load",
        "--url",
        &format!("http://{WEB_VIP}:80/"),
        "--requests",
        &requests.to_string(),
        "--concurrency",
        "4",
        "--pace-ms",
        &pace_ms.to_string(),
    ]);
    std::thread::spawn(move || {
        let out = cmd.output().expect("run testapp load");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("load JSON")
    })
}

#[test]
fn calls_to_a_cluster_ip_follow_a_rolling_update_without_a_failed_request() {
    let Some(cluster) = Cluster::new("discovery_rollout") else {
        return;
    };
    let (old, client) = web_service(&cluster, 3);

    // The first call waits for discovery once; it must not go to the ClusterIP (nothing
    // listens there: there is no kube-proxy).
    let rsp = client.curl(&[&format!("http://{WEB_VIP}/")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let refs: Vec<&Pod> = old.iter().collect();
    converge(&client, &refs);
    let before = served(&refs);
    let out = client.testapp(&[
        "load",
        "--url",
        &format!("http://{WEB_VIP}:80/"),
        "--requests",
        "300",
        "--concurrency",
        "6",
    ]);
    assert_eq!(out["ok"], 300, "{out}");
    let per_pod: Vec<f64> = served(&refs)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    eprintln!("300 requests over 3 pods: {per_pod:?}");
    assert_eq!(per_pod.iter().sum::<f64>(), 300.0);
    assert!(
        per_pod.iter().all(|n| *n >= 30.0),
        "every ready pod gets a share: {per_pod:?}"
    );

    // Rolling update, one pod at a time, under load: surge a new pod, then take the old one
    // out (not ready), wait for the proxies, and stop it.
    let load = background_load(&client, 6000, 4);
    let mut current: Vec<String> = (1..=3).map(|i| format!("web-{i}")).collect();
    let mut new_pods = Vec::new();
    let mut times = Vec::new();
    for i in 1..=3 {
        let pod = cluster.app_pod("shop", &format!("web-new-{i}"), "web", true);
        current.push(format!("web-new-{i}"));
        let eps: Vec<(&str, bool)> = current.iter().map(|n| (n.as_str(), true)).collect();
        cluster.api.set_service_endpoints("shop", "web", &eps);
        new_pods.push(pod);
        let ready: Vec<&Pod> = old[i..].iter().chain(new_pods.iter()).collect();
        let mut ready_with_old = ready.clone();
        ready_with_old.push(&old[i - 1]);
        times.push(converge(&client, &ready_with_old));
        // The old pod is terminating: not ready, then gone.
        let eps: Vec<(&str, bool)> = current
            .iter()
            .map(|n| (n.as_str(), *n != format!("web-{i}")))
            .collect();
        cluster.api.set_service_endpoints("shop", "web", &eps);
        times.push(converge(&client, &ready));
        current.retain(|n| *n != format!("web-{i}"));
        old[i - 1].signal_proxy(libc::SIGTERM);
        old[i - 1].kill_apps();
    }
    let out = load.join().expect("load thread");
    eprintln!("rolling update under load: {out}; endpoint changes seen after {times:?}");
    assert_eq!(
        out["ok"], 6000,
        "zero failed requests during the rollout: {out}"
    );
    for t in &times {
        assert!(*t < Duration::from_secs(1), "an endpoint change took {t:?}");
    }
    // Afterwards only the new pods serve.
    let refs: Vec<&Pod> = new_pods.iter().collect();
    let before = served(&refs);
    let out = client.testapp(&[
        "load",
        "--url",
        &format!("http://{WEB_VIP}:80/"),
        "--requests",
        "150",
        "--concurrency",
        "3",
    ]);
    assert_eq!(out["ok"], 150, "{out}");
    let after = served(&refs);
    let total: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert_eq!(total, 150.0, "only the new pods serve");
}

#[test]
fn meshed_services_get_mutual_tls_with_the_expected_identity_and_others_plaintext() {
    let Some(cluster) = Cluster::new("discovery_auto_mtls") else {
        return;
    };
    cluster.service("shop", "web", WEB_VIP, 80);
    cluster.service("shop", "legacy", "10.96.0.11", 80);
    cluster.service("shop", "imposter", "10.96.0.12", 80);
    let web = cluster.app_pod("shop", "web-1", "web", true);
    let legacy = cluster.app_pod("shop", "legacy-1", "legacy", false);
    // Its sidecar proves `web`, but the API says the pod runs as `payments`: whoever answers
    // at that address is not who the cluster says it is.
    let imposter = cluster.app_pod("shop", "imposter-1", "web", true);
    cluster
        .api
        .delete("/api/v1/namespaces/shop/pods/imposter-1");
    cluster.api.create(
        "/api/v1/namespaces/shop/pods",
        trellis_tests::harness::apiserver::objects::pod(
            "shop",
            "imposter-1",
            &imposter.ip.to_string(),
            "payments",
            true,
        ),
    );
    cluster
        .api
        .set_service_endpoints("shop", "web", &[("web-1", true)]);
    cluster
        .api
        .set_service_endpoints("shop", "legacy", &[("legacy-1", true)]);
    cluster
        .api
        .set_service_endpoints("shop", "imposter", &[("imposter-1", true)]);
    let client = cluster.client_pod("shop", "client", &[]);

    let rsp = client.curl(&[&format!("http://{WEB_VIP}/headers")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let echo: Value = serde_json::from_str(&rsp.body).expect("echo JSON");
    assert_eq!(
        echo["headers"]["trellis-peer-identity"], "spiffe://cluster.local/ns/shop/sa/client",
        "the server's sidecar saw the client's identity over mutual TLS: {echo}"
    );
    let rsp = client.curl(&["http://10.96.0.11/headers"]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let echo: Value = serde_json::from_str(&rsp.body).expect("echo JSON");
    assert_eq!(echo["from"], "legacy-1");
    assert!(
        echo["headers"].get("trellis-peer-identity").is_none(),
        "plaintext to a pod without a sidecar: {echo}"
    );
    let rsp = client.curl(&["http://10.96.0.12/headers"]);
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("trellis-error"), Some("tls-identity-mismatch"));

    // Straight to a pod's IP (a headless service, a StatefulSet): the pod is a destination
    // of its own, with its sidecar's identity.
    let rsp = client.curl(&[&web.url(8080, "/headers")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let echo: Value = serde_json::from_str(&rsp.body).expect("echo JSON");
    assert_eq!(
        echo["headers"]["trellis-peer-identity"], "spiffe://cluster.local/ns/shop/sa/client",
        "mutual TLS to a pod IP: {echo}"
    );
    let rsp = client.curl(&[&legacy.url(8080, "/headers")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");

    let m = client.metrics();
    let calls = |dest: &str, tls: &str, peer: &str| {
        m.sum(
            "trellis_requests_total",
            &[
                ("direction", "outbound"),
                ("destination", dest),
                ("tls", tls),
                ("peer_identity", peer),
            ],
        )
    };
    assert_eq!(
        calls(
            "web.shop.svc.cluster.local:80",
            "true",
            "spiffe://cluster.local/ns/shop/sa/web"
        ),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        calls("legacy.shop.svc.cluster.local:80", "false", ""),
        1.0,
        "{}",
        m.text
    );
    let (_, body) = client.admin_get("/config");
    assert!(
        !body.contains("TrafficPolicy"),
        "no TrafficPolicy was involved: {body}"
    );
}

#[test]
fn a_watch_that_expires_is_relisted_and_a_down_api_server_keeps_the_last_endpoints() {
    let Some(cluster) = Cluster::new("discovery_relist") else {
        return;
    };
    let (web, client) = web_service(&cluster, 2);
    let (web1, web2) = (&web[0], &web[1]);
    assert_eq!(client.curl(&[&format!("http://{WEB_VIP}/")]).status, 200);
    converge(&client, &[web1, web2]);

    // The API server goes away; meanwhile web-1 leaves the service and the history the
    // control plane's watch would resume from is compacted.
    cluster.api.set_down(true);
    std::thread::sleep(Duration::from_millis(300));
    cluster
        .api
        .set_service_endpoints("shop", "web", &[("web-2", true)]);
    cluster.api.compact();
    let out = client.testapp(&[
        "load",
        "--url",
        &format!("http://{WEB_VIP}:80/"),
        "--requests",
        "100",
        "--concurrency",
        "2",
    ]);
    assert_eq!(
        out["ok"], 100,
        "the last good endpoints keep serving: {out}"
    );
    assert_eq!(
        endpoints(&client, &format!("{WEB_VIP}:80")).map(|e| e.len()),
        Some(2),
        "nothing changes while the API server is down"
    );
    std::thread::sleep(Duration::from_secs(1));
    cluster.api.set_down(false);
    // The watch resumes from a compacted resourceVersion: 410 Gone, relist, and the change
    // made while it was away arrives.
    converge(&client, &[web2]);
    let m = cluster.control.control_metrics();
    assert!(
        m.sum(
            "trellis_control_kube_relists_total",
            &[("resource", "endpointslices"), ("reason", "expired")]
        ) >= 1.0,
        "{}",
        m.text
    );
}

#[test]
fn proxies_move_to_the_other_replica_when_one_is_killed_under_load() {
    let Some(mut cluster) = Cluster::new("discovery_replicas") else {
        return;
    };
    cluster.add_replica("control-2");
    cluster.use_control_service();
    let (web, client) = web_service(&cluster, 2);
    let (web1, web2) = (&web[0], &web[1]);
    assert_eq!(client.curl(&[&format!("http://{WEB_VIP}/")]).status, 200);
    converge(&client, &[web1, web2]);
    // Both replicas serve the same policy version: nothing is resent after a move.
    let version = |pod: &Pod| {
        let (_, body) = pod.admin_get("/config");
        serde_json::from_str::<Value>(&body).expect("config")["version"].clone()
    };
    let before = version(&client);

    let load = background_load(&client, 4000, 4);
    std::thread::sleep(Duration::from_millis(1500));
    // The replica every proxy is connected to dies; kube-proxy sends new connections to the
    // other one.
    cluster.control.kill_apps();
    cluster.move_control_service(1);
    // A pod added after the move reaches the client through the surviving replica.
    let web3 = cluster.app_pod("shop", "web-3", "web", true);
    cluster.api.set_service_endpoints(
        "shop",
        "web",
        &[("web-1", true), ("web-2", true), ("web-3", true)],
    );
    let took = converge(&client, &[web1, web2, &web3]);
    let out = load.join().expect("load thread");
    eprintln!(
        "replica killed under load: {out}; web-3 reached the client {took:?} after its endpoint was written"
    );
    assert_eq!(out["ok"], 4000, "zero failed requests: {out}");
    let m = cluster.replicas[0].control_metrics();
    assert!(
        m.sum("trellis_control_proxies_connected", &[]) >= 4.0,
        "every proxy reconnected to the surviving replica:\n{}",
        m.text
    );
    assert_eq!(
        version(&client),
        before,
        "the same policy version on both replicas"
    );
}

#[test]
fn a_traffic_policy_resource_for_a_service_applies_to_calls_to_its_cluster_ip() {
    let Some(cluster) = Cluster::new("discovery_policy_cr") else {
        return;
    };
    let (_web, client) = web_service(&cluster, 1);
    // Without a policy the built-in default does not retry a 503.
    let rsp = client.curl(&[&format!("http://{WEB_VIP}/flaky?fail=1&key=before")]);
    assert_eq!(rsp.status, 503, "{rsp:?}");

    // A TrafficPolicy written as `kubectl apply` would, for the service's name: it applies to
    // calls the app makes to the bare ClusterIP, because discovery knows whose address it is.
    let path = "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies";
    cluster.api.create(
        path,
        serde_json::json!({
            "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "web-retries", "namespace": "shop"},
            "spec": {"destination": {"host": "web", "port": 80},
                     "retries": {"maxRetries": 2, "on": ["gateway-error"]}},
        }),
    );
    let object = format!("{path}/web-retries");
    let mut status = Value::Null;
    wait_for(
        "every proxy to acknowledge the policy (its status)",
        Duration::from_secs(10),
        || {
            status = cluster
                .api
                .get(&object)
                .map_or(Value::Null, |o| o["status"].clone());
            let accepted = status["conditions"][0]["status"] == "True";
            let report = status["controlPlanes"]
                .as_object()
                .and_then(|m| m.values().next().cloned())
                .unwrap_or_default();
            accepted && report["proxies"] == 2 && report["acknowledged"] == 2
        },
    );
    eprintln!("status: {status}");
    let rsp = client.curl(&[&format!("http://{WEB_VIP}/flaky?fail=1&key=after")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    assert_eq!(
        client.metrics().sum(
            "trellis_retries_total",
            &[("policy", "shop/web-retries"), ("reason", "gateway-error")]
        ),
        1.0
    );
}
