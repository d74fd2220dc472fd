//! What discovery keeps from each Service, EndpointSlice and Pod: the few fields that decide
//! where a destination's endpoints are, who they are and how to call them. Everything else in
//! those objects (often kilobytes per pod) is dropped as it arrives.

use std::net::IpAddr;

use serde_json::Value;

use crate::kube::watch::Projection;

/// The annotation on a Service listing ports (comma-separated) that must skip protocol
/// detection, like `ServerPolicy.opaquePorts` on the server side.
pub const OPAQUE_PORTS_ANNOTATION: &str = "trellis.dev/opaque-ports";
/// Set on every pod the injector gave a sidecar (`control-api/src/inject`).
pub const INJECTED_ANNOTATION: &str = crate::inject::ANNOTATION_STATUS;

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Empty for a headless or ExternalName service: reachable by name only.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub opaque_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// The `kubernetes.io/service-name` label: the service these endpoints belong to.
    pub service: String,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    /// The pod behind the endpoint (`targetRef`), in the slice's namespace.
    pub pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub service_account: String,
    pub meshed: bool,
    /// The pod's own addresses (none for a hostNetwork pod: the node's address is not its own).
    pub ips: Vec<IpAddr>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn port_of(v: &Value, field: &str) -> Result<u16, String> {
    let n = v
        .get("port")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("{field}.port: missing or not a number"))?;
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{field}.port: {n} is not a port"))
}

fn ports(list: Option<&Value>, field: &str) -> Result<Vec<ServicePort>, String> {
    let Some(list) = list.and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let field = format!("{field}[{i}]");
            Ok(ServicePort {
                name: str_at(p, &["name"]).unwrap_or_default().to_string(),
                port: port_of(p, &field)?,
                app_protocol: str_at(p, &["appProtocol"]).map(str::to_string),
            })
        })
        .collect()
}

impl Projection for Service {
    fn project(object: &Value) -> Result<Self, String> {
        let spec = object.get("spec").ok_or("no spec")?;
        let mut cluster_ips: Vec<&str> = spec
            .get("clusterIPs")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if cluster_ips.is_empty()
            && let Some(ip) = str_at(spec, &["clusterIP"])
        {
            cluster_ips.push(ip);
        }
        let external = str_at(spec, &["type"]) == Some("ExternalName");
        let cluster_ips = if external {
            Vec::new()
        } else {
            cluster_ips
                .into_iter()
                .filter(|ip| !ip.is_empty() && *ip != "None")
                .map(|ip| {
                    ip.parse()
                        .map_err(|_| format!("spec.clusterIPs: {ip:?} is not an IP address"))
                })
                .collect::<Result<_, _>>()?
        };
        let opaque_ports = match str_at(
            object,
            &["metadata", "annotations", OPAQUE_PORTS_ANNOTATION],
        ) {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.parse::<u16>().map_err(|_| {
                        format!("annotation {OPAQUE_PORTS_ANNOTATION}: {p:?} is not a port")
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            cluster_ips,
            ports: ports(spec.get("ports"), "spec.ports")?,
            opaque_ports,
        })
    }
}

impl Projection for Slice {
    fn project(object: &Value) -> Result<Self, String> {
        let service = str_at(
            object,
            &["metadata", "labels", "kubernetes.io/service-name"],
        )
        .ok_or("no kubernetes.io/service-name label")?
        .to_string();
        let address_type = str_at(object, &["addressType"]).unwrap_or("IPv4");
        if address_type == "FQDN" {
            return Ok(Self {
                service,
                ports: Vec::new(),
                endpoints: Vec::new(),
            });
        }
        let endpoints = object
            .get("endpoints")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let addresses = e
                    .get("addresses")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|a| {
                        a.as_str().and_then(|a| a.parse().ok()).ok_or_else(|| {
                            format!("endpoints[{i}].addresses: {a} is not an IP address")
                        })
                    })
                    .collect::<Result<Vec<IpAddr>, String>>()?;
                // "nil should be interpreted as ready" (discovery.k8s.io/v1).
                let ready = e
                    .pointer("/conditions/ready")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let pod = (str_at(e, &["targetRef", "kind"]) == Some("Pod"))
                    .then(|| str_at(e, &["targetRef", "name"]).map(str::to_string))
                    .flatten();
                Ok(SliceEndpoint {
                    addresses,
                    ready,
                    pod,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            service,
            ports: ports(object.get("ports"), "ports")?,
            endpoints,
        })
    }
}

impl Projection for Pod {
    fn project(object: &Value) -> Result<Self, String> {
        let host_network = object
            .pointer("/spec/hostNetwork")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut ips: Vec<IpAddr> = object
            .pointer("/status/podIPs")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.get("ip")?.as_str()?.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = str_at(object, &["status", "podIP"]).and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        if host_network {
            ips.clear();
        }
        Ok(Self {
            service_account: str_at(object, &["spec", "serviceAccountName"])
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string(),
            meshed: str_at(object, &["metadata", "annotations", INJECTED_ANNOTATION]).is_some(),
            ips,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn services_keep_addresses_ports_and_protocol_hints() {
        let svc = Service::project(&json!({
            "metadata": {"name": "db", "namespace": "shop", "annotations": {OPAQUE_PORTS_ANNOTATION: "5432, 6379"}},
            "spec": {"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7", "fd00::7"],
                     "ports": [{"name": "pg", "port": 5432, "targetPort": 5432}, {"port": 80, "appProtocol": "http"}]}
        }))
        .unwrap();
        assert_eq!(svc.cluster_ips.len(), 2);
        assert_eq!(svc.opaque_ports, vec![5432, 6379]);
        assert_eq!(svc.ports[1].app_protocol.as_deref(), Some("http"));
        let headless =
            Service::project(&json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}}))
                .unwrap();
        assert!(headless.cluster_ips.is_empty());
        let err =
            Service::project(&json!({"spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 0}]}}))
                .unwrap_err();
        assert!(err.contains("spec.ports[0].port"), "{err}");
    }

    #[test]
    fn slices_keep_readiness_and_the_pod_behind_each_endpoint() {
        let slice = Slice::project(&json!({
            "metadata": {"labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "web-1"}},
                {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["10.1.0.7"]}
            ]
        }))
        .unwrap();
        assert_eq!(slice.service, "web");
        assert_eq!(slice.endpoints[0].pod.as_deref(), Some("web-1"));
        assert!(!slice.endpoints[1].ready);
        assert!(slice.endpoints[2].ready, "no condition: ready");
        assert!(Slice::project(&json!({"metadata": {}})).is_err());
    }

    #[test]
    fn pods_are_meshed_when_injected() {
        let pod = Pod::project(&json!({"metadata": {"annotations": {INJECTED_ANNOTATION: "0.1.0"}}, "spec": {"serviceAccountName": "web"}, "status": {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}})).unwrap();
        assert_eq!(
            pod,
            Pod {
                service_account: "web".into(),
                meshed: true,
                ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            }
        );
        let plain = Pod::project(&json!({"metadata": {}, "spec": {"hostNetwork": true}, "status": {"podIP": "192.0.2.1"}})).unwrap();
        assert_eq!(plain.service_account, "default");
        assert!(!plain.meshed);
        assert!(
            plain.ips.is_empty(),
            "a hostNetwork pod has the node's address"
        );
    }
}
