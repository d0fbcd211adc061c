//! One request from head to access line: the per-request exchange (Pingora's
//! `CTX`) holds the request's own generation, its route and policy chain, what
//! the policies asked for, and the access record; nothing request-scoped is
//! kept on the connection.
//!
//! ```text
//! head ─► route ─► Gatekeeper admits ─► destination ─► request policies ─► body limit ─► forward
//!           │              │                 │                │               │
//!           └──────────────┴─────────────────┴────────────────┴───────────────┴─► one answer path
//! ```

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::Worker;
use super::answer::Answer;
use super::downstream::Downstream;
use super::error::{Blame, ProxyError};
use super::forward;
use crate::config::{Destination, Facts, RouteConfig};
use crate::http::{Framing, Head, Version};
use crate::policy::{Chain, HeaderEdits, RequestView, Verdict};
use crate::runtime::Generation;
use crate::runtime::memory::Pressure;
use crate::runtime::route::{normalize_host, upstream_target};
use crate::telemetry::trace;
use crate::telemetry::{AccessRecord, GateLabels, UpstreamLabels};

/// Longest the gateway waits for a client to take one of its own answers.
pub(super) const ANSWER_WRITE: Duration = Duration::from_secs(5);

/// Per-request facts for the access log and metrics.
#[derive(Debug, Default)]
pub(super) struct Record {
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream: Option<SocketAddr>,
    pub upstream_time: Option<Duration>,
    pub error: Option<&'static str>,
}

/// The chain of a route with no policies.
static NO_POLICIES: Chain = Chain::EMPTY;

/// One request in progress.
pub(super) struct Exchange<'a> {
    /// The configuration in force when the head arrived, kept to the end.
    pub generation: &'a Generation,
    /// The API instance it is routed to.
    pub route: Option<&'a RouteConfig>,
    /// The service (and path) the API's routes chose for it.
    pub destination: Option<&'a Destination>,
    /// That API instance's policies.
    pub chain: &'a Chain,
    /// The head and what the request phase left for the upstream and the response.
    pub request: RequestView<'a>,
    pub record: Record,
    /// Whether the request opens a WebSocket the route carries.
    pub websocket: bool,
    /// Its trace context, when tracing is configured.
    pub trace: Option<trace::Context>,
    /// The listener the request came in on.
    pub listener: SocketAddr,
    peer: SocketAddr,
    started: Instant,
}

impl<'a> Exchange<'a> {
    fn new(
        generation: &'a Generation,
        (peer, listener): (SocketAddr, SocketAddr),
        (head, host): (&'a Head, &'a str),
        started: Instant,
    ) -> Self {
        Self {
            generation,
            route: None,
            destination: None,
            chain: &NO_POLICIES,
            request: RequestView {
                client: peer.ip(),
                head,
                api_path: head.path(),
                host,
                edits: HeaderEdits::default(),
                response_add: Vec::new(),
                client_id: None,
            },
            record: Record::default(),
            websocket: false,
            trace: generation.config.gateway.tracing.as_ref().map(|settings| {
                let text = |name| head.header(name).and_then(|v| std::str::from_utf8(v).ok());
                let client_trace = head.header("x-client-trace-id").is_some();
                trace::Context::from_request(settings, text("traceparent"), text("tracestate"), client_trace)
            }),
            listener,
            peer,
            started,
        }
    }

