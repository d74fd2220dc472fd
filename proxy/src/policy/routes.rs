//! Which TrafficPolicy applies to an outbound call, and the runtime state that goes with it.
//!
//! Precedence (../shared/DESIGN.md "Scoping and precedence"): a policy whose `addresses` hold the
//! original destination beats one whose `host` matches the HTTP authority, which beats a
//! namespace default (a policy with neither host nor addresses, in the client's namespace), which
//! beats the built-in default. A policy in namespace N applies to clients in N, and to every
//! client when its host is a service in N.
//!
//! Host names are compared fully qualified: `reviews`, `reviews.default`, `reviews.default.svc`
//! and `reviews.default.svc.cluster.local` are the same service for a client in `default`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use trellis_proto::policy::{Destination, Ejection, Protocol, Retries, TlsMode, TrafficPolicy};

use crate::balance::Balancer;
use crate::retry::Budget;

/// Everything an outbound call needs from its policy.
pub struct Route {
    /// `namespace/name` of the policy, or `default` for the built-in default.
    pub name: String,
    pub policy: TrafficPolicy,
    pub budget: Arc<Budget>,
    /// Present when the policy lists endpoints.
    pub balancer: Option<Balancer>,
    /// The built-in default: its retry budget is kept per original destination (see
    /// `PolicyStore::budget_for`), so one failing destination cannot spend another's retries.
    pub builtin: bool,
    /// The identity the server must prove when the policy asks for mutual TLS
    /// (`tls.serverIdentity`, or any mesh identity when it names none); `None`: plaintext.
    pub mtls_identity: Option<Arc<str>>,
    /// The `destination` metrics label: the policy's host (and port), or its name when it is
    /// keyed by address; `None` for the defaults, whose calls are labelled by address.
    pub destination: Option<Arc<str>>,
}

impl Route {
    /// The route of a TrafficPolicy, with its retry budget and (when it lists endpoints) its
    /// balancer.
    pub fn new(policy: TrafficPolicy, budget: Arc<Budget>, balancer: Option<Balancer>) -> Self {
        let name = format!("{}/{}", policy.namespace, policy.name);
        Self {
            destination: Self::destination_of(&name, &policy),
            mtls_identity: Self::mtls_identity_of(&policy),
            name,
            policy,
            budget,
            balancer,
            builtin: false,
        }
    }

    /// The `destination` label a policy's calls carry (see [`Route::destination`]).
    fn destination_of(name: &str, policy: &TrafficPolicy) -> Option<Arc<str>> {
        let d = &policy.destination;
        match (&d.host, d.port) {
            (Some(host), Some(port)) => Some(Arc::from(format!("{host}:{port}"))),
            (Some(host), None) => Some(Arc::from(host.as_str())),
            (None, _) if !d.addresses.is_empty() => Some(Arc::from(name)),
            _ => None,
        }
    }

    /// The mutual TLS identity a policy asks for.
    fn mtls_identity_of(policy: &TrafficPolicy) -> Option<Arc<str>> {
        let tls = policy.tls.as_ref().filter(|t| t.mode == TlsMode::Mutual)?;
        Some(Arc::from(
            tls.server_identity
                .as_deref()
                .unwrap_or(crate::transport::ANY_MESH_IDENTITY),
        ))
    }
}

impl Route {
    pub fn builtin_default(budget: Arc<Budget>) -> Self {
        Self {
            name: "default".into(),
            policy: TrafficPolicy {
                name: "default".into(),
                namespace: String::new(),
                destination: Destination::default(),
                protocol: Protocol::Auto,
                timeout: None,
                idle_timeout: None,
                retries: Retries::default(),
                ejection: Ejection::default(),
                tls: None,
            },
            budget,
            balancer: None,
            builtin: true,
            mtls_identity: None,
            destination: None,
        }
    }
}

