//! Finds the binaries under test, and makes them executable by the proxy's UID.
//!
//! The workspace's binaries sit next to the test executable's `deps/` folder. A checkout under a
//! 0700 directory (e.g. /root) is not reachable by UID 2102, so such binaries are copied once to a
//! world-readable folder under /tmp, keyed by their size and modification time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The `trellis-proxy` binary (override with `TRELLIS_PROXY_BIN`).
pub fn proxy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| locate("trellis-proxy", "TRELLIS_PROXY_BIN"))
}

/// The `trellis-testapp` binary (override with `TRELLIS_TESTAPP_BIN`).
pub fn testapp_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| locate("trellis-testapp", "TRELLIS_TESTAPP_BIN"))
}

/// The `trellis-control` binary (override with `TRELLIS_CONTROL_BIN`).
pub fn control_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| locate("trellis-control", "TRELLIS_CONTROL_BIN"))
}

fn locate(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe.parent().expect("the test executable is in a folder");
    let candidates = [
        dir.join(name),
        dir.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    let found = candidates.iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} not found next to {} — build it first: `cargo build --workspace --bins` \
             (the README's test command does), or set {env}",
            exe.display()
        )
    });
    reachable_by_everyone(found)
}

/// `path` itself if every folder above it is world-searchable, else a world-readable copy.
fn reachable_by_everyone(path: &Path) -> PathBuf {
    let open = path.ancestors().skip(1).all(|dir| {
        std::fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    });
    if open {
        return path.to_path_buf();
    }
    let meta = std::fs::metadata(path).expect("binary metadata");
    let stamp = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = PathBuf::from(format!("/tmp/trellis-bin-{}-{stamp}", meta.len()));
    let target = dir.join(path.file_name().expect("binary file name"));
    if !target.is_file() {
        std::fs::create_dir_all(&dir).expect("create /tmp binary folder");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod binary folder");
        let tmp = dir.join(format!(
            ".{}.{}",
            std::process::id(),
            target.file_name().and_then(|n| n.to_str()).unwrap_or("bin")
        ));
        std::fs::copy(path, &tmp).expect("copy binary");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .expect("chmod binary");
        std::fs::rename(&tmp, &target).expect("move binary into place");
    }
    target
}
