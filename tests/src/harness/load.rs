//! Bounded background load for fault tests: rounds of paced GETs from a pod until the test
//! says stop (or a round limit is reached), with the totals and every failing round kept.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Pod;

/// What rounds of load saw.
#[derive(Debug, Default)]
pub struct LoadTotals {
    pub rounds: u32,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    /// The `trellis-testapp load` output of every round that had a failure.
    pub failures: Vec<serde_json::Value>,
}

/// Sets the flag when dropped: a failing assertion in the test stops the load's rounds too, so
/// the thread scope the load runs in ends promptly.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Pod {
    /// Rounds of 200 GETs of `url` from this pod (2 keep-alive connections, each pausing
    /// 50 ms between its requests: at most 40 per second, about 5 s a round) until `stop` is
    /// set, at most `max_rounds`.
    pub fn load_until(&self, url: &str, stop: &AtomicBool, max_rounds: u32) -> LoadTotals {
        let mut t = LoadTotals::default();
        while !stop.load(Ordering::SeqCst) && t.rounds < max_rounds {
            let out = self.testapp(&[
                "load",
                "--url",
                url,
                "--requests",
                "200",
                "--concurrency",
                "2",
                "--pace-ms",
                "50",
            ]);
            t.rounds += 1;
            t.requests += 200;
            t.ok += out["ok"].as_u64().unwrap_or(0);
            let failed = out["failed"].as_u64().unwrap_or(200);
            t.failed += failed;
            if failed > 0 {
                t.failures.push(out);
            }
        }
        t
    }
}
