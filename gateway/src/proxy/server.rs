//! One client connection: read requests in order, route, forward, stream back, log.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::timeout;

use super::Worker;
use super::conn::Conn;
use super::error::{Blame, ProxyError};
use super::io::TcpConn;
use crate::config::{GateLevel, HostHeader, RouteConfig, XffMode};
use crate::http::{self, ChunkedDecoder, Framing, Head, HttpError, Reencode, Version};
use crate::policy::{Chain, HeaderEdits, RequestView, Verdict};
use crate::runtime::route::{normalize_host, upstream_target};
use crate::runtime::service::Upstream;
use crate::runtime::{Generation, ListenerRt, Shared};
use crate::telemetry::{AccessRecord, GateLabels, HandshakeLabels, UpstreamLabels};

/// Read buffer of a new upstream connection; it stays with the connection in the pool.
const UPSTREAM_BUF: usize = 32 * 1024;
/// Body reads and writes move this much at a time.
const BODY_CHUNK: usize = 64 * 1024;
/// Read buffer an idle keep-alive connection waits with.
const IDLE_READ: usize = 1024;
/// Most bytes read and discarded while closing after an error.
const LINGER_BYTES: usize = 256 * 1024;
/// Longest time spent discarding input while closing after an error.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Counts an open client connection for the gauge.
struct OpenGuard(Rc<Worker>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
        self.0.shared.metrics.open_connections.dec();
    }
}

/// Serves one accepted connection until it closes.
pub async fn serve(worker: Rc<Worker>, listener: Arc<ListenerRt>, tcp: TcpConn, peer: SocketAddr) {
    worker.open.set(worker.open.get() + 1);
    worker.shared.metrics.open_connections.inc();
    let _guard = OpenGuard(worker.clone());
    let handshake_timeout = worker.current().settings.timeouts.request_headers;
    let mut conn = match &listener.tls {
        Some(config) => {
            let handshake = async {
                let server = rustls::ServerConnection::new(config.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                Conn::tls(tcp, server).await
            };
            let result = timeout(handshake_timeout, Box::pin(handshake)).await;
            let ok = matches!(result, Ok(Ok(_)));
            let label = HandshakeLabels {
                result: if ok { "ok" } else { "error" }.into(),
            };
            worker.shared.metrics.tls_handshakes.get_or_create(&label).inc();
            match result {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
        None => Conn::Plain(tcp),
    };
    let mut client = Client {
        conn: &mut conn,
        buf: Vec::new(),
        peer,
        tls: listener.tls.is_some(),
        generation: worker.current(),
        draining: worker.shared.draining.clone(),
        chain: Arc::new(Chain::default()),
        edits: HeaderEdits::default(),
        response_add: Vec::new(),
    };
    let mut first = true;
    loop {
        client.generation = worker.current();
        let head = match client.read_head(&worker.shared, first).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(e) => {
                let status = e.status();
                let record = Record::bare(peer, status, e.kind());
                client.send_error(status, true).await;
                record.finish(&worker, None, Instant::now());
                client.linger().await;
                return;
            }
        };
        first = false;
        let started = Instant::now();
        // The request runs to its end on the configuration in force now.
        client.generation = worker.current();
        // Boxed: an idle keep-alive connection then holds only the small
        // head-reading state, not the largest state of a whole exchange.
        let keep = Box::pin(client.exchange(&worker, listener.addr, head, started)).await;
        if !keep {
            client.linger().await;
            return;
        }
        if client.buf.is_empty() {
            client.buf = Vec::new();
        }
    }
    conn.close().await;
}

/// Per-request facts for the access log and metrics.
struct Record<'a> {
    peer: SocketAddr,
    method: &'a str,
    path: &'a str,
    api: Option<&'a str>,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    upstream: Option<SocketAddr>,
    upstream_time: Option<Duration>,
    error: Option<&'static str>,
}

impl Record<'_> {
    fn bare(peer: SocketAddr, status: u16, error: &'static str) -> Self {
        Self {
            peer,
            method: "-",
            path: "-",
            api: None,
            status,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            upstream_time: None,
            error: Some(error),
        }
    }

    fn finish(&self, worker: &Worker, route: Option<&RouteConfig>, started: Instant) {
        let api = self.api.unwrap_or("-");
        worker
            .metrics
            .request(api, self.status, route.map(|_| started.elapsed().as_secs_f64()));
        if !worker.current().config.gateway.access_logs {
            return;
        }
        AccessRecord {
            client: self.peer,
            method: self.method,
            path: self.path,
            api,
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration: started.elapsed(),
            upstream_time: self.upstream_time,
            upstream: self.upstream,
            error: self.error,
        }
        .log();
    }
}

