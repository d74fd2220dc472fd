//! Join tokens: how a proxy outside Kubernetes proves its identity to the CA.
//!
//! `trellis-control token create --identity NS/SA --ttl 1h` prints a random token once; the
//! control plane keeps only its SHA-256 in `--state-dir/join-tokens.json` (mode 0600), with the
//! identity it proves and its expiry. A token is reusable until it expires (a proxy that
//! restarts asks again with the same file); expired entries are pruned on every write. Tokens
//! never appear in logs: a log line names a token by the first 12 hex digits of its hash.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::write_atomic;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    sha256: String,
    /// NAMESPACE/SERVICE_ACCOUNT
    identity: String,
    expires_unix: i64,
    created_unix: i64,
}

pub struct JoinTokens {
    path: PathBuf,
    records: Mutex<Vec<Record>>,
}

/// What a presented token proves.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Valid { identity: String },
    Expired { identity: String, at: i64 },
    Unknown,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// 32 random bytes, hex, with a prefix that says what the secret is.
pub fn random_secret(prefix: &str) -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random number generator failed");
    format!("{prefix}{}", hex(&bytes))
}

pub fn sha256_hex(secret: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes()).as_ref())
}

/// How logs name a secret: a prefix of its hash.
pub fn fingerprint(secret: &str) -> String {
    format!("sha256:{}", &sha256_hex(secret)[..12])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl JoinTokens {
    pub fn open(dir: &Path) -> Result<Self, String> {
        let path = dir.join("join-tokens.json");
        let records = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| format!("{} is damaged: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Self {
            path,
            records: Mutex::new(records),
        })
    }

    /// Creates a token for `identity` (NS/SA, already validated) valid for `ttl`. Returns the
    /// token and its expiry (unix seconds).
    pub fn create(&self, identity: &str, ttl: Duration) -> Result<(String, i64), String> {
        let token = random_secret("trellis-join-");
        let now = unix_now();
        let expires = now.saturating_add(ttl.as_secs().min(i64::MAX as u64) as i64);
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Record> = records
            .iter()
            .filter(|r| r.expires_unix > now)
            .cloned()
            .collect();
        next.push(Record {
            sha256: sha256_hex(&token),
            identity: identity.to_string(),
            expires_unix: expires,
            created_unix: now,
        });
        let text = serde_json::to_string_pretty(&next).unwrap_or_default();
        write_atomic(&self.path, text.as_bytes(), 0o600)
            .map_err(|e| format!("cannot store the token in {}: {e}", self.path.display()))?;
        *records = next;
        Ok((token, expires))
    }

    pub fn check(&self, token: &str) -> Check {
        let hash = sha256_hex(token);
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        match records.iter().find(|r| r.sha256 == hash) {
            None => Check::Unknown,
            Some(r) if r.expires_unix <= unix_now() => Check::Expired {
                identity: r.identity.clone(),
                at: r.expires_unix,
            },
            Some(r) => Check::Valid {
                identity: r.identity.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_reusable_and_expire() {
        let dir = std::env::temp_dir().join(format!("trellis-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = JoinTokens::open(&dir).unwrap();
        let (token, _) = tokens
            .create("shop/cart", Duration::from_secs(3600))
            .unwrap();
        let (expired, _) = tokens.create("shop/web", Duration::ZERO).unwrap();
        let stored = std::fs::read_to_string(dir.join("join-tokens.json")).unwrap();
        assert!(!stored.contains(&token), "the token itself is never stored");
        // Reopened from disk; reusable.
        let tokens = JoinTokens::open(&dir).unwrap();
        for _ in 0..2 {
            assert_eq!(
                tokens.check(&token),
                Check::Valid {
                    identity: "shop/cart".into()
                }
            );
        }
        assert!(matches!(tokens.check(&expired), Check::Expired { .. }));
        assert_eq!(tokens.check("trellis-join-nope"), Check::Unknown);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("join-tokens.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
