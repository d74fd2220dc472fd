//! The simulated proxies: P discovery streams (a tonic connection each, all on one runtime), each
//! subscribed to its keys at once, recording and ACKing every update; the waits on what they
//! received (their initial answers, the endpoint set a write implies) and the counts since a
//! mark. Also the full snapshot: one more stream subscribed to every key, to weigh "resending
//! the world".

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use trellis_proto::pb::discovery_service_client::DiscoveryServiceClient;
use trellis_proto::pb::{DiscoveryRequest, DiscoveryUpdate};

use crate::Args;
use crate::cluster::{Cluster, SERVICE_PORT};
use crate::control::ControlProcess;
use crate::report::percentile;

/// Until every simulated proxy has its initial answers (or the full snapshot arrived).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Until every subscriber has the update one API write implies.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest update a simulated proxy accepts (the full snapshot of a big cluster is megabytes).
const MAX_MESSAGE: usize = 256 << 20;

/// One update as a simulated proxy received it.
struct Received {
    at: Instant,
    /// Its encoded size: what the control plane put on the stream for it.
    bytes: usize,
    /// Each destination's key and endpoint addresses (sorted).
    destinations: Vec<(String, Vec<String>)>,
    absent: Vec<String>,
}

impl Received {
    fn of(at: Instant, update: DiscoveryUpdate) -> Self {
        let bytes = update.encoded_len();
        let destinations = update
            .destinations
            .into_iter()
            .map(|d| {
                let mut addresses: Vec<String> =
                    d.endpoints.into_iter().map(|e| e.address).collect();
                addresses.sort();
                (d.key, addresses)
            })
            .collect();
        Self {
            at,
            bytes,
            destinations,
            absent: update.absent,
        }
    }
}

/// What every simulated proxy received, shared with the thread that waits on it.
struct Shared {
    logs: Mutex<Logs>,
    changed: Condvar,
}

struct Logs {
    /// Per proxy, its updates in order of arrival.
    received: Vec<Vec<Received>>,
    /// Streams that failed: the benchmark stops at the first.
    failures: Vec<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Logs> {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, proxy: usize, update: Received) {
        self.lock().received[proxy].push(update);
        self.changed.notify_all();
    }

    fn fail(&self, why: String) {
        self.lock().failures.push(why);
        self.changed.notify_all();
    }

