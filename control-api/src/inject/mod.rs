//! Sidecar injection: one function, [`inject`], used by both `trellis-control inject` (offline,
//! on YAML files) and the mutating admission webhook (`webhook.rs`).
//!
//! It works on untyped JSON values and returns an exact JSON patch (RFC 6902) against the pod or
//! pod template: typed Kubernetes structs would drop fields newer than the crate. What it adds:
//! the `trellis-init` init container and the `trellis-proxy` sidecar first among the init
//! containers (a native sidecar, so the app's own init containers already have a proxy; or, in
//! classic mode, the first app container), the projected token volume, the app's probes
//! rewritten to the admin port (the originals kept in an annotation, the new paths declared to
//! the proxy in `TRELLIS_PROBES`), and a status annotation that makes injecting twice a no-op.

mod containers;
mod probes;
mod workloads;

pub use containers::{ADMIN_PORT, INIT_NAME, PROXY_NAME};
pub use workloads::{inject_documents, workload_name};

use serde_json::{Map, Value, json};

pub const ANNOTATION_INJECT: &str = "trellis.dev/inject";
pub const ANNOTATION_STATUS: &str = "trellis.dev/injected";
pub const ANNOTATION_ORIGINAL_PROBES: &str = "trellis.dev/original-probes";
pub const ANNOTATION_MODE: &str = "trellis.dev/sidecar-mode";

/// How the proxy runs in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): starts before the
    /// app, stops after it, and lets Jobs complete.
    Native,
    /// A regular container listed first, with a postStart hook that waits for `/ready`
    /// (clusters before 1.29). Jobs must call `POST /shutdown` on the admin port when done.
    Classic,
}

/// What every injected sidecar gets, from the control plane's flags.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub proxy_image: String,
    pub pull_policy: String,
    pub control_plane_url: String,
    pub control_plane_identity: String,
    /// The mesh CA (PEM), passed to the proxy in `TRELLIS_TRUST_ANCHORS_PEM`.
    pub trust_anchors_pem: String,
    pub otlp_endpoint: Option<String>,
    pub mode: SidecarMode,
    pub proxy_uid: u32,
    /// The control plane's namespace: never injected.
    pub control_plane_namespace: String,
}

/// Who asked for injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptIn {
    /// The namespace is labelled `trellis.dev/inject: enabled`: inject unless the pod opts out.
    Namespace,
    /// Only pods annotated `trellis.dev/inject: enabled`.
    Annotation,
    /// `trellis-control inject`: the operator asked for it; only an explicit opt-out stops it.
    Always,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The JSON patch that injects the sidecar (paths relative to the pod or template).
    Injected(Vec<Value>),
    /// Why nothing was changed.
    Skipped(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InjectError {
    #[error("annotation {key}: {value:?} {why}")]
    Annotation {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "container {container:?} runs as UID {uid}, the proxy's UID: its traffic would bypass the proxy; run it as another user"
    )]
    ProxyUid { container: String, uid: u32 },
    #[error("probe {0}")]
    Probe(String),
    #[error("{0}")]
    Malformed(String),
}

/// The per-pod settings read from annotations, validated.
pub(crate) struct Annotations {
    pub skip_inbound_ports: Option<String>,
    pub skip_outbound_ports: Option<String>,
    pub skip_outbound_cidrs: Option<String>,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
    pub access_log: Option<String>,
    pub trace_sample_ratio: Option<String>,
    pub mode: SidecarMode,
}

