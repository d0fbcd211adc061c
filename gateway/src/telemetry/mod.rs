//! Logs and metrics: the access log line, the log outputs beside stderr, and
//! the Prometheus registry behind `/metrics`.

pub mod logs;
pub mod trace;

/// A bounded queue of `capacity` drained by `drain` on a thread named `name`,
/// or why the thread could not start.
fn spawn_queue<M: Send + 'static>(
    name: &str,
    capacity: usize,
    drain: fn(&std::sync::mpsc::Receiver<M>),
) -> Result<std::sync::mpsc::SyncSender<M>, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || drain(&rx))
        .map(|_| tx)
        .map_err(|e| e.to_string())
}

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a finished request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// API instance, or `-` when no route matched.
    pub api: String,
    /// Status sent to the client.
    pub status: u16,
}

/// Labels of a per-API histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// API instance.
    pub api: String,
}

/// Labels of an upstream failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Service name.
    pub service: String,
    /// Failure kind (`connect`, `timeout`, ...).
    pub kind: String,
}

/// Labels of an upstream endpoint's health event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Service name.
    pub service: String,
    /// The endpoint's address.
    pub endpoint: String,
    /// `consecutive_5xx` or `connect_failures` for an ejection; `pass` or `fail` for a check.
    pub result: String,
}

/// Labels of a TLS handshake.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of a request the Gatekeeper answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabels {
    /// API instance.
    pub api: String,
    /// Why its gate is closed (`policy_failed`, `contracts_missing`, ...).
    pub reason: String,
}

/// Labels of a closed WebSocket tunnel.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    /// API instance.
    pub api: String,
    /// Why it closed (`closed`, `idle_timeout`, `max_duration`, `reload`, `drain`, `error`).
    pub reason: String,
}

/// Labels of a connection refused, by why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why (each family lists its reasons).
    pub reason: String,
}

/// At most one log line a second for one kind of event under load: each
/// [`LogGate::open`] that returns `Some(n)` lets a line through and says how
/// many were held back since the last one.
#[derive(Debug, Default)]
pub struct LogGate {
    last: AtomicU64,
    held: AtomicU64,
}

impl LogGate {
    /// `Some(held back)` when a line may be written now, else `None` (counted).
    pub fn open(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if now > last
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Labels of a finished gRPC call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// API instance.
    pub api: String,
    /// Its gRPC status code (0 OK, 14 UNAVAILABLE, ...).
    pub grpc_status: u32,
}

/// Labels of bytes carried by WebSocket tunnels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelBytesLabels {
    /// API instance.
    pub api: String,
    /// `upstream` (client to upstream) or `client` (upstream to client).
    pub direction: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

/// Metrics another part of the gateway writes at scrape time (what XDP
/// counted, read from its maps), as OpenMetrics text families.
pub type ScrapeHook = Box<dyn Fn(&mut String) + Send + Sync>;

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by API and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by API, seconds.
    pub latency: HistogramFamily<ApiLabels>,
    /// Upstream failures by service and kind.
    pub upstream_errors: Family<UpstreamLabels, Counter>,
    /// Outlier ejections by service, endpoint and reason.
    pub ejections: Family<EndpointLabels, Counter>,
    /// Active health checks by service, endpoint and result.
    pub health_checks: Family<EndpointLabels, Counter>,
    /// Client connections open now.
    pub open_connections: Gauge,
    /// Inbound TLS handshakes by result.
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// Requests answered 503 by the Gatekeeper, by API and reason.
    pub gate_rejections: Family<GateLabels, Counter>,
    /// 1 while an API instance's gate is open, 0 while it is blocked or applying.
    pub gate_open: Family<ApiLabels, Gauge>,
    /// WebSocket tunnels open now, by API.
    pub websocket_open: Family<ApiLabels, Gauge>,
    /// WebSocket tunnels closed, by API and reason.
    pub websocket_closed: Family<TunnelLabels, Counter>,
    /// Bytes carried by WebSocket tunnels, by API and direction.
    pub websocket_bytes: Family<TunnelBytesLabels, Counter>,
    /// HTTP/2 client connections opened.
    pub http2_connections: Counter,
    /// HTTP/2 connections closed for flooding control frames.
    pub http2_floods: Counter,
    /// HTTP/2 streams the client reset before their response began.
    pub http2_resets: Counter,
    /// gRPC calls by API and gRPC status (the upstream's, or the gateway's own refusal).
    pub grpc_calls: Family<GrpcLabels, Counter>,
    /// Connections refused on PROXY-protocol listeners: `untrusted_source` or `bad_header`.
    pub proxy_protocol_refused: Family<ReasonLabels, Counter>,
    /// Client connections refused at accept: `connection_limit` (the worker
    /// holds its limit), `memory` (the memory guard) or `accept_error` (the
    /// kernel refused the accept).
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Gates the warnings of refused connections to one line a second.
    refused_log: LogGate,
    /// The memory guard's state: 0 normal, 1 refusing connections, 2 shedding requests.
    pub memory_pressure: Gauge,
    /// The cgroup's working set (bytes), as the memory guard last read it.
    pub memory_working_set: Gauge,
    /// The cgroup's memory limit (bytes) the guard holds the working set against.
    pub memory_limit: Gauge,
    /// Families written at scrape time by a layer above (set once, at start).
    pub scrape: Scrape,
}

