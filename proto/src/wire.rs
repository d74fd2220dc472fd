//! The policy model on the wire, and back.
//!
//! Model → protobuf is direct. Protobuf → model goes through the same document validator as
//! YAML: a proxy that rejects a snapshot names the field exactly as `trellis-control apply`
//! would (`document 2 (TrafficPolicy default/web): spec.retries.on[1]: ...`).

use serde_json::{Map, Value, json};

use crate::pb;
use crate::policy::{
    API_VERSION, Mtls, PolicyErrors, PolicySet, Protocol, ServerPolicy, TlsMode, TrafficPolicy,
    validate,
};

pub fn traffic_to_wire(p: &TrafficPolicy) -> pb::TrafficPolicy {
    let d = &p.destination;
    let r = &p.retries;
    pb::TrafficPolicy {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        destination: Some(pb::Destination {
            host: d.host.clone().unwrap_or_default(),
            port: u32::from(d.port.unwrap_or(0)),
            addresses: d.addresses.iter().map(|a| a.to_string()).collect(),
            endpoints: d.endpoints.iter().map(|a| a.to_string()).collect(),
        }),
        protocol: match p.protocol {
            Protocol::Auto => pb::Protocol::Auto,
            Protocol::Http1 => pb::Protocol::Http1,
            Protocol::Http2 => pb::Protocol::Http2,
            Protocol::Grpc => pb::Protocol::Grpc,
            Protocol::Opaque => pb::Protocol::Opaque,
        } as i32,
        timeout_ms: p.timeout.map_or(0, |t| t.as_millis() as u64),
        idle_timeout_ms: p.idle_timeout.map_or(0, |t| t.as_millis() as u64),
        retries: Some(pb::Retries {
            max_retries: Some(r.max_retries),
            on: r.on.iter().map(|c| c.to_string()).collect(),
            per_try_timeout_ms: r.per_try_timeout.map_or(0, |t| t.as_millis() as u64),
            backoff_base_ms: Some(r.backoff.base.as_millis() as u64),
            backoff_max_ms: Some(r.backoff.max.as_millis() as u64),
            budget_percent: Some(r.budget.percent),
            budget_min_per_second: Some(r.budget.min_per_second),
            non_idempotent: r.non_idempotent,
            body_buffer_bytes: Some(r.body_buffer_bytes),
        }),
        ejection: Some(pb::Ejection {
            consecutive_failures: p.ejection.consecutive_failures,
            base_time_ms: p.ejection.base_time.as_millis() as u64,
            max_time_ms: p.ejection.max_time.as_millis() as u64,
        }),
        tls: p.tls.as_ref().map(|t| pb::Tls {
            mode: match t.mode {
                TlsMode::Mutual => pb::TlsMode::Mutual,
                TlsMode::Disabled => pb::TlsMode::Disabled,
            } as i32,
            server_identity: t.server_identity.clone().unwrap_or_default(),
        }),
    }
}

pub fn server_to_wire(p: &ServerPolicy) -> pb::ServerPolicy {
    pb::ServerPolicy {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        service_account: p.selector.service_account.clone().unwrap_or_default(),
        port: u32::from(p.port.unwrap_or(0)),
        mtls: match p.mtls {
            Mtls::Strict => pb::Mtls::Strict,
            Mtls::Permissive => pb::Mtls::Permissive,
        } as i32,
        allow: p
            .allow
            .iter()
            .map(|a| pb::Allow {
                identities: a.identities.clone(),
            })
            .collect(),
        opaque_ports: p.opaque_ports.iter().map(|p| u32::from(*p)).collect(),
    }
}

/// Validates wire policies with the document rules.
pub fn set_from_wire(
    traffic: &[pb::TrafficPolicy],
    server: &[pb::ServerPolicy],
) -> Result<PolicySet, PolicyErrors> {
    let docs = documents(traffic, server);
    validate::parse_values(&docs)
}

