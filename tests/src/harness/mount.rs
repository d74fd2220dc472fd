//! Mounts a fault test puts over a directory — a tiny tmpfs (a full disk) or a read-only bind
//! mount (a read-only volume) — and takes away again when dropped, also when the test fails.
//!
//! They are made in the test process's mount namespace: processes started afterwards (with
//! `ip netns exec`, which copies it) see them; processes already running keep the view they had.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mount over `dir`, unmounted on drop.
pub struct Mount {
    dir: PathBuf,
    what: &'static str,
    mounted: bool,
}

impl Mount {
    /// A tmpfs of `size` (e.g. `64k`) over `dir` (created if missing): writes past it fail
    /// with ENOSPC, as on a full disk.
    pub fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let size = format!("size={size}");
        mount(&["-t", "tmpfs", "-o", &size, "tmpfs", &path(dir)]);
        Self {
            dir: dir.to_path_buf(),
            what: "tmpfs",
            mounted: true,
        }
    }

    /// `dir` bound over itself read-only: every write under it fails with EROFS, also for root
    /// (which permission bits would not stop).
    pub fn read_only(dir: &Path) -> Self {
        mount(&["--bind", &path(dir), &path(dir)]);
        let guard = Self {
            dir: dir.to_path_buf(),
            what: "read-only bind mount",
            mounted: true,
        };
        mount(&["-o", "remount,bind,ro", &path(dir)]);
        guard
    }

    /// Unmounts now (also done on drop); the directory shows what is beneath again.
    pub fn unmount(&mut self) {
        if !std::mem::take(&mut self.mounted) {
            return;
        }
        let out = Command::new("umount").arg(&self.dir).output();
        if !out.is_ok_and(|o| o.status.success()) {
            // Busy (a process still has a file open there): detach it now, freed when unused.
            let lazy = Command::new("umount").arg("-l").arg(&self.dir).output();
            if !lazy.is_ok_and(|o| o.status.success()) {
                eprintln!(
                    "could not unmount the {} on {}: run `umount -l {}`",
                    self.what,
                    self.dir.display(),
                    self.dir.display()
                );
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn path(dir: &Path) -> String {
    dir.to_string_lossy().into_owned()
}

fn mount(args: &[&str]) {
    let out = Command::new("mount")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running mount: {e}"));
    assert!(
        out.status.success(),
        "mount {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
