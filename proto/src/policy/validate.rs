//! YAML → typed policies, collecting every problem with its document and field path.
//!
//! Documents are first read as untyped values, then walked field by field, so that one pass
//! reports everything wrong (unknown fields with a "did you mean", wrong types, bad durations,
//! out-of-range numbers) instead of stopping at the first serde error.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::fields::Walker;
use super::*;

pub(super) fn parse(yaml: &str) -> Result<PolicySet, PolicyErrors> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml)
        .map_err(|e| PolicyErrors(vec![format!("not valid YAML: {e}")]))?;
    parse_values(&docs)
}

/// Validates documents already read into untyped values (from YAML, or rebuilt from the wire).
pub(crate) fn parse_values(docs: &[Value]) -> Result<PolicySet, PolicyErrors> {
    let mut set = PolicySet::default();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, doc) in docs.iter().enumerate() {
        if doc.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let mut v = Walker::default();
        let parsed = document(&mut v, doc);
        let label = match &parsed {
            Some((kind, ns, name, _)) => format!("document {} ({kind} {ns}/{name})", i + 1),
            None => format!("document {}", i + 1),
        };
        if let Some((kind, ns, name, _)) = &parsed
            && !seen.insert((kind.clone(), ns.clone(), name.clone()))
        {
            v.err(
                "metadata.name",
                format!("a {kind} named {ns}/{name} appears twice"),
            );
        }
        if v.errors.is_empty() {
            match parsed {
                Some((_, _, _, Parsed::Traffic(p))) => set.traffic.push(*p),
                Some((_, _, _, Parsed::Server(p))) => set.server.push(p),
                None => {}
            }
        } else {
            errors.extend(v.errors.into_iter().map(|e| format!("{label}: {e}")));
        }
    }
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(PolicyErrors(errors))
    }
}

enum Parsed {
    Traffic(Box<TrafficPolicy>),
    Server(ServerPolicy),
}

fn document(v: &mut Walker, doc: &Value) -> Option<(String, String, String, Parsed)> {
    let root = v.object(doc, "")?;
    v.keys(root, "", &["apiVersion", "kind", "metadata", "spec"]);
    match v.string(root, "apiVersion", "") {
        Some(a) if a == API_VERSION => {}
        Some(a) => v.err(
            "apiVersion",
            format!("{a:?} is not supported (expected {API_VERSION})"),
        ),
        None => v.err("apiVersion", format!("is required ({API_VERSION})")),
    }
    let kind = v.string(root, "kind", "");
    let (name, namespace) = match root.get("metadata") {
        Some(m) => metadata(v, m),
        None => {
            v.err("metadata", "is required (name, and optionally namespace)");
            (None, "default".to_string())
        }
    };
    let empty = Value::Object(Map::new());
    let spec = root.get("spec").unwrap_or(&empty);
    let parsed = match kind.as_deref() {
        // A bad name is already reported; the spec is still checked so every error shows at once.
        Some("TrafficPolicy") => Parsed::Traffic(Box::new(traffic(
            v,
            spec,
            name.clone().unwrap_or_default(),
            namespace.clone(),
        )?)),
        Some("ServerPolicy") => Parsed::Server(server(
            v,
            spec,
            name.clone().unwrap_or_default(),
            namespace.clone(),
        )?),
        Some(other) => {
            v.err(
                "kind",
                format!("{other:?} is not a policy kind (TrafficPolicy or ServerPolicy)"),
            );
            return None;
        }
        None => {
            v.err("kind", "is required (TrafficPolicy or ServerPolicy)");
            return None;
        }
    };
    Some((kind?, namespace, name?, parsed))
}

fn metadata(v: &mut Walker, m: &Value) -> (Option<String>, String) {
    let Some(m) = v.object(m, "metadata") else {
        return (None, "default".into());
    };
    v.keys(
        m,
        "metadata",
        &["name", "namespace", "labels", "annotations"],
    );
    let name = v.string(m, "name", "metadata");
    if name.is_none() && !m.contains_key("name") {
        v.err("metadata.name", "is required");
    }
    let name = name.filter(|n| v.dns_name(n, "metadata.name"));
    let namespace = v
        .string(m, "namespace", "metadata")
        .unwrap_or_else(|| "default".into());
    v.dns_name(&namespace, "metadata.namespace");
    (name, namespace)
}

