//! App probes, rewritten to the proxy's admin port so kubelet's probes still work when the app's
//! ports accept only mutual TLS: the proxy forwards them to the app on loopback.
//!
//! - `httpGet {port, path}` → `httpGet {port: 4191, path: /probe/http/<port><path>}` (headers kept);
//! - `tcpSocket {port}` → `httpGet {port: 4191, path: /probe/tcp/<port>}`;
//! - `grpc {port, service}` → `httpGet {port: 4191, path: /probe/grpc/<port>?service=<service>}`.
//!
//! Named ports are resolved against the container's ports; timings and thresholds are kept.
//! `httpGet` with `scheme: HTTPS` is left alone (the proxy probes the app in plaintext).

use serde_json::{Map, Value, json};

use super::InjectError;
use super::containers::ADMIN_PORT;

pub const PROBES: [&str; 3] = ["livenessProbe", "readinessProbe", "startupProbe"];

/// The probe as the proxy serves it, or `None` when it stays as it is.
pub fn rewrite(
    probe: &Value,
    container: &Value,
    where_: &str,
) -> Result<Option<Value>, InjectError> {
    let Some(obj) = probe.as_object() else {
        return Ok(None);
    };
    let (path, headers) = if let Some(get) = obj.get("httpGet") {
        if get
            .get("scheme")
            .and_then(Value::as_str)
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
        {
            return Ok(None);
        }
        let port = port_of(get.get("port"), container, where_)?;
        let app_path = get.get("path").and_then(Value::as_str).unwrap_or("/");
        let app_path = if app_path.starts_with('/') {
            app_path.to_string()
        } else {
            format!("/{app_path}")
        };
        (
            format!("/probe/http/{port}{app_path}"),
            get.get("httpHeaders").cloned(),
        )
    } else if let Some(tcp) = obj.get("tcpSocket") {
        let port = port_of(tcp.get("port"), container, where_)?;
        (format!("/probe/tcp/{port}"), None)
    } else if let Some(grpc) = obj.get("grpc") {
        let port = port_of(grpc.get("port"), container, where_)?;
        match grpc
            .get("service")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            Some(service) => (
                format!("/probe/grpc/{port}?service={}", encode_query(service)),
                None,
            ),
            None => (format!("/probe/grpc/{port}"), None),
        }
    } else {
        // exec probes run inside the app's container: nothing to rewrite.
        return Ok(None);
    };
    let mut out: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "httpGet" | "tcpSocket" | "grpc"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut get = json!({"path": path, "port": ADMIN_PORT, "scheme": "HTTP"});
    if let Some(h) = headers {
        get["httpHeaders"] = h;
    }
    out.insert("httpGet".into(), get);
    Ok(Some(Value::Object(out)))
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port_of(port: Option<&Value>, container: &Value, where_: &str) -> Result<u16, InjectError> {
    let bad = |why: String| InjectError::Probe(format!("{where_}: {why}"));
    match port {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("port {n} is not 1-65535"))),
        Some(Value::String(name)) => {
            if let Ok(p) = name.parse::<u16>() {
                return Ok(p);
            }
            container
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort")?.as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "named port {name:?} is not one of the container's ports"
                    ))
                })
        }
        _ => Err(bad("no port".into())),
    }
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Value {
        json!({"name": "app", "ports": [{"name": "http", "containerPort": 8080}]})
    }

    #[test]
    fn http_tcp_and_grpc_probes_go_to_the_admin_port() {
        let p = json!({"httpGet": {"path": "/healthz", "port": "http",
            "httpHeaders": [{"name": "X", "value": "1"}]}, "periodSeconds": 5});
        let r = rewrite(&p, &container(), "app.livenessProbe")
            .unwrap()
            .unwrap();
        assert_eq!(r["httpGet"]["path"], "/probe/http/8080/healthz");
        assert_eq!(r["httpGet"]["port"], 4191);
        assert_eq!(r["httpGet"]["httpHeaders"][0]["name"], "X");
        assert_eq!(r["periodSeconds"], 5);
        let r = rewrite(&json!({"tcpSocket": {"port": 5432}}), &container(), "x")
            .unwrap()
            .unwrap();
        assert_eq!(r["httpGet"]["path"], "/probe/tcp/5432");
        assert!(r.get("tcpSocket").is_none());
        let r = rewrite(
            &json!({"grpc": {"port": 50051, "service": "a b"}}),
            &container(),
            "x",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r["httpGet"]["path"], "/probe/grpc/50051?service=a%20b");
    }

    #[test]
    fn exec_and_https_probes_stay_and_unknown_ports_are_errors() {
        let exec = json!({"exec": {"command": ["true"]}});
        assert_eq!(rewrite(&exec, &container(), "x").unwrap(), None);
        let https = json!({"httpGet": {"port": 8443, "scheme": "HTTPS"}});
        assert_eq!(rewrite(&https, &container(), "x").unwrap(), None);
        let err = rewrite(
            &json!({"httpGet": {"port": "metrics"}}),
            &container(),
            "app.readinessProbe",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("app.readinessProbe") && err.contains("metrics"),
            "{err}"
        );
    }
}
