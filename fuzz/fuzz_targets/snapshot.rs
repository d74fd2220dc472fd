//! Fuzz target `snapshot`: what the proxy does with the control plane's messages.
//!
//! The first byte picks the message, the rest is its protobuf encoding:
//! - even: a `ConfigService` `Snapshot`, decoded with prost and applied the way the proxy's
//!   control-plane client applies it (`policy::control::apply_snapshot`: validation through the
//!   wire validator, then the policy store). A rejected snapshot (the NACK) must leave the
//!   policy in force untouched and name what is wrong; an applied one is then used as the data
//!   path uses it: route lookups (with an arbitrary HTTP authority), mutual-TLS identities,
//!   endpoint balancing and ejection, retry backoff and budgets, inbound authorization, and
//!   `/config`. Every duration in force must fit in a deadline (`Instant::now() + d`, which the
//!   request path computes and which panics on overflow).
//! - odd: a `DiscoveryService` `DiscoveryUpdate`, applied to subscribed destinations
//!   (`Discovery::apply`): all of it, or — with an error naming the destination — none of it.

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio::runtime::Runtime;
use trellis_identity::SpiffeId;
use trellis_proto::pb;
use trellis_proto::policy::PolicySet;
use trellis_proxy::discovery::Discovery;
use trellis_proxy::inbound;
use trellis_proxy::policy::PolicyStore;
use trellis_proxy::policy::control::apply_snapshot;
use trellis_proxy::policy::routes::ClientScope;
use trellis_proxy::retry;

/// The policy in force before the fuzzed snapshot arrives.
const BASELINE: &str = "apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  destination: {host: api, port: 8080, endpoints: [\"10.1.0.5:8080\"]}
  timeout: 2s
";

fuzz_target!(|data: &[u8]| {
    let Some((&which, message)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(snapshot) = pb::Snapshot::decode(message) {
            config_snapshot(&snapshot);
        }
    } else if let Ok(update) = pb::DiscoveryUpdate::decode(message) {
        discovery_update(&update);
    }
});

fn scope() -> ClientScope {
    ClientScope {
        namespace: "shop".into(),
        cluster_domain: "cluster.local".into(),
    }
}

