//! The access log: one line per HTTP request (or gRPC stream) and per opaque TCP connection,
//! on stdout, as JSON or logfmt text (`--access-log off|text|json`).
//!
//! Requests hand an owned record to a writer thread through a bounded queue and never wait on
//! stdout: when the reader of stdout falls behind, lines are dropped and counted
//! (`trellis_access_log_dropped_lines_total`) instead of slowing traffic. Formatting happens on
//! the writer thread, off the data path. The writer wakes every 50 ms and writes what is queued
//! with one flush: a request never wakes a thread.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanId, TraceId};
use prometheus_client::metrics::counter::Counter;

use crate::metrics::Direction;

/// Lines waiting for stdout at most (at one wake-up per 50 ms: 160,000 lines per second).
const QUEUE_CAPACITY: usize = 8192;
const WAKE_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// No access log.
    Off,
    /// logfmt: `key=value` pairs, values quoted when they need it.
    Text,
    /// One JSON object per line.
    Json,
}

/// One finished HTTP request or stream.
#[derive(Debug)]
pub struct HttpRecord {
    pub time: SystemTime,
    pub direction: Direction,
    pub protocol: &'static str,
    pub method: http::Method,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Until the end of the response body.
    pub duration: Duration,
    /// Until the response headers.
    pub response_headers: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub client: SocketAddr,
    pub upstream: SocketAddr,
    pub attempts: u32,
    pub policy: String,
    pub peer_identity: Option<Arc<str>>,
    pub tls: bool,
    pub error: Option<&'static str>,
    pub error_detail: Option<String>,
    pub trace: Option<(TraceId, SpanId)>,
}

/// One finished opaque TCP connection.
#[derive(Debug)]
pub struct TcpRecord {
    pub time: SystemTime,
    pub direction: Direction,
    pub client: SocketAddr,
    pub upstream: SocketAddr,
    pub duration: Duration,
    /// Client to upstream.
    pub request_bytes: u64,
    /// Upstream to client.
    pub response_bytes: u64,
    pub peer_identity: Option<Arc<str>>,
    pub tls: bool,
    pub error: Option<&'static str>,
    pub error_detail: Option<String>,
}

#[derive(Debug)]
pub enum Record {
    Http(Box<HttpRecord>),
    Tcp(Box<TcpRecord>),
}

/// Where requests send their records; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Record>,
    dropped: Counter,
}

/// The writer thread: stop it to flush what is queued.
pub struct AccessLogWriter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl AccessLog {
    /// Starts the writer thread (none for `off`).
    pub fn start(
        format: Format,
        dropped: Counter,
    ) -> std::io::Result<Option<(Self, AccessLogWriter)>> {
        if format == Format::Off {
            return Ok(None);
        }
        let (tx, rx) = sync_channel(QUEUE_CAPACITY);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("trellis-access-log".into())
                .spawn(move || write_loop(&rx, format, std::io::stdout().lock(), &stop))?
        };
        Ok(Some((
            Self { tx, dropped },
            AccessLogWriter { stop, thread },
        )))
    }

    pub fn log(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

impl AccessLogWriter {
    /// Writes what is queued and stops the thread.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

fn write_loop(rx: &Receiver<Record>, format: Format, out: impl Write, stop: &AtomicBool) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::with_capacity(512);
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let mut wrote = false;
        while let Ok(record) = rx.try_recv() {
            line.clear();
            render(&record, format, &mut line);
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
            wrote = true;
        }
        if wrote && out.flush().is_err() {
            return;
        }
        if stopping {
            return;
        }
        std::thread::park_timeout(WAKE_INTERVAL);
    }
}

/// A field value, rendered as JSON or logfmt.
enum Val<'a> {
    Str(&'a str),
    Owned(String),
    Float(f64),
    Int(u64),
    Bool(bool),
    Null,
}

fn opt_str(v: Option<&str>) -> Val<'_> {
    v.map_or(Val::Null, Val::Str)
}

fn millis(d: Duration) -> Val<'static> {
    Val::Float((d.as_secs_f64() * 1e6).round() / 1e3)
}

