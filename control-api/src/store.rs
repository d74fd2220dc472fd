//! Policies and their version, kept in `--state-dir/state.json`; and the state dir itself,
//! which also holds the CA key and the admin credential, so it is private to the control
//! plane's user ([`private_dir`], 0700).
//!
//! A change is written to a temporary file, fsynced, renamed over the old file and the directory
//! fsynced; only then is it put in force in memory. A write that fails (disk full, read-only,
//! permissions) rejects the change with the reason and leaves both the file and the policy in
//! force as they were.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use trellis_proto::policy::{PolicyErrors, PolicySet, ServerPolicy, TrafficPolicy};
use trellis_proto::wire;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write the state to {path}: {source} — the policy in force is unchanged")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the state from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state in {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(PolicyErrors),
}

type Key = (String, String);

/// The policies in force and the version of the last change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub version: u64,
    pub traffic: BTreeMap<Key, TrafficPolicy>,
    pub server: BTreeMap<Key, ServerPolicy>,
}

impl State {
    pub fn policy_set(&self) -> PolicySet {
        PolicySet {
            traffic: self.traffic.values().cloned().collect(),
            server: self.server.values().cloned().collect(),
        }
    }

    /// The state with `set` applied (created or replaced), and what changed.
    pub fn with_applied(&self, set: PolicySet) -> (State, Vec<String>) {
        let mut next = self.clone();
        let mut changed = Vec::new();
        for p in set.traffic {
            let key = (p.namespace.clone(), p.name.clone());
            if next.traffic.get(&key) != Some(&p) {
                changed.push(format!("TrafficPolicy {}/{}", key.0, key.1));
                next.traffic.insert(key, p);
            }
        }
        for p in set.server {
            let key = (p.namespace.clone(), p.name.clone());
            if next.server.get(&key) != Some(&p) {
                changed.push(format!("ServerPolicy {}/{}", key.0, key.1));
                next.server.insert(key, p);
            }
        }
        (next, changed)
    }

    /// The state with the documents named in `set` removed, and what changed.
    pub fn with_deleted(&self, set: &PolicySet) -> (State, Vec<String>) {
        let mut next = self.clone();
        let mut changed = Vec::new();
        for p in &set.traffic {
            if next
                .traffic
                .remove(&(p.namespace.clone(), p.name.clone()))
                .is_some()
            {
                changed.push(format!("TrafficPolicy {}/{} deleted", p.namespace, p.name));
            }
        }
        for p in &set.server {
            if next
                .server
                .remove(&(p.namespace.clone(), p.name.clone()))
                .is_some()
            {
                changed.push(format!("ServerPolicy {}/{} deleted", p.namespace, p.name));
            }
        }
        (next, changed)
    }
}

pub struct Store {
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the state directory and reads the state it holds.
    pub fn open(dir: &Path) -> Result<(Self, State), StoreError> {
        private_dir(dir).map_err(|source| StoreError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("state.json");
        let store = Self { path: path.clone() };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((store, State::default()));
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let saved: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let version = saved["version"].as_u64().unwrap_or(0);
        let yaml = saved["policies"].as_str().unwrap_or("");
        let set = PolicySet::parse(yaml).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let (mut state, _) = State::default().with_applied(set);
        state.version = version;
        Ok((store, state))
    }

    /// Writes `state` durably. On error the previous file is intact.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let set = state.policy_set();
        let traffic: Vec<_> = set.traffic.iter().map(wire::traffic_to_wire).collect();
        let server: Vec<_> = set.server.iter().map(wire::server_to_wire).collect();
        let body = serde_json::json!({"version": state.version, "policies": wire::to_yaml(&traffic, &server)});
        let text = serde_json::to_string_pretty(&body).unwrap_or_default();
        write_atomic(&self.path, text.as_bytes(), 0o644).map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Creates `dir` (and missing parents) readable by this user only (0700), whatever the umask;
/// an existing dir open to others is narrowed to 0700. When that is not allowed (a volume owned
/// by another user, e.g. a Kubernetes emptyDir), it says so and goes on: the secrets in it are
/// 0600 files in any case.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), was = %format!("{mode:o}"), "state dir narrowed to 0700: it holds the CA key and the admin credential")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), mode = %format!("{mode:o}"), error = %e, "the state dir is open to other users and cannot be narrowed to 0700; its secrets are 0600 files")
            }
        }
    }
    Ok(())
}

/// Narrows an existing secret file (a key, a token) that others may read to 0600, saying so: a
/// file left 0644 by an operator or an older version is not left readable.
pub fn private_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return;
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Ok(()) => {
            tracing::warn!(path = %path.display(), was = %format!("{mode:o}"), "a secret file was readable by others: narrowed to 0600")
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), mode = %format!("{mode:o}"), error = %e, "a secret file is readable by others and cannot be narrowed to 0600")
        }
    }
}

/// Writes `path` durably: a temporary file with `mode`, fsynced, renamed over `path`, and the
/// directory fsynced. On error the previous file is intact.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: a}\nspec: {timeout: 2s}\n";

    #[test]
    fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("trellis-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (store, state) = Store::open(&dir).unwrap();
        assert_eq!(state.version, 0);
        let (mut next, changed) = state.with_applied(PolicySet::parse(DOCS).unwrap());
        assert_eq!(changed, ["TrafficPolicy default/a"]);
        next.version = 1;
        store.save(&next).unwrap();
        let (_, restored) = Store::open(&dir).unwrap();
        assert_eq!(restored, next);
        let (same, changed) = restored.with_applied(PolicySet::parse(DOCS).unwrap());
        assert!(
            changed.is_empty(),
            "applying the same document again changes nothing"
        );
        assert_eq!(same, restored);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
