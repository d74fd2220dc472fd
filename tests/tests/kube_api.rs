//! The control plane's Kubernetes API client against the stand-in API server (HTTPS on
//! 127.0.0.1, no privileges needed): putting the mesh CA into the injector's
//! MutatingWebhookConfiguration, without overwriting anyone else's change to it.

use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use trellis_control::kube::{KubeClient, keep_webhook_ca_bundle, patch_webhook_ca_bundle};
use trellis_tests::harness::apiserver::LocalApi;

const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nTUVTSCBDQQ==\n-----END CERTIFICATE-----\n";
/// `base64 -w0` of [`CA_PEM`].
const CA_BUNDLE: &str =
    "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tClRVVlRTQ0JEUVE9PQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==";
const OWN_TOKEN: &str = "control-plane-own-token";
const CONFIGS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/";

/// A stand-in API server and a client holding the token it expects.
struct Cluster {
    local: LocalApi,
    client: KubeClient,
}

impl Cluster {
    fn new(test: &str) -> Self {
        let local = LocalApi::start(&format!("kube-{test}"), OWN_TOKEN);
        let client = local.client();
        Self { local, client }
    }
}

impl std::ops::Deref for Cluster {
    type Target = LocalApi;
    fn deref(&self) -> &LocalApi {
        &self.local
    }
}

/// The injector's configuration as Helm would install it: two webhooks, no caBundle yet.
fn injector_config(resource_version: &str) -> Value {
    let webhook = |name: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "trellis-control", "namespace": "trellis-system",
                "path": "/inject", "port": 8443}}})
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-injector", "resourceVersion": resource_version},
        "webhooks": [webhook("pods.trellis.dev"), webhook("pods-strict.trellis.dev")],
    })
}

fn ca_bundles(object: &Value) -> Vec<&str> {
    object["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["clientConfig"]["caBundle"].as_str().unwrap_or("<none>"))
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn both_webhooks_get_the_ca_bundle_and_the_patch_tests_the_version_it_read() {
    let c = Cluster::new("patch");
    c.api.set_webhook_config(injector_config("7"));
    let patched = rt()
        .block_on(patch_webhook_ca_bundle(
            &c.client,
            "trellis-injector",
            CA_PEM,
        ))
        .unwrap();
    assert_eq!(patched, 2);
    let now = c.api.webhook_config().unwrap();
    assert_eq!(ca_bundles(&now), vec![CA_BUNDLE, CA_BUNDLE]);
    assert_eq!(now["metadata"]["resourceVersion"], "8");
    // Nothing else changed.
    assert_eq!(
        now["webhooks"][1]["clientConfig"]["service"]["path"],
        "/inject"
    );

    let patches = c.api.requests_to(&Method::PATCH, CONFIGS);
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].path, format!("{CONFIGS}trellis-injector"));
    assert_eq!(patches[0].content_type, "application/json-patch+json");
    assert_eq!(patches[0].authorization, format!("Bearer {OWN_TOKEN}"));
    let ops: Value = serde_json::from_str(&patches[0].body).unwrap();
    assert_eq!(
        ops[0],
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": "7"})
    );
    assert_eq!(ops[2]["path"], "/webhooks/1/clientConfig/caBundle");
}

#[test]
fn a_wrong_token_is_refused_and_changes_nothing() {
    let c = Cluster::new("token");
    c.api.set_webhook_config(injector_config("7"));
    // The token file is re-read on every request: a rotated (here: wrong) token is used at once.
    std::fs::write(&c.token_file, "not-the-token\n").unwrap();
    let err = rt()
        .block_on(patch_webhook_ca_bundle(
            &c.client,
            "trellis-injector",
            CA_PEM,
        ))
        .unwrap_err();
    assert!(err.contains("401"), "{err}");
    assert!(err.contains("\"trellis-injector\""), "{err}");
    assert!(
        !err.contains("not-the-token"),
        "the token leaked into: {err}"
    );
    assert_eq!(c.api.webhook_config().unwrap(), injector_config("7"));
    assert!(c.api.requests_to(&Method::PATCH, CONFIGS).is_empty());
    let sent = c.api.requests_to(&Method::GET, CONFIGS);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].authorization, "Bearer not-the-token");
}

#[test]
fn a_missing_configuration_is_named_in_the_error() {
    let c = Cluster::new("missing");
    c.api.set_webhook_config(injector_config("7"));
    let err = rt()
        .block_on(patch_webhook_ca_bundle(
            &c.client,
            "trellis-injectr",
            CA_PEM,
        ))
        .unwrap_err();
    assert!(
        err.contains("MutatingWebhookConfiguration \"trellis-injectr\"") && err.contains("404"),
        "{err}"
    );
    // A name that is not a Kubernetes name never reaches the API server.
    let err = rt()
        .block_on(patch_webhook_ca_bundle(&c.client, "../secrets", CA_PEM))
        .unwrap_err();
    assert!(err.contains("not a Kubernetes object name"), "{err}");
    assert_eq!(c.api.requests.lock().unwrap().len(), 1);
}

#[test]
fn a_concurrent_change_is_read_again_not_overwritten() {
    let c = Cluster::new("conflict");
    c.api.set_webhook_config(injector_config("7"));
    // Another writer changes the object right after our first read.
    c.api.change_after_next_gets(1);
    let patched = rt()
        .block_on(patch_webhook_ca_bundle(
            &c.client,
            "trellis-injector",
            CA_PEM,
        ))
        .unwrap();
    assert_eq!(patched, 2);
    let now = c.api.webhook_config().unwrap();
    assert_eq!(ca_bundles(&now), vec![CA_BUNDLE, CA_BUNDLE]);
    // 7 → 8 (the other writer) → 9 (our patch, built from a second read); their label stays.
    assert_eq!(now["metadata"]["resourceVersion"], "9");
    assert_eq!(now["metadata"]["labels"]["changed-by"], "another-writer");
    assert_eq!(c.api.requests_to(&Method::GET, CONFIGS).len(), 2);
    assert_eq!(c.api.requests_to(&Method::PATCH, CONFIGS).len(), 2);

    // An object that changes after every read: 4 attempts (1 + 3 retries), then a clear error.
    c.api.change_after_next_gets(100);
    let err = rt()
        .block_on(patch_webhook_ca_bundle(
            &c.client,
            "trellis-injector",
            CA_PEM,
        ))
        .unwrap_err();
    assert!(err.contains("4 attempts") && err.contains("422"), "{err}");
    assert_eq!(c.api.requests_to(&Method::PATCH, CONFIGS).len(), 2 + 4);
}

#[test]
fn the_start_up_task_retries_until_the_configuration_exists() {
    let c = Cluster::new("keep");
    let rt = rt();
    let started = std::time::Instant::now();
    let patched = rt.block_on(async {
        let keep = keep_webhook_ca_bundle(&c.client, "trellis-injector", CA_PEM);
        let install = async {
            // The injector's configuration appears after the first attempt found nothing.
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.api.set_webhook_config(injector_config("1"));
        };
        let (patched, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(keep, install)
        })
        .await
        .expect("keep_webhook_ca_bundle gave up or hung");
        patched
    });
    assert_eq!(patched, 2);
    assert_eq!(
        ca_bundles(&c.api.webhook_config().unwrap()),
        vec![CA_BUNDLE, CA_BUNDLE]
    );
    // First retry after 0.5–1 s (1 s, jittered), and no sooner.
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(c.api.requests_to(&Method::GET, CONFIGS).len(), 2);
}
