//! The stand-in Kubernetes API server's writes, over real HTTPS on 127.0.0.1 (no privileges
//! needed): create, replace and patch as the real server answers them — optimistic
//! concurrency (409 on a stale resourceVersion), no-op writes writing nothing, the status
//! subresource and generation, `Status` bodies for every failure, 401 without the token — and
//! `limit`/`continue` pages of one snapshot. Lists and watches are in `apiserver.rs`.

use http::{Method, StatusCode};
use serde_json::{Value, json};
use trellis_tests::harness::ServicePort;
use trellis_tests::harness::apiserver::client::{Api, client_with_token, names, rv, secret};
use trellis_tests::harness::apiserver::service;

const SERVICES: &str = "/api/v1/namespaces/shop/services";
const POLICIES: &str = "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies";

const HTTP: ServicePort = ServicePort {
    name: "http",
    port: 80,
    target_port: 8080,
    app_protocol: Some("http"),
};

#[tokio::test]
async fn failures_are_status_objects() {
    let api = Api::new("failures");
    let (status, body) = api
        .call(Method::GET, &format!("{SERVICES}/nope"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "services \"nope\" not found", "reason": "NotFound", "code": 404})
    );

    let web = service("shop", "web", "10.96.0.10", &[HTTP]);
    let (status, _) = api.call(Method::POST, SERVICES, Some(web.clone())).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = api.call(Method::POST, SERVICES, Some(web.clone())).await;
    assert_eq!(
        (status, &body["reason"]),
        (StatusCode::CONFLICT, &json!("AlreadyExists"))
    );

    let (status, body) = api
        .call(Method::POST, "/api/v1/namespaces/other/services", Some(web))
        .await;
    assert_eq!(
        (status, &body["reason"]),
        (StatusCode::BAD_REQUEST, &json!("BadRequest"))
    );

    let (status, bytes) = api
        .client
        .request(
            Method::POST,
            SERVICES,
            Some("application/json"),
            Some(b"{not json".to_vec()),
        )
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        (status, &body["code"]),
        (StatusCode::BAD_REQUEST, &json!(400))
    );

    let (status, body) = api
        .call(Method::GET, "/api/v1/namespaces/shop/configmaps", None)
        .await;
    assert_eq!(
        (status, &body["reason"]),
        (StatusCode::NOT_FOUND, &json!("NotFound"))
    );

    let stranger = client_with_token(&api.server, &api.dir, "someone-else");
    let (status, _) = stranger
        .request(Method::GET, SERVICES, None, None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn stale_resource_version_conflicts() {
    let api = Api::new("conflict");
    let web = api
        .server
        .create(SERVICES, service("shop", "web", "10.96.0.10", &[HTTP]));
    let path = format!("{SERVICES}/web");

    let mut changed = web.clone();
    changed["metadata"]["labels"] = json!({"tier": "front"});
    let (status, first) = api.call(Method::PUT, &path, Some(changed.clone())).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(rv(&first), rv(&web) + 1);

    // The same stale copy again: someone else's write (ours) came in between.
    changed["metadata"]["labels"] = json!({"tier": "back"});
    let (status, body) = api.call(Method::PUT, &path, Some(changed.clone())).await;
    assert_eq!(
        (status, &body["reason"]),
        (StatusCode::CONFLICT, &json!("Conflict"))
    );
    assert_eq!(
        body["message"],
        "Operation cannot be fulfilled on services \"web\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
    let (status, body) = api
        .call(Method::PATCH, &path, Some(json!({"metadata": {"resourceVersion": web["metadata"]["resourceVersion"], "labels": {"x": "y"}}})))
        .await;
    assert_eq!(
        (status, &body["reason"]),
        (StatusCode::CONFLICT, &json!("Conflict"))
    );

    // Without a resourceVersion the write is unconditional; one that changes nothing writes
    // nothing.
    changed["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (status, second) = api.call(Method::PUT, &path, Some(changed.clone())).await;
    assert_eq!((status, rv(&second)), (StatusCode::OK, rv(&first) + 1));
    let (status, same) = api.call(Method::PUT, &path, Some(changed)).await;
    assert_eq!((status, rv(&same)), (StatusCode::OK, rv(&second)));
    assert_eq!(api.server.resource_version(), rv(&second).to_string());

    let (status, _) = api
        .call(
            Method::PUT,
            &format!("{SERVICES}/absent"),
            Some(service("shop", "absent", "10.96.0.9", &[])),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn traffic_policy_status_is_a_subresource_and_generation_counts_spec_changes() {
    let api = Api::new("status");
    let policy = json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "web-timeout"},
        "spec": {"destination": {"host": "web"}, "timeout": "2s"}});
    let (status, created) = api.call(Method::POST, POLICIES, Some(policy)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["metadata"]["generation"], 1);
    assert_eq!(created["metadata"]["namespace"], "shop");
    let path = format!("{POLICIES}/web-timeout");
    let mut watch = api
        .watch(&format!(
            "{POLICIES}?watch=1&resourceVersion={}",
            rv(&created)
        ))
        .await;

    // Status written to the object is ignored: nothing changes, nothing is written.
    let (status, same) = api
        .call(
            Method::PATCH,
            &path,
            Some(json!({"status": {"observedGeneration": 1}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(same, created);

    let conditions = json!([{"type": "Accepted", "status": "True"}]);
    let (status, reported) = api
        .call(
            Method::PATCH,
            &format!("{path}/status"),
            Some(json!({"status": {"observedGeneration": 1, "conditions": conditions}, "spec": {"timeout": "1h"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reported}");
    assert_eq!(reported["status"]["observedGeneration"], 1);
    assert_eq!(
        reported["spec"]["timeout"], "2s",
        "a status write changes only the status"
    );
    assert_eq!(reported["metadata"]["generation"], 1);
    assert_eq!(rv(&reported), rv(&created) + 1);

    let (_, respec) = api
        .call(
            Method::PATCH,
            &path,
            Some(json!({"spec": {"timeout": "5s"}})),
        )
        .await;
    assert_eq!(respec["metadata"]["generation"], 2);
    assert_eq!(
        respec["status"]["conditions"], conditions,
        "an object write keeps the status"
    );

    let mut status_only = respec.clone();
    status_only["spec"]["timeout"] = json!("9s");
    status_only["status"]["observedGeneration"] = json!(2);
    let (status, put) = api
        .call(Method::PUT, &format!("{path}/status"), Some(status_only))
        .await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(
        (
            &put["spec"]["timeout"],
            &put["status"]["observedGeneration"]
        ),
        (&json!("5s"), &json!(2))
    );
    assert_eq!(put["metadata"]["generation"], 2);
    assert_eq!(api.get_ok(&format!("{path}/status")).await, put);

    let changes: Vec<(Value, Value)> = [watch.next().await, watch.next().await, watch.next().await]
        .iter()
        .map(|e| {
            (
                e["type"].clone(),
                e["object"]["metadata"]["generation"].clone(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [("MODIFIED", 1), ("MODIFIED", 2), ("MODIFIED", 2)].map(|(t, g)| (json!(t), json!(g)))
    );
}

#[tokio::test]
async fn pages_show_one_snapshot() {
    let api = Api::new("pages");
    for (ns, name) in [
        ("a", "s1"),
        ("a", "s2"),
        ("a", "s3"),
        ("b", "s4"),
        ("b", "s5"),
    ] {
        api.server.create(
            &format!("/api/v1/namespaces/{ns}/secrets"),
            secret(ns, name),
        );
    }
    let first = api.get_ok("/api/v1/secrets?limit=2").await;
    assert_eq!(names(&first["items"]), ["a/s1", "a/s2"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    let snapshot = first["metadata"]["resourceVersion"].clone();

    // Writes between the pages do not show in them.
    api.server
        .create("/api/v1/namespaces/a/secrets", secret("a", "s0"));
    api.server.delete("/api/v1/namespaces/b/secrets/s5");

    let mut all = names(&first["items"]);
    let mut token = first["metadata"]["continue"].as_str().unwrap().to_string();
    let mut pages = 1;
    loop {
        let page = api
            .get_ok(&format!("/api/v1/secrets?limit=2&continue={token}"))
            .await;
        assert_eq!(page["metadata"]["resourceVersion"], snapshot);
        all.extend(names(&page["items"]));
        pages += 1;
        match page["metadata"]["continue"].as_str() {
            Some(next) => token = next.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(all, ["a/s1", "a/s2", "a/s3", "b/s4", "b/s5"]);

    let now = api.get_ok("/api/v1/secrets").await;
    assert_eq!(
        names(&now["items"]),
        ["a/s0", "a/s1", "a/s2", "a/s3", "b/s4"]
    );
    assert!(now["metadata"].get("continue").is_none());
    let b = api.get_ok("/api/v1/namespaces/b/secrets").await;
    assert_eq!(names(&b["items"]), ["b/s4"]);

    api.server.compact();
    let (status, body) = api
        .call(
            Method::GET,
            &format!("/api/v1/secrets?limit=2&continue={token}"),
            None,
        )
        .await;
    assert_eq!(
        (status, &body["reason"]),
        (StatusCode::GONE, &json!("Expired"))
    );
}