/// The wire policies as YAML documents, as `trellis-control get -o yaml` prints them.
pub fn to_yaml(traffic: &[pb::TrafficPolicy], server: &[pb::ServerPolicy]) -> String {
    documents(traffic, server)
        .iter()
        .map(|d| serde_saphyr::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The wire policies as documents (untyped JSON values, field names as in YAML).
pub fn documents(traffic: &[pb::TrafficPolicy], server: &[pb::ServerPolicy]) -> Vec<Value> {
    traffic
        .iter()
        .map(traffic_doc)
        .chain(server.iter().map(server_doc))
        .collect()
}

fn ms(v: u64) -> Value {
    Value::String(humantime::format_duration(std::time::Duration::from_millis(v)).to_string())
}

fn doc(kind: &str, namespace: &str, name: &str, spec: Map<String, Value>) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": if namespace.is_empty() { "default" } else { namespace }},
        "spec": spec,
    })
}

fn traffic_doc(t: &pb::TrafficPolicy) -> Value {
    let mut spec = Map::new();
    if let Some(d) = &t.destination {
        let mut dest = Map::new();
        if !d.host.is_empty() {
            dest.insert("host".into(), json!(d.host));
        }
        if d.port != 0 {
            dest.insert("port".into(), json!(d.port));
        }
        if !d.addresses.is_empty() {
            dest.insert("addresses".into(), json!(d.addresses));
        }
        if !d.endpoints.is_empty() {
            dest.insert("endpoints".into(), json!(d.endpoints));
        }
        if !dest.is_empty() {
            spec.insert("destination".into(), Value::Object(dest));
        }
    }
    let protocol = match pb::Protocol::try_from(t.protocol) {
        Ok(pb::Protocol::Auto) => "auto",
        Ok(pb::Protocol::Http1) => "http1",
        Ok(pb::Protocol::Http2) => "http2",
        Ok(pb::Protocol::Grpc) => "grpc",
        Ok(pb::Protocol::Opaque) => "opaque",
        Err(_) => "unknown protocol enum value",
    };
    spec.insert("protocol".into(), json!(protocol));
    if t.timeout_ms != 0 {
        spec.insert("timeout".into(), ms(t.timeout_ms));
    }
    if t.idle_timeout_ms != 0 {
        spec.insert("idleTimeout".into(), ms(t.idle_timeout_ms));
    }
    if let Some(r) = &t.retries {
        let mut retries = Map::new();
        if let Some(n) = r.max_retries {
            retries.insert("maxRetries".into(), json!(n));
        }
        if !r.on.is_empty() {
            retries.insert("on".into(), json!(r.on));
        }
        if r.per_try_timeout_ms != 0 {
            retries.insert("perTryTimeout".into(), ms(r.per_try_timeout_ms));
        }
        let mut backoff = Map::new();
        if let Some(b) = r.backoff_base_ms {
            backoff.insert("base".into(), ms(b));
        }
        if let Some(m) = r.backoff_max_ms {
            backoff.insert("max".into(), ms(m));
        }
        if !backoff.is_empty() {
            retries.insert("backoff".into(), Value::Object(backoff));
        }
        let mut budget = Map::new();
        if let Some(p) = r.budget_percent {
            budget.insert("percent".into(), json!(p));
        }
        if let Some(m) = r.budget_min_per_second {
            budget.insert("minPerSecond".into(), json!(m));
        }
        if !budget.is_empty() {
            retries.insert("budget".into(), Value::Object(budget));
        }
        if r.non_idempotent {
            retries.insert("nonIdempotent".into(), json!(true));
        }
        if let Some(b) = r.body_buffer_bytes {
            retries.insert("bodyBufferBytes".into(), json!(b));
        }
        spec.insert("retries".into(), Value::Object(retries));
    }
    if let Some(e) = &t.ejection {
        let mut ejection = Map::new();
        if e.consecutive_failures != 0 {
            ejection.insert("consecutiveFailures".into(), json!(e.consecutive_failures));
        }
        if e.base_time_ms != 0 {
            ejection.insert("baseTime".into(), ms(e.base_time_ms));
        }
        if e.max_time_ms != 0 {
            ejection.insert("maxTime".into(), ms(e.max_time_ms));
        }
        spec.insert("ejection".into(), Value::Object(ejection));
    }
    if let Some(tls) = &t.tls {
        let mut m = Map::new();
        m.insert(
            "mode".into(),
            json!(if tls.mode == pb::TlsMode::Disabled as i32 {
                "disabled"
            } else {
                "mutual"
            }),
        );
        if !tls.server_identity.is_empty() {
            m.insert("serverIdentity".into(), json!(tls.server_identity));
        }
        spec.insert("tls".into(), Value::Object(m));
    }
    doc("TrafficPolicy", &t.namespace, &t.name, spec)
}

