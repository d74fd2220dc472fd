//! The Kubernetes manifests in `deploy/`: `deploy/validate.py` renders every kustomization and
//! checks each document against the Kubernetes 1.33 schemas (kubernetes-validate) and our custom
//! resources against their CRDs (jsonschema); and the policy CRDs accept and refuse the same
//! documents as the control plane's validator (`PolicySet::parse`). No cluster needed.
//!
//! Needs python3 with `kubernetes-validate` and `jsonschema`, and kubectl (with kustomize): when
//! one is missing the test is skipped with the reason, and fails when `CI=true`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use trellis_proto::policy::PolicySet;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether the tools are here; if not, a skip (outside CI) or a failure (`CI=true`).
fn tools_present(test: &str, need_kubectl: bool) -> bool {
    let python_ok = Command::new("python3")
        .args(["-c", "import kubernetes_validate, jsonschema"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let kubectl_ok = !need_kubectl
        || Command::new("kubectl")
            .args(["version", "--client"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let reason = match (python_ok, kubectl_ok) {
        (true, true) => return true,
        (false, _) => {
            "needs python3 with kubernetes-validate and jsonschema (pip install kubernetes-validate jsonschema)"
        }
        (true, false) => "needs kubectl (with kustomize) on PATH",
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {reason}; CI=true, so this is a failure, not a skip"
    );
    eprintln!("SKIPPED {test}: {reason}");
    false
}

/// Runs `deploy/validate.py ARGS` with `stdin`; (exit code, stdout + stderr).
fn validate(args: &[&str], stdin: &str) -> (i32, String) {
    let mut child = Command::new("python3")
        .arg(workspace().join("deploy/validate.py"))
        .args(args)
        .current_dir(workspace())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut input = child.stdin.take().unwrap();
    let text = stdin.to_string();
    // Written from a thread: a script that fails early stops reading and must not block us.
    let writer = std::thread::spawn(move || input.write_all(text.as_bytes()));
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_rendered_manifest_is_valid() {
    if !tools_present("every_rendered_manifest_is_valid", true) {
        return;
    }
    let (code, out) = validate(&[], "");
    println!("{out}");
    assert_eq!(code, 0, "deploy/validate.py failed:\n{out}");
    for expected in [
        "deploy: Deployment/trellis-control: ok",
        "deploy: MutatingWebhookConfiguration/trellis-injector: ok",
        "deploy: CustomResourceDefinition/trafficpolicies.trellis.dev: ok",
        "deploy/overlays/jaeger: Deployment/jaeger: ok",
        "deploy/examples/shop: TrafficPolicy/api: ok",
        "deploy/examples/shop: ServerPolicy/api: ok",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}

/// Policies the control plane accepts, written as Kubernetes reads YAML (the key "on" quoted).
const GOOD: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: default}
spec:
  destination:
    host: reviews.default.svc.cluster.local
    port: 9080
    addresses: ["10.96.0.12:9080", "[fd00::12]:9080"]
    endpoints: ["10.1.0.5:9080", "10.1.0.6:9080"]
  protocol: auto
  timeout: 2s
  idleTimeout: 5m
  retries:
    maxRetries: 2
    "on": [connect-failure, refused-stream, reset, gateway-error, "503", 429, unavailable]
    perTryTimeout: 500ms
    backoff: {base: 25ms, max: 250ms}
    budget: {percent: 12.5, minPerSecond: 10}
    nonIdempotent: false
    bodyBufferBytes: 65536
  ejection: {consecutiveFailures: 5, baseTime: 1s, maxTime: 1m30s}
  tls: {mode: mutual, serverIdentity: spiffe://cluster.local/ns/default/sa/reviews}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: defaults}
spec: {timeout: 0, idleTimeout: 0s, protocol: opaque, tls: {mode: disabled}}
---
apiVersion: trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: default}
spec:
  selector: {serviceAccount: reviews}
  port: 9080
  mtls: permissive
  allow:
    - identities: ["spiffe://cluster.local/ns/default/sa/productpage", "spiffe://cluster.local/ns/shop/*"]
  opaquePorts: [3306, 65535]
"#;

/// Documents the control plane refuses, each with the field the CRD schema must name.
const BAD: &[(&str, &str)] = &[
    (
        "spec: {destination: {port: 70000}}",
        "spec.destination.port",
    ),
    (
        "spec: {destination: {host: 'bad host!'}}",
        "spec.destination.host",
    ),
    (
        "spec: {destination: {host: a, endpoints: ['10.1.0.5']}}",
        "spec.destination.endpoints[0]",
    ),
    (
        "spec: {destination: {addresses: ['10.1.0.5:0']}}",
        "spec.destination.addresses[0]",
    ),
    ("spec: {protocol: quic}", "spec.protocol"),
    ("spec: {timeout: 2}", "spec.timeout"),
    ("spec: {timeout: fast}", "spec.timeout"),
    ("spec: {idleTimeout: 5x}", "spec.idleTimeout"),
    (
        "spec: {retries: {maxRetry: 3}}",
        "'maxRetry' was unexpected",
    ),
    (
        "spec: {retries: {maxRetries: 11}}",
        "spec.retries.maxRetries",
    ),
    ("spec: {retries: {\"on\": ['999']}}", "spec.retries.on[0]"),
    ("spec: {retries: {\"on\": [teapot]}}", "spec.retries.on[0]"),
    ("spec: {retries: {\"on\": [600]}}", "spec.retries.on[0]"),
    (
        "spec: {retries: {perTryTimeout: 1}}",
        "spec.retries.perTryTimeout",
    ),
    (
        "spec: {retries: {budget: {percent: 150}}}",
        "spec.retries.budget.percent",
    ),
    (
        "spec: {retries: {nonIdempotent: maybe}}",
        "spec.retries.nonIdempotent",
    ),
    (
        "spec: {retries: {bodyBufferBytes: 17000000}}",
        "spec.retries.bodyBufferBytes",
    ),
    (
        "spec: {ejection: {consecutiveFailures: 0}}",
        "spec.ejection.consecutiveFailures",
    ),
    ("spec: {tls: {mode: optional}}", "spec.tls.mode"),
    (
        "spec: {tls: {serverIdentity: reviews}}",
        "spec.tls.serverIdentity",
    ),
    ("spec: {destination: {hots: a}}", "'hots' was unexpected"),
];

const BAD_SERVER: &[(&str, &str)] = &[
    ("spec: {mtls: sometimes}", "spec.mtls"),
    ("spec: {port: 0}", "spec.port"),
    ("spec: {opaquePorts: [0]}", "spec.opaquePorts[0]"),
    (
        "spec: {allow: [{identities: [productpage]}]}",
        "spec.allow[0].identities[0]",
    ),
    (
        "spec: {allow: [{identities: ['spiffe://cluster.local']}]}",
        "spec.allow[0].identities[0]",
    ),
    ("spec: {selector: {app: x}}", "'app' was unexpected"),
];

// Refused by the control plane and, in a cluster, by the CRDs' CEL rules, which validate.py does
// not evaluate: backoff base > max, ejection baseTime > maxTime, endpoints without host or
// addresses.

#[test]
fn the_policy_crds_accept_and_refuse_what_the_control_plane_does() {
    if !tools_present(
        "the_policy_crds_accept_and_refuse_what_the_control_plane_does",
        false,
    ) {
        return;
    }
    // Accepted by both: the documents above and the example application's policies.
    let shop =
        std::fs::read_to_string(workspace().join("deploy/examples/shop/policies.yaml")).unwrap();
    for (name, yaml) in [("GOOD", GOOD), ("shop policies", shop.as_str())] {
        if let Err(e) = PolicySet::parse(yaml) {
            panic!("the control plane refuses {name}: {e}");
        }
        let (code, out) = validate(&["--files", "-"], yaml);
        assert_eq!(code, 0, "the CRD schemas refuse {name}:\n{out}");
    }

    // Refused by both, each naming the field.
    let mut docs = Vec::new();
    let mut expected = Vec::new();
    for (kind, cases) in [("TrafficPolicy", BAD), ("ServerPolicy", BAD_SERVER)] {
        for (i, (spec, field)) in cases.iter().enumerate() {
            let name = format!("bad-{}-{i}", kind.to_lowercase());
            let doc = format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\n{spec}\n"
            );
            assert!(
                PolicySet::parse(&doc).is_err(),
                "the control plane accepts {doc}"
            );
            expected.push((format!("<stdin>: {kind}/{name}: "), *field, doc.clone()));
            docs.push(doc);
        }
    }
    let name_doc = "apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {name: Bad_Name}\nspec: {}\n";
    assert!(PolicySet::parse(name_doc).is_err());
    expected.push((
        "<stdin>: ServerPolicy/Bad_Name: ".into(),
        "metadata.name",
        name_doc.into(),
    ));
    docs.push(name_doc.into());

    let (code, out) = validate(&["--files", "-"], &docs.join("---\n"));
    println!("{out}");
    assert_eq!(code, 1, "deploy/validate.py should fail:\n{out}");
    for (label, field, doc) in &expected {
        let line = out.lines().find(|l| l.starts_with(label.as_str()));
        assert!(
            line.is_some_and(|l| l.contains(field)),
            "the CRD schema does not refuse this document naming {field:?}:\n{doc}\noutput:\n{out}"
        );
    }
}

#[test]
fn an_unquoted_on_key_is_caught_because_kubernetes_reads_yaml_1_1() {
    if !tools_present(
        "an_unquoted_on_key_is_caught_because_kubernetes_reads_yaml_1_1",
        false,
    ) {
        return;
    }
    // The CLI reads YAML 1.2 and takes `on` as a key; kubectl (YAML 1.1) would send `true`.
    let doc = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {retries: {on: [gateway-error]}}\n";
    assert!(PolicySet::parse(doc).is_ok());
    let (code, out) = validate(&["--files", "-"], doc);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(r#"quoted as "on""#), "{out}");
}
