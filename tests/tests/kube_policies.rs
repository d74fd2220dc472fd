//! Policies as custom resources: the control plane in Kubernetes mode (`serve --kubernetes`)
//! against the stand-in API server (HTTPS on 127.0.0.1, no privileges needed). Objects written
//! as kubectl would come into force when valid; `trellis-control apply/delete` write through the
//! API server; every object's status says whether it is accepted and how many of this replica's
//! proxies have acknowledged the version in force.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_proto::pb::Subscribe;
use trellis_tests::harness::apiserver::LocalApi;
use trellis_tests::harness::{ControlPlane, simulated_proxy, wait_for};

const TOKEN: &str = "control-plane-token";
const API: &str = "/apis/trellis.dev/v1alpha1";

/// The stand-in API server and a control plane (or two) in Kubernetes mode on it.
struct Kube {
    local: LocalApi,
}

impl std::ops::Deref for Kube {
    type Target = LocalApi;
    fn deref(&self) -> &LocalApi {
        &self.local
    }
}

impl Kube {
    fn new(test: &str) -> Self {
        Self {
            local: LocalApi::start(&format!("kp-{test}"), TOKEN),
        }
    }

    fn control_plane(&self, name: &str) -> ControlPlane {
        let flags = self.serve_flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ControlPlane::start_with(name, &flags)
    }

    /// Creates a policy object as kubectl would.
    fn create(&self, plural: &str, ns: &str, name: &str, spec: Value) {
        let kind = if plural == "trafficpolicies" {
            "TrafficPolicy"
        } else {
            "ServerPolicy"
        };
        self.api.create(
            &format!("{API}/namespaces/{ns}/{plural}"),
            json!({"apiVersion": "trellis.dev/v1alpha1", "kind": kind,
                   "metadata": {"name": name, "namespace": ns}, "spec": spec}),
        );
    }

    fn object(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.api
            .get(&format!("{API}/namespaces/{ns}/{plural}/{name}"))
    }

    /// The object's Accepted condition (status, message) and the one replica's report in it.
    fn status(&self, plural: &str, ns: &str, name: &str) -> Option<(String, String, Value)> {
        let object = self.object(plural, ns, name)?;
        let status = &object["status"];
        let condition = status["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Accepted")?;
        let report = status["controlPlanes"]
            .as_object()?
            .values()
            .next()?
            .clone();
        Some((
            condition["status"].as_str()?.to_string(),
            condition["message"].as_str()?.to_string(),
            report,
        ))
    }
}

