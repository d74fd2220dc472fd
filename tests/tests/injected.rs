//! What we ship is what we test: `trellis-control inject` writes a Deployment's sidecar, and the
//! pod harness runs exactly that init container's command line and that proxy's environment —
//! taken from the injected YAML, not written again by hand — in two pods, then checks the mesh
//! they form: certificates, mutual TLS between them, a strict ServerPolicy, and the app's probe
//! rewritten to the admin port working from outside the pod as kubelet would call it.
//!
//! What the harness supplies that a cluster would: the downward API's values (pod name,
//! namespace, service account, IP) and, in place of the projected service-account token (there
//! is no API server to review it), a join token at the path the injected proxy reads.

use serde_json::Value;
use trellis_tests::harness::{Mesh, Pod};

const APP_PORT: u16 = 8080;

fn deployment(name: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {{trellis.dev/skip-outbound-ports: "9999"}}
    spec:
      serviceAccountName: {name}
      containers:
      - name: app
        image: ghcr.io/trellis-mesh/trellis:0.1.0
        ports: [{{name: http, containerPort: {APP_PORT}}}]
        readinessProbe: {{httpGet: {{path: /headers, port: http}}}}
"#
    )
}

/// The injected pod template of `name`'s Deployment.
fn inject(control: &Pod, mesh: &Mesh, name: &str) -> Value {
    let file = mesh.write_file(&format!("{name}-deployment.yaml"), &deployment(name));
    let url = control.control_url();
    let out = control.control(&[
        "inject",
        "-f",
        &file.to_string_lossy(),
        "--control-plane-url",
        &url,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_saphyr::from_str(&stdout)
        .unwrap_or_else(|e| panic!("inject wrote no YAML ({e}):\n{stdout}"));
    doc["spec"]["template"].clone()
}

fn container<'a>(template: &'a Value, name: &str) -> &'a Value {
    template["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .chain(template["spec"]["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {template}"))
}

/// The proxy container's environment as the kubelet would compute it: downward-API fields from
/// the pod, `$(VAR)` expanded from the variables above it.
fn environment(proxy: &Value, pod: &Pod, sa: &str, token_file: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in proxy["env"].as_array().expect("env") {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => format!("{}-0", pod.name),
                Some("metadata.namespace") => "shop".into(),
                Some("spec.serviceAccountName") => sa.into(),
                Some("status.podIP") => pod.ip.to_string(),
                other => panic!("unexpected env source {other:?} in {e}"),
            }
        };
        let value = if name == "TRELLIS_IDENTITY_TOKEN_FILE" {
            token_file.to_string()
        } else {
            value
        };
        env.push((name, value));
    }
    env
}

/// Runs the injected init container and proxy of `name` in `pod`.
fn run_injected(control: &Pod, mesh: &Mesh, pod: &Pod, name: &str) -> Value {
    let template = inject(control, mesh, name);
    let init = container(&template, "trellis-init");
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "init");
    let out = pod.init(&args[1..]);
    assert!(
        out.status.success(),
        "the injected init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy = container(&template, "trellis-proxy");
    assert_eq!(proxy["args"], serde_json::json!(["run"]));
    let token = control.join_token_file(mesh, &format!("shop/{name}"));
    let env = environment(proxy, pod, name, &token.to_string_lossy());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    pod.start_proxy_with_env(&[], &env);
    template
}

#[test]
fn the_injected_sidecar_runs_as_written_and_forms_the_mesh() {
    let Some(mesh) = Mesh::new("injected") else {
        return;
    };
    let control = mesh.pod("control");
    control.start_control_plane(&mesh.log_dir().join("control-state"));
    let api = mesh.pod("api");
    api.spawn_app(&[
        "http",
        "--listen",
        &format!("0.0.0.0:{APP_PORT}"),
        "--name",
        "api",
    ]);
    let template = run_injected(&control, &mesh, &api, "api");
    let web = mesh.pod("web");
    run_injected(&control, &mesh, &web, "web");

    // Only web may call api, over mutual TLS.
    let policy = mesh.write_file(
        "strict.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: ServerPolicy\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  selector: {serviceAccount: api}\n  mtls: strict\n  allow:\n  - identities: [spiffe://cluster.local/ns/shop/sa/web]\n",
    );
    let out = control.control(&["apply", "--wait", "-f", &policy.to_string_lossy()]);
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let rsp = web.curl(&[&api.url(APP_PORT, "/headers")]);
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let seen: Value = serde_json::from_str(&rsp.body).unwrap();
    assert_eq!(
        seen["headers"]["trellis-peer-identity"], "spiffe://cluster.local/ns/shop/sa/web",
        "the injected proxies identify each other: {}",
        rsp.body
    );
    // A caller outside the mesh is refused...
    let outsider = mesh.pod("outsider");
    let rsp = outsider.curl(&[&api.url(APP_PORT, "/headers")]);
    assert_eq!(rsp.status, 403, "{rsp:?}");
    // ...but kubelet's probe, as injection rewrote it, reaches the app through the admin port.
    let probe = &container(&template, "app")["readinessProbe"]["httpGet"];
    let port = probe["port"].as_u64().unwrap();
    let path = probe["path"].as_str().unwrap();
    assert_eq!((port, path), (4191, "/probe/http/8080/headers"));
    let rsp = outsider.curl(&[&format!("http://{}:{port}{path}", api.ip)]);
    assert_eq!(
        rsp.status, 200,
        "the rewritten probe from outside the pod: {rsp:?}"
    );
    // It is the one probe injection declared to the proxy; any other probe path from outside
    // the pod is refused, so the admin port is no way around the strict server.
    let declared = container(&template, "trellis-proxy")["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "TRELLIS_PROBES")
        .map(|e| e["value"].clone());
    assert_eq!(declared, Some(Value::from(path)));
    for undeclared in ["/probe/http/8080/headers?x=1", "/probe/tcp/8080"] {
        let rsp = outsider.curl(&[&format!("http://{}:{port}{undeclared}", api.ip)]);
        assert_eq!(
            rsp.status, 403,
            "{undeclared} from outside the pod: {rsp:?}"
        );
        assert!(rsp.body.contains("probe not declared"), "{}", rsp.body);
    }

    // The metrics name the workloads as injection did.
    let m = api.metrics();
    assert!(
        m.sum(
            "trellis_requests_total",
            &[
                ("direction", "inbound"),
                ("peer_identity", "spiffe://cluster.local/ns/shop/sa/web")
            ]
        ) >= 1.0,
        "{}",
        m.text
    );
    let config: Value = serde_json::from_str(&api.admin_get("/config").1).unwrap();
    assert_eq!(config["proxy"]["workload"], "shop/api");
    assert_eq!(config["proxy"]["admin_addr"], "0.0.0.0:4191");
}