fn traffic(v: &mut Walker, spec: &Value, name: String, namespace: String) -> Option<TrafficPolicy> {
    let spec = v.object(spec, "spec")?;
    v.keys(
        spec,
        "spec",
        &[
            "destination",
            "protocol",
            "timeout",
            "idleTimeout",
            "retries",
            "ejection",
            "tls",
        ],
    );
    let destination = match spec.get("destination") {
        Some(d) => destination(v, d),
        None => Destination::default(),
    };
    let protocol = match v.string(spec, "protocol", "spec").as_deref() {
        None | Some("auto") => Protocol::Auto,
        Some("http1") => Protocol::Http1,
        Some("http2") => Protocol::Http2,
        Some("grpc") => Protocol::Grpc,
        Some("opaque") => Protocol::Opaque,
        Some(other) => {
            v.err(
                "spec.protocol",
                format!("{other:?} is not one of auto, http1, http2, grpc, opaque"),
            );
            Protocol::Auto
        }
    };
    let retries = match spec.get("retries") {
        Some(r) => retries(v, r),
        None => Retries::default(),
    };
    let ejection = match spec.get("ejection") {
        Some(e) => ejection(v, e),
        None => Ejection::default(),
    };
    let tls = spec.get("tls").and_then(|t| tls(v, t));
    Some(TrafficPolicy {
        name,
        namespace,
        destination,
        protocol,
        timeout: v.timeout(spec, "timeout", "spec"),
        idle_timeout: v.timeout(spec, "idleTimeout", "spec"),
        retries,
        ejection,
        tls,
    })
}

fn destination(v: &mut Walker, d: &Value) -> Destination {
    let Some(d) = v.object(d, "spec.destination") else {
        return Destination::default();
    };
    v.keys(
        d,
        "spec.destination",
        &["host", "port", "addresses", "endpoints"],
    );
    let host = v.string(d, "host", "spec.destination");
    if let Some(h) = &host {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            v.err(
                "spec.destination.host",
                format!("{h:?} is not a host name (e.g. reviews.default.svc.cluster.local)"),
            );
        }
    }
    let port = v.port(d, "port", "spec.destination");
    let addresses = v.addrs(d, "addresses", "spec.destination");
    let endpoints = v.addrs(d, "endpoints", "spec.destination");
    if !endpoints.is_empty() && host.is_none() && addresses.is_empty() {
        v.err(
            "spec.destination.endpoints",
            "need a host or addresses to say which calls they serve",
        );
    }
    Destination {
        host,
        port,
        addresses,
        endpoints,
    }
}

fn retries(v: &mut Walker, r: &Value) -> Retries {
    let mut out = Retries::default();
    let Some(r) = v.object(r, "spec.retries") else {
        return out;
    };
    let p = "spec.retries";
    v.keys(
        r,
        p,
        &[
            "maxRetries",
            "on",
            "perTryTimeout",
            "backoff",
            "budget",
            "nonIdempotent",
            "bodyBufferBytes",
        ],
    );
    if let Some(n) = v.uint(r, "maxRetries", p, 0, 10) {
        out.max_retries = n as u32;
    }
    if let Some(on) = r.get("on") {
        out.on = retry_conditions(v, on);
    }
    out.per_try_timeout = v.timeout(r, "perTryTimeout", p);
    if let Some(b) = r.get("backoff")
        && let Some(b) = v.object(b, "spec.retries.backoff")
    {
        v.keys(b, "spec.retries.backoff", &["base", "max"]);
        if let Some(base) = v.duration(b, "base", "spec.retries.backoff") {
            out.backoff.base = base;
        }
        if let Some(max) = v.duration(b, "max", "spec.retries.backoff") {
            out.backoff.max = max;
        }
        if out.backoff.base > out.backoff.max {
            v.err(
                "spec.retries.backoff",
                format!(
                    "base {:?} is larger than max {:?}",
                    out.backoff.base, out.backoff.max
                ),
            );
        }
    }
    if let Some(b) = r.get("budget")
        && let Some(b) = v.object(b, "spec.retries.budget")
    {
        v.keys(b, "spec.retries.budget", &["percent", "minPerSecond"]);
        match b.get("percent") {
            None => {}
            Some(Value::Number(n)) if n.as_f64().is_some_and(|f| (0.0..=100.0).contains(&f)) => {
                out.budget.percent = n.as_f64().unwrap_or(20.0);
            }
            Some(other) => v.err(
                "spec.retries.budget.percent",
                format!("{other} is not a number from 0 to 100"),
            ),
        }
        if let Some(n) = v.uint(b, "minPerSecond", "spec.retries.budget", 0, 100_000) {
            out.budget.min_per_second = n as u32;
        }
    }
    match r.get("nonIdempotent") {
        None => {}
        Some(Value::Bool(b)) => out.non_idempotent = *b,
        Some(other) => v.err(
            "spec.retries.nonIdempotent",
            format!("{other} is not true or false"),
        ),
    }
    if let Some(n) = v.uint(r, "bodyBufferBytes", p, 0, 16 * 1024 * 1024) {
        out.body_buffer_bytes = n;
    }
    out
}

