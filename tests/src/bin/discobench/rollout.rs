//! The rollouts: rolling updates of the rolled service (`web-0` in `ns-0`), one pod at a time as
//! a Deployment does with maxSurge 1, maxUnavailable 0 — create the new pod, add it ready to the
//! slice, mark the old one not ready, remove it from the slice, delete it. Each API write is
//! timed until the last subscriber has the endpoint set it implies (or, when it implies none,
//! given a quiet period), with the proxies' and the control plane's counts of updates and bytes
//! and the control plane's CPU over it.

use std::time::{Duration, Instant};

use trellis_tests::harness::apiserver::objects::pod;
use trellis_tests::harness::{FakeApiServer, Scrape};

use crate::Args;
use crate::cluster::{Cluster, Endpoint, ready_addresses, slice, slice_name};
use crate::control::ControlProcess;
use crate::proxies::Proxies;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    CreatePod,
    AddReady,
    OldNotReady,
    RemoveOld,
    DeletePod,
}

impl WriteKind {
    pub(crate) const ALL: [Self; 5] = [
        Self::CreatePod,
        Self::AddReady,
        Self::OldNotReady,
        Self::RemoveOld,
        Self::DeletePod,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::CreatePod => "create new pod",
            Self::AddReady => "slice: add new, ready",
            Self::OldNotReady => "slice: old not ready",
            Self::RemoveOld => "slice: remove old",
            Self::DeletePod => "delete old pod",
        }
    }

    pub(crate) fn id(self) -> &'static str {
        match self {
            Self::CreatePod => "create_pod",
            Self::AddReady => "add_ready",
            Self::OldNotReady => "old_not_ready",
            Self::RemoveOld => "remove_old",
            Self::DeletePod => "delete_pod",
        }
    }
}

/// A change of the rolled service's slice: the endpoints, and the new pod.
type SliceStep = fn(&mut Vec<Endpoint>, &Endpoint);

/// One API write and what followed it.
pub(crate) struct WriteResult {
    pub(crate) kind: WriteKind,
    /// Per subscriber: delay from the write to its update, and the update's size. Empty for a
    /// write that changes no ready endpoint.
    pub(crate) deliveries: Vec<(Duration, usize)>,
    /// Every update any proxy received from the write until the next one.
    pub(crate) client_updates: usize,
    pub(crate) client_bytes: usize,
    /// The control plane's own count over the same span.
    pub(crate) metric_updates: f64,
    pub(crate) metric_bytes: f64,
    /// The control plane's time on CPU (schedstat) from the write until the next.
    pub(crate) cpu: Duration,
}

pub(crate) struct Rollout {
    pub(crate) writes: Vec<WriteResult>,
    pub(crate) elapsed: Duration,
    /// The control plane's CPU time over the rollouts: utime + stime, and schedstat's.
    pub(crate) cpu: Duration,
    pub(crate) on_cpu: Duration,
    /// Updates received by proxies not subscribed to the rolled service.
    pub(crate) bystander_updates: usize,
    /// Updates received by subscribers beyond the one per endpoint change.
    pub(crate) unexpected_updates: usize,
}

struct Writer<'a> {
    cp: &'a ControlProcess,
    proxies: &'a Proxies,
    key: String,
    quiet: Duration,
    metric: (f64, f64),
    writes: Vec<WriteResult>,
}

