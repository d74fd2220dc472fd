//! The control plane's reflector and CA Secret against the stand-in API server (HTTPS on
//! 127.0.0.1, no privileges needed): a relist after 410 reports exactly what changed, an API
//! server that goes away and comes back costs no update and no relist, and replicas starting
//! together end up with one CA — also two real `serve --kubernetes`, one through a kubeconfig.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_control::admin::Metrics;
use trellis_control::kube::KubeClient;
use trellis_control::kube::ca_secret::load_or_create;
use trellis_control::kube::watch::{self, Event, ObjectKey, Projection, Watched};
use trellis_tests::harness::apiserver::{LocalApi, service};
use trellis_tests::harness::{ControlPlane, FakeApiServer, ServicePort};

const OWN_TOKEN: &str = "control-plane-own-token";
const SERVICES: &str = "/api/v1/namespaces/shop/services";

/// A stand-in API server and a client holding the token it expects.
struct Cluster {
    local: LocalApi,
    client: Arc<KubeClient>,
}

impl std::ops::Deref for Cluster {
    type Target = LocalApi;
    fn deref(&self) -> &LocalApi {
        &self.local
    }
}

impl Cluster {
    fn new(test: &str) -> Self {
        let local = LocalApi::start(&format!("watch-{test}"), OWN_TOKEN);
        let client = Arc::new(local.client());
        Self { local, client }
    }

    /// A reflector of the services in all namespaces, and where its events arrive.
    fn watch_services(&self, metrics: &Arc<Metrics>) -> mpsc::UnboundedReceiver<Event<Ports>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let watched = Watched {
            resource: "services",
            path: "/api/v1/services".into(),
        };
        watch::spawn(self.client.clone(), watched, metrics.clone(), tx);
        rx
    }
}

/// What these tests keep of a Service: its port numbers.
#[derive(Debug, Clone, PartialEq)]
struct Ports(Vec<u64>);

impl Projection for Ports {
    fn project(object: &Value) -> Result<Self, String> {
        let ports = object["spec"]["ports"].as_array().ok_or("no spec.ports")?;
        Ok(Ports(
            ports.iter().filter_map(|p| p["port"].as_u64()).collect(),
        ))
    }
}

fn svc(name: &str, port: u16) -> Value {
    service(
        "shop",
        name,
        "10.96.0.10",
        &[ServicePort {
            name: "http",
            port,
            target_port: port,
            app_protocol: None,
        }],
    )
}