/// The client side of a connection: its transport and unread bytes.
struct Client<'c> {
    conn: &'c mut Conn,
    buf: Vec<u8>,
    peer: SocketAddr,
    tls: bool,
    generation: Arc<Generation>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// The routed API's policies, for the exchange in progress.
    chain: Arc<Chain>,
    /// Header edits the request phase asked for.
    edits: HeaderEdits,
    /// Headers the request phase added for the response.
    response_add: Vec<(String, String)>,
}

/// How a finished exchange leaves the client connection.
struct Exchange {
    status: u16,
    keep_alive: bool,
    bytes_in: u64,
    bytes_out: u64,
    upstream: Option<SocketAddr>,
    upstream_time: Option<Duration>,
    error: Option<ProxyError>,
}

/// An error while copying a body: which side failed.
enum CopyError {
    Source(ProxyError),
    Sink(ProxyError),
}

impl Client<'_> {
    /// Reads the next request head; `None` when the client closed or idled out between requests.
    async fn read_head(&mut self, shared: &Shared, first: bool) -> Result<Option<Head>, ProxyError> {
        let generation = self.generation.clone();
        let settings = &generation.settings;
        let limits = &settings.limits;
        let mut deadline = None;
        loop {
            // Tolerate the empty lines some clients send between requests.
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
            }
            if let Some(end) = http::head_end(&self.buf) {
                let head = http::parse_request(&self.buf[..end], limits)?;
                self.buf.drain(..end);
                return Ok(Some(head));
            }
            http::check_partial_request(&self.buf, limits)?;
            let wait = if self.buf.is_empty() {
                if first {
                    settings.timeouts.request_headers
                } else {
                    settings.timeouts.idle
                }
            } else {
                let d = *deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + settings.timeouts.request_headers);
                d.saturating_duration_since(tokio::time::Instant::now())
            };
            if self.buf.capacity() == 0 {
                self.buf.reserve(IDLE_READ);
            } else if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(8 * 1024);
            }
            let between_requests = self.buf.is_empty();
            let buf = std::mem::take(&mut self.buf);
            let read = timeout(wait, self.conn.read(buf));
            let outcome = if between_requests {
                // A drain closes connections that wait for their next request at once.
                let drained = shared.drain.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if shared.draining.load(std::sync::atomic::Ordering::Acquire) {
                    return Ok(None);
                }
                tokio::select! {
                    r = read => r,
                    () = &mut drained => return Ok(None),
                }
            } else {
                read.await
            };
            match outcome {
                Ok((res, buf)) => {
                    self.buf = buf;
                    match res {
                        Ok(0) if self.buf.is_empty() => return Ok(None),
                        Ok(0) => {
                            return Err(ProxyError::Client(HttpError::Malformed(
                                "connection closed mid-head",
                            )));
                        }
                        Ok(_) => {}
                        Err(e) if self.buf.is_empty() => {
                            tracing::debug!(peer = %self.peer, error = %e, "client read failed between requests");
                            return Ok(None);
                        }
                        Err(e) => return Err(ProxyError::ClientIo(e)),
                    }
                }
                Err(_) => {
                    // The read future owned the buffer; anything it held is lost with it.
                    return if self.buf.is_empty() && deadline.is_none() {
                        Ok(None)
                    } else {
                        Err(ProxyError::ClientTimeout)
                    };
                }
            }
        }
    }

    async fn write(&mut self, bytes: Vec<u8>, wait: Duration) -> Result<Vec<u8>, ProxyError> {
        match timeout(wait, self.conn.write_all(bytes)).await {
            Ok((Ok(()), buf)) => Ok(buf),
            Ok((Err(e), _)) => Err(ProxyError::ClientIo(e)),
            Err(_) => Err(ProxyError::ClientIo(io::Error::new(
                io::ErrorKind::TimedOut,
                "client write timed out",
            ))),
        }
    }

    async fn send_error(&mut self, status: u16, close: bool) -> u64 {
        let body = format!("{} {}\n", status, http::reason(status));
        let mut extra: Vec<(&str, &str)> = Vec::new();
        if status == 503 {
            extra.push(("retry-after", "5"));
        }
        let bytes = http::simple_response(
            status,
            &extra,
            "text/plain; charset=utf-8",
            body.as_bytes(),
            close,
        );
        let len = bytes.len() as u64;
        let _ = timeout(Duration::from_secs(5), self.conn.write_all(bytes)).await;
        len
    }

    /// Half-closes and discards what the client still sends, so it reads our
    /// response instead of a reset.
    async fn linger(&mut self) {
        if let Conn::Plain(tcp) = &*self.conn {
            tcp.shutdown_write();
        }
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut seen = 0;
        let mut buf = std::mem::take(&mut self.buf);
        while seen < LINGER_BYTES {
            buf.clear();
            buf.reserve(16 * 1024);
            match tokio::time::timeout_at(deadline, self.conn.read(buf)).await {
                Ok((Ok(n), b)) if n > 0 => {
                    seen += n;
                    buf = b;
                }
                _ => break,
            }
        }
        self.conn.shutdown();
    }

    /// Handles one request; returns whether the connection may carry another.
    async fn exchange(
        &mut self,
        worker: &Rc<Worker>,
        listener: SocketAddr,
        head: Head,
        started: Instant,
    ) -> bool {
        let generation = self.generation.clone();
        let host = head.host().map(normalize_host).unwrap_or_default();
        let Some(listener) = generation.listeners.get(&listener) else {
            // A reload removed this listener: finish politely.
            self.send_error(404, true).await;
            return false;
        };
        let route = listener.router.find(&host, head.path());
        let mut record = Record {
            peer: self.peer,
            method: head.method(),
            path: head.path(),
            api: route.map(|r| r.api.as_str()),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            upstream_time: None,
            error: None,
        };
        let Some(route) = route else {
            // Untracked traffic: 404, not policed, not counted per API.
            record.status = 404;
            let close = !head.keep_alive || head.framing != Framing::Empty;
            record.bytes_out = self.send_error(404, close).await;
            record.error = Some("no_route");
            record.finish(worker, None, started);
            return !close;
        };
        let chain = generation.chains.get(&route.api);
        let closed = match generation.gates.get(&route.api) {
            Some(gate) if !gate.is_open() => Some(gate.reason.map_or("gated", |r| r.label())),
            // Under `disabled` the policy itself answers (it fails closed).
            _ if generation.config.gateway.gate_level != GateLevel::Disabled
                && chain.is_some_and(|c| !c.ready()) =>
            {
                Some("policy_not_ready")
            }
            _ => None,
        };
        if let Some(reason) = closed {
            let labels = GateLabels {
                api: route.api.clone(),
                reason: reason.to_owned(),
            };
            worker.shared.metrics.gate_rejections.get_or_create(&labels).inc();
            let close = !head.keep_alive || head.framing != Framing::Empty;
            record.status = 503;
            record.bytes_out = self.send_error(503, close).await;
            record.error = Some(reason);
            record.finish(worker, Some(route), started);
            return !close;
        }
        self.chain = chain.cloned().unwrap_or_default();
        if let Some((status, bytes, reason)) = self.request_policies(&head).await {
            record.bytes_out = bytes.len() as u64;
            let _ = self.write(bytes, generation.settings.timeouts.idle).await;
            record.status = status;
            record.error = Some(reason);
            record.finish(worker, Some(route), started);
            // A body the policy did not read cannot be skipped reliably: the answer closes.
            return head.keep_alive && head.framing == Framing::Empty;
        }
        let too_large = match head.framing {
            Framing::Length(n) => n > route.max_body,
            _ => false,
        };
        if too_large {
            record.status = 413;
            record.bytes_out = self.send_error(413, true).await;
            record.error = Some("body_too_large");
            record.finish(worker, Some(route), started);
            return false;
        }
        let upstream = generation.upstreams[route.service].clone();
        let ex = self.forward(worker, route, &upstream, &head).await;
        record.status = ex.status;
        record.bytes_in = ex.bytes_in;
        record.bytes_out = ex.bytes_out;
        record.upstream = ex.upstream;
        record.upstream_time = ex.upstream_time;
        if let Some(e) = &ex.error {
            record.error = Some(e.kind());
            match e.blame() {
                Blame::Upstream => {
                    let labels = UpstreamLabels {
                        service: upstream.cfg.name.clone(),
                        kind: e.kind().into(),
                    };
                    worker.shared.metrics.upstream_errors.get_or_create(&labels).inc();
                    tracing::warn!(api = %route.api, service = %upstream.cfg.name, error = %e, "upstream exchange failed");
                }
                Blame::Client => tracing::debug!(peer = %self.peer, error = %e, "client exchange failed"),
                Blame::Internal => tracing::error!(error = %e, "internal error"),
            }
        }
        record.finish(worker, Some(route), started);
        ex.keep_alive
    }

    /// Runs the request phase of the routed API's policies; an answer to send
    /// instead of forwarding (status, bytes, reason) if one of them ends the exchange.
    async fn request_policies(&mut self, head: &Head) -> Option<(u16, Vec<u8>, &'static str)> {
        let mut view = RequestView {
            client: self.peer.ip(),
            head,
            edits: HeaderEdits::default(),
            response_add: Vec::new(),
            client_id: None,
        };
        let chain = self.chain.clone();
        let verdict = chain.on_request(&mut view).await;
        self.edits = view.edits;
        self.response_add = view.response_add;
        let (status, headers, body, reason) = match verdict {
            Verdict::Continue | Verdict::Later(_) => return None,
            Verdict::Respond(r) => (r.status, r.headers, r.body, "policy_response"),
            Verdict::Deny(d) => (
                d.status(),
                Vec::new(),
                format!("{} {}\n", d.status(), http::reason(d.status())),
                d.reason(),
            ),
        };
        let close = !head.keep_alive || head.framing != Framing::Empty;
        let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let bytes = http::simple_response(
            status,
            &extra,
            "text/plain; charset=utf-8",
            body.as_bytes(),
            close,
        );
        Some((status, bytes, reason))
    }

    /// The service's response timeout, tightened by a policy if one sets less.
    fn response_timeout(&self, upstream: &Upstream) -> Duration {
        self.chain
            .response_timeout()
            .map_or(upstream.cfg.response_timeout, |t| {
                t.min(upstream.cfg.response_timeout)
            })
    }

    /// Builds the request head sent upstream.
    fn upstream_head(
        &self,
        route: &RouteConfig,
        upstream: &Upstream,
        endpoint: usize,
        head: &Head,
    ) -> Vec<u8> {
        let fwd = self.generation.settings.forwarded;
        let mut out = Vec::with_capacity(head.wire_len() + 128);
        out.extend_from_slice(head.method().as_bytes());
        out.push(b' ');
        out.extend_from_slice(upstream_target(route, head.target()).as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let client_host = head.host().unwrap_or("");
        let host: &str = match &upstream.cfg.host_header {
            HostHeader::Preserve if !client_host.is_empty() => client_host,
            HostHeader::Preserve | HostHeader::Upstream => &upstream.cfg.endpoints[endpoint].authority,
            HostHeader::Fixed(h) => h,
        };
        http::put_header(&mut out, b"host", host.as_bytes());
        let mut xff: Option<Vec<u8>> = None;
        let mut via: Option<Vec<u8>> = None;
        let mut te: Option<Vec<u8>> = None;
        for (name, value) in head.headers() {
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let t = te.get_or_insert_with(Vec::new);
                if !t.is_empty() {
                    t.extend_from_slice(b", ");
                }
                t.extend_from_slice(value);
                continue;
            }
            if name.eq_ignore_ascii_case(b"host") || head.is_hop_by_hop(name) || self.edits.removes(name) {
                continue;
            }
            if name.eq_ignore_ascii_case(b"x-forwarded-for") && fwd.xff != XffMode::Off {
                if fwd.xff == XffMode::Append {
                    let x = xff.get_or_insert_with(Vec::new);
                    if !x.is_empty() {
                        x.extend_from_slice(b", ");
                    }
                    x.extend_from_slice(value);
                }
                continue;
            }
            if (name.eq_ignore_ascii_case(b"x-forwarded-proto") && fwd.proto)
                || (name.eq_ignore_ascii_case(b"x-forwarded-host") && fwd.host)
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"via") && fwd.via {
                via = Some(value.to_vec());
                continue;
            }
            http::put_header(&mut out, name, value);
        }
        if head.framing == Framing::Chunked {
            http::put_header(
                &mut out,
                b"transfer-encoding",
                te.as_deref().unwrap_or(b"chunked"),
            );
        }
        if fwd.xff != XffMode::Off {
            let mut x = xff.unwrap_or_default();
            if !x.is_empty() {
                x.extend_from_slice(b", ");
            }
            x.extend_from_slice(self.peer.ip().to_string().as_bytes());
            http::put_header(&mut out, b"x-forwarded-for", &x);
        }
        for (name, value) in &self.edits.add {
            http::put_header(&mut out, name.as_bytes(), value.as_bytes());
        }
        if fwd.proto {
            http::put_header(
                &mut out,
                b"x-forwarded-proto",
                if self.tls { b"https" } else { b"http" },
            );
        }
        if fwd.host && !client_host.is_empty() {
            http::put_header(&mut out, b"x-forwarded-host", client_host.as_bytes());
        }
        if fwd.via {
            let mut v = via.map(|mut v| {
                v.extend_from_slice(b", ");
                v
            });
            let v = v.get_or_insert_with(Vec::new);
            v.extend_from_slice(if head.version == Version::Http10 {
                b"1.0 portcullis"
            } else {
                b"1.1 portcullis"
            });
            http::put_header(&mut out, b"via", v);
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Connects (or reuses a pooled connection) to an endpoint: the connection,
    /// whether it was reused, and its read buffer.
    async fn connect(
        &self,
        worker: &Worker,
        upstream: &Upstream,
        endpoint: usize,
    ) -> Result<(Conn, bool, Vec<u8>), ProxyError> {
        if let Some((conn, buf)) = worker.pool.take(upstream.id, endpoint) {
            return Ok((conn, true, buf));
        }
        let ep = &upstream.cfg.endpoints[endpoint];
        let tcp = match TcpConn::connect(ep.addr, upstream.cfg.connect_timeout).await {
            Ok(tcp) => tcp,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(ProxyError::ConnectTimeout {
                    endpoint: ep.addr.to_string(),
                });
            }
            Err(e) => {
                return Err(ProxyError::Connect {
                    service: upstream.cfg.name.clone(),
                    source: e,
                });
            }
        };
        let Some(tls) = &upstream.tls else {
            return Ok((Conn::Plain(tcp), false, Vec::with_capacity(UPSTREAM_BUF)));
        };
        let name = upstream.server_names[endpoint].clone();
        let tls_err = |e: io::Error| ProxyError::UpstreamTls {
            endpoint: ep.addr.to_string(),
            source: e,
        };
        let client =
            rustls::ClientConnection::new(tls.clone(), name).map_err(|e| tls_err(io::Error::other(e)))?;
        match timeout(upstream.cfg.connect_timeout, Conn::tls(tcp, client)).await {
            Ok(Ok(conn)) => Ok((conn, false, Vec::with_capacity(UPSTREAM_BUF))),
            Ok(Err(e)) => Err(tls_err(e)),
            Err(_) => Err(ProxyError::ConnectTimeout {
                endpoint: ep.addr.to_string(),
            }),
        }
    }

    #[expect(clippy::too_many_lines, reason = "the retry loop reads best as one piece")]
    async fn forward(
        &mut self,
        worker: &Rc<Worker>,
        route: &RouteConfig,
        upstream: &Arc<Upstream>,
        head: &Head,
    ) -> Exchange {
        let generation = self.generation.clone();
        let settings = &generation.settings;
        let mut ex = Exchange {
            status: 502,
            keep_alive: false,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            upstream_time: None,
            error: None,
        };
        let mut tried: Vec<usize> = Vec::new();
        let mut sent_continue = false;
        let max_attempts = 1 + upstream.cfg.retries as usize;
        let mut attempts = 0;
        let mut last_error: Option<ProxyError> = None;
        let up_start = Instant::now();
        // A reused connection that failed before anything was sent does not use up an attempt.
        while let Some(endpoint) = upstream.pick(&tried) {
            if attempts >= max_attempts {
                break;
            }
            let ep_addr = upstream.cfg.endpoints[endpoint].addr;
            ex.upstream = Some(ep_addr);
            let (mut up, reused, mut up_buf) = match self.connect(worker, upstream, endpoint).await {
                Ok(c) => c,
                Err(e) => {
                    attempts += 1;
                    if matches!(e, ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. }) {
                        upstream.eject(endpoint);
                    }
                    tried.push(endpoint);
                    // Nothing reached the upstream, so another endpoint is safe for any method.
                    last_error = Some(e);
                    continue;
                }
            };
            if !reused {
                attempts += 1;
            }
            let _in_flight = upstream.begin(endpoint);
            let endpoint_name = || ep_addr.to_string();
            if head.expects_continue() && head.framing != Framing::Empty && !sent_continue {
                sent_continue = true;
                if let Err(e) = self
                    .write(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), settings.timeouts.idle)
                    .await
                {
                    ex.error = Some(e);
                    return ex;
                }
            }
            let request_head = self.upstream_head(route, upstream, endpoint, head);
            let (res, _) = up.write_all(request_head).await;
            if let Err(e) = res {
                if reused {
                    continue;
                }
                last_error = Some(ProxyError::UpstreamIo {
                    endpoint: endpoint_name(),
                    source: e,
                });
                tried.push(endpoint);
                continue;
            }
            match self
                .copy_request_body(
                    &mut up,
                    head.framing,
                    route.max_body,
                    settings.timeouts.idle,
                    self.response_timeout(upstream),
                )
                .await
            {
                Ok(n) => ex.bytes_in = n,
                Err(CopyError::Source(e)) => {
                    ex.status = e.status();
                    if !matches!(e, ProxyError::ClientIo(_) | ProxyError::ClientTimeout) {
                        ex.bytes_out = self.send_error(ex.status, true).await;
                    }
                    ex.error = Some(e);
                    return ex;
                }
                Err(CopyError::Sink(e)) => {
                    ex.status = 502;
                    ex.bytes_out = self.send_error(502, true).await;
                    ex.error = Some(e);
                    return ex;
                }
            }
            let response = loop {
                match read_response_head(
                    &mut up,
                    &mut up_buf,
                    self.response_timeout(upstream),
                    settings.limits.headers,
                    &endpoint_name(),
                )
                .await
                {
                    Ok(r) if r.status == 100 => {}
                    Ok(r) if r.status == 101 => {
                        break Err(ProxyError::UpstreamProtocol {
                            endpoint: endpoint_name(),
                            source: HttpError::Malformed("upgrade is not supported"),
                        });
                    }
                    Ok(r) if r.status < 200 => {
                        let mut interim = format!("HTTP/1.1 {} {}\r\n", r.status, r.reason()).into_bytes();
                        for (n, v) in r.headers() {
                            http::put_header(&mut interim, n, v);
                        }
                        interim.extend_from_slice(b"\r\n");
                        if let Err(e) = self.write(interim, settings.timeouts.idle).await {
                            break Err(e);
                        }
                    }
                    other => break other,
                }
            };
            let response = match response {
                Ok(r) => r,
                Err(ProxyError::UpstreamIo { source, .. })
                    if reused
                        && up_buf.is_empty()
                        && head.is_idempotent()
                        && head.framing == Framing::Empty
                        && source.kind() == io::ErrorKind::UnexpectedEof =>
                {
                    // The pooled connection was closed by the upstream before it read our request.
                    continue;
                }
                Err(e) => {
                    ex.status = e.status();
                    if !matches!(e, ProxyError::ClientIo(_)) {
                        ex.bytes_out = self.send_error(ex.status, true).await;
                    }
                    ex.error = Some(e);
                    ex.upstream_time = Some(up_start.elapsed());
                    return ex;
                }
            };
            ex.status = response.status;
            let result = self
                .send_response(head, &response, &mut up, up_buf, upstream, &endpoint_name())
                .await;
            ex.upstream_time = Some(up_start.elapsed());
            match result {
                Ok((sent, client_keep, upstream_keep, buf)) => {
                    ex.bytes_out = sent;
                    ex.keep_alive = client_keep;
                    if upstream_keep {
                        worker.pool.put(upstream.id, endpoint, up, buf);
                    }
                }
                Err((sent, e)) => {
                    ex.bytes_out = sent;
                    ex.error = Some(e);
                }
            }
            return ex;
        }
        let e = last_error.unwrap_or_else(|| ProxyError::Connect {
            service: upstream.cfg.name.clone(),
            source: io::Error::new(io::ErrorKind::NotConnected, "no endpoint left to try"),
        });
        ex.status = e.status();
        ex.bytes_out = self
            .send_error(ex.status, !head.keep_alive || head.framing != Framing::Empty)
            .await;
        ex.keep_alive = head.keep_alive && head.framing == Framing::Empty;
        ex.upstream_time = Some(up_start.elapsed());
        ex.error = Some(e);
        ex
    }

    /// Streams the request body to the upstream; returns the payload size.
    async fn copy_request_body(
        &mut self,
        up: &mut Conn,
        framing: Framing,
        max: u64,
        client_wait: Duration,
        up_wait: Duration,
    ) -> Result<u64, CopyError> {
        match framing {
            Framing::Empty | Framing::UntilClose => Ok(0),
            Framing::Length(n) => {
                let mut remaining = n;
                while remaining > 0 {
                    self.fill(client_wait).await.map_err(CopyError::Source)?;
                    let avail = self.buf.len() as u64;
                    let out = if avail <= remaining {
                        remaining -= avail;
                        std::mem::take(&mut self.buf)
                    } else {
                        let cut = usize::try_from(remaining).unwrap_or(usize::MAX);
                        remaining = 0;
                        let part = self.buf[..cut].to_vec();
                        self.buf.drain(..cut);
                        part
                    };
                    let mut out = write_to(up, out, up_wait)
                        .await
                        .map_err(|e| CopyError::Sink(upstream_io(e)))?;
                    if self.buf.is_empty() {
                        out.clear();
                        self.buf = out;
                    }
                }
                Ok(n)
            }
            Framing::Chunked => {
                let mut dec = ChunkedDecoder::default();
                let mut out = Vec::with_capacity(BODY_CHUNK + 64);
                while !dec.is_done() {
                    self.fill(client_wait).await.map_err(CopyError::Source)?;
                    let used = dec
                        .feed(&self.buf, &mut out, Reencode::Chunked)
                        .map_err(|e| CopyError::Source(e.into()))?;
                    self.buf.drain(..used);
                    if dec.payload > max {
                        return Err(CopyError::Source(ProxyError::BodyTooLarge { limit: max }));
                    }
                    if !out.is_empty() {
                        out = write_to(up, out, up_wait)
                            .await
                            .map_err(|e| CopyError::Sink(upstream_io(e)))?;
                        out.clear();
                    }
                }
                Ok(dec.payload)
            }
        }
    }

    /// Makes sure `buf` holds at least one unread byte.
    async fn fill(&mut self, wait: Duration) -> Result<(), ProxyError> {
        if !self.buf.is_empty() {
            return Ok(());
        }
        if self.buf.capacity() < BODY_CHUNK {
            self.buf.reserve(BODY_CHUNK);
        }
        let buf = std::mem::take(&mut self.buf);
        match timeout(wait, self.conn.read(buf)).await {
            Ok((Ok(0), buf)) => {
                self.buf = buf;
                Err(ProxyError::ClientIo(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed mid-body",
                )))
            }
            Ok((Ok(_), buf)) => {
                self.buf = buf;
                Ok(())
            }
            Ok((Err(e), buf)) => {
                self.buf = buf;
                Err(ProxyError::ClientIo(e))
            }
            Err(_) => Err(ProxyError::ClientIo(io::Error::new(
                io::ErrorKind::TimedOut,
                "client body read timed out",
            ))),
        }
    }

    /// Sends the response head and streams the body; returns bytes sent and whether each side may be reused.
    #[expect(clippy::too_many_lines, reason = "one arm per response framing")]
    async fn send_response(
        &mut self,
        request: &Head,
        response: &Head,
        up: &mut Conn,
        mut up_buf: Vec<u8>,
        upstream: &Upstream,
        endpoint: &str,
    ) -> Result<(u64, bool, bool, Vec<u8>), (u64, ProxyError)> {
        let generation = self.generation.clone();
        let settings = &generation.settings;
        let no_body = request.method() == "HEAD" || response.status == 204 || response.status == 304;
        let framing = if no_body { Framing::Empty } else { response.framing };
        let client_11 = request.version == Version::Http11;
        // An HTTP/1.0 client cannot read chunks: it gets raw bytes and a close.
        let rechunk = client_11 && matches!(framing, Framing::Chunked | Framing::UntilClose);
        let delimited = !matches!(framing, Framing::Chunked | Framing::UntilClose) || rechunk;
        let draining = self.draining.load(std::sync::atomic::Ordering::Acquire);
        let client_keep = request.keep_alive && delimited && !draining;
        let mut out = Vec::with_capacity(response.wire_len() + 64);
        out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", response.status, response.reason()).as_bytes());
        let mut via: Option<Vec<u8>> = None;
        let edits = if self.chain.is_empty() {
            HeaderEdits::default()
        } else {
            self.chain.on_response(request, response)
        };
        for (name, value) in response.headers() {
            if response.is_hop_by_hop(name) || edits.removes(name) {
                continue;
            }
            if name.eq_ignore_ascii_case(b"via") && settings.forwarded.via {
                via = Some(value.to_vec());
                continue;
            }
            http::put_header(&mut out, name, value);
        }
        for (name, value) in edits.add.iter().chain(&self.response_add) {
            http::put_header(&mut out, name.as_bytes(), value.as_bytes());
        }
        if rechunk {
            http::put_header(&mut out, b"transfer-encoding", b"chunked");
        }
        if settings.forwarded.via {
            let mut v = via.map(|mut v| {
                v.extend_from_slice(b", ");
                v
            });
            let v = v.get_or_insert_with(Vec::new);
            v.extend_from_slice(if response.version == Version::Http10 {
                b"1.0 portcullis"
            } else {
                b"1.1 portcullis"
            });
            http::put_header(&mut out, b"via", v);
        }
        if !client_keep {
            http::put_header(&mut out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        let mut sent = out.len() as u64;
        let client_wait = settings.timeouts.idle;
        let up_wait = self.response_timeout(upstream);
        // The head goes out with whatever body bytes already arrived behind it.
        let mut pending = out;
        match framing {
            Framing::Empty => {
                let _ = self.write(pending, client_wait).await.map_err(|e| (sent, e))?;
                // Some upstreams send a body to HEAD anyway; such a connection
                // would answer the next request with stale bytes, so it is not reused.
                let reusable = response.keep_alive && up_buf.is_empty() && request.method() != "HEAD";
                Ok((sent, client_keep, reusable, up_buf))
            }
            Framing::Length(n) => {
                let mut remaining = n;
                loop {
                    let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(up_buf.len());
                    if take > 0 {
                        if pending.is_empty() && take == up_buf.len() {
                            pending = std::mem::take(&mut up_buf);
                        } else {
                            pending.extend_from_slice(&up_buf[..take]);
                            up_buf.drain(..take);
                        }
                        remaining -= take as u64;
                    }
                    if !pending.is_empty() {
                        sent += pending.len() as u64;
                        let b = self.write(pending, client_wait).await.map_err(|e| (sent, e))?;
                        pending = Vec::new();
                        if up_buf.capacity() == 0 {
                            up_buf = b;
                            up_buf.clear();
                        }
                    }
                    if remaining == 0 {
                        break;
                    }
                    up_buf = read_upstream_more(up, up_buf, up_wait, endpoint)
                        .await
                        .map_err(|e| (sent, e))?;
                }
                Ok((
                    sent,
                    client_keep,
                    response.keep_alive && up_buf.is_empty(),
                    up_buf,
                ))
            }
            Framing::Chunked => {
                let mode = if rechunk { Reencode::Chunked } else { Reencode::Raw };
                let mut dec = ChunkedDecoder::default();
                loop {
                    let used = dec.feed(&up_buf, &mut pending, mode).map_err(|e| {
                        (
                            sent,
                            ProxyError::UpstreamProtocol {
                                endpoint: endpoint.to_string(),
                                source: e,
                            },
                        )
                    })?;
                    up_buf.drain(..used);
                    if !pending.is_empty() {
                        sent += pending.len() as u64;
                        let mut b = self.write(pending, client_wait).await.map_err(|e| (sent, e))?;
                        b.clear();
                        pending = b;
                    }
                    if dec.is_done() {
                        break;
                    }
                    up_buf = read_upstream_more(up, up_buf, up_wait, endpoint)
                        .await
                        .map_err(|e| (sent, e))?;
                }
                Ok((
                    sent,
                    client_keep,
                    response.keep_alive && up_buf.is_empty(),
                    up_buf,
                ))
            }
            Framing::UntilClose => {
                loop {
                    if !up_buf.is_empty() {
                        if rechunk {
                            pending.extend_from_slice(format!("{:x}\r\n", up_buf.len()).as_bytes());
                            pending.extend_from_slice(&up_buf);
                            pending.extend_from_slice(b"\r\n");
                        } else {
                            pending.extend_from_slice(&up_buf);
                        }
                        up_buf.clear();
                    }
                    if !pending.is_empty() {
                        sent += pending.len() as u64;
                        let mut b = self.write(pending, client_wait).await.map_err(|e| (sent, e))?;
                        b.clear();
                        pending = b;
                    }
                    let (b, n) = read_upstream(up, up_buf, up_wait, endpoint)
                        .await
                        .map_err(|e| (sent, e))?;
                    if n == 0 {
                        break;
                    }
                    up_buf = b;
                }
                if rechunk {
                    sent += 5;
                    self.write(b"0\r\n\r\n".to_vec(), client_wait)
                        .await
                        .map_err(|e| (sent, e))?;
                }
                Ok((sent, client_keep, false, Vec::new()))
            }
        }
    }
}

/// Reads more of an upstream response into `buf`; `(buf, 0)` at the end of the stream.
async fn read_upstream(
    up: &mut Conn,
    mut buf: Vec<u8>,
    wait: Duration,
    endpoint: &str,
) -> Result<(Vec<u8>, usize), ProxyError> {
    buf.reserve(BODY_CHUNK);
    match timeout(wait, up.read(buf)).await {
        Ok((Ok(n), b)) => Ok((b, n)),
        Ok((Err(e), _)) => Err(ProxyError::UpstreamIo {
            endpoint: endpoint.to_string(),
            source: e,
        }),
        Err(_) => Err(ProxyError::UpstreamTimeout {
            endpoint: endpoint.to_string(),
        }),
    }
}

/// Reads more of a body the framing says is not over: a close now is an error.
async fn read_upstream_more(
    up: &mut Conn,
    buf: Vec<u8>,
    wait: Duration,
    endpoint: &str,
) -> Result<Vec<u8>, ProxyError> {
    let (buf, n) = read_upstream(up, buf, wait, endpoint).await?;
    if n == 0 {
        return Err(ProxyError::UpstreamIo {
            endpoint: endpoint.to_string(),
            source: io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(buf)
}

fn upstream_io(e: io::Error) -> ProxyError {
    ProxyError::UpstreamIo {
        endpoint: "upstream".into(),
        source: e,
    }
}

async fn write_to(conn: &mut Conn, bytes: Vec<u8>, wait: Duration) -> io::Result<Vec<u8>> {
    match timeout(wait, conn.write_all(bytes)).await {
        Ok((Ok(()), buf)) => Ok(buf),
        Ok((Err(e), _)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// Reads a response head; bytes after it stay in `buf`.
async fn read_response_head(
    up: &mut Conn,
    buf: &mut Vec<u8>,
    wait: Duration,
    max_headers: usize,
    endpoint: &str,
) -> Result<Head, ProxyError> {
    const MAX_RESPONSE_HEAD: usize = 64 * 1024;
    loop {
        if let Some(end) = http::head_end(buf) {
            let head = http::parse_response(&buf[..end], max_headers.max(100)).map_err(|e| {
                ProxyError::UpstreamProtocol {
                    endpoint: endpoint.to_string(),
                    source: e,
                }
            })?;
            buf.drain(..end);
            return Ok(head);
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ProxyError::UpstreamProtocol {
                endpoint: endpoint.into(),
                source: HttpError::HeadTooLarge {
                    limit: MAX_RESPONSE_HEAD,
                },
            });
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let owned = std::mem::take(buf);
        match timeout(wait, up.read(owned)).await {
            Ok((Ok(0), b)) => {
                *buf = b;
                return Err(ProxyError::UpstreamIo {
                    endpoint: endpoint.into(),
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            Ok((Ok(_), b)) => *buf = b,
            Ok((Err(e), b)) => {
                *buf = b;
                return Err(ProxyError::UpstreamIo {
                    endpoint: endpoint.into(),
                    source: e,
                });
            }
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    endpoint: endpoint.into(),
                });
            }
        }
    }
}
