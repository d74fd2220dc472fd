//! Endpoint load balancing: power of two choices over a peak-EWMA latency estimate, with
//! ejection of failing endpoints.
//!
//! Each endpoint's cost is its latency estimate times (requests in flight + 1). The estimate
//! jumps up to a slow response at once and decays back over ~10 s, so one slow endpoint is
//! avoided quickly and tried again gradually. An endpoint that fails `consecutiveFailures` times
//! in a row is ejected for `baseTime`, doubling on each consecutive ejection up to `maxTime`;
//! once its time is up it is probed with real traffic: one success restores it, one failure
//! ejects it again. Endpoint state lives in an [`EndpointRegistry`] shared by all policies, so
//! it survives policy reloads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_proto::policy::Ejection;

const DECAY: Duration = Duration::from_secs(10);
const INITIAL_LATENCY: Duration = Duration::from_millis(1);

pub struct EndpointState {
    pub addr: SocketAddr,
    stats: Mutex<Stats>,
}

struct Stats {
    ewma_ns: f64,
    updated: Instant,
    pending: u32,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// Consecutive ejections, for the backoff.
    ejections: u32,
    probing: bool,
}

/// What [`EndpointState::failed`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Kept,
    Ejected(Duration),
}

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stats: Mutex::new(Stats {
                ewma_ns: INITIAL_LATENCY.as_nanos() as f64,
                updated: Instant::now(),
                pending: 0,
                consecutive_failures: 0,
                ejected_until: None,
                ejections: 0,
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the endpoint may receive traffic now; an expired ejection turns into a probe.
    fn available(&self, now: Instant) -> bool {
        let mut s = self.lock();
        match s.ejected_until {
            Some(until) if until > now => false,
            Some(_) => {
                s.ejected_until = None;
                s.probing = true;
                true
            }
            None => true,
        }
    }

    fn cost(&self, now: Instant) -> f64 {
        let s = self.lock();
        let decay =
            (-(now.saturating_duration_since(s.updated).as_secs_f64()) / DECAY.as_secs_f64()).exp();
        let ewma = s.ewma_ns * decay + INITIAL_LATENCY.as_nanos() as f64 * (1.0 - decay);
        ewma * f64::from(s.pending + 1)
    }

    /// Marks a request as started; the guard's `succeeded`/`failed` end it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.lock().pending += 1;
        InFlight {
            endpoint: self.clone(),
            start: Instant::now(),
            done: false,
        }
    }

    /// (latency estimate, requests in flight, time left ejected) for `/config`.
    pub fn snapshot(&self) -> (Duration, u32, Option<Duration>) {
        let s = self.lock();
        let left = s
            .ejected_until
            .map(|t| t.saturating_duration_since(Instant::now()));
        (
            Duration::from_nanos(s.ewma_ns as u64),
            s.pending,
            left.filter(|d| !d.is_zero()),
        )
    }
}

/// A request in flight to an endpoint.
pub struct InFlight {
    endpoint: Arc<EndpointState>,
    start: Instant,
    done: bool,
}

impl InFlight {
    pub fn succeeded(mut self) {
        self.done = true;
        let mut s = self.endpoint.lock();
        s.pending = s.pending.saturating_sub(1);
        let rtt = self.start.elapsed().as_nanos() as f64;
        let now = Instant::now();
        if rtt > s.ewma_ns {
            s.ewma_ns = rtt; // peak: slow responses count at once
        } else {
            let w = (-(now.saturating_duration_since(s.updated).as_secs_f64())
                / DECAY.as_secs_f64())
            .exp();
            s.ewma_ns = s.ewma_ns * w + rtt * (1.0 - w);
        }
        s.updated = now;
        s.consecutive_failures = 0;
        s.ejections = 0;
        s.probing = false;
    }

    pub fn failed(mut self, ejection: &Ejection) -> Verdict {
        self.done = true;
        let mut s = self.endpoint.lock();
        s.pending = s.pending.saturating_sub(1);
        s.consecutive_failures += 1;
        if s.probing || s.consecutive_failures >= ejection.consecutive_failures {
            let factor = 1u32 << s.ejections.min(16);
            let time = ejection
                .base_time
                .saturating_mul(factor)
                .min(ejection.max_time);
            s.ejected_until = Some(Instant::now() + time);
            s.ejections += 1;
            s.consecutive_failures = 0;
            s.probing = false;
            return Verdict::Ejected(time);
        }
        Verdict::Kept
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned (timeout, cancelled caller): neither a success nor a failure.
            let mut s = self.endpoint.lock();
            s.pending = s.pending.saturating_sub(1);
        }
    }
}