/// The scrape-time hook of [`Metrics`].
#[derive(Default)]
pub struct Scrape(std::sync::OnceLock<ScrapeHook>);

impl Scrape {
    /// Installs `hook`; later calls are ignored.
    pub fn set(&self, hook: ScrapeHook) {
        let _ = self.0.set(hook);
    }
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Scrape").field(&self.0.get().is_some()).finish()
    }
}

/// A new metric of type `M`, registered as `name` with `help`.
fn registered<M: Default + Clone + prometheus_client::registry::Metric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let r = &mut registry;
        let requests = registered(r, "requests", "Requests answered, by API instance and status");
        let latency: HistogramFamily<ApiLabels> = Family::new_with_constructor(latency_histogram);
        r.register(
            "request_duration_seconds",
            "Time from request head to last response byte",
            latency.clone(),
        );
        Self {
            requests,
            latency,
            upstream_errors: registered(
                r,
                "upstream_errors",
                "Failed upstream exchanges, by service and kind",
            ),
            ejections: registered(
                r,
                "upstream_ejections",
                "Endpoints ejected by outlier detection, by service, endpoint and reason (result)",
            ),
            health_checks: registered(
                r,
                "upstream_health_checks",
                "Active health checks, by service, endpoint and result (pass or fail)",
            ),
            open_connections: registered(r, "open_connections", "Client connections open now"),
            tls_handshakes: registered(r, "tls_handshakes", "Inbound TLS handshakes, by result"),
            gate_rejections: registered(
                r,
                "gate_rejections",
                "Requests answered 503 by the Gatekeeper, by API instance and reason",
            ),
            gate_open: registered(
                r,
                "gate_open",
                "1 while the API instance's gate is open, 0 while it is blocked or applying",
            ),
            websocket_open: registered(r, "websocket_open", "WebSocket tunnels open now, by API instance"),
            websocket_closed: registered(
                r,
                "websocket_closed",
                "WebSocket tunnels closed, by API instance and reason",
            ),
            websocket_bytes: registered(
                r,
                "websocket_bytes",
                "Bytes carried by WebSocket tunnels, by API instance and direction",
            ),
            http2_connections: registered(
                r,
                "http2_connections",
                "HTTP/2 client connections opened (TLS by ALPN, or h2c)",
            ),
            http2_floods: registered(
                r,
                "http2_floods",
                "HTTP/2 connections sent GOAWAY ENHANCE_YOUR_CALM for flooding control frames",
            ),
            http2_resets: registered(
                r,
                "http2_resets",
                "HTTP/2 streams the client reset before their response began; their upstream requests are dropped",
            ),
            grpc_calls: registered(
                r,
                "grpc_calls",
                "gRPC calls finished, by API instance and gRPC status",
            ),
            proxy_protocol_refused: registered(
                r,
                "proxy_protocol_refused",
                "Connections refused on PROXY-protocol listeners: from an untrusted source, or without a valid header",
            ),
            connections_refused: registered(
                r,
                "connections_refused",
                "Client connections closed at accept: the worker at its connection limit, memory near the cgroup limit, or an accept the kernel refused",
            ),
            refused_log: LogGate::default(),
            memory_pressure: registered(
                r,
                "memory_pressure",
                "The memory guard: 0 normal, 1 new connections refused (90% of the cgroup limit), 2 new requests shed (95%)",
            ),
            memory_working_set: registered(
                r,
                "memory_working_set_bytes",
                "The cgroup's memory in use less its inactive page cache, read every 50 ms",
            ),
            memory_limit: registered(
                r,
                "memory_limit_bytes",
                "The cgroup memory limit the guard holds to",
            ),
            scrape: Scrape::default(),
            registry,
        }
    }
}