fn set_port(api: &FakeApiServer, name: &str, port: u16) {
    api.merge_patch(
        &format!("{SERVICES}/{name}"),
        json!({"spec": {"ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]}}),
    );
}

fn applied(name: &str, port: u64) -> Event<Ports> {
    Event::Applied(key(name), Arc::new(Ports(vec![port])))
}

fn deleted(name: &str) -> Event<Ports> {
    Event::Deleted(key(name))
}

fn key(name: &str) -> ObjectKey {
    ObjectKey {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// The next `n` events, each within 10 s.
async fn next(rx: &mut mpsc::UnboundedReceiver<Event<Ports>>, n: usize) -> Vec<Event<Ports>> {
    let mut events = Vec::new();
    while events.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!("the reflector stopped; got {events:?}"),
            Err(_) => panic!("expected {n} events within 10 s, got {events:?}"),
        }
    }
    events
}

/// Asserts that nothing arrives for `d`.
async fn quiet(rx: &mut mpsc::UnboundedReceiver<Event<Ports>>, d: Duration) {
    if let Ok(event) = tokio::time::timeout(d, rx.recv()).await {
        panic!("expected no event, got {event:?}");
    }
}

/// Polls the metrics text until it contains `line`.
async fn metric(metrics: &Metrics, line: &str) {
    for _ in 0..100 {
        if metrics.encode().lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {line:?} in\n{}", metrics.encode());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_410_reports_exactly_what_changed() {
    let c = Cluster::new("relist");
    c.api.create(SERVICES, svc("cart", 80));
    c.api.create(SERVICES, svc("web", 8080));
    let metrics = Arc::new(Metrics::default());
    let mut rx = c.watch_services(&metrics);
    assert_eq!(
        next(&mut rx, 3).await,
        [applied("cart", 80), applied("web", 8080), Event::Synced]
    );
    set_port(&c.api, "web", 8081);
    assert_eq!(next(&mut rx, 1).await, [applied("web", 8081)]);

    // While the reflector cannot reach it, the API server moves on and forgets its history:
    // resuming the watch gets 410, and only a relist can tell what changed.
    c.api.set_down(true);
    set_port(&c.api, "web", 8082);
    c.api.create(SERVICES, svc("pay", 443));
    c.api.delete(&format!("{SERVICES}/cart"));
    c.api.compact();
    c.api.set_down(false);
    assert_eq!(
        next(&mut rx, 4).await,
        [
            applied("pay", 443),
            applied("web", 8082),
            deleted("cart"),
            Event::Synced
        ]
    );
    metric(
        &metrics,
        r#"trellis_control_kube_relists_total{resource="services",reason="expired"} 1"#,
    )
    .await;

    // The watch goes on from the relist's version: the next change arrives once.
    set_port(&c.api, "pay", 444);
    assert_eq!(next(&mut rx, 1).await, [applied("pay", 444)]);
    quiet(&mut rx, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_down_and_back_costs_no_update_and_no_relist() {
    let c = Cluster::new("down");
    c.api.create(SERVICES, svc("cart", 80));
    let metrics = Arc::new(Metrics::default());
    let mut rx = c.watch_services(&metrics);
    assert_eq!(next(&mut rx, 2).await, [applied("cart", 80), Event::Synced]);
    metric(
        &metrics,
        r#"trellis_control_kube_synced{resource="services"} 1"#,
    )
    .await;
    // The watch must be open before the server goes down: one accepted just before would be
    // served on.
    for _ in 0..100 {
        if c.api.open_watches() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.api.open_watches(), 1);

    c.api.set_down(true);
    set_port(&c.api, "cart", 81);
    c.api.create(SERVICES, svc("web", 8080));
    // Down: nothing is withdrawn from the consumer, and the failure shows.
    metric(
        &metrics,
        r#"trellis_control_kube_synced{resource="services"} 0"#,
    )
    .await;
    quiet(&mut rx, Duration::from_millis(700)).await;

    c.api.set_down(false);
    assert_eq!(
        next(&mut rx, 2).await,
        [applied("cart", 81), applied("web", 8080)],
        "the watch resumes from the last version: the history replays, no relist, no Synced"
    );
    metric(
        &metrics,
        r#"trellis_control_kube_synced{resource="services"} 1"#,
    )
    .await;
    quiet(&mut rx, Duration::from_millis(500)).await;
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"trellis_control_kube_relists_total{resource="services",reason="start"} 1"#
        ) && !text.contains(r#"reason="expired""#),
        "{text}"
    );
    assert!(
        text.contains(r#"trellis_control_kube_watch_errors_total{resource="services"}"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_share_one_ca_secret() {
    let c = Cluster::new("casecret");
    let secrets = "/api/v1/namespaces/trellis-system/secrets";
    let (a, b) = tokio::join!(
        load_or_create(&c.client, "trellis-system", "trellis-ca", "cluster.local"),
        load_or_create(&c.client, "trellis-system", "trellis-ca", "cluster.local"),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        (&a.ca_cert_pem, &a.ca_key_pem, &a.admin_token),
        (&b.ca_cert_pem, &b.ca_key_pem, &b.admin_token)
    );
    let stored = c.api.get(&format!("{secrets}/trellis-ca")).unwrap();
    let decode = |key: &str| {
        let b64 = stored["data"][key].as_str().unwrap();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(stored["type"], "Opaque");
    assert_eq!(decode("ca.pem"), a.ca_cert_pem);
    assert_eq!(decode("ca-key.pem"), a.ca_key_pem);
    assert_eq!(decode("admin-token"), a.admin_token);
    let posts = c.api.requests_to(&Method::POST, secrets).len();
    assert!((1..=2).contains(&posts), "{posts} creates");

    // A replica restarting later reads it and creates nothing.
    let later = load_or_create(&c.client, "trellis-system", "trellis-ca", "cluster.local")
        .await
        .unwrap();
    assert_eq!(later.admin_token, a.admin_token);
    assert_eq!(c.api.requests_to(&Method::POST, secrets).len(), posts);

    // A Secret someone else wrote without the token is refused by name, not overwritten.
    c.api.create(
        secrets,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "half", "namespace": "trellis-system"},
            "data": {"ca.pem": stored["data"]["ca.pem"], "ca-key.pem": stored["data"]["ca-key.pem"]}}),
    );
    let err = load_or_create(&c.client, "trellis-system", "half", "cluster.local")
        .await
        .unwrap_err();
    assert!(
        err.contains("trellis-system/half") && err.contains("\"admin-token\""),
        "{err}"
    );
}

#[test]
fn two_control_planes_sign_with_the_ca_of_the_secret() {
    let c = Cluster::new("replicas");
    // One replica finds the API server through a kubeconfig (CA path relative to it, inline
    // token), the other through flags.
    let kubeconfig = c.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: fake, cluster: {{server: '{}', certificate-authority: apiserver-ca.pem}}}}]\n\
             contexts: [{{name: test, context: {{cluster: fake, user: control}}}}]\n\
             users: [{{name: control, user: {{token: {OWN_TOKEN}}}}}]\n",
            c.api.url
        ),
    )
    .unwrap();
    let first = ControlPlane::start_with(
        "replica-a",
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig.to_string_lossy(),
        ],
    );
    let token_file = c.dir.join("token").to_string_lossy().into_owned();
    let ca_file = c.api.ca_file.to_string_lossy().into_owned();
    let second = ControlPlane::start_with(
        "replica-b",
        &[
            "--kubernetes",
            "--kube-api-url",
            &c.api.url,
            "--kube-ca",
            &ca_file,
            "--kube-token-file",
            &token_file,
        ],
    );
    let stored = c
        .api
        .get("/api/v1/namespaces/trellis-system/secrets/trellis-ca")
        .expect("the first replica created the CA Secret");
    let secret = |key: &str| {
        let b64 = stored["data"][key].as_str().unwrap();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    };
    for replica in [&first, &second] {
        let file = |name: &str| std::fs::read_to_string(replica.dir.join(name)).unwrap();
        assert_eq!(file("ca.pem"), secret("ca.pem"), "{}", replica.log());
        assert_eq!(file("ca-key.pem"), secret("ca-key.pem"));
        assert_eq!(file("admin-token").trim(), secret("admin-token"));
    }
    let log = first.log();
    assert!(
        log.contains("Kubernetes API server") && log.contains("(context test)"),
        "{log}"
    );
    assert!(
        !log.contains(OWN_TOKEN),
        "the inline token leaked into the log"
    );
    assert_eq!(
        c.api
            .requests_to(&Method::POST, "/api/v1/namespaces/trellis-system/secrets")
            .len(),
        1,
        "the second replica found the Secret and created none"
    );
}