/// Endpoint state by address, shared by every policy and kept across reloads.
#[derive(Default)]
pub struct EndpointRegistry {
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
}

impl EndpointRegistry {
    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(addr)
            .or_insert_with(|| Arc::new(EndpointState::new(addr)))
            .clone()
    }

    /// Forgets endpoints no policy lists any more.
    pub fn retain(&self, keep: &[SocketAddr]) {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|addr, _| keep.contains(addr));
    }
}

/// The endpoints of one policy.
pub struct Balancer {
    endpoints: Vec<Arc<EndpointState>>,
}

impl Balancer {
    pub fn new(addrs: &[SocketAddr], registry: &EndpointRegistry) -> Self {
        Self {
            endpoints: addrs.iter().map(|a| registry.get(*a)).collect(),
        }
    }

    pub fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// Two random available endpoints, the cheaper one wins. Endpoints in `avoid` (already
    /// tried by this request) are used only when nothing else is available.
    pub fn pick(&self, avoid: &[SocketAddr]) -> Option<Arc<EndpointState>> {
        let now = Instant::now();
        let available: Vec<&Arc<EndpointState>> =
            self.endpoints.iter().filter(|e| e.available(now)).collect();
        let fresh: Vec<&Arc<EndpointState>> = available
            .iter()
            .copied()
            .filter(|e| !avoid.contains(&e.addr))
            .collect();
        let candidates = if fresh.is_empty() { available } else { fresh };
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => {
                let a = fastrand::usize(0..n);
                let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
                let (ea, eb) = (candidates[a], candidates[b]);
                Some(if ea.cost(now) <= eb.cost(now) {
                    ea.clone()
                } else {
                    eb.clone()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 80)))
            .collect()
    }

    #[test]
    fn consecutive_failures_eject_with_doubling_backoff_and_a_probe_restores() {
        let registry = EndpointRegistry::default();
        let b = Balancer::new(&addrs(2), &registry);
        let bad = b.endpoints()[0].clone();
        let ej = Ejection {
            consecutive_failures: 3,
            base_time: Duration::from_millis(40),
            max_time: Duration::from_secs(1),
        };
        assert_eq!(bad.start().failed(&ej), Verdict::Kept);
        assert_eq!(bad.start().failed(&ej), Verdict::Kept);
        assert_eq!(
            bad.start().failed(&ej),
            Verdict::Ejected(Duration::from_millis(40))
        );
        for _ in 0..50 {
            assert_ne!(
                b.pick(&[]).unwrap().addr,
                bad.addr,
                "an ejected endpoint gets no traffic"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(bad.available(Instant::now()), "ejection expired: probing");
        // A failed probe ejects again at once, for twice as long.
        assert_eq!(
            bad.start().failed(&ej),
            Verdict::Ejected(Duration::from_millis(80))
        );
        std::thread::sleep(Duration::from_millis(90));
        assert!(bad.available(Instant::now()));
        bad.start().succeeded();
        assert_eq!(
            bad.start().failed(&ej),
            Verdict::Kept,
            "a success resets the count and the backoff"
        );
    }

    #[test]
    fn a_retry_avoids_endpoints_already_tried() {
        let registry = EndpointRegistry::default();
        let all = addrs(3);
        let b = Balancer::new(&all, &registry);
        for _ in 0..50 {
            let picked = b.pick(&all[..2]).unwrap();
            assert_eq!(picked.addr, all[2]);
        }
        assert!(b.pick(&all).is_some(), "all tried: any available one");
    }

    #[test]
    fn slow_and_busy_endpoints_get_less_traffic() {
        let registry = EndpointRegistry::default();
        let b = Balancer::new(&addrs(2), &registry);
        let (fast, slow) = (b.endpoints()[0].clone(), b.endpoints()[1].clone());
        let _busy: Vec<InFlight> = (0..5).map(|_| slow.start()).collect();
        let picks = (0..100)
            .filter(|_| b.pick(&[]).unwrap().addr == fast.addr)
            .count();
        assert_eq!(
            picks, 100,
            "with two endpoints P2C compares both: the idle one always wins"
        );
    }
}
