//! The control plane's gRPC API with in-process peers: a scripted fake control plane that sends
//! a proxy a snapshot it must reject, 500 simulated proxy streams converging on an apply, and a
//! proxy's NACK shown by `status` and failing `apply --wait`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Command;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::pb::config_service_client::ConfigServiceClient;
use trellis_proto::pb::config_service_server::{ConfigService, ConfigServiceServer};
use trellis_proto::pb::policy_service_client::PolicyServiceClient;
use trellis_proto::pb::{
    Ack, ApplyRequest, Nack, ProxyMessage, Snapshot, StatusRequest, Subscribe, proxy_message,
};
use trellis_proto::policy::PolicySet;
use trellis_proto::wire;
use trellis_tests::harness::{self, CONTROL_IDENTITY, ControlPlane, Mesh};

// ---- a scripted control plane ----

struct FakeControlPlane {
    snapshots: Mutex<Option<Vec<Snapshot>>>,
    answers: mpsc::UnboundedSender<ProxyMessage>,
}

type Out = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigService for FakeControlPlane {
    type StreamStream = Out;

    async fn stream(&self, req: Request<Streaming<ProxyMessage>>) -> Result<Response<Out>, Status> {
        let mut incoming = req.into_inner();
        let subscribe = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no subscribe"))?;
        let _ = self.answers.send(subscribe);
        let snapshots = self.snapshots.lock().await.take().unwrap_or_default();
        let (tx, rx) = mpsc::channel(4);
        let answers = self.answers.clone();
        tokio::spawn(async move {
            // One snapshot at a time: send, then wait for its answer.
            for s in snapshots {
                if tx.send(Ok(s)).await.is_err() {
                    return;
                }
                match incoming.message().await {
                    Ok(Some(answer)) => {
                        let _ = answers.send(answer);
                    }
                    _ => return,
                }
            }
            // Keep the stream open.
            while let Ok(Some(m)) = incoming.message().await {
                let _ = answers.send(m);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn snapshot(version: &str, yaml: &str) -> Snapshot {
    let set = PolicySet::parse(yaml).unwrap();
    Snapshot {
        version: version.into(),
        nonce: format!("n{version}"),
        traffic: set.traffic.iter().map(wire::traffic_to_wire).collect(),
        server: set.server.iter().map(wire::server_to_wire).collect(),
        meshed: Vec::new(),
    }
}

#[test]
fn a_snapshot_the_proxy_cannot_apply_is_nacked_and_the_previous_config_stays() {
    let Some(mesh) = Mesh::new("control_nack") else {
        return;
    };
    let pod = mesh.pod("proxy");
    let good = snapshot(
        "1",
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {timeout: 2s}\n",
    );
    let mut bad = snapshot(
        "2",
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {timeout: 2s}\n",
    );
    // What a newer control plane might send: a retry condition this proxy does not know.
    bad.traffic[0]
        .retries
        .as_mut()
        .unwrap()
        .on
        .push("teapot".into());
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let fake = FakeControlPlane {
        snapshots: Mutex::new(Some(vec![good, bad])),
        answers: answers_tx,
    };
    // The fake control plane runs inside the pod, on 127.0.0.1:7443, with a certificate for the
    // control plane's identity from a CA of the test's own.
    let (ca, ..) = trellis_identity::ca::Ca::generate("cluster.local").unwrap();
    let id: trellis_identity::SpiffeId = CONTROL_IDENTITY.parse().unwrap();
    let (issued, key) = ca.issue(&id, Duration::from_secs(600), &[], &[]).unwrap();
    let anchors = mesh.write_file("anchors.pem", ca.bundle_pem());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let roots = trellis_identity::tls::roots_from_pem(ca.bundle_pem().as_bytes()).unwrap();
    let tls =
        trellis_identity::tls::server_config(Arc::new(roots), chain, key, false, &[b"h2"]).unwrap();
    let _server = pod.netns().spawn_thread(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let addr: SocketAddr = "127.0.0.1:7443".parse().unwrap();
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let _ = tonic::transport::Server::builder()
                .add_service(ConfigServiceServer::new(fake))
                .serve_with_incoming(trellis_control::tls::incoming(listener, tls))
                .await;
        });
    });
    pod.start_sidecar(&[
        "--control-plane",
        "https://127.0.0.1:7443",
        "--trust-anchors",
        &anchors.to_string_lossy(),
        "--workload",
        "default/proxy",
    ]);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut next = || {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), answers.recv())
                .await
                .unwrap()
                .unwrap()
        })
    };
    let Some(proxy_message::Kind::Subscribe(sub)) = next().kind else {
        panic!("expected Subscribe")
    };
    assert_eq!(sub.workload, "default/proxy");
    assert_eq!(sub.version, "", "a fresh proxy holds no version");
    let Some(proxy_message::Kind::Ack(Ack { version, nonce })) = next().kind else {
        panic!("expected Ack")
    };
    assert_eq!((version.as_str(), nonce.as_str()), ("1", "n1"));
    let Some(proxy_message::Kind::Nack(Nack {
        version,
        nonce,
        error,
    })) = next().kind
    else {
        panic!("expected Nack")
    };
    assert_eq!((version.as_str(), nonce.as_str()), ("2", "n2"));
    assert!(
        error.contains("spec.retries.on[2]: \"teapot\" is not a retry condition"),
        "{error}"
    );

    let config: serde_json::Value = serde_json::from_str(&pod.admin_get("/config").1).unwrap();
    assert_eq!(
        config["version"], "1",
        "the proxy keeps the last good snapshot"
    );
    assert_eq!(config["source"], "control-plane:https://127.0.0.1:7443");
    assert_eq!(
        pod.metrics()
            .sum("trellis_policy_loads_total", &[("result", "rejected")]),
        1.0
    );
}

