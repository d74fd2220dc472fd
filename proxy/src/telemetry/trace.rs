//! Spans: the sampling decision, span ids, and the finished span handed to the exporter.
//!
//! The request path does little: a decision and two random ids when a request arrives, and for
//! a sampled request one `SpanData` built when it ends, pushed into a bounded queue without
//! waiting (`export.rs` ships it). An unsampled request costs no allocation here.

use std::borrow::Cow;
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use tokio::sync::{Notify, mpsc};

use super::context::Incoming;

/// Creates spans and queues the finished, sampled ones for export.
pub struct Tracer {
    queue: mpsc::Sender<SpanData>,
    /// A trace id whose low 63 bits are below this is sampled (the same rule on every hop,
    /// so a ratio decision is consistent across proxies).
    ratio_bound: u64,
    scope: InstrumentationScope,
    dropped_queue_full: Counter,
    /// Wakes the exporter early when the queue is half full.
    wake: Arc<Notify>,
}

/// Where a request's spans hang in its trace: the caller's span (when it sent a context) or a
/// new trace, with the sampling decision every span of this request follows.
#[derive(Debug, Clone, Copy)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: Option<SpanId>,
    pub sampled: bool,
}

/// A span being timed.
#[derive(Debug)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    kind: SpanKind,
    start: SystemTime,
}

impl Tracer {
    pub fn new(
        queue: mpsc::Sender<SpanData>,
        wake: Arc<Notify>,
        ratio: f64,
        dropped_queue_full: Counter,
    ) -> Self {
        Self {
            wake,
            queue,
            ratio_bound: ratio_bound(ratio),
            scope: InstrumentationScope::builder("trellis-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            dropped_queue_full,
        }
    }

    /// The parent for a request's spans: the caller's context, or a new trace sampled by ratio.
    /// A caller's decision always wins, so an app's sampled traces are never cut.
    pub fn parent(&self, incoming: Incoming) -> Parent {
        let (trace_id, span_id) = match incoming.parent {
            Some((t, s)) => (t, Some(s)),
            None => (new_trace_id(), None),
        };
        let sampled = incoming
            .sampled
            .unwrap_or_else(|| self.ratio_samples(trace_id));
        Parent {
            trace_id,
            span_id,
            sampled,
        }
    }

    fn ratio_samples(&self, trace_id: TraceId) -> bool {
        let bytes = trace_id.to_bytes();
        let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default()) >> 1;
        low < self.ratio_bound
    }

    /// Queues a finished span (sampled ones only); never waits: a full queue drops the span and
    /// counts it.
    pub fn end(
        &self,
        span: Span,
        name: Cow<'static, str>,
        attributes: Vec<KeyValue>,
        status: Status,
    ) {
        if !span.sampled {
            return;
        }
        let data = SpanData {
            span_context: SpanContext::new(
                span.trace_id,
                span.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: span.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: span.parent.is_some(),
            span_kind: span.kind,
            name,
            start_time: span.start,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        };
        match self.queue.try_send(data) {
            Ok(()) if self.queue.capacity() == self.queue.max_capacity() / 2 => {
                self.wake.notify_one();
            }
            Ok(()) => {}
            Err(_) => {
                self.dropped_queue_full.inc();
            }
        }
    }
}

impl Parent {
    /// A new span under this parent, started now.
    pub fn child(&self, kind: SpanKind) -> Span {
        Span {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            parent: self.span_id,
            sampled: self.sampled,
            kind,
            start: SystemTime::now(),
        }
    }
}

impl Span {
    /// Writes this span as the context of the request it covers (for the next hop).
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        super::context::inject(
            headers,
            self.trace_id,
            self.span_id,
            self.parent,
            self.sampled,
        );
    }
}

fn ratio_bound(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio <= 0.0 || ratio.is_nan() {
        0
    } else {
        (ratio * (1u64 << 63) as f64) as u64
    }
}

fn new_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

fn new_span_id() -> SpanId {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return SpanId::from(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64) -> (Tracer, mpsc::Receiver<SpanData>, Counter) {
        let (tx, rx) = mpsc::channel(2);
        let dropped = Counter::default();
        let wake = Arc::new(Notify::new());
        (Tracer::new(tx, wake, ratio, dropped.clone()), rx, dropped)
    }

    #[test]
    fn the_callers_decision_wins_and_the_ratio_decides_otherwise() {
        let (all, ..) = tracer(1.0);
        let (none, ..) = tracer(0.0);
        let (half, ..) = tracer(0.5);
        let unsampled = Incoming {
            parent: None,
            sampled: Some(false),
        };
        assert!(!all.parent(unsampled).sampled);
        let sampled = Incoming {
            parent: Some((TraceId::from(7u128), SpanId::from(9u64))),
            sampled: Some(true),
        };
        let p = none.parent(sampled);
        assert!(p.sampled);
        assert_eq!(p.trace_id, TraceId::from(7u128));
        assert!((0..100).all(|_| all.parent(Incoming::NONE).sampled));
        assert!((0..100).all(|_| !none.parent(Incoming::NONE).sampled));
        let n = (0..10_000)
            .filter(|_| half.parent(Incoming::NONE).sampled)
            .count();
        assert!((4_500..5_500).contains(&n), "{n} of 10000 sampled at 0.5");
        // The same trace id gets the same decision on every hop.
        let ctx = Incoming {
            parent: Some((TraceId::from(u128::MAX), SpanId::from(1u64))),
            sampled: None,
        };
        assert!(!half.parent(ctx).sampled);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (t, mut rx, dropped) = tracer(1.0);
        let parent = t.parent(Incoming::NONE);
        for _ in 0..5 {
            t.end(
                parent.child(SpanKind::Client),
                "GET".into(),
                vec![],
                Status::Unset,
            );
        }
        assert_eq!(dropped.get(), 3);
        let span = rx.try_recv().unwrap();
        assert_eq!(span.span_context.trace_id(), parent.trace_id);
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        // Unsampled spans never reach the queue.
        let (t, mut rx, _) = tracer(0.0);
        let p = t.parent(Incoming::NONE);
        t.end(
            p.child(SpanKind::Server),
            "GET".into(),
            vec![],
            Status::Unset,
        );
        assert!(rx.try_recv().is_err());
    }
}
