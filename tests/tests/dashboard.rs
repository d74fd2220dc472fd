//! The Grafana dashboard (`deploy/grafana/trellis-dashboard.json`) asks only for metrics the proxy
//! and the control plane really expose: every `trellis_*` name in its queries is checked against
//! the families their registries encode (no root, no pods needed), so renaming a metric without
//! updating the dashboard fails here.

use std::collections::BTreeSet;

/// The metric families a registry's text exposition declares (`# TYPE name kind`), with the
/// sample names each kind produces.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some("#") || parts.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for suffix in suffixes {
            names.insert(format!("{name}{suffix}"));
        }
    }
    names
}

/// Every `trellis_…` token in the dashboard's query expressions.
fn referenced(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut exprs = Vec::new();
    collect_exprs(dashboard, &mut exprs);
    let mut names = BTreeSet::new();
    for expr in exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while let Some(at) = expr[i..].find("trellis_") {
            let start = i + at;
            let boundary = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = expr[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| start + n);
            if boundary {
                names.insert(expr[start..end].to_string());
            }
            i = end;
        }
    }
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// A proxy's metrics after one of every event it records.
fn proxy_after_traffic() -> trellis_proxy::metrics::Metrics {
    use std::sync::Arc;
    use trellis_proxy::metrics::{Direction, Metrics, RequestRecord};
    let m = Metrics::new();
    let destination: Arc<str> = Arc::from("10.0.0.2:80");
    let peer: Arc<str> = Arc::from("spiffe://cluster.local/ns/a/sa/b");
    m.request(&RequestRecord {
        direction: Direction::inbound,
        protocol: "http1",
        destination: &destination,
        status: 200,
        grpc_status: None,
        peer: Some(&peer),
        latency: std::time::Duration::from_millis(1),
        request_bytes: 10,
        response_bytes: 20,
    });
    m.error(Direction::outbound, "connect-refused");
    m.upstream_connect(Direction::outbound, "http1");
    m.retry("default/web", "connect-failure");
    m.retry_budget_exhausted("default/web");
    m.ejection("default/web", "10.0.0.2:80".parse().unwrap());
    m.policy_load(true, "1");
    m.handshake(Direction::inbound, "ok");
    m.identity(true, 1_800_000_000);
    let _ = m.span_counters();
    let _ = m.access_log_dropped();
    let mut conn = m.connection(Direction::inbound);
    m.detected(&mut conn, "http1");
    drop(conn);
    m
}

#[test]
fn the_dashboard_queries_only_metrics_that_exist() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/trellis-dashboard.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));

    // Families with labels appear once they have a series: record one of everything, as
    // traffic would.
    let mut exposition = proxy_after_traffic().encode();
    let control = trellis_control::admin::Metrics::default();
    control.proxy_connected(1);
    control.push();
    control.answer(true);
    control.answer(false);
    control.converged(std::time::Duration::from_millis(3));
    control.apply_error("invalid");
    control.certify("issued", "join-token");
    control.unauthorized("policy");
    exposition.push_str(&control.encode());
    let available = exposed(&exposition);

    let wanted = referenced(&dashboard);
    assert!(
        wanted.len() >= 20,
        "the dashboard should chart at least 20 metrics, found {wanted:?}"
    );
    let missing: Vec<&String> = wanted.difference(&available).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exposes: {missing:?}\nexposed: {available:?}"
    );
}
