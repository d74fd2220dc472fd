//! The status subresource of every policy object: is it accepted (and if not, why), and — per
//! control-plane replica — which version is in force and how many of the proxies it applies to
//! have acknowledged that version.
//!
//! Each replica reports the proxies connected to it, under its own name in
//! `status.controlPlanes`: a JSON merge patch merges map keys, so replicas never overwrite each
//! other. Writes happen in their own task, woken by changes in force and by proxies' answers,
//! never on a request path; an object is written only when what it would say changed (timestamps
//! aside), and at most once a second, so a rollout of a thousand pods acknowledging one by one
//! costs a handful of writes, not a thousand. A failed write is logged (at most once a minute)
//! and retried later; it never stops anything else.
//!
//! A replica that goes away (a rollout gives replicas new names) must not be reported for ever:
//! every replica rewrites its entry at least every [`REFRESH`], and removes entries of others
//! not updated for [`STALE`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{InForce, Kind};
use crate::kube::watch::ObjectKey;
use crate::kube::{KubeClient, api_message};
use crate::server::Hub;

/// The shortest time between two writes of one object's status.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed write, the next attempt for that object.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Answers come in bursts (a rollout): wait this long after a wake-up before counting.
const COALESCE: Duration = Duration::from_millis(250);
/// A replica's entry is rewritten at least this often, even when nothing changed.
const REFRESH: Duration = Duration::from_secs(5 * 60);
/// Entries of other replicas older than this are removed (three missed refreshes).
const STALE: Duration = Duration::from_secs(15 * 60);
/// At most one log line about failed status writes per this.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What one object's status says, timestamps aside.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectStatus {
    pub generation: u64,
    /// `Err`: why the object is not in force.
    pub accepted: Result<(), String>,
    /// The policy version in force on this replica.
    pub version: u64,
    /// Connected proxies the policy applies to.
    pub proxies: usize,
    /// Of those, the ones that have acknowledged `version` — or hold what it means for them: a
    /// version that changed nothing for a proxy is not sent to it.
    pub acknowledged: usize,
}

/// The merge patch for the status subresource. `transition` is when the Accepted condition last
/// changed (kept from the object when it did not), `now` the time of this report.
pub fn render(status: &ObjectStatus, replica: &str, transition: &str, now: &str) -> Value {
    let (accepted, reason, message) = match &status.accepted {
        Ok(()) => ("True", "Valid", "valid; in force".to_string()),
        Err(e) => ("False", "Invalid", format!("not in force: {e}")),
    };
    json!({"status": {
        "observedGeneration": status.generation,
        "conditions": [{
            "type": "Accepted",
            "status": accepted,
            "reason": reason,
            "message": message,
            "lastTransitionTime": transition,
            "observedGeneration": status.generation,
        }],
        "controlPlanes": {
            replica: {
                "version": status.version.to_string(),
                "proxies": status.proxies,
                "acknowledged": status.acknowledged,
                "updated": now,
            },
        },
    }})
}

/// What of a status `render` compares: everything but the timestamps.
fn comparable(status: &Value, replica: &str) -> Value {
    let condition = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
        .cloned()
        .unwrap_or(Value::Null);
    let mine = &status["controlPlanes"][replica];
    json!({
        "observedGeneration": status["observedGeneration"],
        "condition": [condition["status"], condition["reason"], condition["message"], condition["observedGeneration"]],
        "mine": [mine["version"], mine["proxies"], mine["acknowledged"]],
    })
}

