//! SPIFFE IDs of workloads (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) and
//! the identity patterns ServerPolicies allow: an exact ID, `spiffe://<td>/ns/<ns>/*` (every
//! service account of a namespace), or `*` (every mesh identity).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{id:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}"
)]
pub struct ParseError {
    pub id: String,
    pub reason: &'static str,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// `ns/sa`, the short form operators type (`token create --identity ns/sa`).
    pub fn short(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }

    /// Whether an `allow` entry admits this identity.
    pub fn matches(&self, pattern: &str) -> bool {
        if pattern == "*" {
            return true;
        }
        if let Some(prefix) = pattern.strip_suffix("/*") {
            // spiffe://td/ns/NS/* or spiffe://td/ns/NS/sa/*
            let prefix = prefix.strip_suffix("/sa").unwrap_or(prefix);
            return prefix == format!("spiffe://{}/ns/{}", self.trust_domain, self.namespace);
        }
        pattern == self.to_string()
    }
}

/// Checks a name segment (trust domain, namespace, service account): DNS-label-ish characters.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl FromStr for SpiffeId {
    type Err = ParseError;

    fn from_str(id: &str) -> Result<Self, ParseError> {
        let err = |reason| ParseError {
            id: id.to_string(),
            reason,
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("it has no path"))?;
        if !valid_segment(td) {
            return Err(err(
                "the trust domain must be lowercase letters, digits, '-', '.', '_'",
            ));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if valid_segment(ns) && valid_segment(sa) => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(err("the path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.short(), "default/web");
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://Cluster/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn allow_patterns() {
        let id = SpiffeId::new("cluster.local", "shop", "cart");
        assert!(id.matches("spiffe://cluster.local/ns/shop/sa/cart"));
        assert!(id.matches("spiffe://cluster.local/ns/shop/*"));
        assert!(id.matches("spiffe://cluster.local/ns/shop/sa/*"));
        assert!(id.matches("*"));
        assert!(!id.matches("spiffe://cluster.local/ns/shop/sa/web"));
        assert!(!id.matches("spiffe://cluster.local/ns/sho/*"));
        assert!(!id.matches("spiffe://other.td/ns/shop/*"));
    }
}