/// The patch that injects the sidecar into `pod` (a Pod, or a workload's pod template:
/// `{metadata, spec}`) in `namespace` for the workload `workload`, or why nothing is done.
pub fn inject(
    pod: &Value,
    namespace: Option<&str>,
    workload: &str,
    opt_in: OptIn,
    cfg: &InjectConfig,
) -> Result<Outcome, InjectError> {
    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| InjectError::Malformed("the pod has no spec".into()))?;
    let meta = pod.get("metadata").and_then(Value::as_object);
    let annotations = meta
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object);
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(annotation_text);

    match annotation(ANNOTATION_INJECT).as_deref() {
        Some("disabled") => return Ok(Outcome::Skipped(format!("{ANNOTATION_INJECT}: disabled"))),
        Some("enabled") => {}
        Some(other) => {
            return Err(InjectError::Annotation {
                key: ANNOTATION_INJECT,
                value: other.to_string(),
                why: "must be enabled or disabled".into(),
            });
        }
        None if opt_in == OptIn::Annotation => {
            return Ok(Outcome::Skipped(format!(
                "not annotated {ANNOTATION_INJECT}: enabled"
            )));
        }
        None => {}
    }
    if namespace == Some(cfg.control_plane_namespace.as_str()) {
        return Ok(Outcome::Skipped(format!(
            "{} is the control plane's namespace",
            cfg.control_plane_namespace
        )));
    }
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .ok_or_else(|| InjectError::Malformed("spec.containers is missing".into()))?;
    let init_containers = spec.get("initContainers").and_then(Value::as_array);
    let all = || {
        containers
            .iter()
            .chain(init_containers.into_iter().flatten())
    };
    if annotation(ANNOTATION_STATUS).is_some()
        || all().any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_NAME))
    {
        return Ok(Outcome::Skipped("already injected".into()));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "hostNetwork pod: its traffic is the node's, not the pod's".into(),
        ));
    }
    let pod_uid = spec
        .get("securityContext")
        .and_then(|s| s.get("runAsUser"))
        .and_then(Value::as_u64);
    for c in all() {
        let uid = c
            .get("securityContext")
            .and_then(|s| s.get("runAsUser"))
            .and_then(Value::as_u64)
            .or(pod_uid);
        if uid == Some(u64::from(cfg.proxy_uid)) {
            return Err(InjectError::ProxyUid {
                container: c.get("name").and_then(Value::as_str).unwrap_or("?").into(),
                uid: cfg.proxy_uid,
            });
        }
    }
    let ann = read_annotations(&annotation, cfg)?;

    let mut ops = Vec::new();
    // Probes first: the paths index the app's containers before anything is inserted.
    let mut originals = Map::new();
    // The rewritten paths, declared to the proxy: the only probes it serves beyond loopback.
    let mut declared: Vec<String> = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
        let mut kept = Map::new();
        for probe in probes::PROBES {
            let Some(p) = c.get(probe) else { continue };
            if let Some(new) = probes::rewrite(p, c, &format!("{name}.{probe}"))? {
                if let Some(path) = new["httpGet"]["path"].as_str()
                    && !declared.iter().any(|d| d == path)
                {
                    declared.push(path.to_string());
                }
                ops.push(json!({"op": "replace", "path": format!("/spec/containers/{i}/{probe}"), "value": new}));
                kept.insert(probe.into(), p.clone());
            }
        }
        if !kept.is_empty() {
            originals.insert(name.into(), Value::Object(kept));
        }
    }
    let init = containers::init_container(cfg, &ann);
    let proxy = containers::proxy_container(cfg, &ann, workload, ann.mode, &declared);
    let first_inits = match ann.mode {
        SidecarMode::Native => vec![init, proxy.clone()],
        SidecarMode::Classic => vec![init],
    };
    if init_containers.is_some() {
        for (i, c) in first_inits.into_iter().enumerate() {
            ops.push(json!({"op": "add", "path": format!("/spec/initContainers/{i}"), "value": c}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": first_inits}));
    }
    if ann.mode == SidecarMode::Classic {
        ops.push(json!({"op": "add", "path": "/spec/containers/0", "value": proxy}));
    }
    let volumes = containers::volumes();
    if spec.get("volumes").and_then(Value::as_array).is_some() {
        for v in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": v}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    let mut new_annotations = vec![(ANNOTATION_STATUS, json!(env!("CARGO_PKG_VERSION")))];
    if !originals.is_empty() {
        let text = serde_json::to_string(&originals).unwrap_or_default();
        new_annotations.push((ANNOTATION_ORIGINAL_PROBES, json!(text)));
    }
    if annotations.is_some() {
        for (k, v) in new_annotations {
            let path = format!("/metadata/annotations/{}", escape_pointer(k));
            ops.push(json!({"op": "add", "path": path, "value": v}));
        }
    } else {
        let a: Map<String, Value> = new_annotations
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        // Create what is missing: the annotations, or the whole metadata.
        let (path, value) = match meta {
            Some(_) => ("/metadata/annotations", json!(a)),
            None => ("/metadata", json!({"annotations": a})),
        };
        ops.push(json!({"op": "add", "path": path, "value": value}));
    }
    Ok(Outcome::Injected(ops))
}

/// An annotation value as text (YAML may have read `8080` as a number).
fn annotation_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    }
}

fn read_annotations(
    get: &dyn Fn(&str) -> Option<String>,
    cfg: &InjectConfig,
) -> Result<Annotations, InjectError> {
    let bad = |key: &'static str, value: &str, why: &str| InjectError::Annotation {
        key,
        value: value.to_string(),
        why: why.to_string(),
    };
    let ports = |key: &'static str| -> Result<Option<String>, InjectError> {
        let Some(v) = get(key).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        for p in v.split(',').map(str::trim) {
            let ok = match p.split_once('-') {
                Some((a, b)) => valid_port(a) && valid_port(b),
                None => valid_port(p),
            };
            if !ok {
                return Err(bad(
                    key,
                    &v,
                    &format!("has {p:?}, not a port (1-65535) or range"),
                ));
            }
        }
        Ok(Some(v))
    };
    let cidrs = |key: &'static str| -> Result<Option<String>, InjectError> {
        let Some(v) = get(key).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        for c in v.split(',').map(str::trim) {
            if !valid_cidr(c) {
                return Err(bad(
                    key,
                    &v,
                    &format!("has {c:?}, not a CIDR like 10.0.0.0/8"),
                ));
            }
        }
        Ok(Some(v))
    };
    let quantity = |key: &'static str, default: &str| -> Result<String, InjectError> {
        let v = get(key).unwrap_or_else(|| default.to_string());
        if valid_quantity(&v) {
            Ok(v)
        } else {
            Err(bad(
                key,
                &v,
                "is not a Kubernetes quantity (e.g. 100m, 64Mi)",
            ))
        }
    };
    let access_log = get("trellis.dev/access-log");
    if let Some(v) = &access_log
        && !matches!(v.as_str(), "off" | "text" | "json" | "false")
    {
        return Err(bad(
            "trellis.dev/access-log",
            v,
            "must be off, text or json",
        ));
    }
    let ratio = get("trellis.dev/trace-sample-ratio");
    if let Some(v) = &ratio
        && !v.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r))
    {
        return Err(bad(
            "trellis.dev/trace-sample-ratio",
            v,
            "must be a number from 0.0 to 1.0",
        ));
    }
    let mode = match get(ANNOTATION_MODE).as_deref() {
        None => cfg.mode,
        Some("native") => SidecarMode::Native,
        Some("classic") => SidecarMode::Classic,
        Some(other) => return Err(bad(ANNOTATION_MODE, other, "must be native or classic")),
    };
    Ok(Annotations {
        skip_inbound_ports: ports("trellis.dev/skip-inbound-ports")?,
        skip_outbound_ports: ports("trellis.dev/skip-outbound-ports")?,
        skip_outbound_cidrs: cidrs("trellis.dev/skip-outbound-cidrs")?,
        cpu_request: quantity("trellis.dev/proxy-cpu-request", "10m")?,
        memory_request: quantity("trellis.dev/proxy-memory-request", "20Mi")?,
        cpu_limit: quantity("trellis.dev/proxy-cpu-limit", "1")?,
        memory_limit: quantity("trellis.dev/proxy-memory-limit", "256Mi")?,
        // YAML reads `off` as false.
        access_log: access_log.map(|v| if v == "false" { "off".into() } else { v }),
        trace_sample_ratio: ratio,
        mode,
    })
}

fn valid_port(s: &str) -> bool {
    s.trim().parse::<u16>().is_ok_and(|p| p > 0)
}

fn valid_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len <= 32,
        Ok(std::net::IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

/// `123`, `0.5`, `100m`, `64Mi`, `1G`, `1e3`.
fn valid_quantity(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    !digits.is_empty()
        && digits.parse::<f64>().is_ok_and(|n| n >= 0.0)
        && matches!(
            suffix,
            "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
        )
}

/// JSON pointer escaping (RFC 6901).
pub fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests;