/// The version in force, as `trellis-control status` reports it.
fn version(cp: &ControlPlane) -> u64 {
    let out = cp.cli(&["status", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    status["version"].as_u64().expect("a version")
}

fn write_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// A proxy of `workload` with `service_account` that acknowledges every snapshot; the channel
/// reports each version it was sent.
fn ack_everything(
    rt: &tokio::runtime::Runtime,
    cp: &ControlPlane,
    workload: &str,
    service_account: &str,
) -> mpsc::UnboundedReceiver<String> {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let channel = rt.block_on(async { cp.channel(false) });
    let sub = Subscribe {
        workload: workload.into(),
        service_account: service_account.into(),
        ..Default::default()
    };
    rt.spawn(simulated_proxy(channel, sub, None, move |version| {
        let _ = seen_tx.send(version);
    }));
    seen
}

#[test]
fn valid_resources_are_in_force_and_every_status_says_why_and_who_acknowledged() {
    let kube = Kube::new("status");
    kube.create(
        "trafficpolicies",
        "shop",
        "reviews",
        json!({"destination": {"host": "reviews", "port": 9080}, "timeout": "2s"}),
    );
    kube.create(
        "trafficpolicies",
        "shop",
        "broken",
        json!({"timeout": "soon"}),
    );
    let cp = kube.control_plane("kube-status");
    kube.create(
        "serverpolicies",
        "shop",
        "web",
        json!({"selector": {"serviceAccount": "web"}, "mtls": "strict"}),
    );
    kube.create(
        "serverpolicies",
        "shop",
        "other",
        json!({"selector": {"serviceAccount": "other"}}),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sent = ack_everything(&rt, &cp, "shop/web-1", "web");

    // The proxy of shop/web counts for the TrafficPolicy and for the ServerPolicy selecting
    // its service account, and has acknowledged the version in force; nobody runs as "other".
    let expect = |plural: &str, name: &str, accepted: &str, proxies: u64| {
        let want = version(&cp).to_string();
        kube.status(plural, "shop", name)
            .is_some_and(|(status, _, report)| {
                status == accepted
                    && report["version"] == want.as_str()
                    && report["proxies"] == proxies
                    && report["acknowledged"] == proxies
            })
    };
    wait_for("every object's status", Duration::from_secs(10), || {
        expect("trafficpolicies", "reviews", "True", 1)
            && expect("trafficpolicies", "broken", "False", 1)
            && expect("serverpolicies", "web", "True", 1)
            && expect("serverpolicies", "other", "True", 0)
    });
    let (_, message, _) = kube.status("trafficpolicies", "shop", "broken").unwrap();
    assert!(
        message.starts_with("not in force: spec.timeout: "),
        "the reason names the field: {message}"
    );
    let object = kube.object("trafficpolicies", "shop", "broken").unwrap();
    assert_eq!(object["status"]["observedGeneration"], 1);

    let out = cp.cli(&["get", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["other", "reviews", "web"],
        "the invalid one is not in force"
    );

    // Nothing was sent before both kinds were listed: never an empty version-0 snapshot.
    let first = rt.block_on(sent.recv()).unwrap();
    assert_ne!(first, "0");

    // A policy for another service account: a new version, which changes nothing for the proxy
    // (it is not sent again) — it still counts as having acknowledged what is in force.
    let before = version(&cp);
    kube.create(
        "serverpolicies",
        "shop",
        "other-too",
        json!({"selector": {"serviceAccount": "other"}, "port": 8080}),
    );
    wait_for("the new version's reports", Duration::from_secs(10), || {
        version(&cp) != before
            && expect("trafficpolicies", "reviews", "True", 1)
            && expect("serverpolicies", "web", "True", 1)
            && expect("serverpolicies", "other-too", "True", 0)
    });

    // Fixing the broken object puts it in force and flips its condition.
    let path = format!("{API}/namespaces/shop/trafficpolicies/broken");
    kube.api
        .merge_patch(&path, json!({"spec": {"timeout": "1s"}}));
    wait_for(
        "the fixed object to be accepted",
        Duration::from_secs(10),
        || {
            let object = kube.object("trafficpolicies", "shop", "broken").unwrap();
            expect("trafficpolicies", "broken", "True", 1)
                && object["status"]["observedGeneration"] == 2
        },
    );
}

#[test]
fn apply_and_delete_write_through_the_api_server_and_answer_once_in_force() {
    let kube = Kube::new("apply");
    let cp = kube.control_plane("kube-apply");
    let docs = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\n\
                metadata: {name: ratings, namespace: shop}\nspec: {timeout: 2s}\n---\n\
                apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\n\
                metadata: {name: db}\nspec: {mtls: permissive}\n";
    let file = write_file(&kube.dir, "policies.yaml", docs);

    let out = cp.cli(&["apply", "-f", &file]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("TrafficPolicy shop/ratings"), "{stdout}");
    assert!(stdout.contains("ServerPolicy default/db"), "{stdout}");
    // The answer came once the change was in force: its version is the one in force now.
    let in_force = version(&cp);
    assert!(stdout.contains(&format!("version {in_force}")), "{stdout}");
    let ratings = kube.object("trafficpolicies", "shop", "ratings").unwrap();
    assert_eq!(ratings["spec"], json!({"timeout": "2s"}));
    assert!(kube.object("serverpolicies", "default", "db").is_some());

    // The same documents again: nothing written, same version.
    let puts = kube.api.requests_to(&http::Method::PUT, API).len();
    let out = cp.cli(&["apply", "-f", &file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("unchanged (version {in_force})")
    );
    assert_eq!(kube.api.requests_to(&http::Method::PUT, API).len(), puts);

    // One bad document: the field is named, and nothing is written (not even the good one).
    let bad = write_file(
        &kube.dir,
        "bad.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: fine, namespace: shop}\nspec: {timeout: 1s}\n---\n\
         apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: bad, namespace: shop}\nspec: {retries: {maxRetries: many}}\n",
    );
    let out = cp.cli(&["apply", "-f", &bad]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.retries.maxRetries"), "{stderr}");
    assert!(kube.object("trafficpolicies", "shop", "fine").is_none());

    // A change is an update of the object read (generation 2), and a new version.
    let changed = write_file(&kube.dir, "changed.yaml", &docs.replace("2s", "3s"));
    let out = cp.cli(&["apply", "-f", &changed]);
    assert!(out.status.success(), "{out:?}");
    let ratings = kube.object("trafficpolicies", "shop", "ratings").unwrap();
    assert_eq!(ratings["metadata"]["generation"], 2);
    let after_change = version(&cp);
    assert_ne!(after_change, in_force);

    // A second replica on the same API server names the same policies by the same version.
    let replica = kube.control_plane("kube-apply-2");
    wait_for(
        "the replica to agree on the version",
        Duration::from_secs(10),
        || version(&replica) == after_change,
    );

    let out = cp.cli(&["delete", "-f", &changed]);
    assert!(out.status.success(), "{out:?}");
    assert!(kube.object("trafficpolicies", "shop", "ratings").is_none());
    assert!(kube.object("serverpolicies", "default", "db").is_none());
    let out = cp.cli(&["get", "-o", "json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}
