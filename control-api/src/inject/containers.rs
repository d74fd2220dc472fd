//! The containers and volumes injection adds: the `trellis-init` init container (interception
//! rules, only NET_ADMIN and NET_RAW), the `trellis-proxy` sidecar (native: an init container
//! with `restartPolicy: Always`; classic: the first app container with a postStart hook), and
//! the projected service-account token (audience `trellis`) the proxy proves its identity with.

use serde_json::{Value, json};

use super::{Annotations, InjectConfig, SidecarMode};

pub const INIT_NAME: &str = "trellis-init";
pub const PROXY_NAME: &str = "trellis-proxy";
pub const TOKEN_VOLUME: &str = "trellis-token";
pub const INIT_RUN_VOLUME: &str = "trellis-init-run";
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis.dev/serviceaccount";
pub const ADMIN_PORT: u16 = 4191;
/// Lifetime of the projected token; kubelet refreshes it at 80 %.
const TOKEN_SECONDS: u64 = 3600;

/// The init container: installs the interception rules and exits. Root (iptables needs it in
/// the pod's network namespace) but with only NET_ADMIN and NET_RAW, not privileged; `/run` is
/// a small writable volume for iptables' lock file under a read-only root filesystem.
pub fn init_container(cfg: &InjectConfig, ann: &Annotations) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        cfg.proxy_uid.to_string(),
    ];
    for (flag, value) in [
        ("--skip-inbound-ports", &ann.skip_inbound_ports),
        ("--skip-outbound-ports", &ann.skip_outbound_ports),
        ("--skip-outbound-cidrs", &ann.skip_outbound_cidrs),
    ] {
        if let Some(v) = value {
            args.push(flag.into());
            args.push(v.clone());
        }
    }
    json!({
        "name": INIT_NAME,
        "image": cfg.proxy_image,
        "imagePullPolicy": cfg.pull_policy,
        "args": args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "10Mi"},
            "limits": {"cpu": "100m", "memory": "50Mi"},
        },
        "volumeMounts": [{"name": INIT_RUN_VOLUME, "mountPath": "/run"}],
    })
}

/// The proxy container. `probes`: the app's probe paths rewritten to the admin port, declared
/// in `TRELLIS_PROBES` (the proxy answers no other probe path to kubelet or any other pod).
pub fn proxy_container(
    cfg: &InjectConfig,
    ann: &Annotations,
    workload: &str,
    mode: SidecarMode,
    probes: &[String],
) -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let mut env = vec![
        json!({"name": "TRELLIS_POD_NAME", "valueFrom": field("metadata.name")}),
        json!({"name": "TRELLIS_POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "TRELLIS_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")}),
        json!({"name": "TRELLIS_POD_IP", "valueFrom": field("status.podIP")}),
        // Kubernetes expands $(VAR) from the variables defined above.
        json!({"name": "TRELLIS_WORKLOAD", "value": format!("$(TRELLIS_POD_NAMESPACE)/{workload}")}),
        json!({"name": "TRELLIS_ADMIN_ADDR", "value": format!("0.0.0.0:{ADMIN_PORT}")}),
        json!({"name": "TRELLIS_CONTROL_PLANE", "value": cfg.control_plane_url}),
        json!({"name": "TRELLIS_CONTROL_PLANE_IDENTITY", "value": cfg.control_plane_identity}),
        json!({"name": "TRELLIS_TRUST_ANCHORS_PEM", "value": cfg.trust_anchors_pem}),
        json!({"name": "TRELLIS_IDENTITY_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")}),
        json!({"name": "TRELLIS_LOG_FORMAT", "value": "json"}),
    ];
    if !probes.is_empty() {
        // The list is comma-separated: a comma inside a path is written %2C.
        let list: Vec<String> = probes.iter().map(|p| p.replace(',', "%2C")).collect();
        env.push(json!({"name": "TRELLIS_PROBES", "value": list.join(",")}));
    }
    if let Some(otlp) = &cfg.otlp_endpoint {
        env.push(json!({"name": "TRELLIS_OTLP_ENDPOINT", "value": otlp}));
    }
    for (name, value) in [
        ("TRELLIS_ACCESS_LOG", &ann.access_log),
        ("TRELLIS_TRACE_SAMPLE_RATIO", &ann.trace_sample_ratio),
    ] {
        if let Some(v) = value {
            env.push(json!({"name": name, "value": v}));
        }
    }
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1,
        })
    };
    let mut c = json!({
        "name": PROXY_NAME,
        "image": cfg.proxy_image,
        "imagePullPolicy": cfg.pull_policy,
        "args": ["run"],
        "env": env,
        "ports": [{"name": "trellis-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "securityContext": {
            "runAsUser": cfg.proxy_uid,
            "runAsGroup": cfg.proxy_uid,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": {
            "requests": {"cpu": ann.cpu_request, "memory": ann.memory_request},
            "limits": {"cpu": ann.cpu_limit, "memory": ann.memory_limit},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
        "livenessProbe": probe("/live", 10, 3),
        "readinessProbe": probe("/ready", 2, 3),
    });
    match mode {
        SidecarMode::Native => {
            // Apps start after the startup probe passes; the sidecar stops after them, so a
            // Job completes when its app exits.
            c["restartPolicy"] = json!("Always");
            c["startupProbe"] = probe("/ready", 1, 120);
        }
        SidecarMode::Classic => {
            // Kubernetes runs the next container only after this hook returns.
            c["lifecycle"] = json!({"postStart": {"exec": {"command": [
                "trellis-proxy", "wait-ready", "--admin-addr",
                format!("127.0.0.1:{ADMIN_PORT}"), "--timeout", "120s"
            ]}}});
        }
    }
    c
}

/// The volumes the containers above mount.
pub fn volumes() -> [Value; 2] {
    [
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "trellis",
                "expirationSeconds": TOKEN_SECONDS,
                "path": "token",
            }}]},
        }),
        json!({"name": INIT_RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
    ]
}
