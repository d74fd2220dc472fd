//! Where a workload keeps its pod template, what the workload is called, and `inject` over a
//! multi-document YAML stream (the CLI): Pods, Deployments, StatefulSets, DaemonSets,
//! ReplicaSets, Jobs and CronJobs (and `List`s of them) are injected; other kinds pass through
//! untouched.

use serde_json::Value;

use super::{InjectConfig, InjectError, OptIn, Outcome, inject};

/// The JSON pointer of a kind's pod template (`""`: the object is the pod).
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// The workload a pod belongs to, for `--workload NS/NAME` and the traces' `service.name`:
/// the `app.kubernetes.io/name` or `app` label, else the owner (a ReplicaSet minus its
/// `pod-template-hash`), else the generated-name prefix, else the pod's name.
pub fn workload_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    let label = |k: &str| meta["labels"][k].as_str().filter(|s| !s.is_empty());
    if let Some(name) = label("app.kubernetes.io/name").or_else(|| label("app")) {
        return name.to_string();
    }
    if let Some(owner) = meta["ownerReferences"]
        .as_array()
        .and_then(|o| o.first())
        .and_then(|o| o["name"].as_str())
    {
        if let Some(hash) = label("pod-template-hash")
            && let Some(base) = owner.strip_suffix(&format!("-{hash}"))
        {
            return base.to_string();
        }
        return owner.to_string();
    }
    if let Some(prefix) = meta["generateName"].as_str() {
        return prefix.trim_end_matches('-').to_string();
    }
    meta["name"].as_str().unwrap_or("unknown").to_string()
}

/// A workload object's own name, which its pods are known by.
fn object_workload_name(kind: &str, obj: &Value) -> String {
    if kind == "Pod" {
        return workload_name(obj);
    }
    let template_labels = &obj
        .pointer(template_pointer(kind).unwrap_or(""))
        .map(|t| &t["metadata"]["labels"]);
    for key in ["app.kubernetes.io/name", "app"] {
        if let Some(name) = template_labels
            .and_then(|l| l[key].as_str())
            .filter(|s| !s.is_empty())
        {
            return name.to_string();
        }
    }
    obj["metadata"]["name"]
        .as_str()
        .unwrap_or("unknown")
        .to_string()
}

/// One line of the CLI's report on stderr per object.
pub struct Report {
    pub object: String,
    pub outcome: String,
}

/// Injects every workload in a YAML stream; returns the new stream and what happened to each
/// object. An error names the document.
pub fn inject_documents(
    yaml: &str,
    cfg: &InjectConfig,
) -> Result<(String, Vec<Report>), InjectError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml)
        .map_err(|e| InjectError::Malformed(format!("not valid YAML: {e}")))?;
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        inject_object(&mut doc, cfg, &mut reports)
            .map_err(|e| InjectError::Malformed(format!("document {}: {e}", i + 1)))?;
        out.push(serde_saphyr::to_string(&doc).map_err(|e| {
            InjectError::Malformed(format!("document {}: cannot write YAML: {e}", i + 1))
        })?);
    }
    Ok((out.join("---\n"), reports))
}

fn inject_object(
    doc: &mut Value,
    cfg: &InjectConfig,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    let kind = doc["kind"].as_str().unwrap_or("").to_string();
    let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
    let object = format!("{kind}/{name}");
    if kind == "List" {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, cfg, reports)?;
            }
        }
        return Ok(());
    }
    let Some(pointer) = template_pointer(&kind) else {
        reports.push(Report {
            object,
            outcome: "passed through (not a workload)".into(),
        });
        return Ok(());
    };
    let namespace = doc["metadata"]["namespace"].as_str().map(str::to_string);
    let workload = object_workload_name(&kind, doc);
    let template = doc.pointer(pointer).ok_or_else(|| {
        InjectError::Malformed(format!("{object} has no pod template at {pointer}"))
    })?;
    let outcome = inject(
        template,
        namespace.as_deref(),
        &workload,
        OptIn::Always,
        cfg,
    )
    .map_err(|e| InjectError::Malformed(format!("{object}: {e}")))?;
    match outcome {
        Outcome::Skipped(why) => reports.push(Report {
            object,
            outcome: format!("skipped: {why}"),
        }),
        Outcome::Injected(ops) => {
            let ops: Vec<Value> = ops
                .into_iter()
                .map(|mut op| {
                    if let Some(path) = op["path"].as_str() {
                        op["path"] = Value::String(format!("{pointer}{path}"));
                    }
                    op
                })
                .collect();
            let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                .map_err(|e| InjectError::Malformed(format!("{object}: internal patch: {e}")))?;
            json_patch::patch(doc, &patch).map_err(|e| {
                InjectError::Malformed(format!("{object}: patch did not apply: {e}"))
            })?;
            reports.push(Report {
                object,
                outcome: format!("injected (workload {workload})"),
            });
        }
    }
    Ok(())
}
