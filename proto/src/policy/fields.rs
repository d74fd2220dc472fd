//! Reading untyped YAML values field by field, collecting an error (with its field path) for
//! everything that is missing, mistyped, out of range or unknown.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Map, Value};

/// The longest duration a policy may give.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Collects errors as it reads fields.
#[derive(Default)]
pub(super) struct Walker {
    pub errors: Vec<String>,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Walker {
    pub(super) fn err(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.errors.push(format!("{path}: {msg}"));
    }

    pub(super) fn object<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
    ) -> Option<&'a Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            other => {
                let path = if path.is_empty() { "document" } else { path };
                self.err(path, format!("expected a mapping, found {other}"));
                None
            }
        }
    }

    pub(super) fn keys(&mut self, m: &Map<String, Value>, path: &str, allowed: &[&str]) {
        for key in m.keys() {
            if !allowed.contains(&key.as_str()) {
                let hint = allowed
                    .iter()
                    .map(|a| {
                        let (k, a_low) = (key.to_lowercase(), a.to_lowercase());
                        let prefix =
                            k.len() >= 3 && (a_low.starts_with(&k) || k.starts_with(&a_low));
                        (if prefix { 0 } else { edit_distance(&k, &a_low) }, a)
                    })
                    .filter(|(d, _)| *d <= if key.len() >= 8 { 3 } else { 2 })
                    .min()
                    .map(|(_, a)| format!(" (did you mean {a}?)"))
                    .unwrap_or_else(|| format!(" (expected one of: {})", allowed.join(", ")));
                self.err(&join(path, key), format!("unknown field{hint}"));
            }
        }
    }

    pub(super) fn string(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<String> {
        match m.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(&join(path, key), format!("{other} is not a string"));
                None
            }
        }
    }

    pub(super) fn strings(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Vec<String> {
        match m.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::String(s) => Some(s.clone()),
                    other => {
                        self.err(
                            &format!("{}[{i}]", join(path, key)),
                            format!("{other} is not a string"),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.err(&join(path, key), format!("{other} is not a list"));
                Vec::new()
            }
        }
    }

    pub(super) fn uint(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        match m.get(key)? {
            Value::Number(n) if n.as_u64().is_some_and(|n| (min..=max).contains(&n)) => n.as_u64(),
            other => {
                self.err(
                    &join(path, key),
                    format!("{other} is not a whole number from {min} to {max}"),
                );
                None
            }
        }
    }

    pub(super) fn port(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<u16> {
        m.get(key)
            .and_then(|p| self.port_value(p, &join(path, key)))
    }

    pub(super) fn port_value(&mut self, p: &Value, path: &str) -> Option<u16> {
        match p.as_u64() {
            Some(n) if (1..=65535).contains(&n) => Some(n as u16),
            _ => {
                self.err(path, format!("{p} is not a port (1-65535)"));
                None
            }
        }
    }

    pub(super) fn addrs(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for (i, s) in self.strings(m, key, path).into_iter().enumerate() {
            match s.parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 => out.push(a),
                _ => self.err(
                    &format!("{}[{i}]", join(path, key)),
                    format!("{s:?} is not ip:port (e.g. 10.1.0.5:9080 or [fd00::5]:9080)"),
                ),
            }
        }
        out
    }

    /// A duration (`500ms`, `2s`, or `0`) in whole milliseconds — the wire carries milliseconds,
    /// so a finer one would change on its way to the proxies — and at most [`MAX_DURATION`], so
    /// that `now + duration` always fits a deadline.
    pub(super) fn duration(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<Duration> {
        let value = m.get(key)?;
        match value {
            Value::String(s) => match humantime::parse_duration(s) {
                Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => {
                    self.err(
                        &join(path, key),
                        format!("{s:?} is finer than a millisecond: write whole milliseconds"),
                    );
                    None
                }
                Ok(d) if d > MAX_DURATION => {
                    self.err(
                        &join(path, key),
                        format!("{s:?} is longer than the maximum, 365 days"),
                    );
                    None
                }
                Ok(d) => Some(d),
                Err(_) => {
                    self.err(
                        &join(path, key),
                        format!("{s:?} is not a duration (e.g. 500ms, 2s, 1m)"),
                    );
                    None
                }
            },
            Value::Number(n) if n.as_u64() == Some(0) => Some(Duration::ZERO),
            other => {
                self.err(
                    &join(path, key),
                    format!("{other} is not a duration: write a unit, e.g. 500ms or 2s"),
                );
                None
            }
        }
    }

    /// A timeout: a duration, where 0 means "no timeout".
    pub(super) fn timeout(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<Duration> {
        self.duration(m, key, path).filter(|d| !d.is_zero())
    }

    pub(super) fn dns_name(&mut self, s: &str, path: &str) -> bool {
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.']);
        if !ok {
            self.err(
                path,
                format!("{s:?} is not a valid name (lower case letters, digits, '-' and '.')"),
            );
        }
        ok
    }

    pub(super) fn spiffe_id(&mut self, id: &str, path: &str) {
        let ok = id.strip_prefix("spiffe://").is_some_and(|rest| {
            rest.split_once('/')
                .is_some_and(|(td, p)| !td.is_empty() && !p.is_empty())
        });
        if !ok {
            self.err(
                path,
                format!("{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)"),
            );
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
