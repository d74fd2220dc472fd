//! Objects as a cluster holds them, for tests to write into the stand-in: a Service, a Pod
//! (meshed or not, already running), an EndpointSlice — and what the EndpointSlice controller
//! would write for a Service and its pods ([`FakeApiServer::set_service_endpoints`]).

use serde_json::{Value, json};
use trellis_control::inject::{ANNOTATION_STATUS, PROXY_NAME};

use super::FakeApiServer;

/// One port of a Service.
#[derive(Debug, Clone, Copy)]
pub struct ServicePort<'a> {
    pub name: &'a str,
    pub port: u16,
    pub target_port: u16,
    pub app_protocol: Option<&'a str>,
}

/// One endpoint of an EndpointSlice: a pod's address and whether it is ready.
#[derive(Debug, Clone, Copy)]
pub struct SliceEndpoint<'a> {
    pub ip: &'a str,
    pub ready: bool,
    pub pod_name: &'a str,
}

/// A ClusterIP Service selecting `app: <name>`.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, ports: &[ServicePort]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut port = json!({"name": p.name, "port": p.port, "targetPort": p.target_port,
                "protocol": "TCP"});
            if let Some(app_protocol) = p.app_protocol {
                port["appProtocol"] = json!(app_protocol);
            }
            port
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": ports,
        },
        "status": {"loadBalancer": {}},
    })
}

/// A running, ready pod labelled `app: <service_account>`. A meshed one is what the injector
/// leaves: the `trellis.dev/injected` annotation and the `trellis-proxy` native sidecar (an
/// init container with `restartPolicy: Always`).
pub fn pod(namespace: &str, name: &str, ip: &str, service_account: &str, meshed: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": service_account}},
        "spec": {
            "serviceAccountName": service_account,
            "nodeName": "node-1",
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.0.2.1",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
        },
    });
    if meshed {
        pod["metadata"]["annotations"] = json!({ANNOTATION_STATUS: "0.1.0"});
        pod["spec"]["initContainers"] = json!([{
            "name": PROXY_NAME,
            "image": "ghcr.io/trellis-mesh/trellis-proxy:0.1.0",
            "args": ["run"],
            "restartPolicy": "Always",
        }]);
    }
    pod
}

/// An IPv4 EndpointSlice of `service`. `ports`: (name, port, appProtocol).
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    slice_name: &str,
    ports: &[(&str, u16, Option<&str>)],
    endpoints: &[SliceEndpoint],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, app_protocol)| {
            let mut p = json!({"name": name, "port": port, "protocol": "TCP"});
            if let Some(app_protocol) = app_protocol {
                p["appProtocol"] = json!(app_protocol);
            }
            p
        })
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.ip],
                "conditions": {"ready": e.ready, "serving": e.ready, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": e.pod_name},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

impl FakeApiServer {
    /// What the EndpointSlice controller writes for `service`: the slice `<service>-slice`
    /// (created or replaced) with the stored pods' IPs and the Service's target ports, owned by
    /// the Service. `pods`: (pod name, ready). Panics if the Service or a pod is not stored.
    pub fn set_service_endpoints(&self, namespace: &str, service: &str, pods: &[(&str, bool)]) {
        let svc_path = format!("/api/v1/namespaces/{namespace}/services/{service}");
        let svc = self
            .get(&svc_path)
            .unwrap_or_else(|| panic!("set_service_endpoints: no Service {svc_path}"));
        let ips: Vec<String> = pods
            .iter()
            .map(|(name, _)| {
                let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
                let pod = self
                    .get(&path)
                    .unwrap_or_else(|| panic!("set_service_endpoints: no Pod {path}"));
                pod["status"]["podIP"]
                    .as_str()
                    .unwrap_or_else(|| panic!("set_service_endpoints: {path} has no podIP"))
                    .to_string()
            })
            .collect();
        let ports: Vec<(&str, u16, Option<&str>)> = svc["spec"]["ports"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let port = p["targetPort"].as_u64().or(p["port"].as_u64()).unwrap_or(0);
                (
                    p["name"].as_str().unwrap_or_default(),
                    u16::try_from(port).unwrap_or(0),
                    p["appProtocol"].as_str(),
                )
            })
            .collect();
        let endpoints: Vec<SliceEndpoint> = pods
            .iter()
            .zip(&ips)
            .map(|((pod_name, ready), ip)| SliceEndpoint {
                ip,
                ready: *ready,
                pod_name,
            })
            .collect();
        let slice_name = format!("{service}-slice");
        let mut slice = endpoint_slice(namespace, service, &slice_name, &ports, &endpoints);
        slice["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Service",
            "name": service, "uid": svc["metadata"]["uid"], "controller": true,
            "blockOwnerDeletion": true}]);
        let collection = format!("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices");
        let path = format!("{collection}/{slice_name}");
        if self.get(&path).is_some() {
            self.replace(&path, slice);
        } else {
            self.create(&collection, slice);
        }
    }
}
