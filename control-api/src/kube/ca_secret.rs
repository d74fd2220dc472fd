//! The secrets every replica of the control plane must share — the mesh CA (certificate and key)
//! and the admin token — kept in one Kubernetes Secret, so that each replica signs with the same
//! CA and accepts the same admin token, and the state dir is only a cache.
//!
//! The first replica to find no Secret generates the material and creates it; when several start
//! together, the API server lets exactly one create succeed (409 for the others), and the losers
//! read and use the winner's. The Secret is never updated: replacing a CA is an operator's
//! decision (delete the Secret, restart every replica).

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use trellis_identity::ca::{Ca, CaError};

use super::{Backoff, KubeClient, api_message, is_object_name};
use crate::identity::tokens::random_secret;
use crate::store::write_atomic;

/// The Secret's keys.
pub const CA_CERT_KEY: &str = "ca.pem";
pub const CA_KEY_KEY: &str = "ca-key.pem";
pub const ADMIN_TOKEN_KEY: &str = "admin-token";

/// How long to keep trying while the API server cannot be reached (a control plane starting
/// together with its cluster), before giving up and letting the pod restart.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(8);

/// What the Secret holds, checked: the CA certificate and key belong together and are usable.
#[derive(Clone)]
pub struct SharedSecrets {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub admin_token: String,
}

impl fmt::Debug for SharedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSecrets")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("ca_key_pem", &"<redacted>")
            .field("admin_token", &"<redacted>")
            .finish()
    }
}

impl SharedSecrets {
    /// Writes the admin token, and unless `with_ca` is false (the operator's own CA is in use)
    /// the CA, into the state dir where `Authority::bootstrap` loads them.
    pub fn write_to(&self, dir: &Path, with_ca: bool) -> Result<(), String> {
        let token = format!("{}\n", self.admin_token);
        let mut files = vec![(ADMIN_TOKEN_KEY, token.as_str(), 0o600)];
        if with_ca {
            files.push((CA_CERT_KEY, &self.ca_cert_pem, 0o644));
            files.push((CA_KEY_KEY, &self.ca_key_pem, 0o600));
        }
        for (name, text, mode) in files {
            let path = dir.join(name);
            write_atomic(&path, text.as_bytes(), mode)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// A failed attempt: worth retrying (no answer, or the API server is overloaded or failing) or
/// not (refused, or a Secret we cannot use — retrying would not change it).
enum Failure {
    Retry(String),
    Fatal(String),
}

/// Reads the Secret `namespace/name`, or creates it with a new CA for `trust_domain` and a new
/// admin token if there is none.
pub async fn load_or_create(
    client: &KubeClient,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<SharedSecrets, String> {
    for (what, value) in [("namespace", namespace), ("name", name)] {
        if !is_object_name(value) {
            return Err(format!(
                "the CA Secret's {what} {value:?} is not a Kubernetes name (lowercase letters, digits, '-', '.')"
            ));
        }
    }
    let deadline = Instant::now() + GIVE_UP_AFTER;
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match once(client, namespace, name, trust_domain).await {
            Ok(secrets) => return Ok(secrets),
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Retry(error)) => {
                let wait = backoff.next_wait();
                if Instant::now() + wait > deadline {
                    return Err(format!(
                        "{error} (gave up after {attempt} attempts in {}s)",
                        GIVE_UP_AFTER.as_secs()
                    ));
                }
                tracing::warn!(secret = %format!("{namespace}/{name}"), attempt, retry_in = ?wait, %error, "cannot read the CA Secret yet");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn once(
    client: &KubeClient,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<SharedSecrets, Failure> {
    let collection = format!("/api/v1/namespaces/{namespace}/secrets");
    let path = format!("{collection}/{name}");
    let what = format!("the Secret {namespace}/{name}");
    let (status, body) = get(client, &path, &what).await?;
    if status == StatusCode::OK {
        return read(&body, &what, trust_domain).map_err(Failure::Fatal);
    }
    // 404: nobody has created it yet. Generate, and try to be the one who creates it.
    let (_, ca_cert_pem, ca_key_pem) =
        Ca::generate(trust_domain).map_err(|e| Failure::Fatal(e.to_string()))?;
    let secrets = SharedSecrets {
        ca_cert_pem,
        ca_key_pem,
        admin_token: random_secret("trellis-admin-"),
    };
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let object = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "trellis"},
            "annotations": {"trellis.dev/description": "The mesh CA and admin token shared by every trellis-control replica. Delete it and restart them all to replace the CA."},
        },
        "type": "Opaque",
        "data": {
            CA_CERT_KEY: b64(&secrets.ca_cert_pem),
            CA_KEY_KEY: b64(&secrets.ca_key_pem),
            ADMIN_TOKEN_KEY: b64(&secrets.admin_token),
        },
    });
    let (status, body) = client
        .request(
            Method::POST,
            &collection,
            Some("application/json"),
            Some(object.to_string().into_bytes()),
        )
        .await
        .map_err(Failure::Retry)?;
    match status {
        StatusCode::CREATED | StatusCode::OK => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "generated the mesh CA and admin token, stored in a Secret");
            Ok(secrets)
        }
        // Another replica created it between our GET and our POST: theirs is the one.
        StatusCode::CONFLICT => match get(client, &path, &what).await? {
            (StatusCode::OK, body) => read(&body, &what, trust_domain).map_err(Failure::Fatal),
            (status, _) => Err(Failure::Retry(format!(
                "{what} existed when we created it, then reading it answered {status}"
            ))),
        },
        status => Err(classify(status, &body, &format!("cannot create {what}"))),
    }
}

/// GET the Secret: `Ok` for 200 and 404; other answers are failures.
async fn get(
    client: &KubeClient,
    path: &str,
    what: &str,
) -> Result<(StatusCode, Vec<u8>), Failure> {
    let (status, body) = client
        .request(Method::GET, path, None, None)
        .await
        .map_err(Failure::Retry)?;
    match status {
        StatusCode::OK | StatusCode::NOT_FOUND => Ok((status, body.to_vec())),
        status => Err(classify(status, &body, &format!("cannot read {what}"))),
    }
}

/// 429 and 5xx pass; anything else will not change by asking again.
fn classify(status: StatusCode, body: &[u8], what: &str) -> Failure {
    let hint = match status {
        StatusCode::FORBIDDEN => {
            " (may the control plane's service account get and create secrets in its namespace? see its Role)"
        }
        StatusCode::UNAUTHORIZED => " (is the control plane's token valid for this API server?)",
        _ => "",
    };
    let error = format!(
        "{what}: the Kubernetes API answered {status}{hint}: {}",
        api_message(body)
    );
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Failure::Retry(error)
    } else {
        Failure::Fatal(error)
    }
}