/// The record's fields, in the order they are written.
fn fields(record: &Record) -> Vec<(&'static str, Val<'_>)> {
    let time = |t: SystemTime| Val::Owned(humantime::format_rfc3339_millis(t).to_string());
    match record {
        Record::Http(r) => vec![
            ("time", time(r.time)),
            ("kind", Val::Str("http")),
            ("direction", Val::Str(r.direction.as_str())),
            ("protocol", Val::Str(r.protocol)),
            ("method", Val::Str(r.method.as_str())),
            ("authority", Val::Str(&r.authority)),
            ("path", Val::Str(&r.path)),
            ("status", Val::Int(u64::from(r.status))),
            (
                "grpc_status",
                r.grpc_status.map_or(Val::Null, |c| Val::Int(u64::from(c))),
            ),
            ("duration_ms", millis(r.duration)),
            ("response_headers_ms", millis(r.response_headers)),
            ("request_bytes", Val::Int(r.request_bytes)),
            ("response_bytes", Val::Int(r.response_bytes)),
            ("client", Val::Owned(r.client.to_string())),
            ("upstream", Val::Owned(r.upstream.to_string())),
            ("attempts", Val::Int(u64::from(r.attempts))),
            ("policy", Val::Str(&r.policy)),
            ("peer_identity", opt_str(r.peer_identity.as_deref())),
            ("tls", Val::Bool(r.tls)),
            ("trellis_error", opt_str(r.error)),
            ("error_detail", opt_str(r.error_detail.as_deref())),
            (
                "trace_id",
                r.trace
                    .map_or(Val::Null, |(t, _)| Val::Owned(t.to_string())),
            ),
            (
                "span_id",
                r.trace
                    .map_or(Val::Null, |(_, s)| Val::Owned(s.to_string())),
            ),
        ],
        Record::Tcp(r) => vec![
            ("time", time(r.time)),
            ("kind", Val::Str("tcp")),
            ("direction", Val::Str(r.direction.as_str())),
            ("protocol", Val::Str("opaque")),
            ("client", Val::Owned(r.client.to_string())),
            ("upstream", Val::Owned(r.upstream.to_string())),
            ("duration_ms", millis(r.duration)),
            ("request_bytes", Val::Int(r.request_bytes)),
            ("response_bytes", Val::Int(r.response_bytes)),
            ("peer_identity", opt_str(r.peer_identity.as_deref())),
            ("tls", Val::Bool(r.tls)),
            ("trellis_error", opt_str(r.error)),
            ("error_detail", opt_str(r.error_detail.as_deref())),
        ],
    }
}

fn push_json_string(out: &mut String, s: &str) {
    // serde_json's escaping; a &str always serializes.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// Formats one record as a line (with its newline).
pub fn render(record: &Record, format: Format, out: &mut String) {
    use std::fmt::Write as _;
    let fields = fields(record);
    match format {
        Format::Json | Format::Off => {
            out.push('{');
            for (i, (key, value)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "\"{key}\":");
                match value {
                    Val::Str(s) => push_json_string(out, s),
                    Val::Owned(s) => push_json_string(out, s),
                    Val::Float(f) => out.push_str(&serde_json::Value::from(*f).to_string()),
                    Val::Int(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Val::Bool(b) => {
                        let _ = write!(out, "{b}");
                    }
                    Val::Null => out.push_str("null"),
                }
            }
            out.push('}');
        }
        Format::Text => {
            // The same fields in the same order; absent values are left out.
            let mut first = true;
            for (key, value) in &fields {
                let text: std::borrow::Cow<'_, str> = match value {
                    Val::Null => continue,
                    Val::Str(s) => (*s).into(),
                    Val::Owned(s) => s.as_str().into(),
                    Val::Float(f) => f.to_string().into(),
                    Val::Int(n) => n.to_string().into(),
                    Val::Bool(b) => b.to_string().into(),
                };
                if !first {
                    out.push(' ');
                }
                first = false;
                out.push_str(key);
                out.push('=');
                let quote = text.is_empty()
                    || text
                        .chars()
                        .any(|c| c == ' ' || c == '"' || c == '=' || c.is_control());
                if quote {
                    push_json_string(out, &text);
                } else {
                    out.push_str(&text);
                }
            }
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record::Http(Box::new(HttpRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            direction: Direction::outbound,
            protocol: "http1",
            method: http::Method::GET,
            authority: "reviews:9080".into(),
            path: "/a b".into(),
            status: 503,
            grpc_status: None,
            duration: Duration::from_micros(1_500),
            response_headers: Duration::from_micros(1_200),
            request_bytes: 0,
            response_bytes: 42,
            client: "127.0.0.1:5000".parse().unwrap(),
            upstream: "10.0.0.2:9080".parse().unwrap(),
            attempts: 3,
            policy: "default/reviews".into(),
            peer_identity: None,
            tls: false,
            error: Some("connect-refused"),
            error_detail: Some("connection refused".into()),
            trace: Some((TraceId::from(0xabu128), SpanId::from(0xcdu64))),
        }))
    }

    #[test]
    fn json_lines_carry_every_field_and_the_trace_id() {
        let mut line = String::new();
        render(&record(), Format::Json, &mut line);
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["kind"], "http");
        assert_eq!(v["status"], 503);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["trellis_error"], "connect-refused");
        assert_eq!(v["peer_identity"], serde_json::Value::Null);
        assert_eq!(v["trace_id"], "000000000000000000000000000000ab");
        assert_eq!(v["span_id"], "00000000000000cd");
    }

    #[test]
    fn text_lines_are_logfmt_with_quoting() {
        let mut line = String::new();
        render(&record(), Format::Text, &mut line);
        assert!(
            line.starts_with("time=2023-11-14T22:13:20.123Z kind=http "),
            "{line}"
        );
        assert!(line.contains(r#" path="/a b" "#), "{line}");
        assert!(line.contains(" trellis_error=connect-refused "), "{line}");
        assert!(!line.contains("peer_identity"), "{line}");
    }

    #[test]
    fn the_writer_writes_what_is_queued_before_it_stops() {
        let (tx, rx) = sync_channel(8);
        for _ in 0..3 {
            tx.send(record()).unwrap();
        }
        let mut out = Vec::new();
        write_loop(&rx, Format::Json, &mut out, &AtomicBool::new(true));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = sync_channel(1);
        let log = AccessLog {
            tx,
            dropped: Counter::default(),
        };
        log.log(record());
        log.log(record());
        assert_eq!(log.dropped.get(), 1);
    }
}