fn retry_conditions(v: &mut Walker, on: &Value) -> Vec<RetryOn> {
    let Value::Array(items) = on else {
        v.err(
            "spec.retries.on",
            "must be a list, e.g. [connect-failure, gateway-error, \"503\", unavailable]",
        );
        return Vec::new();
    };
    if items.is_empty() {
        // On the wire an empty list means the defaults: it would change meaning on its way.
        v.err(
            "spec.retries.on",
            "is empty: list the conditions to retry on, or set maxRetries: 0 to turn retries off",
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("spec.retries.on[{i}]");
        let text = match item {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                v.err(&path, format!("{other} is not a retry condition"));
                continue;
            }
        };
        let cond = match text.as_str() {
            "connect-failure" => RetryOn::ConnectFailure,
            "refused-stream" => RetryOn::RefusedStream,
            "reset" => RetryOn::Reset,
            "gateway-error" => RetryOn::GatewayError,
            s => match (
                s.parse::<u16>(),
                GrpcCode::ALL.iter().find(|c| c.name() == s),
            ) {
                (Ok(code), _) if (100..=599).contains(&code) => RetryOn::Status(code),
                (Ok(code), _) => {
                    v.err(&path, format!("{code} is not an HTTP status (100-599)"));
                    continue;
                }
                (_, Some(code)) => RetryOn::Grpc(*code),
                _ => {
                    v.err(
                        &path,
                        format!(
                            "{s:?} is not a retry condition (connect-failure, refused-stream, reset, gateway-error, \
                             an HTTP status such as \"503\", or a gRPC status: cancelled, deadline-exceeded, \
                             resource-exhausted, internal, unavailable)"
                        ),
                    );
                    continue;
                }
            },
        };
        if !out.contains(&cond) {
            out.push(cond);
        }
    }
    out
}

fn ejection(v: &mut Walker, e: &Value) -> Ejection {
    let mut out = Ejection::default();
    let Some(e) = v.object(e, "spec.ejection") else {
        return out;
    };
    v.keys(
        e,
        "spec.ejection",
        &["consecutiveFailures", "baseTime", "maxTime"],
    );
    if let Some(n) = v.uint(e, "consecutiveFailures", "spec.ejection", 1, 1000) {
        out.consecutive_failures = n as u32;
    }
    // On the wire 0 means the default: a zero time would change meaning on its way.
    for (key, slot) in [
        ("baseTime", &mut out.base_time),
        ("maxTime", &mut out.max_time),
    ] {
        match v.duration(e, key, "spec.ejection") {
            Some(d) if d.is_zero() => v.err(
                &format!("spec.ejection.{key}"),
                "must be more than 0 (e.g. 1s)",
            ),
            Some(d) => *slot = d,
            None => {}
        }
    }
    if out.base_time > out.max_time {
        v.err(
            "spec.ejection",
            format!(
                "baseTime {:?} is larger than maxTime {:?}",
                out.base_time, out.max_time
            ),
        );
    }
    out
}

fn tls(v: &mut Walker, t: &Value) -> Option<Tls> {
    let t = v.object(t, "spec.tls")?;
    v.keys(t, "spec.tls", &["mode", "serverIdentity"]);
    let mode = match v.string(t, "mode", "spec.tls").as_deref() {
        None | Some("mutual") => TlsMode::Mutual,
        Some("disabled") => TlsMode::Disabled,
        Some(other) => {
            v.err(
                "spec.tls.mode",
                format!("{other:?} is not one of mutual, disabled"),
            );
            TlsMode::Mutual
        }
    };
    let server_identity = v.string(t, "serverIdentity", "spec.tls");
    if let Some(id) = &server_identity {
        v.spiffe_id(id, "spec.tls.serverIdentity");
    }
    Some(Tls {
        mode,
        server_identity,
    })
}

