//! Distributed tracing: W3C trace context in and out, a span per request,
//! exported over OTLP/HTTP (protobuf) to a collector in batches by a thread
//! of its own, so no worker ever waits on the collector.
//!
//! ```text
//! worker: head ─► Context::from_request (traceparent, or a new trace)
//!         ─► upstream gets traceparent with this span as parent
//!         ─► finish: Span ─► bounded queue ─► exporter thread ─► POST /v1/traces
//! ```

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, span, status};
use prost::Message as _;

/// Spans waiting for the exporter at most; beyond, spans are dropped and counted.
const QUEUE: usize = 4096;
/// Most spans in one export request.
const BATCH: usize = 512;
/// Longest a span waits for its batch.
const LINGER: Duration = Duration::from_secs(1);

/// Where and how spans are exported, and which requests are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The collector: address to connect to, `Host` value and path (`/v1/traces`).
    pub collector: Collector,
    /// `service.name` of the resource.
    pub service_name: String,
    /// More resource attributes.
    pub resource: Vec<(String, String)>,
    /// Longest one export may take.
    pub timeout: Duration,
    /// Share of new traces (no sampled `traceparent` came in) that are recorded, 0 to 1.
    pub ratio: f64,
    /// Share of requests with an `x-client-trace-id` header that are recorded, 0 to 1.
    pub client_ratio: f64,
    /// Attributes put on every span: a literal, a request header, or an environment variable.
    pub labels: Vec<Label>,
}

/// An OTLP/HTTP collector endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collector {
    /// `host:port` as written, resolved at each export.
    pub authority: String,
    /// The request path.
    pub path: String,
}

/// A span attribute from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The attribute's key.
    pub name: String,
    /// Where its value comes from.
    pub source: LabelSource,
}

/// Where a [`Label`]'s value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelSource {
    /// This value.
    Literal(String),
    /// The request header (lowercase), or the default when absent.
    Header { name: String, default: String },
}

/// A request's trace context: the trace it belongs to and its own span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// This request's span id (the parent of what the upstream does).
    pub span_id: [u8; 8],
    /// The caller's span, when a `traceparent` came in.
    pub parent: Option<[u8; 8]>,
    /// Whether the span is recorded and exported.
    pub sampled: bool,
    /// The `tracestate` that came in, passed on unchanged.
    pub state: Option<String>,
    /// Start of the request, since the epoch.
    pub start_unix_nanos: u64,
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos());
        #[expect(clippy::cast_possible_truncation, reason = "only the low bits seed")]
        return (t as u64) | 1;
    }
    u64::from_le_bytes(bytes) | 1
}

