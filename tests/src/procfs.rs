//! What the kernel says about a process, for the harness and the benchmarks: a
//! `/proc/PID/status` field (`VmRSS`, `VmHWM`), the CPU time of `/proc/PID/stat`, and the count of
//! open descriptors.

use std::time::Duration;

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`); `None` when the process is gone.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors (sockets included) of process `pid`; `None` when the process is gone.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// utime + stime of process `pid` (all its threads); `None` when the process is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis
    // (utime and stime are fields 14 and 15, at 11 and 12 after it).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ticks(field(11)? + field(12)?))
}

/// Clock ticks (`/proc/stat`, `/proc/PID/stat` units) as a duration.
pub fn ticks(n: u64) -> Duration {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Duration::from_nanos(n * 1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(super::status_kb(pid, "VmRSS").is_some_and(|kb| kb > 0));
        assert!(super::status_kb(pid, "NoSuchField").is_none());
        assert!(super::cpu_time(pid).is_some());
        assert!(super::status_kb(u32::MAX, "VmRSS").is_none());
    }
}
