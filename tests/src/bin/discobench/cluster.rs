//! The cluster the stand-in Kubernetes API server holds: N services spread over 10 namespaces
//! (ClusterIPs 10.96.x.y, one port 80 → 8080), E meshed pods each (10.244.x.y) and one
//! EndpointSlice per service, written directly as the EndpointSlice controller would leave them;
//! and the objects a rollout writes (new pods, the rolled service's slice step by step).

use std::cell::Cell;

use trellis_tests::harness::apiserver::objects::{endpoint_slice, pod, service};
use trellis_tests::harness::{FakeApiServer, ServicePort, SliceEndpoint};

use crate::Args;

pub(crate) const NAMESPACES: usize = 10;
pub(crate) const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// The services and pods the stand-in holds, and where the proxies look.
pub(crate) struct Cluster {
    pub(crate) services: Vec<Svc>,
    pods_per_service: usize,
    /// How many pod IPs were handed out (10.244.x.y, in order).
    pod_ips: Cell<usize>,
}

pub(crate) struct Svc {
    pub(crate) namespace: String,
    pub(crate) name: String,
    cluster_ip: String,
}

impl Svc {
    /// The key a proxy subscribes to for it.
    pub(crate) fn key(&self) -> String {
        format!("{}:{SERVICE_PORT}", self.cluster_ip)
    }
}

/// One endpoint of the rolled service's slice.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) pod: String,
    pub(crate) ip: String,
    pub(crate) ready: bool,
}

impl Cluster {
    pub(crate) fn new(args: &Args) -> Self {
        let services = (0..args.services)
            .map(|i| Svc {
                namespace: format!("ns-{}", i % NAMESPACES),
                name: format!("web-{}", i / NAMESPACES),
                cluster_ip: format!("10.96.{}.{}", i / 254, i % 254 + 1),
            })
            .collect();
        Self {
            services,
            pods_per_service: args.endpoints,
            pod_ips: Cell::new(0),
        }
    }

    /// The service that is rolled out: `web-0` in `ns-0`.
    pub(crate) fn rolled(&self) -> &Svc {
        &self.services[0]
    }

    pub(crate) fn next_pod_ip(&self) -> String {
        let i = self.pod_ips.replace(self.pod_ips.get() + 1);
        format!("10.244.{}.{}", i / 254, i % 254 + 1)
    }

    /// Every Service, Pod and EndpointSlice, written directly (one slice per service, as the
    /// EndpointSlice controller would leave it); returns how many objects, and the rolled
    /// service's endpoints.
    pub(crate) fn fill(&self, api: &FakeApiServer) -> (usize, Vec<Endpoint>) {
        let mut objects = 0;
        let mut rolled = Vec::new();
        for svc in &self.services {
            let ns = &svc.namespace;
            api.create(
                &format!("/api/v1/namespaces/{ns}/services"),
                service(ns, &svc.name, &svc.cluster_ip, &[http_port()]),
            );
            let endpoints: Vec<Endpoint> = (0..self.pods_per_service)
                .map(|k| Endpoint {
                    pod: format!("{}-g0-{k}", svc.name),
                    ip: self.next_pod_ip(),
                    ready: true,
                })
                .collect();
            for e in &endpoints {
                create_pod(api, svc, e);
            }
            api.create(
                &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
                slice(svc, &endpoints),
            );
            objects += 2 + endpoints.len();
            if rolled.is_empty() {
                rolled = endpoints;
            }
        }
        (objects, rolled)
    }
}

fn http_port() -> ServicePort<'static> {
    ServicePort {
        name: "http",
        port: SERVICE_PORT,
        target_port: TARGET_PORT,
        app_protocol: Some("http"),
    }
}

fn create_pod(api: &FakeApiServer, svc: &Svc, e: &Endpoint) {
    let ns = &svc.namespace;
    api.create(
        &format!("/api/v1/namespaces/{ns}/pods"),
        pod(ns, &e.pod, &e.ip, &svc.name, true),
    );
}

pub(crate) fn slice(svc: &Svc, endpoints: &[Endpoint]) -> serde_json::Value {
    let endpoints: Vec<SliceEndpoint> = endpoints
        .iter()
        .map(|e| SliceEndpoint {
            ip: &e.ip,
            ready: e.ready,
            pod_name: &e.pod,
        })
        .collect();
    endpoint_slice(
        &svc.namespace,
        &svc.name,
        &slice_name(svc),
        &[("http", TARGET_PORT, Some("http"))],
        &endpoints,
    )
}

pub(crate) fn slice_name(svc: &Svc) -> String {
    format!("{}-slice", svc.name)
}

/// The addresses a destination lists for `endpoints`: the ready ones, sorted.
pub(crate) fn ready_addresses(endpoints: &[Endpoint]) -> Vec<String> {
    let mut ready: Vec<String> = endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| format!("{}:{TARGET_PORT}", e.ip))
        .collect();
    ready.sort();
    ready
}