/// Who the client is, for scoping and short names.
#[derive(Debug, Clone)]
pub struct ClientScope {
    pub namespace: String,
    pub cluster_domain: String,
}

/// The policies for one qualified host, as (port, route) in policy order: the first whose port
/// matches wins.
type HostRoutes = Vec<(Option<u16>, Arc<Route>)>;

/// The compiled lookup tables of one policy version.
pub struct RouteTable {
    by_address: HashMap<SocketAddr, Arc<Route>>,
    by_host: HashMap<String, HostRoutes>,
    namespace_default: Option<Arc<Route>>,
    default: Arc<Route>,
}

impl RouteTable {
    pub fn new(routes: Vec<Arc<Route>>, default: Arc<Route>, scope: &ClientScope) -> Self {
        let mut by_address = HashMap::new();
        let mut by_host: HashMap<String, HostRoutes> = HashMap::new();
        let mut namespace_default = None;
        for route in routes {
            let p = &route.policy;
            let dest = &p.destination;
            let host = dest
                .host
                .as_deref()
                .map(|h| qualify(h, &p.namespace, &scope.cluster_domain).into_owned());
            let in_scope = p.namespace == scope.namespace
                || host.as_deref().is_some_and(|h| {
                    service_namespace(h, &scope.cluster_domain) == Some(p.namespace.as_str())
                });
            if !in_scope {
                continue;
            }
            for addr in &dest.addresses {
                by_address.entry(*addr).or_insert_with(|| route.clone());
            }
            if let Some(host) = host {
                by_host
                    .entry(host)
                    .or_default()
                    .push((dest.port, route.clone()));
            }
            if dest.host.is_none() && dest.addresses.is_empty() && p.namespace == scope.namespace {
                namespace_default.get_or_insert(route.clone());
            }
        }
        Self {
            by_address,
            by_host,
            namespace_default,
            default,
        }
    }

    /// The route for a call to `orig_dst` with HTTP `authority` (none for opaque TCP). When
    /// discovery resolved the original destination to a service (`service`,
    /// `name.ns.svc.<domain>:port`), a policy for the service's host applies even when the
    /// client used the bare ClusterIP — after an address match and the authority it sent.
    pub fn route(
        &self,
        authority: Option<&str>,
        orig_dst: SocketAddr,
        scope: &ClientScope,
        service: Option<&str>,
    ) -> &Arc<Route> {
        if let Some(route) = self.by_address.get(&orig_dst) {
            return route;
        }
        if !self.by_host.is_empty() {
            for authority in [authority, service].into_iter().flatten() {
                let (host, port) = split_authority(authority);
                let port = port.unwrap_or(orig_dst.port());
                let host = qualify(host, &scope.namespace, &scope.cluster_domain);
                if let Some((_, route)) = self
                    .by_host
                    .get(host.as_ref())
                    .and_then(|routes| routes.iter().find(|(p, _)| p.is_none_or(|p| p == port)))
                {
                    return route;
                }
            }
        }
        self.namespace_default.as_ref().unwrap_or(&self.default)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_address
            .values()
            .chain(self.by_host.values().flatten().map(|(_, r)| r))
            .chain(self.namespace_default.iter())
    }
}

/// `host[:port]` or `[v6]:port` → (host, port).
pub(crate) fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (authority, None),
    }
}

/// Completes a Kubernetes short name against `namespace` and `cluster_domain`; a name already
/// complete and lower-case (or an IP address) comes back borrowed, without an allocation.
pub fn qualify<'a>(
    host: &'a str,
    namespace: &str,
    cluster_domain: &str,
) -> std::borrow::Cow<'a, str> {
    let canonical = !host.ends_with('.') && !host.bytes().any(|b| b.is_ascii_uppercase());
    if canonical
        && (host.ends_with(cluster_domain)
            && host[..host.len() - cluster_domain.len()].ends_with(".svc.")
            || host.parse::<std::net::IpAddr>().is_ok())
    {
        return std::borrow::Cow::Borrowed(host);
    }
    std::borrow::Cow::Owned(qualify_owned(host, namespace, cluster_domain))
}

