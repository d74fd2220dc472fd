//! What the kernel knows about CPU and memory: a process's CPU time and peak RSS from
//! `/proc/PID/*`, the machine's busy time from `/proc/stat`, our own and our waited-for
//! children's CPU from `getrusage`, and pinning this process to one CPU.

use std::time::Duration;

/// utime + stime of process `pid` (all its threads); zero once it is gone.
pub fn cpu_time(pid: u32) -> Duration {
    trellis_tests::procfs::cpu_time(pid).unwrap_or_default()
}

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`), 0 if the process is gone.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    trellis_tests::procfs::status_kb(pid, field).unwrap_or(0)
}

/// CPU time the whole machine spent not idle (all CPUs), from the `cpu` line of `/proc/stat`:
/// (busy outside softirq, softirq). Softirq time (the receive side of the veth network stack,
/// mostly) is charged to no process, so it is kept apart from "other processes".
pub fn machine_busy() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 7))
        .map(|(_, x)| x)
        .sum();
    let softirq = v.get(6).copied().unwrap_or(0);
    (
        trellis_tests::procfs::ticks(busy),
        trellis_tests::procfs::ticks(softirq),
    )
}

/// CPU used by this process and by the children it has waited for (the load generators run as
/// waited-for children, so a delta around one of them is its CPU time).
pub fn own_and_children() -> (Duration, Duration) {
    let get = |who| {
        // SAFETY: getrusage writes into the struct we pass, nothing else.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `who` is RUSAGE_SELF or RUSAGE_CHILDREN.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN))
}

/// Pins this process (and so everything it spawns afterwards) to `cpu`.
pub fn pin_self(cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes one bit of it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is checked against the set's capacity by the caller's CPU count (< 1024).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the set is valid and of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "sched_setaffinity(CPU {cpu}): {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// How many CPUs this machine has online.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Raises this process's open-files soft limit to its hard limit (20,000 on these machines):
/// every proxy and app spawned afterwards inherits it, also after dropping to the proxy UID.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass, nothing else.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}