    /// The request head.
    pub fn head(&self) -> &'a Head {
        self.request.head
    }

    fn api(&self) -> &str {
        self.route.map_or("-", |r| r.api.as_str())
    }

    /// The service's response timeout, tightened by a policy if one sets less.
    pub fn response_timeout(&self, service_timeout: Duration) -> Duration {
        self.chain
            .response_timeout(&self.request)
            .map_or(service_timeout, |t| t.min(service_timeout))
    }

    /// The request target sent upstream: the base path replaced by the
    /// destination's path; `OPTIONS *` stays `*` (RFC 9112 §3.2.4).
    pub fn upstream_target(&self) -> String {
        let target = self.head().target();
        if target == "*" {
            return target.to_owned();
        }
        match (self.route, self.destination) {
            (Some(route), Some(to)) => upstream_target(&route.base_path, &to.path, target),
            _ => upstream_target("/", "/", target),
        }
    }

    /// Sends `answer` in place of the upstream's response and ends the
    /// exchange; whether the connection may carry another request.
    pub async fn answer(&mut self, client: &mut impl Downstream, worker: &Worker, answer: Answer) -> bool {
        let head = self.head();
        let keep = client.keeps_alive(&answer, head);
        if answer.sendable() {
            self.record.bytes_out = client.send_answer(&answer, head.version, keep).await;
        }
        self.record.status = answer.status();
        self.record.error = Some(answer.label());
        if client.grpc() {
            worker
                .metrics
                .grpc(self.api(), super::grpc::status_of(answer.status()));
        }
        if let Answer::Gated(reason) = &answer {
            let labels = GateLabels {
                api: self.api().to_owned(),
                reason: reason.label().to_owned(),
            };
            worker.shared.metrics.gate_rejections.get_or_create(&labels).inc();
        }
        if let Some(e) = answer.error() {
            self.note(worker, e);
        }
        self.finish(worker);
        keep
    }

    /// What the response policies do to `response`'s head.
    pub fn response_edits(&self, response: &Head) -> HeaderEdits {
        if self.chain.is_empty() {
            HeaderEdits::default()
        } else {
            self.chain.on_response(&self.request, response)
        }
    }

    /// Counts and logs a failed exchange by who is to blame.
    pub fn note(&mut self, worker: &Worker, e: &ProxyError) {
        self.record.error = Some(e.kind());
        match e.blame() {
            Blame::Upstream => {
                let service = self
                    .destination
                    .map_or("-", |d| self.generation.upstreams[d.service].cfg.name.as_str());
                let labels = UpstreamLabels {
                    service: service.to_owned(),
                    kind: e.kind().into(),
                };
                worker.shared.metrics.upstream_errors.get_or_create(&labels).inc();
                tracing::warn!(api = %self.api(), service, error = %e, "upstream exchange failed");
            }
            Blame::Client => tracing::debug!(peer = %self.peer, error = %e, "client exchange failed"),
        }
    }

    /// The request's span, for the exporter.
    fn span(&self, context: &trace::Context, settings: &trace::Settings) -> trace::Span {
        use trace::Value::{Float, Int, Text};
        let head = self.head();
        let status = self.record.status;
        let text = |v: &str| Text(v.to_owned());
        let mut attributes = vec![
            ("http.request.method", text(head.method())),
            ("url.path", text(head.path())),
            ("server.address", text(self.request.host)),
            ("server.port", Int(i64::from(self.listener.port()))),
            ("client.address", Text(self.peer.ip().to_string())),
            ("http.response.status_code", Int(i64::from(status))),
            ("portcullis.api", text(self.api())),
            ("portcullis.outcome", text(self.record.error.unwrap_or("ok"))),
            (
                "http.request.body.size",
                Int(i64::try_from(self.record.bytes_in).unwrap_or(i64::MAX)),
            ),
            (
                "http.response.body.size",
                Int(i64::try_from(self.record.bytes_out).unwrap_or(i64::MAX)),
            ),
        ];
        if let Some(route) = self.route {
            attributes.push(("http.route", text(&route.base_path)));
        }
        if let Some(d) = self.destination {
            attributes.push((
                "portcullis.service",
                text(&self.generation.upstreams[d.service].cfg.name),
            ));
        }
        if let Some(up) = self.record.upstream {
            attributes.push(("portcullis.upstream.address", Text(up.to_string())));
        }
        if let Some(t) = self.record.upstream_time {
            attributes.push(("portcullis.upstream.duration_ms", Float(t.as_secs_f64() * 1000.0)));
        }
        let labels = settings.labels.iter().map(|l| {
            let value = match &l.source {
                trace::LabelSource::Literal(v) => v.clone(),
                trace::LabelSource::Header { name, default } => match name.as_str() {
                    ":method" => head.method().to_owned(),
                    ":path" => head.path().to_owned(),
                    ":authority" => self.request.host.to_owned(),
                    _ => head
                        .header(name)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map_or_else(|| default.clone(), str::to_owned),
                },
            };
            (l.name.as_str(), value)
        });
        trace::Span {
            context: context.clone(),
            name: format!("{} {}", head.method(), self.api()),
            end_unix_nanos: context.start_unix_nanos
                + u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX / 2),
            attributes,
            labels: labels.map(|(k, v)| (k.to_owned(), Text(v))).collect(),
            error: (status >= 500).then(|| self.record.error.unwrap_or("upstream_5xx").to_owned()),
        }
    }

    /// Counts the request and writes its access line, as its generation says.
    pub fn finish(&self, worker: &Worker) {
        let head = self.head();
        let elapsed = self.started.elapsed();
        if let (Some(context), Some(settings)) = (&self.trace, &self.generation.config.gateway.tracing)
            && context.sampled
        {
            trace::record(self.span(context, settings));
        }
        // A tunnel's lifetime is not a request latency.
        let latency = self
            .route
            .filter(|_| self.record.status != 101)
            .map(|_| elapsed.as_secs_f64());
        worker.metrics.request(self.api(), self.record.status, latency);
        if self.generation.config.gateway.access_logs {
            AccessRecord {
                client: self.peer,
                method: head.method(),
                path: head.path(),
                api: self.api(),
                status: self.record.status,
                bytes_in: self.record.bytes_in,
                bytes_out: self.record.bytes_out,
                duration: elapsed,
                upstream_time: self.record.upstream_time,
                upstream: self.record.upstream,
                error: self.record.error,
            }
            .log();
        }
    }
}