/// The next of this thread's random numbers (splitmix64): ids must be unique, not secret.
fn random() -> u64 {
    RNG.with(|state| {
        let mut z = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&random().to_be_bytes()[..chunk.len()]);
        }
        if out.iter().any(|b| *b != 0) {
            return out;
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Whether a random draw falls within `ratio` (0 to 1).
fn draw(ratio: f64) -> bool {
    #[expect(clippy::cast_precision_loss, reason = "a probability")]
    let x = (random() >> 11) as f64 / (1u64 << 53) as f64;
    x < ratio
}

/// A `traceparent` value (version 00): trace id, parent span id, sampled flag.
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    // Version ff is invalid; a later version may carry more fields after these.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace: [u8; 16] = hex(trace)?;
    let parent: [u8; 8] = hex(parent)?;
    let flags: [u8; 1] = hex(flags)?;
    let zero = |b: &[u8]| b.iter().all(|x| *x == 0);
    (!zero(&trace) && !zero(&parent)).then_some((trace, parent, flags[0] & 1 == 1))
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * N
        || !bytes
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl Context {
    /// The context of a request whose `traceparent`, `tracestate` and
    /// `x-client-trace-id` headers are given: the caller's trace and sampling
    /// decision when a valid `traceparent` came in, otherwise a new trace
    /// sampled by `settings`.
    pub fn from_request(
        settings: &Settings,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        client_trace: bool,
    ) -> Self {
        let start_unix_nanos = now_nanos();
        let span_id = nonzero();
        if let Some((trace_id, parent, sampled)) = traceparent.and_then(parse_traceparent) {
            return Self {
                trace_id,
                span_id,
                parent: Some(parent),
                sampled: sampled || (client_trace && draw(settings.client_ratio)),
                state: tracestate.map(str::to_owned),
                start_unix_nanos,
            };
        }
        let sampled = if client_trace {
            draw(settings.client_ratio)
        } else {
            draw(settings.ratio)
        };
        Self {
            trace_id: nonzero(),
            span_id,
            parent: None,
            sampled,
            state: None,
            start_unix_nanos,
        }
    }

    /// The `traceparent` sent upstream: this trace, this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

/// One finished request, as a span.
#[derive(Debug, Clone)]
pub struct Span {
    /// Its context.
    pub context: Context,
    /// `METHOD api`.
    pub name: String,
    /// When the response ended, since the epoch.
    pub end_unix_nanos: u64,
    /// Its attributes.
    pub attributes: Vec<(&'static str, Value)>,
    /// The configured labels, as attributes.
    pub labels: Vec<(String, Value)>,
    /// Whether it failed (a 5xx, or the exchange broke).
    pub error: Option<String>,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Text(String),
    /// A whole number.
    Int(i64),
    /// A number.
    Float(f64),
}

enum Msg {
    Span(Box<Span>),
    Settings(Option<Settings>),
}

/// The exporter thread's queue, once started (or why it could not start).
static EXPORTER: OnceLock<Result<SyncSender<Msg>, String>> = OnceLock::new();
/// Spans exported, dropped for a full queue, and lost in failed exports.
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Puts `settings` in force for the exporter (`None`: tracing off); starts its thread once.
pub fn configure(settings: Option<Settings>) -> io::Result<()> {
    if settings.is_none() && EXPORTER.get().is_none() {
        return Ok(());
    }
    let sender = EXPORTER
        .get_or_init(|| super::spawn_queue("otlp-export", QUEUE, export_loop))
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))?;
    let _ = sender.send(Msg::Settings(settings));
    Ok(())
}

/// Hands a finished span to the exporter; never waits.
pub fn record(span: Span) {
    let Some(Ok(tx)) = EXPORTER.get() else { return };
    if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Span(Box::new(span))) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The exporter's counters as Prometheus families.
pub fn write_metrics(out: &mut String) {
    use std::fmt::Write as _;
    out.push_str("# HELP portcullis_trace_spans Spans by fate: exported, dropped (queue full) or failed (the collector refused or was unreachable)\n");
    out.push_str("# TYPE portcullis_trace_spans counter\n");
    for (fate, n) in [
        ("exported", &EXPORTED),
        ("dropped", &DROPPED),
        ("failed", &FAILED),
    ] {
        let _ = writeln!(
            out,
            "portcullis_trace_spans_total{{fate=\"{fate}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
}

fn export_loop(rx: &Receiver<Msg>) {
    let mut settings: Option<Settings> = None;
    let mut batch: Vec<Span> = Vec::new();
    let mut oldest = Instant::now();
    loop {
        let wait = LINGER.saturating_sub(oldest.elapsed());
        let msg = if batch.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(wait)
        };
        match msg {
            Ok(Msg::Span(span)) => {
                if batch.is_empty() {
                    oldest = Instant::now();
                }
                batch.push(*span);
            }
            Ok(Msg::Settings(new)) => {
                if let Some(s) = &settings
                    && !batch.is_empty()
                {
                    send(s, &mut batch);
                }
                settings = new;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if batch.len() >= BATCH || (!batch.is_empty() && oldest.elapsed() >= LINGER) {
            match &settings {
                Some(s) => send(s, &mut batch),
                None => batch.clear(),
            }
        }
    }
}

fn send(settings: &Settings, batch: &mut Vec<Span>) {
    let n = batch.len() as u64;
    let body = encode(settings, batch.drain(..)).encode_to_vec();
    match post(settings, &body) {
        Ok(()) => {
            EXPORTED.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            FAILED.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(collector = %settings.collector.authority, spans = n, error = %e, "trace export failed; these spans are lost");
        }
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn attribute(key: &str, value: &Value) -> KeyValue {
    let value = match value {
        Value::Text(t) => any_value::Value::StringValue(t.clone()),
        Value::Int(i) => any_value::Value::IntValue(*i),
        Value::Float(f) => any_value::Value::DoubleValue(*f),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// The OTLP request for `spans`: one resource (`service.name` and the configured attributes), one scope.
fn encode(settings: &Settings, spans: impl Iterator<Item = Span>) -> ExportTraceServiceRequest {
    let mut resource = vec![text("service.name", settings.service_name.clone())];
    resource.extend(settings.resource.iter().map(|(k, v)| text(k, v.clone())));
    let spans = spans
        .map(|s| opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: s.context.trace_id.to_vec(),
            span_id: s.context.span_id.to_vec(),
            trace_state: s.context.state.clone().unwrap_or_default(),
            parent_span_id: s.context.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 1,
            name: s.name,
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: s.context.start_unix_nanos,
            end_time_unix_nano: s.end_unix_nanos,
            attributes: s
                .attributes
                .iter()
                .map(|(k, v)| attribute(k, v))
                .chain(s.labels.iter().map(|(k, v)| attribute(k, v)))
                .collect(),
            status: Some(match s.error {
                Some(message) => Status {
                    message,
                    code: status::StatusCode::Error as i32,
                },
                None => Status::default(),
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "portcullis".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// POSTs one export over HTTP/1.1; an answer other than 2xx is an error.
fn post(settings: &Settings, body: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + settings.timeout;
    let addrs: Vec<SocketAddr> = settings.collector.authority.to_socket_addrs()?.collect();
    let addr = addrs.first().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "the collector's name resolves to nothing",
        )
    })?;
    let mut conn = TcpStream::connect_timeout(addr, settings.timeout)?;
    conn.set_write_timeout(Some(settings.timeout))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nuser-agent: portcullis/{}\r\nconnection: close\r\n\r\n",
        settings.collector.path,
        settings.collector.authority,
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() < 16 * 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the collector did not answer in time",
            ));
        }
        conn.set_read_timeout(Some(left))?;
        match conn.read(&mut buf)? {
            0 => break,
            n => answer.extend_from_slice(&buf[..n]),
        }
    }
    let status = std::str::from_utf8(answer.get(9..12).unwrap_or_default()).unwrap_or("");
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the collector answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(64)])
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ratio: f64) -> Settings {
        Settings {
            collector: Collector {
                authority: "127.0.0.1:4318".into(),
                path: "/v1/traces".into(),
            },
            service_name: "gw".into(),
            resource: Vec::new(),
            timeout: Duration::from_secs(1),
            ratio,
            client_ratio: 1.0,
            labels: Vec::new(),
        }
    }

    #[test]
    fn an_incoming_traceparent_is_continued_and_a_broken_one_starts_a_new_trace() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = Context::from_request(&settings(0.0), Some(incoming), Some("k=v"), false);
        assert_eq!(to_hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ctx.parent.map(|p| to_hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(ctx.sampled, "the caller's decision");
        assert_eq!(ctx.state.as_deref(), Some("k=v"));
        let out = ctx.traceparent();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && out.ends_with("-01"),
            "{out}"
        );
        assert_ne!(
            &out[36..52],
            "00f067aa0ba902b7",
            "our own span is the upstream's parent"
        );
        for broken in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse_traceparent(broken).is_none(), "{broken}");
        }
        let fresh = Context::from_request(&settings(1.0), Some("garbage"), None, false);
        assert!(fresh.parent.is_none() && fresh.sampled && fresh.state.is_none());
        assert!(!Context::from_request(&settings(0.0), None, None, false).sampled);
        assert!(
            Context::from_request(&settings(0.0), None, None, true).sampled,
            "x-client-trace-id"
        );
    }

    #[test]
    fn sampling_holds_its_ratio() {
        let s = settings(0.25);
        let sampled = (0..20_000)
            .filter(|_| Context::from_request(&s, None, None, false).sampled)
            .count();
        assert!((4_500..=5_500).contains(&sampled), "{sampled} of 20000 at 0.25");
    }
}