fn config_snapshot(snapshot: &pb::Snapshot) {
    let store = PolicyStore::new(scope(), Some("web".into()));
    let baseline = PolicySet::parse(BASELINE).expect("the baseline policy is valid");
    store.apply(baseline.clone(), "baseline".into(), "test".into());

    let (traffic, server) = match apply_snapshot(&store, snapshot, "fuzz".into()) {
        Ok(counts) => counts,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a NACK without a reason");
            for e in &errors.0 {
                assert!(
                    e.starts_with("document "),
                    "a NACK naming no document: {e:?}"
                );
            }
            let current = store.current();
            assert_eq!(
                current.version, "baseline",
                "a rejected snapshot changed the version"
            );
            assert_eq!(
                current.set, baseline,
                "a rejected snapshot changed the policy"
            );
            return;
        }
    };
    let current = store.current();
    assert_eq!(current.version, snapshot.version);
    assert_eq!(
        (current.set.traffic.len(), current.set.server.len()),
        (traffic, server)
    );
    assert_eq!(
        (traffic, server),
        (snapshot.traffic.len(), snapshot.server.len()),
        "an applied snapshot dropped policies"
    );
    for m in &snapshot.meshed {
        if let Ok(ip) = m.ip.parse() {
            assert!(current.meshed.contains_key(&ip), "meshed pod {} lost", m.ip);
        }
    }

    let scope = scope();
    let now = Instant::now();
    let fits = |what: &str, d: Option<Duration>| {
        if let Some(d) = d {
            assert!(
                now.checked_add(d).is_some(),
                "{what} {d:?} is in force but overflows a deadline (Instant::now() + {what})"
            );
        }
    };
    let peer = SpiffeId::new("cluster.local", "shop", "web");
    for route in current.routes.all() {
        let p = &route.policy;
        fits("timeout", p.timeout);
        fits("idleTimeout", p.idle_timeout);
        fits("perTryTimeout", p.retries.per_try_timeout);
        fits("backoff.max", Some(p.retries.backoff.max));
        fits("ejection.maxTime", Some(p.ejection.max_time));

        let addrs: Vec<SocketAddr> = p
            .destination
            .addresses
            .iter()
            .chain(&p.destination.endpoints)
            .copied()
            .chain(["10.0.0.1:80".parse().expect("an address")])
            .take(8)
            .collect();
        for &addr in &addrs {
            let authority = p.destination.host.as_deref().or(Some(&snapshot.nonce));
            for found in [
                current.routes.route(None, addr, &scope, None),
                current.routes.route(authority, addr, &scope, None),
                current
                    .routes
                    .route(Some(&snapshot.nonce), addr, &scope, Some(&snapshot.version)),
            ] {
                let _ = current.mtls_identity(found, addr, true, None);
                let _ = store.budget_for(found, addr).try_withdraw();
            }
        }
        for retry_n in 1..=p.retries.max_retries.min(10) + 1 {
            let pause = retry::backoff(&p.retries.backoff, retry_n);
            assert!(pause <= p.retries.backoff.max.max(p.retries.backoff.base));
        }
        route.budget.record_request();
        let _ = route.budget.try_withdraw();
        if let Some(balancer) = &route.balancer {
            // Endpoint state is shared by every route that lists the endpoint (and a route is
            // reached by its address and its host): only an ejected endpoint may go unpicked.
            let Some(endpoint) = balancer.pick(&[]) else {
                assert!(
                    balancer
                        .endpoints()
                        .iter()
                        .all(|e| e.snapshot().2.is_some()),
                    "no endpoint picked while some are not ejected"
                );
                continue;
            };
            // Fail it until it is ejected (bounded: policies may ask for up to 1000 failures).
            for _ in 0..p.ejection.consecutive_failures.min(20) {
                let _ = endpoint.start().failed(&p.ejection);
            }
            endpoint.start().succeeded();
            let _ = balancer.pick(&[endpoint.addr]);
        }
    }
    for port in [0u16, 80, 8080, 65535] {
        let policy = inbound::policy_for(&current.inbound_servers, port);
        let _ = inbound::authorize(policy, Some(&peer));
        let _ = inbound::authorize(policy, None);
    }
    let config = store.config_json();
    assert_eq!(config["version"], serde_json::json!(snapshot.version));
}

fn discovery_update(update: &pb::DiscoveryUpdate) {
    let discovery = Discovery::new(Duration::ZERO);
    // Subscribe to what the update answers (as the proxy would have), and to one more address.
    let keys: Vec<SocketAddr> = update
        .destinations
        .iter()
        .map(|d| d.key.as_str())
        .chain(update.absent.iter().map(String::as_str))
        .chain(["10.96.0.1:80"])
        .filter_map(|k| k.parse().ok())
        .take(64)
        .collect();
    for &key in &keys {
        runtime().block_on(discovery.lookup(key));
    }
    let before = discovery.config_json();
    match discovery.apply(update) {
        Err(error) => {
            assert!(
                error.starts_with("destination "),
                "an error naming no destination: {error:?}"
            );
            assert_eq!(
                discovery.config_json(),
                before,
                "a rejected update changed destinations"
            );
        }
        Ok(n) => {
            assert_eq!(n, update.destinations.len() + update.absent.len());
            for (i, d) in update.destinations.iter().enumerate() {
                let key: SocketAddr = d.key.parse().expect("an applied key is ip:port");
                let overridden = update.destinations[i + 1..].iter().any(|e| e.key == d.key)
                    || update.absent.iter().any(|a| a.parse() == Ok(key));
                if overridden || !keys.contains(&key) {
                    continue;
                }
                let target = runtime()
                    .block_on(discovery.lookup(key))
                    .expect("a subscribed destination");
                let resolved = target.current().expect("an applied destination resolves");
                assert_eq!(resolved.version, d.version);
                assert_eq!(resolved.balancer.endpoints().len(), d.endpoints.len());
                for e in &d.endpoints {
                    let addr: SocketAddr = e.address.parse().expect("an applied endpoint");
                    if !e.identity.is_empty() {
                        assert!(resolved.identity(addr).is_some(), "identity of {addr} lost");
                    }
                }
                if let Some(endpoint) = resolved.balancer.pick(&[]) {
                    endpoint.start().succeeded();
                }
            }
            let _ = discovery.config_json();
        }
    }
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}