// ---- the real control plane, on loopback, with simulated proxies ----

/// A simulated proxy: subscribes, then ACKs every snapshot (or NACKs with `nack`), reporting
/// (workload, version, time received) for each.
async fn simulated_proxy(
    channel: tonic::transport::Channel,
    workload: String,
    nack: Option<String>,
    seen: mpsc::UnboundedSender<(String, String, Instant)>,
) {
    let subscribe = Subscribe {
        workload: workload.clone(),
        ..Default::default()
    };
    harness::simulated_proxy(channel, subscribe, nack, move |version| {
        let _ = seen.send((workload.clone(), version, Instant::now()));
    })
    .await;
}

/// A runtime with simulated proxies (`(workload, nack reason)`) subscribed to `cp`; the channel
/// reports every snapshot they receive. Returns once each has received its first snapshot.
fn simulated_proxies(
    cp: &ControlPlane,
    proxies: &[(&str, Option<&str>)],
) -> (
    tokio::runtime::Runtime,
    mpsc::UnboundedReceiver<(String, String, Instant)>,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    rt.block_on(async {
        let channel = cp.channel(false);
        for (workload, nack) in proxies {
            let nack = nack.map(str::to_string);
            tokio::spawn(simulated_proxy(
                channel.clone(),
                workload.to_string(),
                nack,
                seen_tx.clone(),
            ));
        }
        for _ in proxies {
            seen.recv().await.unwrap();
        }
    });
    (rt, seen)
}

#[test]
fn five_hundred_proxy_streams_all_acknowledge_an_apply() {
    const PROXIES: usize = 500;
    let cp = ControlPlane::start("convergence");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        // 10 HTTP/2 connections carrying 50 streams each.
        for c in 0..10 {
            let channel = cp.channel(false);
            for i in 0..PROXIES / 10 {
                let workload = format!("default/sim-{}", c * 50 + i);
                tokio::spawn(simulated_proxy(channel.clone(), workload, None, seen_tx.clone()));
            }
        }
        // Everyone gets the initial (empty) snapshot first.
        for _ in 0..PROXIES {
            tokio::time::timeout(Duration::from_secs(30), seen.recv()).await.unwrap().unwrap();
        }
        let mut policy = PolicyServiceClient::new(cp.channel(true));
        let yaml = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {timeout: 2s}\n";
        let committed = Instant::now();
        let rsp = policy.apply(ApplyRequest { yaml: yaml.into() }).await.unwrap().into_inner();
        assert_eq!(rsp.version, 1);
        assert_eq!(rsp.affected_proxies.len(), PROXIES);
        let mut delays = Vec::new();
        while delays.len() < PROXIES {
            let (_, version, at) = tokio::time::timeout(Duration::from_secs(60), seen.recv()).await.unwrap().unwrap();
            assert_eq!(version, "1");
            delays.push(at.duration_since(committed));
        }
        // Every ACK is recorded by the control plane.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = policy.status(StatusRequest {}).await.unwrap().into_inner();
            let acked = status.proxies.iter().filter(|p| p.acked_version == "1").count();
            if acked == PROXIES {
                break;
            }
            assert!(Instant::now() < deadline, "only {acked} of {PROXIES} ACKs recorded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        delays.sort();
        let pct = |p: usize| delays[(delays.len() * p / 100).min(delays.len() - 1)];
        eprintln!(
            "{PROXIES} proxy streams received version 1: p50 {:?}, p99 {:?}, max {:?} after the Apply call",
            pct(50),
            pct(99),
            delays[delays.len() - 1]
        );
    });
}

#[test]
fn a_nack_shows_in_status_and_fails_apply_wait() {
    let cp = ControlPlane::start("nack_status");
    let (rt, _seen) = simulated_proxies(
        &cp,
        &[
            ("default/good", None),
            ("default/old", Some("spec.retries.on[0]: unknown condition")),
        ],
    );
    let file = std::env::temp_dir().join(format!("trellis-nack-{}.yaml", std::process::id()));
    std::fs::write(&file, "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec: {timeout: 2s}\n").unwrap();
    let out = cp.cli(&[
        "apply",
        "--wait",
        "--timeout",
        "10s",
        "-f",
        &file.to_string_lossy(),
    ]);
    std::fs::remove_file(&file).unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "a NACK must fail apply --wait:\n{stdout}{stderr}"
    );
    assert!(stdout.contains("acknowledged by default/good@"), "{stdout}");
    assert!(
        stderr.contains("default/old@")
            && stderr.contains("rejected version 1: spec.retries.on[0]: unknown condition"),
        "{stderr}"
    );

    let status = cp.cli(&["status"]);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        table.contains("v1: spec.retries.on[0]: unknown condition"),
        "{table}"
    );
    drop(rt);
}

