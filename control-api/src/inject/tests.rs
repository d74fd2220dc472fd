//! Injection checked structurally: the YAML it writes is parsed back and the containers, init
//! containers, volumes, security contexts and annotations are compared field by field.

use serde_json::{Value, json};

use super::*;

fn cfg() -> InjectConfig {
    InjectConfig {
        proxy_image: "ghcr.io/trellis-mesh/trellis:0.1.0".into(),
        pull_policy: "IfNotPresent".into(),
        control_plane_url: "https://trellis-control.trellis-system.svc:7443".into(),
        control_plane_identity: "spiffe://cluster.local/ns/trellis-system/sa/trellis-control"
            .into(),
        trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
        otlp_endpoint: Some("http://jaeger-collector.observability:4317".into()),
        mode: SidecarMode::Native,
        proxy_uid: 2102,
        control_plane_namespace: "trellis-system".into(),
    }
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata:
      labels: {app: api}
      annotations: {trellis.dev/skip-outbound-ports: "5432", trellis.dev/proxy-memory-limit: 128Mi}
    spec:
      serviceAccountName: api
      initContainers:
      - {name: migrate, image: migrate:1}
      containers:
      - name: app
        image: api:1
        futureField: {kept: true}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: 3}
        livenessProbe: {tcpSocket: {port: 8080}}
      volumes:
      - {name: data, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {ports: [{port: 8080}]}
"#;

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap()
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {c}"))
}

