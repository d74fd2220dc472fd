//! The stand-in Kubernetes API server itself, over real HTTPS on 127.0.0.1 (no privileges
//! needed), as readers see it: list and watch as the real server speaks them — ordered events
//! with growing resourceVersions, label selectors, bookmarks and `timeoutSeconds`, 410 after
//! compaction — and the outages tests script with it. Writes (create, replace, patch, status,
//! conflicts) and pagination are in `apiserver_writes.rs`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use trellis_tests::harness::apiserver::client::{
    Api, EVENT_WAIT, TOKEN, client_with_token, names, rv, secret,
};
use trellis_tests::harness::apiserver::{SliceEndpoint, endpoint_slice, pod, service};
use trellis_tests::harness::{FakeApiServer, ServicePort};

const SERVICES: &str = "/api/v1/namespaces/shop/services";
const SECRETS: &str = "/api/v1/namespaces/shop/secrets";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";

const HTTP: ServicePort = ServicePort {
    name: "http",
    port: 80,
    target_port: 8080,
    app_protocol: Some("http"),
};

/// Polls `done` every 20 ms, without blocking the test's runtime; fails after 5 s.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + EVENT_WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {EVENT_WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn list_then_watch_sees_every_change_in_order() {
    let api = Api::new("order");
    api.server
        .create(SERVICES, service("shop", "web", "10.96.0.10", &[HTTP]));

    let list = api.get_ok(SERVICES).await;
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["apiVersion"], "v1");
    let web = &list["items"][0];
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        (&web["apiVersion"], &web["kind"]),
        (&json!("v1"), &json!("Service"))
    );
    assert_eq!(web["metadata"]["generation"], 1);
    assert!(!web["metadata"]["uid"].as_str().unwrap().is_empty());
    assert!(
        web["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let listed: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(listed, rv(web));

    let from = format!("{SERVICES}?watch=1&resourceVersion={listed}");
    let mut watch = api.watch(&from).await;
    assert_eq!(watch.status, StatusCode::OK);
    assert_eq!(watch.content_type, "application/json");
    assert!(watch.chunked, "a watch is a chunked response");

    // Another client creates over HTTP, a controller labels through the test controls, the
    // first client deletes over HTTP.
    let (status, created) = api
        .call(
            Method::POST,
            SERVICES,
            Some(service("shop", "api", "10.96.0.11", &[HTTP])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    api.server.merge_patch(
        &format!("{SERVICES}/web"),
        json!({"metadata": {"labels": {"tier": "front"}}}),
    );
    let (status, deleted) = api
        .call(Method::DELETE, &format!("{SERVICES}/api"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deleted["metadata"]["name"], "api");

    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(watch.next().await);
    }
    let summary: Vec<(String, String)> = seen
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let expected = [("ADDED", "api"), ("MODIFIED", "web"), ("DELETED", "api")]
        .map(|(t, n)| (t.to_string(), n.to_string()));
    assert_eq!(summary, expected);
    let versions: Vec<u64> = seen.iter().map(|e| rv(&e["object"])).collect();
    assert_eq!(versions, [listed + 1, listed + 2, listed + 3]);
    assert_eq!(rv(&created), listed + 1);
    assert_eq!(seen[1]["object"]["metadata"]["labels"]["tier"], "front");
    assert_eq!(seen[1]["object"]["kind"], "Service");
    assert_eq!(
        rv(&deleted),
        listed + 3,
        "the DELETED object carries the deletion's version"
    );

    // The history replays the same events to a late watcher; "" starts at the current state.
    let mut replay = api.watch(&from.replace("watch=1", "watch=true")).await;
    for event in &seen {
        assert_eq!(&replay.next().await, event);
    }
    let mut current = api.watch(&format!("{SERVICES}?watch=1")).await;
    let added = current.next().await;
    assert_eq!(
        (added["type"].as_str(), rv(&added["object"])),
        (Some("ADDED"), listed + 2)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(current.arrived().is_empty(), "only web exists");

    assert_eq!(api.server.open_watches(), 3);
    assert_eq!(api.server.watch_requests("services"), 3);
    assert_eq!(api.server.watch_requests("pods"), 0);
    for w in [&watch, &replay, &current] {
        assert_eq!(
            w.merged_chunks.load(Ordering::SeqCst),
            0,
            "one event per chunk"
        );
    }
    drop((watch, replay, current));
    eventually("the watches to close", || api.server.open_watches() == 0).await;
}

#[tokio::test]
async fn bookmarks_carry_the_current_version_and_timeout_ends_the_watch() {
    let api = Api::new("bookmarks");
    api.server.set_bookmark_interval(Duration::from_millis(200));
    let start = api.server.resource_version();
    let opened = Instant::now();
    let mut watch = api
        .watch(&format!(
            "{SERVICES}?watch=1&resourceVersion={start}&allowWatchBookmarks=true&timeoutSeconds=2"
        ))
        .await;
    let mut plain = api
        .watch(&format!("{SERVICES}?watch=1&resourceVersion={start}"))
        .await;

    let bookmark = watch.next().await;
    assert_eq!(
        bookmark,
        json!({"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1",
            "metadata": {"resourceVersion": start}}})
    );

    // A write to another kind moves the global version; the next bookmarks say so.
    let other = api.server.create(SECRETS, secret("shop", "tls"));
    loop {
        let bookmark = watch.next().await;
        assert_eq!(
            bookmark["type"], "BOOKMARK",
            "no Secret event on a Service watch"
        );
        if rv(&bookmark["object"]) == rv(&other) {
            break;
        }
    }
    let web = api
        .server
        .create(SERVICES, service("shop", "web", "10.96.0.10", &[HTTP]));
    let added = watch.next_change().await;
    assert_eq!(
        (added["type"].as_str(), rv(&added["object"])),
        (Some("ADDED"), rv(&web))
    );
    let after = watch.next().await;
    assert_eq!(after["type"], "BOOKMARK");
    assert!(rv(&after["object"]) >= rv(&web));

    watch.ends_after_bookmarks().await;
    let lasted = opened.elapsed();
    assert!(
        (Duration::from_millis(1800)..Duration::from_millis(3500)).contains(&lasted),
        "timeoutSeconds=2 ended the watch after {lasted:?}"
    );
    let events = plain.arrived();
    assert_eq!(
        events.len(),
        1,
        "no bookmarks without allowWatchBookmarks: {events:?}"
    );
    assert_eq!(events[0]["type"], "ADDED");
}

#[tokio::test]
async fn compacted_history_answers_410() {
    let api = Api::new("compact");
    let a = api
        .server
        .create(SERVICES, service("shop", "a", "10.96.0.1", &[HTTP]));
    let old = rv(&a);
    api.server
        .create(SERVICES, service("shop", "b", "10.96.0.2", &[HTTP]));
    api.server.compact();
    let now = api.server.resource_version();

    let mut watch = api
        .watch(&format!("{SERVICES}?watch=1&resourceVersion={old}"))
        .await;
    assert_eq!(
        watch.status,
        StatusCode::OK,
        "the real server says 410 inside the stream"
    );
    assert_eq!(
        watch.next().await,
        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {old} ({now})"),
            "reason": "Expired", "code": 410}})
    );
    watch.ends().await;

    let (status, body) = api
        .call(
            Method::GET,
            &format!("{SERVICES}?resourceVersion={old}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(
        (&body["reason"], &body["code"]),
        (&json!("Expired"), &json!(410))
    );

    // From the current version, and from "0", all is well.
    for version in [now.as_str(), "0"] {
        let list = api
            .get_ok(&format!("{SERVICES}?resourceVersion={version}"))
            .await;
        assert_eq!(names(&list["items"]), ["shop/a", "shop/b"]);
    }
    let mut watch = api
        .watch(&format!("{SERVICES}?watch=1&resourceVersion={now}"))
        .await;
    api.server.delete(&format!("{SERVICES}/a"));
    assert_eq!(watch.next().await["type"], "DELETED");
}

#[tokio::test]
async fn endpoint_slices_follow_the_service_and_its_pods() {
    let api = Api::new("slices");
    api.server
        .create(SERVICES, service("shop", "web", "10.96.0.10", &[HTTP]));
    let meshed = api.server.create(
        "/api/v1/namespaces/shop/pods",
        pod("shop", "web-1", "10.1.0.5", "web", true),
    );
    api.server.create(
        "/api/v1/namespaces/shop/pods",
        pod("shop", "web-2", "10.1.0.6", "web", false),
    );
    assert_eq!(
        meshed["metadata"]["annotations"]["trellis.dev/injected"],
        "0.1.0"
    );
    let sidecar = &meshed["spec"]["initContainers"][0];
    assert_eq!(
        (&sidecar["name"], &sidecar["restartPolicy"]),
        (&json!("trellis-proxy"), &json!("Always"))
    );
    assert_eq!(meshed["status"]["podIP"], "10.1.0.5");

    api.server
        .set_service_endpoints("shop", "web", &[("web-1", true), ("web-2", false)]);
    let selected = api
        .get_ok(&format!(
            "{SLICES}?labelSelector=kubernetes.io%2Fservice-name%3Dweb"
        ))
        .await;
    let slices = selected["items"].as_array().unwrap();
    assert_eq!(slices.len(), 1);
    let expected = endpoint_slice(
        "shop",
        "web",
        "web-slice",
        &[("http", 8080, Some("http"))],
        &[
            SliceEndpoint {
                ip: "10.1.0.5",
                ready: true,
                pod_name: "web-1",
            },
            SliceEndpoint {
                ip: "10.1.0.6",
                ready: false,
                pod_name: "web-2",
            },
        ],
    );
    for field in ["addressType", "ports", "endpoints"] {
        assert_eq!(slices[0][field], expected[field], "{field}");
    }
    assert_eq!(
        slices[0]["endpoints"][1]["conditions"],
        json!({"ready": false, "serving": false, "terminating": false})
    );
    assert_eq!(
        slices[0]["endpoints"][0]["targetRef"],
        json!({"kind": "Pod", "namespace": "shop", "name": "web-1"})
    );
    let other = api
        .get_ok(&format!(
            "{SLICES}?labelSelector=kubernetes.io/service-name=other"
        ))
        .await;
    assert_eq!(other["items"], json!([]));

    // web-2 goes away: the controller rewrites the same slice.
    let mut watch = api
        .watch(&format!(
            "{SLICES}?watch=1&labelSelector=kubernetes.io/service-name%3Dweb&resourceVersion={}",
            api.server.resource_version()
        ))
        .await;
    api.server
        .set_service_endpoints("shop", "web", &[("web-1", true)]);
    let modified = watch.next().await;
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(modified["object"]["endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(api.server.list(SLICES).len(), 1);
}

#[tokio::test]
async fn down_refuses_connections_then_recovers_with_the_history() {
    let api = Api::new("down");
    let before = api.server.resource_version();
    let mut watch = api
        .watch(&format!("{SERVICES}?watch=1&resourceVersion={before}"))
        .await;
    eventually("the watch to open", || api.server.open_watches() == 1).await;

    api.server.set_down(true);
    watch.ends().await;
    assert_eq!(api.server.open_watches(), 0);
    let refused = api.client.request(Method::GET, SERVICES, None, None).await;
    assert!(refused.is_err(), "answered while down: {refused:?}");

    // Writes go on meanwhile (kubectl against another replica, say).
    api.server
        .create(SERVICES, service("shop", "web", "10.96.0.10", &[HTTP]));
    api.server.set_down(false);

    let list = api.get_ok(SERVICES).await;
    assert_eq!(names(&list["items"]), ["shop/web"]);
    let mut resumed = api
        .watch(&format!("{SERVICES}?watch=1&resourceVersion={before}"))
        .await;
    assert_eq!(resumed.next().await["type"], "ADDED");

    // A restart as clients see it: every watch ends at once.
    let mut second = api.watch(&format!("{SERVICES}?watch=1")).await;
    assert_eq!(second.next().await["type"], "ADDED");
    api.server.close_watches();
    resumed.ends().await;
    second.ends().await;
    assert_eq!(api.server.watch_requests("services"), 3);
}

/// `start_in` listens inside a network namespace, with a certificate for the address there.
#[test]
fn listens_inside_a_network_namespace() {
    if !trellis_tests::harness::privileged("listens_inside_a_network_namespace") {
        return;
    }
    let name = format!("trellis-apisrv-{}", std::process::id());
    let ns = trellis_tests::harness::Netns::create(&name);
    let out = ns.exec("ip", &["addr", "add", "10.250.0.1/32", "dev", "lo"]);
    assert!(out.status.success(), "{out:?}");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let server = FakeApiServer::start_in(
        &ns,
        "10.250.0.1".parse().unwrap(),
        &dir,
        HashMap::new(),
        TOKEN,
    );
    assert_eq!(server.url, "https://10.250.0.1:6443");
    server.create(SERVICES, service("shop", "web", "10.96.0.10", &[HTTP]));
    let client = client_with_token(&server, &dir, TOKEN);
    let answer = ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client.request(Method::GET, SERVICES, None, None))
    });
    let (status, body) = answer.unwrap();
    assert_eq!(status, StatusCode::OK);
    let list: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(names(&list["items"]), ["shop/web"]);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