impl Writer<'_> {
    fn scrape(&self) -> (f64, f64) {
        let text = self.cp.try_metrics().unwrap_or_else(|| {
            panic!(
                "the control plane's admin server ({}) does not answer",
                self.cp.admin
            )
        });
        let scrape = Scrape::parse(&text);
        (
            scrape.sum("trellis_control_discovery_updates_total", &[]),
            scrape.sum("trellis_control_discovery_update_bytes_total", &[]),
        )
    }

    /// Runs `write`; waits for `expected` (the rolled key's ready addresses, when the write
    /// changes them) to reach every subscriber, else for the quiet period.
    fn write(&mut self, kind: WriteKind, expected: Option<Vec<String>>, write: impl FnOnce()) {
        let cpu = self.cp.stats().on_cpu;
        let marks = self.proxies.marks();
        let since = Instant::now();
        write();
        let deliveries = match expected {
            Some(addresses) => {
                let what = format!(
                    "\"{}\" (write {}) to reach every subscriber",
                    kind.label(),
                    self.writes.len() + 1
                );
                self.proxies
                    .wait_for_endpoints(&marks, since, &self.key, &addresses, &what)
            }
            None => {
                std::thread::sleep(self.quiet);
                Vec::new()
            }
        };
        let (client_updates, client_bytes) = self.proxies.received_since(&marks, 0..marks.len());
        let metric = self.scrape();
        self.writes.push(WriteResult {
            kind,
            deliveries,
            client_updates,
            client_bytes,
            metric_updates: metric.0 - self.metric.0,
            metric_bytes: metric.1 - self.metric.1,
            cpu: self.cp.stats().on_cpu.saturating_sub(cpu),
        });
        self.metric = metric;
    }
}

impl Rollout {
    /// `args.rollouts` rolling updates of the rolled service, one pod at a time: maxSurge 1,
    /// maxUnavailable 0.
    pub(crate) fn run(
        api: &FakeApiServer,
        cp: &ControlProcess,
        cluster: &Cluster,
        mut endpoints: Vec<Endpoint>,
        proxies: &Proxies,
        args: &Args,
    ) -> Self {
        let svc = cluster.rolled();
        let ns = &svc.namespace;
        let slice_path = format!(
            "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{}",
            slice_name(svc)
        );
        let mut writer = Writer {
            cp,
            proxies,
            key: svc.key(),
            quiet: Duration::from_millis(args.quiet_ms),
            metric: (0.0, 0.0),
            writes: Vec::new(),
        };
        writer.metric = writer.scrape();
        let start_marks = proxies.marks();
        let started = Instant::now();
        let before = cp.stats();
        for generation in 1..=args.rollouts {
            for k in 0..args.endpoints {
                let new = Endpoint {
                    pod: format!("{}-g{generation}-{k}", svc.name),
                    ip: cluster.next_pod_ip(),
                    ready: true,
                };
                let old = endpoints[0].pod.clone();
                let object = pod(ns, &new.pod, &new.ip, &svc.name, true);
                writer.write(WriteKind::CreatePod, None, || {
                    api.create(&format!("/api/v1/namespaces/{ns}/pods"), object);
                });
                // The slice as the EndpointSlice controller rewrites it, step by step.
                let steps: [(WriteKind, SliceStep); 3] = [
                    (WriteKind::AddReady, |eps, new| eps.push(new.clone())),
                    (WriteKind::OldNotReady, |eps, _| eps[0].ready = false),
                    (WriteKind::RemoveOld, |eps, _| {
                        eps.remove(0);
                    }),
                ];
                for (kind, step) in steps {
                    let before = ready_addresses(&endpoints);
                    step(&mut endpoints, &new);
                    let after = ready_addresses(&endpoints);
                    let expected = (after != before).then_some(after);
                    let object = slice(svc, &endpoints);
                    writer.write(kind, expected, || {
                        api.replace(&slice_path, object);
                    });
                }
                writer.write(WriteKind::DeletePod, None, || {
                    api.delete(&format!("/api/v1/namespaces/{ns}/pods/{old}"));
                });
            }
        }
        let elapsed = started.elapsed();
        let after = cp.stats();
        let end = proxies.marks();
        let (bystander_updates, _) =
            proxies.received_since(&start_marks, proxies.subscribers..end.len());
        let (subscriber_updates, _) = proxies.received_since(&start_marks, 0..proxies.subscribers);
        let expected: usize = writer.writes.iter().map(|w| w.deliveries.len()).sum();
        Self {
            writes: writer.writes,
            elapsed,
            cpu: after.cpu.saturating_sub(before.cpu),
            on_cpu: after.on_cpu.saturating_sub(before.on_cpu),
            bystander_updates,
            unexpected_updates: subscriber_updates - expected,
        }
    }
}