fn server_doc(s: &pb::ServerPolicy) -> Value {
    let mut spec = Map::new();
    if !s.service_account.is_empty() {
        spec.insert(
            "selector".into(),
            json!({"serviceAccount": s.service_account}),
        );
    }
    if s.port != 0 {
        spec.insert("port".into(), json!(s.port));
    }
    spec.insert(
        "mtls".into(),
        json!(if s.mtls == pb::Mtls::Permissive as i32 {
            "permissive"
        } else {
            "strict"
        }),
    );
    if !s.allow.is_empty() {
        let allow: Vec<Value> = s
            .allow
            .iter()
            .map(|a| json!({"identities": a.identities}))
            .collect();
        spec.insert("allow".into(), Value::Array(allow));
    }
    if !s.opaque_ports.is_empty() {
        spec.insert("opaquePorts".into(), json!(s.opaque_ports));
    }
    doc("ServerPolicy", &s.namespace, &s.name, spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &str = "
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  destination: {host: reviews, port: 9080, endpoints: [\"10.1.0.5:9080\"]}
  timeout: 2s
  retries: {maxRetries: 0, on: [gateway-error, \"429\", unavailable], perTryTimeout: 500ms, budget: {percent: 5, minPerSecond: 0}, bodyBufferBytes: 0}
  ejection: {consecutiveFailures: 3}
---
apiVersion: trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: shop}
spec: {selector: {serviceAccount: reviews}, mtls: permissive, opaquePorts: [3306], allow: [{identities: [\"spiffe://td/ns/a/sa/b\"]}]}
";

    #[test]
    fn policies_survive_the_round_trip_through_the_wire() {
        let set = PolicySet::parse(POLICIES).unwrap();
        let traffic: Vec<_> = set.traffic.iter().map(traffic_to_wire).collect();
        let server: Vec<_> = set.server.iter().map(server_to_wire).collect();
        let back = set_from_wire(&traffic, &server).unwrap();
        assert_eq!(
            back, set,
            "zero values that mean something (maxRetries: 0, percent, 0 bytes) are kept"
        );
        let yaml = to_yaml(&traffic, &server);
        assert_eq!(
            PolicySet::parse(&yaml).unwrap(),
            set,
            "the YAML the CLI prints parses back:\n{yaml}"
        );
    }

    #[test]
    fn bad_wire_policies_are_named_like_bad_yaml() {
        let set = PolicySet::parse(POLICIES).unwrap();
        let mut t = traffic_to_wire(&set.traffic[0]);
        if let Some(r) = t.retries.as_mut() {
            r.on.push("teapot".into());
        }
        if let Some(d) = t.destination.as_mut() {
            d.endpoints.push("nowhere".into());
        }
        let errors = set_from_wire(&[t], &[]).unwrap_err().0;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("spec.destination.endpoints[1]: \"nowhere\" is not ip:port"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("spec.retries.on[3]: \"teapot\" is not a retry condition"),
            "{errors:?}"
        );
    }
}