/// Counts one event of `endpoint` of `service` in `family`.
fn endpoint_event(
    family: &Family<EndpointLabels, Counter>,
    service: &str,
    endpoint: SocketAddr,
    result: &str,
) {
    let labels = EndpointLabels {
        service: service.to_owned(),
        endpoint: endpoint.to_string(),
        result: result.to_owned(),
    };
    family.get_or_create(&labels).inc();
}

impl Metrics {
    /// Counts an ejection of `endpoint` of `service` for `reason`.
    pub fn ejection(&self, service: &str, endpoint: SocketAddr, reason: &str) {
        endpoint_event(&self.ejections, service, endpoint, reason);
    }

    /// Counts an active health check of `endpoint` of `service`.
    pub fn health_check(&self, service: &str, endpoint: SocketAddr, passed: bool) {
        let result = if passed { "pass" } else { "fail" };
        endpoint_event(&self.health_checks, service, endpoint, result);
    }

    /// Counts a connection refused on a PROXY-protocol listener for `reason`.
    pub fn refuse_proxy_protocol(&self, reason: &str) {
        let labels = ReasonLabels {
            reason: reason.to_owned(),
        };
        self.proxy_protocol_refused.get_or_create(&labels).inc();
    }

    /// Counts a client connection refused at accept for `reason`; `Some(n)`
    /// when a warning may be logged now (at most one a second), `n` the
    /// refusals held back since the last.
    pub fn refuse_connection(&self, reason: &str) -> Option<u64> {
        let labels = ReasonLabels {
            reason: reason.to_owned(),
        };
        self.connections_refused.get_or_create(&labels).inc();
        self.refused_log.open()
    }

    /// Prometheus text exposition of every metric, the scrape-time families included.
    pub fn encode(&self) -> String {
        self.encode_with(&|_| {})
    }

    /// [`Metrics::encode`] with `more` families written at scrape time by the caller.
    pub fn encode_with(&self, more: &dyn Fn(&mut String)) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        // OpenMetrics ends with `# EOF`: the extra families go before it.
        let eof = out.rfind("# EOF").unwrap_or(out.len());
        let tail = out.split_off(eof);
        if let Some(hook) = self.scrape.0.get() {
            hook(&mut out);
        }
        more(&mut out);
        out.push_str(&tail);
        out
    }
}

