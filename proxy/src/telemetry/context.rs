//! Trace context on the wire: W3C Trace Context (`traceparent`, `tracestate`) and Zipkin B3
//! (the single `b3` header and the `X-B3-*` headers) are both read; a request leaving the proxy
//! carries the proxy's span in both formats, so an app that forwards whichever headers it
//! received keeps the trace connected.
//!
//! Reading order: `traceparent`, then `b3`, then `X-B3-*`; the first one that parses wins, and a
//! malformed header is ignored (a new trace starts) rather than failing the request.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceId};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// What the caller said about the trace: the span to continue (when it sent one) and its
/// sampling decision (when it made one; B3 can carry a decision without ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// The trace and the caller's span, which becomes the parent of the proxy's span.
    pub parent: Option<(TraceId, SpanId)>,
    pub sampled: Option<bool>,
}

impl Incoming {
    pub const NONE: Self = Self {
        parent: None,
        sampled: None,
    };

    pub fn extract(headers: &HeaderMap) -> Self {
        if let Some(v) = headers.get(&TRACEPARENT)
            && let Some(ctx) = parse_traceparent(v.as_bytes())
        {
            return ctx;
        }
        if let Some(v) = headers.get(&B3)
            && let Some(ctx) = parse_b3_single(v.as_bytes())
        {
            return ctx;
        }
        parse_b3_multi(headers).unwrap_or(Self::NONE)
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; later versions may append fields.
fn parse_traceparent(v: &[u8]) -> Option<Incoming> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut parts = s.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
        return None;
    }
    // Version 00 has exactly four fields; a future version may have more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if !(is_lower_hex(trace) && is_lower_hex(span) && is_lower_hex(flags)) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Incoming {
        parent: Some((trace_id, span_id)),
        sampled: Some(flags & 1 == 1),
    })
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`, or a decision alone: `0`, `1` or `d`.
fn parse_b3_single(v: &[u8]) -> Option<Incoming> {
    let s = std::str::from_utf8(v).ok()?.trim();
    if let Some(sampled) = b3_decision(s) {
        return Some(Incoming {
            parent: None,
            sampled: Some(sampled),
        });
    }
    let mut parts = s.split('-');
    let trace = b3_trace_id(parts.next()?)?;
    let span = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some(d) => Some(b3_decision(d)?),
    };
    Some(Incoming {
        parent: Some((trace, span)),
        sampled,
    })
}

fn parse_b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let get = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let debug = get(&B3_FLAGS) == Some("1");
    let sampled = if debug {
        Some(true)
    } else {
        get(&B3_SAMPLED).and_then(|v| match v {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        })
    };
    let parent = match (get(&B3_TRACE_ID), get(&B3_SPAN_ID)) {
        (Some(t), Some(s)) => Some((b3_trace_id(t)?, b3_span_id(s)?)),
        _ => None,
    };
    (parent.is_some() || sampled.is_some()).then_some(Incoming { parent, sampled })
}

fn b3_decision(s: &str) -> Option<bool> {
    match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// B3 trace ids are 64 or 128 bits; a 64-bit one is the low half of the W3C id.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let s = s.trim();
    if !(s.len() == 16 || s.len() == 32) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = TraceId::from_hex(&s.to_ascii_lowercase()).ok()?;
    (id != TraceId::INVALID).then_some(id)
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    let s = s.trim();
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = SpanId::from_hex(&s.to_ascii_lowercase()).ok()?;
    (id != SpanId::INVALID).then_some(id)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Writes `span` (child of `parent`, when there is one) as the context of an outgoing request,
/// in both formats. `tracestate` is left as the caller sent it: the proxy adds no entry.
pub fn inject(
    headers: &mut HeaderMap,
    trace: TraceId,
    span: SpanId,
    parent: Option<SpanId>,
    sampled: bool,
) {
    let flag = flag_value(sampled);
    let traceparent = format!("00-{trace}-{span}-0{flag}");
    let b3 = format!("{trace}-{span}-{flag}");
    headers.remove(&B3_FLAGS);
    headers.remove(&B3_PARENT_SPAN_ID);
    let mut set = |name: HeaderName, value: String| {
        // Hex digits and dashes: always a valid header value.
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    set(TRACEPARENT, traceparent);
    set(B3, b3);
    set(B3_TRACE_ID, trace.to_string());
    set(B3_SPAN_ID, span.to_string());
    if let Some(parent) = parent {
        set(B3_PARENT_SPAN_ID, parent.to_string());
    }
    headers.insert(B3_SAMPLED, HeaderValue::from_static(flag_value(sampled)));
}

fn flag_value(sampled: bool) -> &'static str {
    if sampled { "1" } else { "0" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn reads_traceparent_with_its_sampled_flag() {
        let ctx = Incoming::extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-01"),
        )]));
        let (t, s) = ctx.parent.unwrap();
        assert_eq!(
            (t.to_string().as_str(), s.to_string().as_str()),
            (TRACE, SPAN)
        );
        assert_eq!(ctx.sampled, Some(true));
        let ctx = Incoming::extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-00"),
        )]));
        assert_eq!(ctx.sampled, Some(false));
    }

    #[test]
    fn malformed_traceparent_falls_back_to_b3_or_nothing() {
        for bad in [
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            "garbage".to_string(),
        ] {
            assert_eq!(
                Incoming::extract(&headers(&[("traceparent", &bad)])),
                Incoming::NONE,
                "{bad}"
            );
        }
        let ctx = Incoming::extract(&headers(&[
            ("traceparent", "nonsense"),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(ctx.parent.unwrap().0.to_string(), TRACE);
    }

    #[test]
    fn reads_b3_single_and_multi_including_64_bit_ids_and_bare_decisions() {
        let ctx = Incoming::extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]));
        assert_eq!(ctx.parent.unwrap().1.to_string(), SPAN);
        assert_eq!(ctx.sampled, Some(true));
        let ctx = Incoming::extract(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}"))]));
        assert_eq!(
            ctx.parent.unwrap().0.to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert_eq!(ctx.sampled, None);
        assert_eq!(
            Incoming::extract(&headers(&[("b3", "0")])),
            Incoming {
                parent: None,
                sampled: Some(false)
            }
        );
        let ctx = Incoming::extract(&headers(&[
            ("x-b3-traceid", &TRACE.to_uppercase()),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(ctx.sampled, Some(true), "debug implies sampled");
        assert_eq!(ctx.parent.unwrap().0.to_string(), TRACE);
        assert_eq!(
            Incoming::extract(&headers(&[("x-b3-traceid", TRACE)])),
            Incoming::NONE,
            "a trace id without a span id is not a context"
        );
    }

    #[test]
    fn writes_both_formats() {
        let mut h = headers(&[("x-b3-flags", "1"), ("tracestate", "vendor=1")]);
        let trace = TraceId::from_hex(TRACE).unwrap();
        let span = SpanId::from_hex(SPAN).unwrap();
        let parent = SpanId::from_hex("1111111111111111").unwrap();
        inject(&mut h, trace, span, Some(parent), true);
        assert_eq!(h["traceparent"], format!("00-{TRACE}-{SPAN}-01"));
        assert_eq!(h["b3"], format!("{TRACE}-{SPAN}-1"));
        assert_eq!(h["x-b3-traceid"], TRACE);
        assert_eq!(h["x-b3-spanid"], SPAN);
        assert_eq!(h["x-b3-parentspanid"], "1111111111111111");
        assert_eq!(h["x-b3-sampled"], "1");
        assert_eq!(h["tracestate"], "vendor=1");
        assert!(!h.contains_key("x-b3-flags"));
        // What was written reads back as the same context.
        let back = Incoming::extract(&h);
        assert_eq!(back.parent, Some((trace, span)));
        inject(&mut h, trace, span, None, false);
        assert_eq!(h["traceparent"], format!("00-{TRACE}-{SPAN}-00"));
        assert!(!h.contains_key("x-b3-parentspanid"));
        assert_eq!(Incoming::extract(&h).sampled, Some(false));
    }
}
