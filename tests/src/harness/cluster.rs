//! A simulated Kubernetes cluster for discovery tests: a mesh of pods plus the stand-in API
//! server ([`FakeApiServer`]) and the control plane in Kubernetes mode, both in a `control`
//! pod. Tests drive the cluster as kubectl and the controllers would — create Services and Pods,
//! write EndpointSlices — and the control plane learns everything from the stand-in's
//! list/watch API, as it would from a real API server.
//!
//! Service ClusterIPs (10.96.0.0/16) exist nowhere, as in a cluster without kube-proxy: a call
//! to one only succeeds if the client's sidecar balanced it to a pod.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::apiserver::objects::{self, ServicePort};
use super::{FakeApiServer, Mesh, Pod};

/// The bearer token the control plane presents to the stand-in.
const CONTROL_TOKEN: &str = "control-plane-service-account-token";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The control plane's Service address with [`Cluster::use_control_service`].
pub const CONTROL_VIP: &str = "10.96.0.1";

pub struct Cluster {
    pub api: FakeApiServer,
    pub control: Pod,
    /// Further control-plane replicas (`add_replica`).
    pub replicas: Vec<Pod>,
    token_file: PathBuf,
    /// With `use_control_service`: the replica the Service sends new connections to (0: the
    /// `control` pod, i: `replicas[i - 1]`), and the namespaces whose rules point there.
    service: Mutex<Option<(usize, Vec<String>)>>,
    // Dropped last: its namespaces hold every pod.
    pub mesh: Mesh,
}

impl Cluster {
    /// `None` (with the reason printed) without the privileges for namespaces, outside CI.
    pub fn new(test: &str) -> Option<Self> {
        let mesh = Mesh::new(test)?;
        let control = mesh.pod("control");
        let api = FakeApiServer::start_in(
            control.netns(),
            control.ip.into(),
            mesh.log_dir(),
            HashMap::new(),
            CONTROL_TOKEN,
        );
        let token_file = mesh.write_file("control-plane-token", CONTROL_TOKEN);
        let cluster = Self {
            api,
            control,
            replicas: Vec::new(),
            token_file,
            service: Mutex::new(None),
            mesh,
        };
        let state = cluster.mesh.log_dir().join("control-state");
        let flags = cluster.kube_flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        cluster.control.start_control_plane_with(&state, &flags);
        Some(cluster)
    }

    fn kube_flags(&self) -> Vec<String> {
        self.api.serve_flags(&self.token_file)
    }

    /// Another control-plane replica in a pod of its own, on the same API server.
    pub fn add_replica(&mut self, name: &str) -> &Pod {
        let pod = self.mesh.pod(name);
        let state = self.mesh.log_dir().join(format!("{name}-state"));
        let flags = self.kube_flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        pod.start_control_plane_with(&state, &flags);
        self.replicas.push(pod);
        self.replicas.last().expect("just pushed")
    }

    /// From now on pods reach the control plane through its Service address
    /// ([`CONTROL_VIP`]:7443), translated in each pod to one replica as kube-proxy does
    /// (iptables DNAT); [`Cluster::move_control_service`] points it at another replica.
    pub fn use_control_service(&self) {
        *self.service.lock().expect("lock") = Some((0, Vec::new()));
    }

    /// Kube-proxy's part when a replica goes away: new connections to the control plane's
    /// Service go to replica `to` (0: `control`, i: `replicas[i - 1]`).
    pub fn move_control_service(&self, to: usize) {
        let mut service = self.service.lock().expect("lock");
        let (target, namespaces) = service.as_mut().expect("use_control_service first");
        let old = self.replica(*target).ip;
        let new = self.replica(to).ip;
        for ns in namespaces.iter() {
            for rule in [dnat("-D", old), dnat("-I", new)] {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", ns, "iptables-nft"])
                    .args(&rule)
                    .output()
                    .expect("ip netns exec");
                assert!(out.status.success(), "{rule:?} in {ns}: {out:?}");
            }
        }
        *target = to;
    }