fn server(v: &mut Walker, spec: &Value, name: String, namespace: String) -> Option<ServerPolicy> {
    let spec = v.object(spec, "spec")?;
    v.keys(
        spec,
        "spec",
        &["selector", "port", "mtls", "allow", "opaquePorts"],
    );
    let mut selector = Selector::default();
    if let Some(s) = spec.get("selector")
        && let Some(s) = v.object(s, "spec.selector")
    {
        v.keys(s, "spec.selector", &["serviceAccount"]);
        selector.service_account = v.string(s, "serviceAccount", "spec.selector");
    }
    let mtls = match v.string(spec, "mtls", "spec").as_deref() {
        None | Some("strict") => Mtls::Strict,
        Some("permissive") => Mtls::Permissive,
        Some(other) => {
            v.err(
                "spec.mtls",
                format!("{other:?} is not one of strict, permissive"),
            );
            Mtls::Strict
        }
    };
    let mut allow = Vec::new();
    match spec.get("allow") {
        None => {}
        Some(Value::Array(rules)) => {
            for (i, rule) in rules.iter().enumerate() {
                let path = format!("spec.allow[{i}]");
                let Some(rule) = v.object(rule, &path) else {
                    continue;
                };
                v.keys(rule, &path, &["identities"]);
                let ids = v.strings(rule, "identities", &path);
                for (j, id) in ids.iter().enumerate() {
                    v.spiffe_id(id, &format!("{path}.identities[{j}]"));
                }
                allow.push(Allow { identities: ids });
            }
        }
        Some(other) => v.err(
            "spec.allow",
            format!("{other} is not a list of {{identities: [...]}}"),
        ),
    }
    let opaque_ports = match spec.get("opaquePorts") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, p)| v.port_value(p, &format!("spec.opaquePorts[{i}]")))
            .collect(),
        Some(other) => {
            v.err(
                "spec.opaquePorts",
                format!("{other} is not a list of ports"),
            );
            Vec::new()
        }
    };
    Some(ServerPolicy {
        name,
        namespace,
        selector,
        port: v.port(spec, "port", "spec"),
        mtls,
        allow,
        opaque_ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: default}
spec:
  destination:
    host: reviews.default.svc.cluster.local
    port: 9080
    addresses: ["10.96.0.12:9080"]
    endpoints: ["10.1.0.5:9080", "10.1.0.6:9080"]
  protocol: auto
  timeout: 2s
  retries:
    maxRetries: 2
    on: [connect-failure, refused-stream, reset, gateway-error, "503", unavailable]
    perTryTimeout: 500ms
    backoff: {base: 25ms, max: 250ms}
    budget: {percent: 20, minPerSecond: 10}
  tls: {mode: mutual, serverIdentity: spiffe://cluster.local/ns/default/sa/reviews}
---
apiVersion: trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: default}
spec:
  selector: {serviceAccount: reviews}
  port: 9080
  mtls: strict
  allow:
    - identities: ["spiffe://cluster.local/ns/default/sa/productpage"]
"#;

    #[test]
    fn the_design_example_parses() {
        let set = PolicySet::parse(EXAMPLE).unwrap();
        let t = &set.traffic[0];
        assert_eq!(t.destination.endpoints.len(), 2);
        assert_eq!(t.timeout, Some(Duration::from_secs(2)));
        assert_eq!(t.retries.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(
            t.retries.on,
            [
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Reset,
                RetryOn::GatewayError,
                RetryOn::Status(503),
                RetryOn::Grpc(GrpcCode::Unavailable)
            ]
        );
        assert_eq!(set.server[0].allow[0].identities.len(), 1);
        assert_eq!(set.server[0].mtls, Mtls::Strict);
    }

    #[test]
    fn absent_fields_take_documented_defaults() {
        let set = PolicySet::parse(
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: a}\nspec: {destination: {host: a}}\n",
        )
        .unwrap();
        let t = &set.traffic[0];
        assert_eq!(t.namespace, "default");
        assert_eq!(t.retries, Retries::default());
        assert_eq!(t.timeout, None);
        assert_eq!(t.ejection, Ejection::default());
    }

    #[test]
    fn every_error_is_named_by_document_and_field_path() {
        let bad = r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  destination: {host: reviews, port: 70000, endpoints: ["10.1.0.5"]}
  timeout: 2
  retries:
    maxRetry: 3
    perTryTimeout: 5x
    on: [connect-failure, "999", teapot]
    budget: {percent: 150}
---
apiVersion: trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: Bad_Name}
spec: {mtls: sometimes}
"#;
        let errors = PolicySet::parse(bad).unwrap_err().0;
        let expected = [
            "document 1 (TrafficPolicy default/reviews): spec.destination.port: 70000 is not a port (1-65535)",
            "document 1 (TrafficPolicy default/reviews): spec.destination.endpoints[0]: \"10.1.0.5\" is not ip:port",
            "document 1 (TrafficPolicy default/reviews): spec.timeout: 2 is not a duration: write a unit",
            "document 1 (TrafficPolicy default/reviews): spec.retries.maxRetry: unknown field (did you mean maxRetries?)",
            "document 1 (TrafficPolicy default/reviews): spec.retries.perTryTimeout: \"5x\" is not a duration",
            "document 1 (TrafficPolicy default/reviews): spec.retries.on[1]: 999 is not an HTTP status",
            "document 1 (TrafficPolicy default/reviews): spec.retries.on[2]: \"teapot\" is not a retry condition",
            "document 1 (TrafficPolicy default/reviews): spec.retries.budget.percent: 150 is not a number from 0 to 100",
            "document 2: metadata.name: \"Bad_Name\" is not a valid name",
            "document 2: spec.mtls: \"sometimes\" is not one of strict, permissive",
        ];
        for e in expected {
            assert!(
                errors.iter().any(|got| got.starts_with(e)),
                "missing {e:?} in\n{}",
                errors.join("\n")
            );
        }
        assert_eq!(errors.len(), expected.len(), "{}", errors.join("\n"));
    }

    #[test]
    fn structural_problems_are_reported() {
        let e = PolicySet::parse("kind: Gateway\n").unwrap_err().0;
        assert!(e.iter().any(|e| e.contains("apiVersion: is required")));
        assert!(
            e.iter()
                .any(|e| e.contains("\"Gateway\" is not a policy kind"))
        );
        let e = PolicySet::parse("a: [unclosed\n").unwrap_err().0;
        assert!(e[0].starts_with("not valid YAML"), "{e:?}");
        let twice = format!("{EXAMPLE}\n---\n{}", EXAMPLE.split("---").next().unwrap());
        let e = PolicySet::parse(&twice).unwrap_err().0;
        assert!(
            e[0].contains("a TrafficPolicy named default/reviews appears twice"),
            "{e:?}"
        );
    }

    #[test]
    fn values_the_wire_cannot_carry_are_rejected() {
        // Found by the `policy` fuzz target's round trip (fuzz/corpus/policy/roundtrip-*): each
        // was accepted, then changed on its way to the proxies and in the control plane's state.
        let doc = |spec: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: a}}\nspec: {spec}\n"
            )
        };
        for (spec, expected) in [
            (
                "{timeout: 1500us}",
                "spec.timeout: \"1500us\" is finer than a millisecond",
            ),
            (
                "{idleTimeout: 18446744073709551615s}",
                "spec.idleTimeout: \"18446744073709551615s\" is longer than the maximum, 365 days",
            ),
            ("{retries: {\"on\": []}}", "spec.retries.on: is empty"),
            (
                "{ejection: {baseTime: 0, maxTime: 30s}}",
                "spec.ejection.baseTime: must be more than 0",
            ),
        ] {
            let errors = PolicySet::parse(&doc(spec)).unwrap_err().0;
            assert!(
                errors.len() == 1 && errors[0].contains(expected),
                "{spec}: {errors:?}"
            );
        }
        let set = PolicySet::parse(&doc(
            "{timeout: 365d, retries: {backoff: {base: 0, max: 1ms}}}",
        ))
        .unwrap();
        assert_eq!(
            set.traffic[0].timeout,
            Some(Duration::from_secs(365 * 24 * 3600))
        );
    }

    #[test]
    fn zero_disables_a_timeout() {
        let set = PolicySet::parse(
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: a}\nspec: {timeout: 0, idleTimeout: 0s}\n",
        )
        .unwrap();
        assert_eq!(
            (set.traffic[0].timeout, set.traffic[0].idle_timeout),
            (None, None)
        );
    }
}
