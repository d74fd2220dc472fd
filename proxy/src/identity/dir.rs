//! `--identity-dir`: certificates written by cert-manager, SPIRE or an operator (`cert.pem`,
//! `key.pem`, `ca.pem`), checked every second and reloaded when any of them changes. A set that
//! does not verify (half-written, key and certificate from different issuances, another CA) is
//! refused with the reason and the certificate in force stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_identity::tls::Credentials;

use super::Installer;

/// The files' contents, to notice a change.
fn read_all(dir: &Path) -> Result<[Vec<u8>; 3], String> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    Ok([read("cert.pem")?, read("key.pem")?, read("ca.pem")?])
}

/// Loads the directory once (at start: an error stops the proxy).
pub fn load(dir: &Path) -> Result<Credentials, String> {
    let [cert, key, ca] = read_all(dir)?;
    Credentials::from_pem(&cert, &key, &ca).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Installs the directory's credentials now and whenever they change.
pub async fn watch(dir: PathBuf, installer: Installer, mut last: [Vec<u8>; 3]) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let files = match read_all(&dir) {
            Ok(files) => files,
            Err(e) => {
                if !last[0].is_empty() {
                    tracing::warn!(error = %e, "identity dir unreadable; the certificate in force stays");
                    last = Default::default();
                }
                continue;
            }
        };
        if files == last {
            continue;
        }
        let [cert, key, ca] = &files;
        match Credentials::from_pem(cert, key, ca) {
            Ok(creds) => {
                if let Err(e) = installer.install(&creds, "identity dir") {
                    tracing::error!(error = %e, "identity dir: cannot use the certificate");
                    installer.failed();
                }
            }
            Err(e) => {
                installer.failed();
                tracing::error!(dir = %dir.display(), error = %e, "identity dir changed but does not verify; the certificate in force stays");
            }
        }
        last = files;
    }
}

/// The files as they are now (for `watch` to start from).
pub fn snapshot(dir: &Path) -> [Vec<u8>; 3] {
    read_all(dir).unwrap_or_default()
}