/// The Accepted condition's `status` and `lastTransitionTime` in an object's status.
fn accepted_since(status: &Value) -> Option<(&str, &str)> {
    let condition = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?;
    Some((
        condition["status"].as_str()?,
        condition["lastTransitionTime"].as_str()?,
    ))
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Connected proxies and how many have acknowledged what is in force for them: in all, and by
/// namespace and service account.
#[derive(Default)]
struct Counts {
    all: (usize, usize),
    by_namespace: HashMap<String, (usize, usize)>,
    by_account: HashMap<(String, String), (usize, usize)>,
}

impl Counts {
    fn of(hub: &Hub) -> Self {
        let mut counts = Self::default();
        for (p, acked) in hub.connected_proxies() {
            let acked = usize::from(acked);
            let namespace = p.workload.split_once('/').map_or("", |(ns, _)| ns);
            for slot in [
                &mut counts.all,
                counts
                    .by_namespace
                    .entry(namespace.to_string())
                    .or_default(),
                counts
                    .by_account
                    .entry((namespace.to_string(), p.service_account.clone()))
                    .or_default(),
            ] {
                slot.0 += 1;
                slot.1 += acked;
            }
        }
        counts
    }

    /// A TrafficPolicy reaches every proxy; a ServerPolicy the workloads of its namespace that
    /// its selector selects.
    fn for_object(&self, kind: Kind, namespace: &str, spec: &Value) -> (usize, usize) {
        match kind {
            Kind::Traffic => self.all,
            Kind::Server => match spec["selector"]["serviceAccount"].as_str() {
                Some(sa) => self
                    .by_account
                    .get(&(namespace.to_string(), sa.to_string()))
                    .copied()
                    .unwrap_or_default(),
                None => self
                    .by_namespace
                    .get(namespace)
                    .copied()
                    .unwrap_or_default(),
            },
        }
    }
}

/// What this replica last wrote (or tried to write) into one object.
struct Written {
    uid: String,
    /// `None` after a failed write.
    status: Option<ObjectStatus>,
    /// No write to this object before then.
    not_before: Instant,
    /// When it was last written; its entry is refreshed after [`REFRESH`].
    at: Instant,
}

/// `null` (a merge patch's removal) for every other replica's entry in `status` not updated
/// for [`STALE`] as of `now`.
fn stale_entries(status: &Value, replica: &str, now: SystemTime) -> serde_json::Map<String, Value> {
    status["controlPlanes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, entry)| {
            *name != replica
                && entry["updated"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
                    .is_none_or(|t| now.duration_since(t).is_ok_and(|age| age > STALE))
        })
        .map(|(name, _)| (name.clone(), Value::Null))
        .collect()
}

/// Starts the task that keeps every object's status.
pub fn spawn(
    hub: Arc<Hub>,
    client: Arc<KubeClient>,
    in_force: watch::Receiver<Arc<InForce>>,
    replica: String,
) {
    tokio::spawn(run(hub, client, in_force, replica));
}

async fn run(
    hub: Arc<Hub>,
    client: Arc<KubeClient>,
    mut in_force: watch::Receiver<Arc<InForce>>,
    replica: String,
) {
    let mut proxies = hub.subscribe_proxies();
    let mut written: HashMap<(Kind, ObjectKey), Written> = HashMap::new();
    let mut failures = FailureLog::default();
    let mut due: Option<Instant> = None;
    in_force.mark_changed();
    loop {
        tokio::select! {
            changed = in_force.changed() => if changed.is_err() { return },
            changed = proxies.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        tokio::time::sleep(COALESCE).await;
        let seen = in_force.borrow_and_update().clone();
        proxies.borrow_and_update();
        due = None;
        if !seen.synced {
            continue;
        }
        let version = seen.commit.version;
        let counts = Counts::of(&hub);
        written.retain(|id, _| seen.objects.contains_key(id));
        for (id, observed) in &seen.objects {
            let resource = &observed.resource;
            let (proxies, acknowledged) =
                counts.for_object(id.0, &resource.namespace, &resource.spec);
            let status = ObjectStatus {
                generation: resource.generation,
                accepted: observed.accepted.clone(),
                version,
                proxies,
                acknowledged,
            };
            let last = written.get(id).filter(|w| w.uid == resource.uid);
            match last {
                Some(w) if w.status.as_ref() == Some(&status) && w.at.elapsed() < REFRESH => {
                    let at = w.at + REFRESH;
                    due = Some(due.map_or(at, |d| d.min(at)));
                    continue;
                }
                Some(w) if w.not_before > Instant::now() => {
                    due = Some(due.map_or(w.not_before, |d| d.min(w.not_before)));
                    continue;
                }
                // First sight (e.g. after a restart): the object may already say all this.
                None if comparable(&resource.status, &replica)
                    == comparable(&render(&status, &replica, "", "")["status"], &replica) =>
                {
                    written.insert(
                        id.clone(),
                        Written {
                            uid: resource.uid.clone(),
                            status: Some(status),
                            not_before: Instant::now(),
                            at: Instant::now(),
                        },
                    );
                    continue;
                }
                _ => {}
            }
            let now = rfc3339_now();
            let condition = if status.accepted.is_ok() {
                "True"
            } else {
                "False"
            };
            let transition = match accepted_since(&resource.status) {
                Some((was, since)) if was == condition => since.to_string(),
                _ => now.clone(),
            };
            let mut patch = render(&status, &replica, &transition, &now);
            for (name, null) in stale_entries(&resource.status, &replica, SystemTime::now()) {
                patch["status"]["controlPlanes"][name] = null;
            }
            let path = format!("{}/status", id.0.object(&id.1));
            let result = client
                .request(
                    Method::PATCH,
                    &path,
                    Some("application/merge-patch+json"),
                    Some(patch.to_string().into_bytes()),
                )
                .await;
            let ok = match result {
                Ok((s, _)) if s.is_success() => true,
                // Deleted since the watch saw it: its status is moot.
                Ok((StatusCode::NOT_FOUND, _)) => true,
                Ok((s, body)) => {
                    failures.record(&path, &format!("{s}: {}", api_message(&body)));
                    false
                }
                Err(e) => {
                    failures.record(&path, &e);
                    false
                }
            };
            let not_before = Instant::now() + if ok { MIN_INTERVAL } else { RETRY_AFTER };
            if !ok {
                due = Some(due.map_or(not_before, |d| d.min(not_before)));
            }
            written.insert(
                id.clone(),
                Written {
                    uid: resource.uid.clone(),
                    status: ok.then_some(status),
                    not_before,
                    at: Instant::now(),
                },
            );
        }
    }
}

/// Failed status writes, logged at most once per [`LOG_INTERVAL`] with how many were not.
#[derive(Default)]
struct FailureLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl FailureLog {
    fn record(&mut self, path: &str, error: &str) {
        if self.last.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            %path, %error, others_since_last_report = self.unlogged,
            "cannot write a policy's status (may the control plane's service account patch trafficpolicies/status and serverpolicies/status?)"
        );
        self.last = Some(Instant::now());
        self.unlogged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(accepted: Result<(), String>) -> ObjectStatus {
        ObjectStatus {
            generation: 3,
            accepted,
            version: 9_007_199_254_740_991,
            proxies: 4,
            acknowledged: 3,
        }
    }

    #[test]
    fn a_status_renders_as_the_merge_patch_the_crd_declares() {
        let patch = render(
            &status(Ok(())),
            "trellis-control-0",
            "2026-01-02T03:04:05Z",
            "2026-01-02T03:04:06Z",
        );
        assert_eq!(
            patch,
            json!({"status": {
                "observedGeneration": 3,
                "conditions": [{
                    "type": "Accepted", "status": "True", "reason": "Valid",
                    "message": "valid; in force",
                    "lastTransitionTime": "2026-01-02T03:04:05Z", "observedGeneration": 3,
                }],
                "controlPlanes": {"trellis-control-0": {
                    "version": "9007199254740991", "proxies": 4, "acknowledged": 3,
                    "updated": "2026-01-02T03:04:06Z",
                }},
            }})
        );
    }

    #[test]
    fn an_invalid_object_says_why() {
        let patch = render(
            &status(Err("spec.timeout: \"5x\" is not a duration".into())),
            "a",
            "t",
            "t",
        );
        let condition = &patch["status"]["conditions"][0];
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["reason"], "Invalid");
        assert_eq!(
            condition["message"],
            "not in force: spec.timeout: \"5x\" is not a duration"
        );
    }

    #[test]
    fn timestamps_and_other_replicas_do_not_make_a_status_different() {
        let mine = render(&status(Ok(())), "a", "t1", "t2")["status"].clone();
        let mut object = render(&status(Ok(())), "a", "t0", "t0")["status"].clone();
        object["controlPlanes"]["b"] = json!({"version": "1", "proxies": 9});
        assert_eq!(comparable(&object, "a"), comparable(&mine, "a"));
        let other = render(
            &ObjectStatus {
                acknowledged: 4,
                ..status(Ok(()))
            },
            "a",
            "t1",
            "t2",
        );
        assert_ne!(comparable(&other["status"], "a"), comparable(&mine, "a"));
        assert_eq!(accepted_since(&object), Some(("True", "t0")));
    }

    #[test]
    fn entries_of_replicas_gone_for_fifteen_minutes_are_removed() {
        let now = humantime::parse_rfc3339("2026-01-01T12:00:00Z").unwrap();
        let status = json!({"controlPlanes": {
            "me": {"updated": "2026-01-01T10:00:00Z"},
            "live": {"updated": "2026-01-01T11:50:00Z"},
            "gone": {"updated": "2026-01-01T11:40:00Z"},
            "garbled": {"updated": "yesterday"},
        }});
        let mut stale: Vec<String> = stale_entries(&status, "me", now).keys().cloned().collect();
        stale.sort();
        assert_eq!(stale, ["garbled", "gone"]);
    }
}