    fn replica(&self, i: usize) -> &Pod {
        if i == 0 {
            &self.control
        } else {
            &self.replicas[i - 1]
        }
    }

    /// The flags of a meshed sidecar for `namespace/name` (service account `sa`), with a join
    /// token from the replica new connections go to; through the Service address when in use.
    fn sidecar_flags(&self, pod: &Pod, namespace: &str, name: &str, sa: &str) -> Vec<String> {
        let out = pod.exec("ip", &["route", "add", SERVICE_CIDR, "dev", "eth0"]);
        assert!(out.status.success(), "route: {out:?}");
        let mut service = self.service.lock().expect("lock");
        let issuer = self.replica(service.as_ref().map_or(0, |(t, _)| *t));
        let mut flags = issuer.mesh_flags(&self.mesh, &format!("{namespace}/{name}"), sa);
        if let Some((target, namespaces)) = service.as_mut() {
            // Before `init`, so that it picks the same (nft) backend.
            let rule = dnat("-I", self.replica(*target).ip);
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            let out = pod.exec("iptables-nft", &rule);
            assert!(out.status.success(), "DNAT: {out:?}");
            namespaces.push(pod.netns().name().to_string());
            let url = flags
                .iter()
                .position(|f| f == "--control-plane")
                .expect("--control-plane flag")
                + 1;
            flags[url] = format!("https://{CONTROL_VIP}:7443");
        }
        flags
    }

    /// A pod running the test app on 8080 (`--name <name>`), registered with the API server
    /// as `namespace/name` with service account `sa`; with a sidecar (meshed, certificate for
    /// `namespace/sa`) or without.
    pub fn app_pod(&self, namespace: &str, name: &str, sa: &str, meshed: bool) -> Pod {
        let pod = self.mesh.pod(name);
        pod.spawn_app(&["http", "--listen", "0.0.0.0:8080", "--name", name]);
        if meshed {
            let flags = self.sidecar_flags(&pod, namespace, name, sa);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            pod.start_sidecar(&flags);
        }
        self.api.create(
            &format!("/api/v1/namespaces/{namespace}/pods"),
            objects::pod(namespace, name, &pod.ip.to_string(), sa, meshed),
        );
        pod
    }

    /// A client pod with a meshed sidecar (`extra` proxy flags appended) and a route to the
    /// service CIDR, as every pod in a cluster has.
    pub fn client_pod(&self, namespace: &str, name: &str, extra: &[&str]) -> Pod {
        let pod = self.mesh.pod(name);
        let mut flags = self.sidecar_flags(&pod, namespace, name, name);
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        pod.start_sidecar(&flags);
        self.api.create(
            &format!("/api/v1/namespaces/{namespace}/pods"),
            objects::pod(namespace, name, &pod.ip.to_string(), name, true),
        );
        pod
    }

    /// A ClusterIP Service `namespace/name` at `cluster_ip:port` → target port 8080.
    pub fn service(&self, namespace: &str, name: &str, cluster_ip: &str, port: u16) {
        self.api.create(
            &format!("/api/v1/namespaces/{namespace}/services"),
            objects::service(
                namespace,
                name,
                cluster_ip,
                &[ServicePort {
                    name: "http",
                    port,
                    target_port: 8080,
                    app_protocol: None,
                }],
            ),
        );
    }
}

/// The iptables arguments that add (`-I`) or delete (`-D`) kube-proxy's translation of the
/// control plane's Service address to replica `ip`.
fn dnat(op: &str, ip: std::net::Ipv4Addr) -> Vec<String> {
    let mut rule: Vec<String> = ["-t", "nat", op, "OUTPUT"].map(String::from).into();
    if op == "-I" {
        rule.push("1".into());
    }
    rule.extend(
        [
            "-d",
            CONTROL_VIP,
            "-p",
            "tcp",
            "--dport",
            "7443",
            "-j",
            "DNAT",
            "--to-destination",
        ]
        .map(String::from),
    );
    rule.push(format!("{ip}:7443"));
    rule
}