/// Handles one request; returns whether the connection may carry another.
pub(super) async fn handle(
    client: &mut impl Downstream,
    worker: &Rc<Worker>,
    listener: SocketAddr,
    head: Head,
    started: Instant,
) -> bool {
    // The request runs to its end on the configuration in force now.
    let generation = worker.current();
    let host = head.host().map(normalize_host).unwrap_or_default();
    let mut ex = Exchange::new(&generation, (client.peer(), listener), (&head, &host), started);
    let Some(rt) = generation.listeners.get(&listener) else {
        return ex.answer(client, worker, Answer::ListenerGone).await;
    };
    let Some(api) = rt.router.find(&host, head.path()) else {
        // Untracked traffic: 404, not policed, not counted per API.
        return ex.answer(client, worker, Answer::NoRoute).await;
    };
    let route = &api.cfg;
    ex.route = Some(route);
    if worker.shared.memory.pressure() == Pressure::Shed {
        return ex.answer(client, worker, Answer::Overloaded).await;
    }
    ex.request.api_path = api.api_path(head.path());
    if let Some(chain) = generation.chains.get(&route.api) {
        ex.chain = chain;
    }
    if let Err(reason) = generation.gates.admit(&route.api, ex.chain) {
        return ex.answer(client, worker, Answer::Gated(reason)).await;
    }
    let facts = Facts {
        head: &head,
        path: ex.request.api_path,
        host: &host,
    };
    // Counted for the API: its routes' rules take none of it.
    let Some(destination) = api.destination(&facts) else {
        return ex.answer(client, worker, Answer::NoRoute).await;
    };
    ex.destination = Some(destination);
    match ex.chain.on_request(&mut ex.request).await {
        Verdict::Continue | Verdict::Later(_) => {}
        Verdict::Respond(response) => return ex.answer(client, worker, Answer::Policy(response)).await,
        Verdict::Deny(denial) => return ex.answer(client, worker, Answer::Denied(denial)).await,
    }
    if head.method() == "TRACE" {
        return ex.answer(client, worker, Answer::TraceRefused).await;
    }
    if head.max_forwards() == Some(0) {
        return ex.answer(client, worker, Answer::LastHop).await;
    }
    // Held until the tunnel closes; taken only once the policies let the handshake through.
    let tunnel_slot = if route.websocket.enabled && head.is_websocket_upgrade() {
        let limit = route.websocket.max_connections;
        let Some(slot) = worker.shared.tunnels.open(&route.api, limit) else {
            return ex.answer(client, worker, Answer::TunnelsFull).await;
        };
        ex.websocket = true;
        Some(slot)
    } else {
        None
    };
    if let Framing::Length(n) = head.framing
        && n > route.max_body
    {
        let too_large = ProxyError::BodyTooLarge {
            limit: route.max_body,
        };
        return ex.answer(client, worker, Answer::Failed(too_large)).await;
    }
    let keep = forward::forward(client, worker, &mut ex, route, destination).await;
    drop(tunnel_slot);
    keep
}

/// Answers a head that could not be read or parsed, and logs it without a request.
pub(super) async fn refuse_head(client: &mut impl Downstream, worker: &Worker, error: ProxyError) {
    let answer = Answer::Failed(error);
    let mut bytes_out = 0;
    if answer.sendable() {
        bytes_out = client.send_answer(&answer, Version::Http11, false).await;
    }
    worker.metrics.request("-", answer.status(), None);
    if worker.current().config.gateway.access_logs {
        AccessRecord {
            client: client.peer(),
            method: "-",
            path: "-",
            api: "-",
            status: answer.status(),
            bytes_in: 0,
            bytes_out,
            duration: Duration::ZERO,
            upstream_time: None,
            upstream: None,
            error: Some(answer.label()),
        }
        .log();
    }
}