#[test]
fn a_deployment_gets_init_and_native_sidecar_first_and_everything_else_is_kept() {
    let (out, reports) = inject_documents(DEPLOYMENT, &cfg()).unwrap();
    let d = docs(&out);
    assert_eq!(d.len(), 2);
    let pod = &d[0]["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["trellis-init", "trellis-proxy", "migrate"]
    );
    assert_eq!(names(&spec["containers"]), ["app"]);
    assert_eq!(spec["containers"][0]["futureField"], json!({"kept": true}));
    assert_eq!(
        names(&spec["volumes"]),
        ["data", "trellis-token", "trellis-init-run"]
    );

    let init = &spec["initContainers"][0];
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--proxy-uid",
            "2102",
            "--skip-outbound-ports",
            "5432"
        ])
    );
    let sc = &init["securityContext"];
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["runAsUser"], 0);

    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 4191);
    let sc = &proxy["securityContext"];
    assert_eq!(
        (sc["runAsUser"].as_u64(), sc["runAsNonRoot"].as_bool()),
        (Some(2102), Some(true))
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(proxy["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(proxy["resources"]["requests"]["cpu"], "10m");
    assert_eq!(env(proxy, "TRELLIS_ADMIN_ADDR")["value"], "0.0.0.0:4191");
    assert_eq!(
        env(proxy, "TRELLIS_WORKLOAD")["value"],
        "$(TRELLIS_POD_NAMESPACE)/api"
    );
    assert_eq!(
        env(proxy, "TRELLIS_POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        env(proxy, "TRELLIS_OTLP_ENDPOINT")["value"],
        "http://jaeger-collector.observability:4317"
    );
    assert!(
        env(proxy, "TRELLIS_TRUST_ANCHORS_PEM")["value"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let token = &spec["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "trellis");

    // Probes now go to the admin port; the originals are kept.
    let app = &spec["containers"][0];
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"],
        "/probe/http/8080/ready"
    );
    assert_eq!(app["readinessProbe"]["periodSeconds"], 3);
    assert_eq!(app["livenessProbe"]["httpGet"]["path"], "/probe/tcp/8080");
    // ...and declared to the proxy, the only probe paths it serves beyond loopback.
    assert_eq!(
        env(proxy, "TRELLIS_PROBES")["value"],
        "/probe/tcp/8080,/probe/http/8080/ready"
    );
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann[ANNOTATION_STATUS], env!("CARGO_PKG_VERSION"));
    let originals: Value =
        serde_json::from_str(ann[ANNOTATION_ORIGINAL_PROBES].as_str().unwrap()).unwrap();
    assert_eq!(originals["app"]["livenessProbe"]["tcpSocket"]["port"], 8080);

    // The Service passed through untouched.
    assert_eq!(d[1], docs(DEPLOYMENT)[1]);
    assert_eq!(reports[1].outcome, "passed through (not a workload)");
}

#[test]
fn injecting_twice_changes_nothing() {
    let (once, _) = inject_documents(DEPLOYMENT, &cfg()).unwrap();
    let (twice, reports) = inject_documents(&once, &cfg()).unwrap();
    assert_eq!(docs(&once), docs(&twice));
    assert_eq!(reports[0].outcome, "skipped: already injected");
}

#[test]
fn every_workload_kind_finds_its_template() {
    for (kind, api, wrap) in [
        (
            "StatefulSet",
            "apps/v1",
            "spec: {serviceName: s, selector: {}, template: {T}}",
        ),
        (
            "DaemonSet",
            "apps/v1",
            "spec: {selector: {}, template: {T}}",
        ),
        (
            "ReplicaSet",
            "apps/v1",
            "spec: {selector: {}, template: {T}}",
        ),
        ("Job", "batch/v1", "spec: {template: {T}}"),
        (
            "CronJob",
            "batch/v1",
            "spec: {schedule: '* * * * *', jobTemplate: {spec: {template: {T}}}}",
        ),
        ("Pod", "v1", "T"),
    ] {
        let template = "spec: {restartPolicy: Never, containers: [{name: app, image: a}]}";
        let body = if kind == "Pod" {
            template.to_string()
        } else {
            wrap.replace("{T}", &format!("{{{template}}}"))
        };
        let yaml = format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: w}}\n{body}\n");
        let (out, reports) =
            inject_documents(&yaml, &cfg()).unwrap_or_else(|e| panic!("{kind}: {e}\n{yaml}"));
        assert!(
            reports[0].outcome.starts_with("injected"),
            "{kind}: {}",
            reports[0].outcome
        );
        let doc = &docs(&out)[0];
        let pointer = match kind {
            "Pod" => "",
            "CronJob" => "/spec/jobTemplate/spec/template",
            _ => "/spec/template",
        };
        let spec = &doc.pointer(pointer).unwrap()["spec"];
        assert_eq!(
            names(&spec["initContainers"]),
            ["trellis-init", "trellis-proxy"],
            "{kind}"
        );
        assert_eq!(spec["restartPolicy"], "Never", "{kind}");
    }
}

#[test]
fn opt_out_host_network_and_the_control_plane_namespace_are_skipped() {
    let pod = |ann: &str, extra: &str, ns: &str| {
        docs(&format!(
            "kind: Pod\nmetadata: {{name: p, namespace: {ns}, annotations: {{{ann}}}}}\nspec: {{{extra} containers: [{{name: app, image: a}}]}}\n"
        ))
        .remove(0)
    };
    let c = cfg();
    let skipped = |p: &Value, ns: &str, opt: OptIn| {
        matches!(
            inject(p, Some(ns), "p", opt, &c).unwrap(),
            Outcome::Skipped(_)
        )
    };
    assert!(skipped(
        &pod("trellis.dev/inject: disabled", "", "a"),
        "a",
        OptIn::Always
    ));
    assert!(skipped(
        &pod("", "hostNetwork: true,", "a"),
        "a",
        OptIn::Namespace
    ));
    assert!(skipped(
        &pod("", "", "trellis-system"),
        "trellis-system",
        OptIn::Namespace
    ));
    assert!(skipped(&pod("", "", "a"), "a", OptIn::Annotation));
    assert!(!skipped(
        &pod("trellis.dev/inject: enabled", "", "a"),
        "a",
        OptIn::Annotation
    ));
    assert!(!skipped(&pod("", "", "a"), "a", OptIn::Namespace));
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    let c = cfg();
    let run = |yaml: &str| {
        let p = docs(yaml).remove(0);
        inject(&p, Some("a"), "p", OptIn::Always, &c)
            .unwrap_err()
            .to_string()
    };
    let err = run(
        "metadata: {name: p}\nspec: {securityContext: {runAsUser: 2102}, containers: [{name: app, image: a}]}",
    );
    assert!(err.contains("\"app\"") && err.contains("2102"), "{err}");
    let err = run(
        "metadata: {annotations: {trellis.dev/inject: yes-please}}\nspec: {containers: [{name: app}]}",
    );
    assert!(
        err.contains("trellis.dev/inject") && err.contains("enabled or disabled"),
        "{err}"
    );
    let err = run(
        "metadata: {annotations: {trellis.dev/skip-inbound-ports: '80,99999'}}\nspec: {containers: [{name: app}]}",
    );
    assert!(err.contains("99999"), "{err}");
    let err = run(
        "metadata: {annotations: {trellis.dev/skip-outbound-cidrs: 10.0.0.0/33}}\nspec: {containers: [{name: app}]}",
    );
    assert!(err.contains("10.0.0.0/33"), "{err}");
    let err = run(
        "metadata: {annotations: {trellis.dev/proxy-cpu-limit: lots}}\nspec: {containers: [{name: app}]}",
    );
    assert!(err.contains("quantity"), "{err}");
    let err = run(
        "metadata: {}\nspec: {containers: [{name: app, readinessProbe: {httpGet: {port: web}}}]}",
    );
    assert!(
        err.contains("app.readinessProbe") && err.contains("web"),
        "{err}"
    );
}

#[test]
fn classic_mode_puts_the_proxy_first_among_containers_with_a_wait_hook() {
    let yaml = "kind: Pod\nmetadata: {name: p, annotations: {trellis.dev/sidecar-mode: classic}}\nspec: {containers: [{name: app, image: a, livenessProbe: {tcpSocket: {port: 80}}}]}\n";
    let (out, _) = inject_documents(yaml, &cfg()).unwrap();
    let spec = &docs(&out)[0]["spec"];
    assert_eq!(names(&spec["initContainers"]), ["trellis-init"]);
    assert_eq!(names(&spec["containers"]), ["trellis-proxy", "app"]);
    let proxy = &spec["containers"][0];
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"][1],
        "wait-ready"
    );
    // The probe of the app (now at index 1) was rewritten, not the proxy's.
    assert_eq!(
        spec["containers"][1]["livenessProbe"]["httpGet"]["path"],
        "/probe/tcp/80"
    );
    assert_eq!(env(proxy, "TRELLIS_PROBES")["value"], "/probe/tcp/80");
}

#[test]
fn every_rewritten_probe_of_every_container_is_declared_once() {
    let yaml = r#"
kind: Pod
metadata: {name: p}
spec:
  containers:
  - name: web
    image: w
    ports: [{name: http, containerPort: 8080}]
    livenessProbe: {httpGet: {path: /healthz, port: http}}
    readinessProbe: {httpGet: {path: /healthz, port: 8080}}
    startupProbe: {httpGet: {path: "/ready?full=1", port: 8080}}
  - name: db
    image: d
    livenessProbe: {tcpSocket: {port: 5432}}
    readinessProbe: {exec: {command: ["true"]}}
  - name: rpc
    image: r
    readinessProbe: {grpc: {port: 9090, service: my.Svc}}
    livenessProbe: {httpGet: {path: "/check?l=a,b", port: 9091}}
    startupProbe: {httpGet: {path: /tls, port: 9443, scheme: HTTPS}}
"#;
    let (out, _) = inject_documents(yaml, &cfg()).unwrap();
    let spec = &docs(&out)[0]["spec"];
    let proxy = &spec["initContainers"][1];
    // In container and probe order, duplicates once; exec and HTTPS probes stay as they were
    // and are not declared; the comma inside a path is %2C (the list is comma-separated).
    assert_eq!(
        env(proxy, "TRELLIS_PROBES")["value"],
        "/probe/http/8080/healthz,/probe/http/8080/ready?full=1,/probe/tcp/5432,\
         /probe/http/9091/check?l=a%2Cb,/probe/grpc/9090?service=my.Svc"
    );
    // Each declared path is what the container's probe now asks for.
    let rewritten: Vec<&str> = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| probes::PROBES.map(|p| c[p]["httpGet"]["path"].as_str()))
        .flatten()
        .filter(|p| p.starts_with("/probe/"))
        .collect();
    assert_eq!(rewritten.len(), 6, "{rewritten:?}");
    let declared = env(proxy, "TRELLIS_PROBES")["value"].as_str().unwrap();
    for path in rewritten {
        assert!(
            declared.split(',').any(|d| d.replace("%2C", ",") == path),
            "{path} not in {declared}"
        );
    }
}

#[test]
fn a_pod_without_rewritten_probes_declares_none() {
    let yaml = "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app, image: a, livenessProbe: {exec: {command: [\"true\"]}}}]}\n";
    let (out, _) = inject_documents(yaml, &cfg()).unwrap();
    let proxy = &docs(&out)[0]["spec"]["initContainers"][1];
    assert_eq!(proxy["name"], PROXY_NAME);
    let env = proxy["env"].as_array().unwrap();
    assert!(
        !env.iter().any(|e| e["name"] == "TRELLIS_PROBES"),
        "{env:?}"
    );
}

#[test]
fn pods_from_a_replicaset_are_named_after_their_deployment() {
    let pod = json!({"metadata": {
        "generateName": "api-5d8f7c9b4-",
        "labels": {"pod-template-hash": "5d8f7c9b4"},
        "ownerReferences": [{"kind": "ReplicaSet", "name": "api-5d8f7c9b4"}],
    }});
    assert_eq!(workload_name(&pod), "api");
    let pod = json!({"metadata": {"labels": {"app.kubernetes.io/name": "web"}}});
    assert_eq!(workload_name(&pod), "web");
    let pod = json!({"metadata": {"generateName": "batch-"}});
    assert_eq!(workload_name(&pod), "batch");
}
