//! Retry decisions: which failures are retried, how long to wait, and how many retries the
//! recent traffic can afford.
//!
//! The budget keeps retries from turning an outage into a retry storm: over a sliding 10-second
//! window, retries may add at most `percent` of the requests seen plus `minPerSecond` for each
//! second of the window, so that a quiet client can still retry. A 100 %-failing upstream
//! therefore receives at most `requests × (1 + percent/100) + minPerSecond × seconds` attempts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use trellis_proto::policy::{self, Retries, RetryOn};

const WINDOW_SECS: usize = 10;

/// Why an attempt failed, in the terms of `retries.on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint, or the far sidecar could not connect to its app.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// The connection closed or reset before a response (also as reported by the far sidecar).
    Reset,
    /// No response headers within `perTryTimeout`.
    PerTryTimeout,
    /// A response whose status (or trailers-only gRPC status) may be retried.
    Status { http: u16, grpc: Option<u32> },
}

impl Failure {
    /// Whether the request provably never reached an application.
    pub fn never_reached_app(self) -> bool {
        matches!(self, Self::ConnectFailure | Self::RefusedStream)
    }

    /// The `reason` label of `trellis_retries_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ConnectFailure => "connect-failure",
            Self::RefusedStream => "refused-stream",
            Self::Reset => "reset",
            Self::PerTryTimeout => "per-try-timeout",
            Self::Status { grpc: Some(_), .. } => "grpc-status",
            Self::Status { http, .. } if (502..=504).contains(&http) => "gateway-error",
            Self::Status { .. } => "status",
        }
    }

    /// Whether `retries.on` lists this failure. A per-try timeout is retried whenever retries
    /// are enabled: the attempt was abandoned by the proxy, not answered.
    pub fn listed_in(self, on: &[RetryOn]) -> bool {
        on.iter().any(|c| match (c, self) {
            (RetryOn::ConnectFailure, Self::ConnectFailure) => true,
            (RetryOn::RefusedStream, Self::RefusedStream) => true,
            (RetryOn::Reset, Self::Reset) => true,
            (_, Self::PerTryTimeout) => true,
            (RetryOn::GatewayError, Self::Status { http, grpc: None }) => {
                (502..=504).contains(&http)
            }
            (RetryOn::Status(code), Self::Status { http, grpc: None }) => *code == http,
            (RetryOn::Grpc(code), Self::Status { grpc: Some(g), .. }) => code.code() == g,
            _ => false,
        })
    }
}

/// Whether a request may be sent again after it may have reached an app.
pub fn replay_safe(method: &http::Method, grpc: bool, retries: &Retries) -> bool {
    use http::Method;
    let idempotent = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    // Listing gRPC statuses is the opt-in for gRPC calls (which are all POSTs).
    idempotent || retries.non_idempotent || (grpc && retries.on.iter().any(|c| c.is_grpc()))
}

/// Full-jitter exponential backoff before retry number `retry` (1-based).
pub fn backoff(b: &policy::Backoff, retry: u32) -> Duration {
    let exp = b
        .base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    let cap = exp.min(b.max);
    if cap.is_zero() {
        return cap;
    }
    Duration::from_nanos(fastrand::u64(0..=cap.as_nanos() as u64))
}

/// A sliding-window retry budget.
pub struct Budget {
    percent: f64,
    min_per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    /// Per second: (requests, retries); indexed by second mod WINDOW_SECS.
    slots: [(u64, u64); WINDOW_SECS],
    /// The absolute second each slot holds.
    slot_second: [u64; WINDOW_SECS],
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(&policy::Budget::default())
    }
}

impl Budget {
    pub fn new(b: &policy::Budget) -> Self {
        Self {
            percent: b.percent,
            min_per_second: b.min_per_second,
            window: Mutex::new(Window {
                start: Instant::now(),
                slots: [(0, 0); WINDOW_SECS],
                slot_second: [u64::MAX; WINDOW_SECS],
            }),
        }
    }

    /// Counts a request (a first attempt).
    pub fn record_request(&self) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.current().0 += 1;
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn try_withdraw(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.current();
        let now = w.second();
        let live = |i: usize, w: &Window| {
            w.slot_second[i] != u64::MAX && now - w.slot_second[i] < WINDOW_SECS as u64
        };
        let (mut requests, mut retries) = (0u64, 0u64);
        for i in 0..WINDOW_SECS {
            if live(i, &w) {
                requests += w.slots[i].0;
                retries += w.slots[i].1;
            }
        }
        // Seconds of the window this budget has existed for: a new budget gets no full reserve.
        let seconds = (now + 1).min(WINDOW_SECS as u64);
        let allowed =
            requests as f64 * self.percent / 100.0 + (self.min_per_second as u64 * seconds) as f64;
        if (retries + 1) as f64 <= allowed {
            w.current().1 += 1;
            true
        } else {
            false
        }
    }
}

impl Window {
    fn second(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn current(&mut self) -> &mut (u64, u64) {
        let now = self.second();
        let i = (now % WINDOW_SECS as u64) as usize;
        if self.slot_second[i] != now {
            self.slot_second[i] = now;
            self.slots[i] = (0, 0);
        }
        &mut self.slots[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::policy::GrpcCode;

    #[test]
    fn a_failing_burst_gets_percent_of_its_requests_plus_the_reserve() {
        let budget = Budget::new(&policy::Budget {
            percent: 20.0,
            min_per_second: 10,
        });
        let mut granted = 0;
        for _ in 0..500 {
            budget.record_request();
            for _ in 0..2 {
                granted += u32::from(budget.try_withdraw());
            }
        }
        // Within one second: 20 % of 500 plus one second of reserve.
        assert_eq!(granted, 110);
    }

    #[test]
    fn conditions_match_the_policy_words() {
        let on = [
            RetryOn::GatewayError,
            RetryOn::Status(429),
            RetryOn::Grpc(GrpcCode::Unavailable),
        ];
        assert!(
            Failure::Status {
                http: 503,
                grpc: None
            }
            .listed_in(&on)
        );
        assert!(
            Failure::Status {
                http: 429,
                grpc: None
            }
            .listed_in(&on)
        );
        assert!(
            !Failure::Status {
                http: 500,
                grpc: None
            }
            .listed_in(&on)
        );
        assert!(
            Failure::Status {
                http: 200,
                grpc: Some(14)
            }
            .listed_in(&on)
        );
        assert!(
            !Failure::Status {
                http: 200,
                grpc: Some(5)
            }
            .listed_in(&on)
        );
        assert!(!Failure::ConnectFailure.listed_in(&on));
        assert!(Failure::PerTryTimeout.listed_in(&on));
    }

    #[test]
    fn only_idempotent_methods_replay_unless_opted_in() {
        let mut r = Retries::default();
        assert!(replay_safe(&http::Method::GET, false, &r));
        assert!(!replay_safe(&http::Method::POST, false, &r));
        assert!(!replay_safe(&http::Method::POST, true, &r));
        r.on.push(RetryOn::Grpc(GrpcCode::Unavailable));
        assert!(
            replay_safe(&http::Method::POST, true, &r),
            "gRPC conditions are the opt-in for gRPC"
        );
        r.non_idempotent = true;
        assert!(replay_safe(&http::Method::POST, false, &r));
    }

    #[test]
    fn backoff_is_jittered_below_the_exponential_cap() {
        let b = policy::Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        for _ in 0..200 {
            assert!(backoff(&b, 1) <= Duration::from_millis(10));
            assert!(backoff(&b, 3) <= Duration::from_millis(40));
            assert!(backoff(&b, 9) <= Duration::from_millis(50));
        }
    }
}
