//! Telemetry the proxy emits besides `/metrics`: distributed traces over OTLP and the access log.
//!
//! - [`context`]: W3C and B3 trace context read from and written to requests;
//! - [`trace`]: sampling, span ids and finished spans; [`export`]: the OTLP/gRPC exporter thread;
//! - [`semconv`]: OpenTelemetry HTTP/RPC semantic-convention attributes for a request's spans;
//! - [`access_log`]: one line per request or connection on stdout.
//!
//! Both are off unless asked for (`--otlp-endpoint`, `--access-log`), and both cost a request
//! nothing but a non-blocking push into a bounded queue when on.

pub mod access_log;
pub mod context;
pub mod export;
pub mod semconv;
pub mod trace;

pub use access_log::AccessLog;
pub use trace::{Parent, Span, Tracer};

/// What the data path needs to emit traces and access-log lines; `None` parts are off.
#[derive(Default)]
pub struct Telemetry {
    pub tracer: Option<Tracer>,
    pub access_log: Option<AccessLog>,
}