#[test]
fn a_second_grpc_stack_applies_policy_that_proxies_receive() {
    let have_grpcio = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_grpcio {
        let reason = "needs Python grpcio and grpcio-tools (pip install grpcio grpcio-tools; .ci/run installs them)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{reason}; CI=true, so this is a failure"
        );
        eprintln!("SKIPPED a_second_grpc_stack_applies_policy_that_proxies_receive: {reason}");
        return;
    }
    let cp = ControlPlane::start("python");
    let (rt, mut seen) = simulated_proxies(&cp, &[("default/watcher", None)]);

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = std::env::temp_dir().join(format!("trellis-py-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let yaml = out_dir.join("policy.yaml");
    std::fs::write(&yaml, "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: from-python}\nspec: {timeout: 1500ms}\n").unwrap();
    let out = Command::new("python3")
        .arg(root.join("python/apply_policy.py"))
        .arg(root.join("../proto/proto"))
        .arg(&out_dir)
        .arg(cp.url.trim_start_matches("https://"))
        .arg(&yaml)
        .arg(cp.dir.join("ca.pem"))
        .arg(cp.dir.join("admin-token"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&out_dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rsp: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(rsp["version"], 1);
    assert_eq!(rsp["changed"][0], "TrafficPolicy default/from-python");
    assert_eq!(rsp["listed"][0], "from-python");

    // The simulated proxy receives version 1 with the policy Python applied.
    let (_, version, _) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .unwrap()
            .unwrap()
    });
    assert_eq!(version, "1");
    let listed = cp.cli(&["get", "TrafficPolicy", "from-python", "-o", "yaml"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("timeout: 1s 500ms"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
}

#[test]
fn a_proxy_that_stops_reading_delays_no_other_proxy() {
    let cp = ControlPlane::start("slow_proxy");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The stuck proxy: subscribes, then never reads its stream (HTTP/2 flow control fills up).
        let channel = cp.channel(false);
        let (stuck_tx, stuck_rx) = mpsc::channel(4);
        let sub = Subscribe { workload: "default/stuck".into(), ..Default::default() };
        stuck_tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Subscribe(sub)) }).await.unwrap();
        let _stuck_stream = ConfigServiceClient::new(channel).stream(ReceiverStream::new(stuck_rx)).await.unwrap();

        // Three healthy proxies on their own connection.
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let channel = cp.channel(false);
        for i in 0..3 {
            tokio::spawn(simulated_proxy(channel.clone(), format!("default/ok-{i}"), None, seen_tx.clone()));
        }
        for _ in 0..3 {
            seen.recv().await.unwrap();
        }
        // 40 versions of a policy with 6000 endpoints (~90 KB per snapshot, 3.6 MB in all): far
        // more than the stuck stream's flow-control window, so its sender really blocks.
        let mut policy = PolicyServiceClient::new(cp.channel(true));
        let mut slowest_apply = Duration::ZERO;
        for v in 1..=40u32 {
            let endpoints: Vec<String> = (0..6000).map(|i| format!("\"10.{}.{}.{}:8080\"", v, i / 250, i % 250)).collect();
            let yaml = format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: big}}\nspec: {{destination: {{host: big, endpoints: [{}]}}}}\n",
                endpoints.join(", ")
            );
            let start = Instant::now();
            policy.apply(ApplyRequest { yaml }).await.unwrap();
            slowest_apply = slowest_apply.max(start.elapsed());
        }
        // Every healthy proxy reaches version 40 (it may skip versions: only the latest is sent).
        let mut latest = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while latest.values().filter(|v: &&u64| **v == 40).count() < 3 {
            let left = deadline.saturating_duration_since(Instant::now());
            let (workload, version, _) = tokio::time::timeout(left, seen.recv()).await.expect("healthy proxies stalled").unwrap();
            latest.insert(workload, version.parse::<u64>().unwrap());
        }
        let status = policy.status(StatusRequest {}).await.unwrap().into_inner();
        let stuck = status.proxies.iter().find(|p| p.workload == "default/stuck").unwrap();
        eprintln!("slowest Apply: {slowest_apply:?}; stuck proxy was sent version {:?}, acked {:?}", stuck.sent_version, stuck.acked_version);
        assert!(stuck.acked_version.is_empty(), "the stuck proxy never answered");
        let stuck_sent: u64 = stuck.sent_version.parse().unwrap();
        assert!(stuck_sent < 40, "the stuck stream was never blocked (sent {stuck_sent}): the test proves nothing");
        assert!(slowest_apply < Duration::from_secs(5), "an Apply waited for a stuck proxy: {slowest_apply:?}");
    });
}
