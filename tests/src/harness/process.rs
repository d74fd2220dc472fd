//! A child process with its output in log files, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    pub name: String,
    child: Child,
    /// Stderr, and stdout too unless the process was started with [`Proc::spawn_split`].
    log: PathBuf,
    /// Stdout, when it has a file of its own.
    stdout: Option<PathBuf>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr both in `log`.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> Self {
        let file = create(log);
        let err = file.try_clone().expect("clone log file handle");
        Self::start(name, cmd, (file, err), log, None)
    }

    /// Starts `cmd` with stdout in `stdout` and stderr in `stderr`: for a process whose stdout
    /// is data (the sidecar's access log) and whose stderr is its diagnostic log.
    pub fn spawn_split(name: &str, cmd: Command, stdout: &Path, stderr: &Path) -> Self {
        let (out, err) = (create(stdout), create(stderr));
        Self::start(name, cmd, (out, err), stderr, Some(stdout.to_path_buf()))
    }

    fn start(
        name: &str,
        mut cmd: Command,
        (out, err): (std::fs::File, std::fs::File),
        log: &Path,
        stdout: Option<PathBuf>,
    ) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            stdout,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The diagnostic log so far: stderr (with stdout, unless the two were split).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stdout so far, when it has a file of its own (else the combined log).
    pub fn stdout_log(&self) -> String {
        std::fs::read_to_string(self.stdout.as_ref().unwrap_or(&self.log)).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // A child already waited for is gone and its PID may belong to another process now.
        if self.exited.is_some() {
            return;
        }
        // SAFETY: sending a signal to our own child has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// A `/proc/PID/status` field in kB (e.g. `VmRSS`, `VmHWM`).
    pub fn status_kb(&self, field: &str) -> Option<u64> {
        crate::procfs::status_kb(self.child.id(), field)
    }
}

fn create(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

/// Prints the last `n` lines of the file at `path`, headed by what it is.
fn print_tail(what: &str, path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(n).collect();
    eprintln!("---- last lines of {what} ({}) ----", path.display());
    for line in tail.into_iter().rev() {
        eprintln!("{line}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            if let Some(stdout) = &self.stdout {
                print_tail(&format!("{} stdout", self.name), stdout, 20);
            }
            print_tail(&self.name, &self.log, 40);
        }
    }
}