fn qualify_owned(host: &str, namespace: &str, cluster_domain: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || host.ends_with(&format!(".svc.{cluster_domain}"))
    {
        return host;
    }
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.{cluster_domain}"),
        1 => format!("{host}.svc.{cluster_domain}"),
        _ if host.ends_with(".svc") => format!("{host}.{cluster_domain}"),
        _ => host,
    }
}

/// `name.ns.svc.<domain>` → `ns`.
fn service_namespace<'a>(fqdn: &'a str, cluster_domain: &str) -> Option<&'a str> {
    let rest = fqdn.strip_suffix(&format!(".svc.{cluster_domain}"))?;
    rest.rsplit_once('.').map(|(_, ns)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::policy::PolicySet;

    fn scope() -> ClientScope {
        ClientScope {
            namespace: "default".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    fn table(yaml: &str) -> RouteTable {
        let set = PolicySet::parse(yaml).unwrap();
        let routes = set
            .traffic
            .into_iter()
            .map(|p| Arc::new(Route::new(p, Arc::default(), None)))
            .collect();
        RouteTable::new(
            routes,
            Arc::new(Route::builtin_default(Arc::default())),
            &scope(),
        )
    }

    const POLICIES: &str = "
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: by-host}
spec: {destination: {host: reviews.default.svc.cluster.local, port: 9080}}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: by-address}
spec: {destination: {host: ratings, addresses: [\"10.96.0.12:9080\"]}}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ns-default}
spec: {timeout: 5s}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: other-ns-client-only, namespace: shop}
spec: {destination: {host: payments.default}}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: cart, namespace: shop}
spec: {destination: {host: cart}}
";

    #[test]
    fn short_names_are_qualified_like_kubernetes_dns() {
        assert_eq!(
            qualify("reviews", "default", "cluster.local"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            qualify("reviews.default", "x", "cluster.local"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            qualify("reviews.default.svc", "x", "cluster.local"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            qualify("Reviews.Default.svc.cluster.local.", "x", "cluster.local"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(qualify("10.0.0.1", "x", "cluster.local"), "10.0.0.1");
    }

    #[test]
    fn address_beats_host_beats_namespace_default() {
        let t = table(POLICIES);
        let s = scope();
        let vip: SocketAddr = "10.96.0.12:9080".parse().unwrap();
        let pod: SocketAddr = "10.1.0.5:9080".parse().unwrap();
        assert_eq!(
            t.route(Some("reviews:9080"), vip, &s, None).name,
            "default/by-address"
        );
        assert_eq!(
            t.route(Some("reviews:9080"), pod, &s, None).name,
            "default/by-host"
        );
        assert_eq!(
            t.route(Some("reviews.default:9080"), pod, &s, None).name,
            "default/by-host"
        );
        assert_eq!(
            t.route(Some("reviews"), pod, &s, None).name,
            "default/by-host",
            "port from the original destination"
        );
        assert_eq!(
            t.route(Some("reviews:8080"), pod, &s, None).name,
            "default/ns-default",
            "port must match"
        );
        assert_eq!(t.route(None, pod, &s, None).name, "default/ns-default");
    }

    #[test]
    fn policies_apply_to_their_namespace_and_to_everyone_for_their_own_hosts() {
        let t = table(POLICIES);
        let s = scope();
        let pod: SocketAddr = "10.1.0.9:80".parse().unwrap();
        // shop's policy for a host in default is for shop's clients only.
        assert_eq!(
            t.route(Some("payments.default"), pod, &s, None).name,
            "default/ns-default"
        );
        // shop's policy for its own service applies to clients everywhere.
        assert_eq!(t.route(Some("cart.shop"), pod, &s, None).name, "shop/cart");
    }
}