/// The secrets in a Secret object, each key checked; errors name the Secret and the key.
fn read(body: &[u8], what: &str, trust_domain: &str) -> Result<SharedSecrets, String> {
    let secret: Value = serde_json::from_slice(body)
        .map_err(|e| format!("{what}: the Kubernetes API answered invalid JSON: {e}"))?;
    let key = |key: &str| -> Result<String, String> {
        let encoded = secret["data"][key].as_str().ok_or_else(|| {
            format!(
                "{what} has no key {key:?} (it needs {CA_CERT_KEY}, {CA_KEY_KEY} and {ADMIN_TOKEN_KEY}; delete it to have a new one generated)"
            )
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("{what}, key {key:?}: not base64: {e}"))?;
        String::from_utf8(bytes).map_err(|_| format!("{what}, key {key:?}: not text"))
    };
    let (ca_cert_pem, ca_key_pem) = (key(CA_CERT_KEY)?, key(CA_KEY_KEY)?);
    Ca::load(&ca_cert_pem, &ca_key_pem, trust_domain).map_err(|e| match e {
        CaError::BadCaKey(_) => format!("{what}, key {CA_KEY_KEY:?}: {e}"),
        e => format!("{what}, key {CA_CERT_KEY:?}: {e}"),
    })?;
    let admin_token = key(ADMIN_TOKEN_KEY)?.trim().to_string();
    if admin_token.is_empty() || !admin_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{what}, key {ADMIN_TOKEN_KEY:?}: empty or not a token (printable ASCII without spaces)"
        ));
    }
    Ok(SharedSecrets {
        ca_cert_pem,
        ca_key_pem,
        admin_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(data: Value) -> Vec<u8> {
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "trellis-ca", "namespace": "trellis-system"}, "data": data})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn reads_a_good_secret_and_names_the_bad_key() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let (_, cert, key) = Ca::generate("cluster.local").unwrap();
        let what = "the Secret trellis-system/trellis-ca";
        let good = secret(json!({"ca.pem": b64(&cert), "ca-key.pem": b64(&key),
            "admin-token": b64("trellis-admin-abc\n")}));
        let secrets = read(&good, what, "cluster.local").unwrap();
        assert_eq!(
            (secrets.ca_cert_pem.as_str(), secrets.admin_token.as_str()),
            (cert.as_str(), "trellis-admin-abc")
        );
        assert!(!format!("{secrets:?}").contains("trellis-admin-abc"));

        let (_, _, other_key) = Ca::generate("cluster.local").unwrap();
        for (data, expected) in [
            (
                json!({"ca.pem": b64(&cert), "admin-token": b64("t")}),
                "has no key \"ca-key.pem\"",
            ),
            (
                json!({"ca.pem": b64(&cert), "ca-key.pem": b64(&other_key), "admin-token": b64("t")}),
                "key \"ca-key.pem\": the CA key is unusable: it does not belong",
            ),
            (
                json!({"ca.pem": b64("not pem"), "ca-key.pem": b64(&key), "admin-token": b64("t")}),
                "key \"ca.pem\": the CA certificate is unusable",
            ),
            (
                json!({"ca.pem": "%%%", "ca-key.pem": b64(&key), "admin-token": b64("t")}),
                "key \"ca.pem\": not base64",
            ),
            (
                json!({"ca.pem": b64(&cert), "ca-key.pem": b64(&key), "admin-token": b64(" \n")}),
                "key \"admin-token\": empty",
            ),
        ] {
            let err = read(&secret(data), what, "cluster.local").unwrap_err();
            assert!(
                err.starts_with(what) && err.contains(expected),
                "expected {expected:?} in {err}"
            );
        }
    }
}