    /// Waits until `ready` answers `Ok`; its `Err` says what is still missing, for the panic
    /// after `timeout`.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Logs) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut logs = self.lock();
        loop {
            if let Some(first) = logs.failures.first() {
                panic!(
                    "waiting for {what}: {} simulated proxies failed, the first: {first}",
                    logs.failures.len()
                );
            }
            let missing = match ready(&logs) {
                Ok(done) => return done,
                Err(missing) => missing,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {what}: {missing}"
            );
            logs = self
                .changed
                .wait_timeout(logs, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

pub(crate) struct Proxies {
    shared: Arc<Shared>,
    /// Per proxy, the keys it subscribed to.
    keys: Vec<Vec<String>>,
    /// Proxies `0..subscribers` subscribe to the rolled service; the others are bystanders.
    pub(crate) subscribers: usize,
    started: Instant,
}

/// The initial answers: how long until every proxy had them, and their weight.
pub(crate) struct Initial {
    /// Until the last proxy had an answer for every key it subscribed to.
    pub(crate) all: Duration,
    /// Per proxy, until it had them (median).
    pub(crate) median: Duration,
    pub(crate) bytes_median: usize,
    pub(crate) bytes_total: usize,
    pub(crate) updates: usize,
    /// Keys answered as absent (none should be: every key names a service).
    pub(crate) absent: usize,
    /// `trellis_control_discovery_update_bytes_total` then.
    pub(crate) metric_bytes: f64,
}

impl Proxies {
    /// Connects every proxy (a connection and a stream each), subscribing at once.
    pub(crate) fn start(
        rt: &tokio::runtime::Runtime,
        cp: &ControlProcess,
        cluster: &Cluster,
        args: &Args,
    ) -> Self {
        let mut rng = SplitMix64(args.seed);
        let rolled = cluster.rolled().key();
        let subscribers = args.subscribers();
        let others = cluster.services.len() - 1;
        let keys: Vec<Vec<String>> = (0..args.proxies)
            .map(|i| {
                let mut chosen = HashSet::new();
                while chosen.len() < args.subscriptions {
                    chosen.insert(1 + rng.below(others));
                }
                let mut keys: Vec<String> =
                    chosen.iter().map(|s| cluster.services[*s].key()).collect();
                keys.sort();
                if i < subscribers {
                    keys.insert(0, rolled.clone());
                }
                keys
            })
            .collect();
        let shared = Arc::new(Shared {
            logs: Mutex::new(Logs {
                received: (0..args.proxies).map(|_| Vec::new()).collect(),
                failures: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        // A tonic channel spawns its connection task on the runtime it is made in.
        let _entered = rt.enter();
        let started = Instant::now();
        for (i, keys) in keys.iter().enumerate() {
            rt.spawn(simulate_proxy(
                i,
                cp.channel(),
                keys.clone(),
                shared.clone(),
            ));
        }
        Self {
            shared,
            keys,
            subscribers,
            started,
        }
    }

    pub(crate) fn wait_initial_answers(&self, cp: &ControlProcess) -> Initial {
        let answered = self
            .shared
            .wait("every proxy's initial answers", ANSWER_TIMEOUT, |logs| {
                let done: Vec<(Instant, usize, usize, usize)> = logs
                    .received
                    .iter()
                    .zip(&self.keys)
                    .filter_map(|(log, keys)| answered(keys, log))
                    .collect();
                if done.len() == self.keys.len() {
                    Ok(done)
                } else {
                    Err(format!(
                        "{} of {} proxies have them",
                        done.len(),
                        self.keys.len()
                    ))
                }
            });
        let mut times: Vec<Duration> = answered.iter().map(|a| a.0 - self.started).collect();
        times.sort();
        let mut bytes: Vec<usize> = answered.iter().map(|a| a.1).collect();
        bytes.sort();
        Initial {
            all: times.last().copied().unwrap_or_default(),
            median: percentile(&times, 0.5).unwrap_or_default(),
            bytes_median: percentile(&bytes, 0.5).unwrap_or_default(),
            bytes_total: bytes.iter().sum(),
            updates: answered.iter().map(|a| a.2).sum(),
            absent: answered.iter().map(|a| a.3).sum(),
            metric_bytes: cp
                .metrics()
                .sum("trellis_control_discovery_update_bytes_total", &[]),
        }
    }

    /// How many updates each proxy has received so far.
    pub(crate) fn marks(&self) -> Vec<usize> {
        self.shared.lock().received.iter().map(Vec::len).collect()
    }

    /// Waits until every subscriber received, after `marks`, an update giving `key` exactly
    /// `addresses`; per subscriber, the delay since `since` and that update's size.
    pub(crate) fn wait_for_endpoints(
        &self,
        marks: &[usize],
        since: Instant,
        key: &str,
        addresses: &[String],
        what: &str,
    ) -> Vec<(Duration, usize)> {
        self.shared.wait(what, WRITE_TIMEOUT, |logs| {
            let delivered: Vec<(Duration, usize)> = logs.received[..self.subscribers]
                .iter()
                .zip(marks)
                .filter_map(|(log, mark)| {
                    log[*mark..]
                        .iter()
                        .find(|r| {
                            r.destinations
                                .iter()
                                .any(|(k, a)| k == key && a == addresses)
                        })
                        .map(|r| (r.at.saturating_duration_since(since), r.bytes))
                })
                .collect();
            if delivered.len() == self.subscribers {
                Ok(delivered)
            } else {
                Err(format!(
                    "{} of {} subscribers have {key} with {} endpoints",
                    delivered.len(),
                    self.subscribers,
                    addresses.len()
                ))
            }
        })
    }

    /// Updates (count, bytes) received since `marks` by the proxies in `range`.
    pub(crate) fn received_since(
        &self,
        marks: &[usize],
        range: std::ops::Range<usize>,
    ) -> (usize, usize) {
        let logs = self.shared.lock();
        logs.received[range.clone()]
            .iter()
            .zip(&marks[range])
            .flat_map(|(log, mark)| &log[*mark..])
            .fold((0, 0), |(n, b), r| (n + 1, b + r.bytes))
    }
}

/// When `log` first covered every key in `keys`: (then, bytes so far, updates so far, keys
/// answered absent).
fn answered(keys: &[String], log: &[Received]) -> Option<(Instant, usize, usize, usize)> {
    let mut left: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let (mut bytes, mut absent) = (0, 0);
    for (n, r) in log.iter().enumerate() {
        bytes += r.bytes;
        absent += r.absent.len();
        for (key, _) in &r.destinations {
            left.remove(key.as_str());
        }
        for key in &r.absent {
            left.remove(key.as_str());
        }
        if left.is_empty() {
            return Some((r.at, bytes, n + 1, absent));
        }
    }
    None
}

/// One proxy's discovery stream: subscribes to `keys`, records and ACKs every update.
async fn simulate_proxy(
    i: usize,
    channel: tonic::transport::Channel,
    keys: Vec<String>,
    shared: Arc<Shared>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(DiscoveryRequest {
        workload: format!("bench/proxy-{i}"),
        subscribe: keys,
        ..Default::default()
    });
    let mut client = DiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let mut updates = match client.watch(UnboundedReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(e) => {
            let cause = trellis_identity::grpc::status_cause(&e);
            return shared.fail(format!("proxy {i}: Watch: {cause}"));
        }
    };
    loop {
        match updates.message().await {
            Ok(Some(update)) => {
                let at = Instant::now();
                let nonce = update.nonce.clone();
                shared.record(i, Received::of(at, update));
                let _ = tx.send(DiscoveryRequest {
                    nonce,
                    ..Default::default()
                });
            }
            Ok(None) => {
                return shared.fail(format!("proxy {i}: the control plane ended the stream"));
            }
            Err(e) => {
                let cause = trellis_identity::grpc::status_cause(&e);
                return shared.fail(format!("proxy {i}: {cause}"));
            }
        }
    }
}

/// A full snapshot: every destination (both keys of every service port) in one answer.
pub(crate) struct Snapshot {
    pub(crate) keys: usize,
    pub(crate) bytes: usize,
    pub(crate) updates: usize,
    pub(crate) elapsed: Duration,
}

/// Subscribes one more stream to every key, measures the answer, and closes the stream.
pub(crate) async fn full_snapshot(cp: &ControlProcess, cluster: &Cluster) -> Snapshot {
    let keys: Vec<String> = cluster
        .services
        .iter()
        .flat_map(|s| {
            [
                s.key(),
                format!(
                    "{}.{}.svc.cluster.local:{SERVICE_PORT}",
                    s.name, s.namespace
                ),
            ]
        })
        .collect();
    let n = keys.len();
    let mut left: HashSet<String> = keys.iter().cloned().collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(DiscoveryRequest {
        workload: "bench/full-snapshot".into(),
        subscribe: keys,
        ..Default::default()
    });
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let mut client =
        DiscoveryServiceClient::new(cp.channel()).max_decoding_message_size(MAX_MESSAGE);
    let mut updates =
        tokio::time::timeout_at(deadline, client.watch(UnboundedReceiverStream::new(rx)))
            .await
            .unwrap_or_else(|_| {
                panic!("the full snapshot's Watch is not answered after {ANSWER_TIMEOUT:?}")
            })
            .unwrap_or_else(|e| {
                panic!(
                    "the full snapshot's Watch: {}",
                    trellis_identity::grpc::status_cause(&e)
                )
            })
            .into_inner();
    let (mut bytes, mut count) = (0, 0);
    while !left.is_empty() {
        let update = tokio::time::timeout_at(deadline, updates.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the full snapshot: {} of {n} keys unanswered after {ANSWER_TIMEOUT:?}",
                    left.len()
                )
            })
            .unwrap_or_else(|e| {
                panic!(
                    "the full snapshot's stream: {}",
                    trellis_identity::grpc::status_cause(&e)
                )
            })
            .unwrap_or_else(|| {
                panic!(
                    "the full snapshot's stream ended with {} keys unanswered",
                    left.len()
                )
            });
        bytes += update.encoded_len();
        count += 1;
        for d in &update.destinations {
            left.remove(&d.key);
        }
        for key in &update.absent {
            left.remove(key);
        }
        let _ = tx.send(DiscoveryRequest {
            nonce: update.nonce,
            ..Default::default()
        });
    }
    Snapshot {
        keys: n,
        bytes,
        updates: count,
        elapsed: started.elapsed(),
    }
}

/// A small seeded generator (SplitMix64): the same proxies subscribe to the same services on
/// every run.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is negligible for a few thousand).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
