//! `--policy-file`: the policy read from a file, and re-read when the file changes.
//!
//! The file is polled (content hash compared) rather than watched with inotify: polling also
//! follows the symlink swaps Kubernetes uses to update mounted ConfigMaps. A change that fails
//! validation is logged with every error, counted, and not applied; the policy in force stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use trellis_proto::policy::{PolicyErrors, PolicySet};

use super::PolicyStore;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy file {path} was rejected: {errors}")]
    Invalid { path: PathBuf, errors: PolicyErrors },
}

/// Reads and validates the file: (policies, version).
pub fn load(path: &Path) -> Result<(PolicySet, String), PolicyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let set = PolicySet::parse(&text).map_err(|errors| PolicyFileError::Invalid {
        path: path.to_path_buf(),
        errors,
    })?;
    Ok((set, version_of(&text)))
}

/// A short content hash: the same file always has the same version.
pub fn version_of(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    format!("{hash:016x}")
}

/// Polls `path` every `interval` and applies valid changes until the process exits.
pub async fn watch(
    path: PathBuf,
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    interval: Duration,
) {
    let mut last_seen = store.current().version.clone();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                if last_seen != "unreadable" {
                    tracing::warn!(path = %path.display(), error = %e, "policy file unreadable; keeping the policy in force");
                    last_seen = "unreadable".into();
                }
                continue;
            }
        };
        let version = version_of(&text);
        if version == last_seen {
            continue;
        }
        last_seen = version.clone();
        match PolicySet::parse(&text) {
            Ok(set) => {
                let (traffic, server) = (set.traffic.len(), set.server.len());
                store.apply(set, version.clone(), format!("file:{}", path.display()));
                metrics.policy_load(true, &version);
                tracing::info!(%version, traffic, server, path = %path.display(), "policy applied");
            }
            Err(errors) => {
                metrics.policy_load(false, &store.current().version);
                for error in &errors.0 {
                    tracing::error!(path = %path.display(), rejected_version = %version, "{error}");
                }
                tracing::error!(
                    path = %path.display(), in_force = %store.current().version, errors = errors.0.len(),
                    "policy file rejected; the policy in force stays"
                );
            }
        }
    }
}