/// One finished request, as the access log records it.
#[derive(Debug)]
pub struct AccessRecord<'a> {
    /// Client address.
    pub client: SocketAddr,
    /// Method.
    pub method: &'a str,
    /// Path without the query string (which may carry secrets).
    pub path: &'a str,
    /// API instance, or `-`.
    pub api: &'a str,
    /// Status sent.
    pub status: u16,
    /// Request body bytes received.
    pub bytes_in: u64,
    /// Response bytes sent (head and body).
    pub bytes_out: u64,
    /// Total time.
    pub duration: Duration,
    /// Time spent waiting for and streaming from the upstream.
    pub upstream_time: Option<Duration>,
    /// Upstream endpoint used.
    pub upstream: Option<SocketAddr>,
    /// Why the exchange failed, if it did.
    pub error: Option<&'a str>,
}

impl AccessRecord<'_> {
    /// Emits the record on the `access` tracing target.
    pub fn log(&self) {
        let upstream = self.upstream.map(|a| a.to_string());
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
        let upstream_ms = self.upstream_time.map(ms);
        tracing::info!(
            target: "access",
            client = %self.client,
            method = self.method,
            path = self.path,
            api = self.api,
            status = self.status,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = %ms(self.duration),
            upstream_ms = %upstream_ms.as_deref().unwrap_or("-"),
            upstream = upstream.as_deref().unwrap_or("-"),
            error = self.error.unwrap_or("-"),
        );
    }
}

/// Per-API handles one worker caches, so recording a request allocates nothing.
#[derive(Debug, Default)]
struct ApiHandles {
    by_status: Vec<(u16, Counter)>,
    latency: Option<Histogram>,
}

/// A worker's view of [`Metrics`]: same counters, cached handles.
#[derive(Debug)]
pub struct LocalMetrics {
    /// The shared registry.
    pub shared: std::sync::Arc<Metrics>,
    apis: std::cell::RefCell<std::collections::HashMap<String, ApiHandles>>,
}

impl LocalMetrics {
    /// A cache over `shared`.
    pub fn new(shared: std::sync::Arc<Metrics>) -> Self {
        Self {
            shared,
            apis: std::cell::RefCell::default(),
        }
    }

    /// Counts a finished gRPC call of `api` with `grpc_status`.
    pub fn grpc(&self, api: &str, grpc_status: u32) {
        let labels = GrpcLabels {
            api: api.to_owned(),
            grpc_status,
        };
        self.shared.grpc_calls.get_or_create(&labels).inc();
    }

    /// Counts a finished request of `api` (`-` for unrouted) with its latency.
    pub fn request(&self, api: &str, status: u16, seconds: Option<f64>) {
        let mut apis = self.apis.borrow_mut();
        if !apis.contains_key(api) {
            apis.insert(api.to_string(), ApiHandles::default());
        }
        let Some(handles) = apis.get_mut(api) else { return };
        let counter = if let Some((_, c)) = handles.by_status.iter().find(|(s, _)| *s == status) {
            c.clone()
        } else {
            let labels = RequestLabels {
                api: api.to_string(),
                status,
            };
            let c = self.shared.requests.get_or_create(&labels).clone();
            handles.by_status.push((status, c.clone()));
            c
        };
        counter.inc();
        if let Some(seconds) = seconds {
            let histogram = handles.latency.get_or_insert_with(|| {
                self.shared
                    .latency
                    .get_or_create(&ApiLabels { api: api.to_string() })
                    .clone()
            });
            histogram.observe(seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_time_families_go_before_the_end_of_the_exposition() {
        let metrics = Metrics::default();
        metrics.open_connections.set(3);
        metrics.scrape.set(Box::new(|out: &mut String| {
            out.push_str("# TYPE portcullis_xdp_listeners gauge\nportcullis_xdp_listeners 2\n");
        }));
        let text = metrics.encode();
        assert!(text.contains("portcullis_open_connections 3\n"), "{text}");
        let extra = text
            .find("portcullis_xdp_listeners 2\n")
            .expect("the hook's family");
        let eof = text.find("# EOF").expect("the end marker");
        assert!(extra < eof && text.ends_with("# EOF\n"), "{text}");
    }
}
