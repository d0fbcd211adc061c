//! HTTP/2 to clients: over TLS when ALPN settles on `h2`, and in cleartext
//! with prior knowledge (h2c) where the listener takes it. The `h2` crate
//! does the framing, HPACK, flow control and stream states over [`H2Io`];
//! each stream becomes an exchange like any HTTP/1.1 request (the same
//! routing, Gatekeeper, policies, forwarding as HTTP/1.1 and answer path),
//! through [`Downstream`].
//!
//! ```text
//! H2Io (rustls, control-frame meter) ─► h2::server::Connection ─► accept loop
//!   └─ per stream: head (h2_request) ─► exchange::handle(H2Stream) ─► HTTP/1.1 upstream
//! ```
//!
//! The floods of the last years are bounded here: concurrent streams by
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; rapid reset (CVE-2023-44487) by `h2`'s
//! pending-accept reset limit and by RST_STREAM counting as a control frame;
//! CONTINUATION floods and HPACK bombs by the header list limit (the proxy's
//! `headerBytes`), which `h2` enforces while decoding; SETTINGS, PING,
//! PRIORITY, tiny WINDOW_UPDATE and empty DATA floods by the control-frame
//! budget, after which the client is sent `GOAWAY ENHANCE_YOUR_CALM`.

pub(super) mod io;
pub(super) mod upstream;

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use tokio::time::timeout;

use super::Worker;
use super::answer::{Answer, CONTENT_TYPE};
use super::body::{self, CopyError, Sent};
use super::conn::Conn;
use super::downstream::{Downstream, Waits};
use super::error::ProxyError;
use super::exchange::{self, ANSWER_WRITE, Exchange};
use super::heads;
use super::io::Transport as _;
use super::tunnel;
use crate::http::{self, ChunkedDecoder, Framing, Head, HttpError, Reencode, Version};
use crate::policy::HeaderEdits;
use crate::runtime::ListenerRt;
pub(super) use io::{H2Io, PREFACE};

/// Longest wait for the connection to finish after a GOAWAY.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Reset streams a client may leave in the accept queue before `GOAWAY`.
const PENDING_RESETS: usize = 20;
/// Body bytes `h2` buffers per stream towards a slow client.
const SEND_BUFFER: usize = 256 * 1024;

/// The `h2` server with the connection's limits from `settings`.
pub(super) fn server_builder(settings: &crate::config::ProxySettings) -> h2::server::Builder {
    let limits = settings.http2;
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        .initial_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .max_header_list_size(u32::try_from(settings.limits.header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(PENDING_RESETS)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_connect_protocol();
    builder
}

/// The head a stream's request stands for (an extended CONNECT for a
/// WebSocket becomes its HTTP/1.1 handshake), and whether it is one.
pub(super) fn stream_head(
    parts: &::http::request::Parts,
    has_body: bool,
    limits: &http::HeadLimits,
) -> (Result<http::Head, http::HttpError>, bool) {
    let target = parts
        .uri
        .path_and_query()
        .map_or("", ::http::uri::PathAndQuery::as_str);
    let authority = parts.uri.authority().map(::http::uri::Authority::as_str);
    // RFC 8441: a WebSocket opened by an extended CONNECT is judged and
    // forwarded as the HTTP/1.1 handshake it stands for.
    let websocket = parts.method == ::http::Method::CONNECT
        && parts
            .extensions
            .get::<h2::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    let key = websocket.then(tunnel::handshake_key);
    let upgrade: [(&[u8], &[u8]); 3] = [
        (b"upgrade", b"websocket"),
        (b"connection", b"upgrade"),
        (
            b"sec-websocket-key",
            key.as_deref().unwrap_or_default().as_bytes(),
        ),
    ];
    let fields = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        .chain(upgrade.into_iter().filter(|_| websocket));
    let method = if websocket { "GET" } else { parts.method.as_str() };
    let head = http::h2_request(method, target, authority, fields, has_body && !websocket, limits);
    (head, websocket)
}

/// Serves one HTTP/2 connection until it closes.
pub(super) async fn serve(
    worker: Rc<Worker>,
    listener: Arc<ListenerRt>,
    transport: H2Io,
    peer: SocketAddr,
    tls: bool,
) {
    let generation = worker.current();
    let settings = &generation.settings;
    let flooded = transport.flood_flag();
    let stream = transport.stream();
    let handshake = timeout(
        settings.timeouts.request_headers,
        server_builder(settings).handshake::<_, Bytes>(transport),
    );
    let mut conn = match handshake.await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
            stream.shutdown();
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "HTTP/2 handshake timed out");
            stream.shutdown();
            return;
        }
    };
    worker.shared.metrics.http2_connections.inc();
    let idle = settings.timeouts.idle;
    let open = Rc::new(Cell::new(0usize));
    let last_active = Rc::new(Cell::new(tokio::time::Instant::now()));
    let drained = worker.shared.drain.notified();
    tokio::pin!(drained);
    drained.as_mut().enable();
    let mut closing = false;
    if worker.shared.draining.load(Ordering::Acquire) {
        conn.graceful_shutdown();
        closing = true;
    }
    loop {
        let idle_at = last_active.get() + idle;
        let next = tokio::select! {
            next = conn.accept() => next,
            () = poll_fn(|_| if flooded.get() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }) => {
                tracing::warn!(%peer, "HTTP/2 control-frame flood; GOAWAY ENHANCE_YOUR_CALM");
                worker.shared.metrics.http2_floods.inc();
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                break;
            }
            () = &mut drained, if !closing => {
                conn.graceful_shutdown();
                closing = true;
                continue;
            }
            () = tokio::time::sleep_until(idle_at), if !closing => {
                if open.get() == 0 && tokio::time::Instant::now() >= last_active.get() + idle {
                    conn.graceful_shutdown();
                    closing = true;
                }
                continue;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                open.set(open.get() + 1);
                let task = StreamTask {
                    worker: worker.clone(),
                    listener: listener.addr,
                    peer,
                    tls,
                    open: open.clone(),
                    last_active: last_active.clone(),
                };
                super::io::spawn(task.run(request, respond));
            }
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HTTP/2 connection failed");
                break;
            }
            None => break,
        }
    }
    let _ = timeout(CLOSE_WAIT, poll_fn(|cx| conn.poll_closed(cx))).await;
    drop(conn);
    stream.shutdown();
}

/// What one stream's task needs of its connection.
struct StreamTask {
    worker: Rc<Worker>,
    listener: SocketAddr,
    peer: SocketAddr,
    tls: bool,
    open: Rc<Cell<usize>>,
    last_active: Rc<Cell<tokio::time::Instant>>,
}

impl StreamTask {
    /// Handles one request stream to its end.
    async fn run(self, request: ::http::Request<RecvStream>, respond: SendResponse<Bytes>) {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let respond = Rc::new(RefCell::new(respond));
        let mut down = H2Stream {
            peer: self.peer,
            tls: self.tls,
            has_body: !body.is_end_stream(),
            body,
            respond: respond.clone(),
            reply: Reply::Pending,
            kind: StreamKind::Plain,
            answered: Rc::new(Cell::new(false)),
        };
        let answered = down.answered.clone();
        let generation = self.worker.current();
        let (head, websocket) = stream_head(&parts, down.has_body, &generation.settings.limits);
        let work = async {
            match head {
                Ok(head) => {
                    if websocket {
                        down.kind = StreamKind::WebSocket;
                    } else if super::grpc::is_grpc(&head) {
                        down.kind = StreamKind::Grpc;
                    }
                    Box::pin(exchange::handle(
                        &mut down,
                        &self.worker,
                        self.listener,
                        head,
                        started,
                    ))
                    .await;
                }
                Err(e) => exchange::refuse_head(&mut down, &self.worker, ProxyError::Client(e)).await,
            }
        };
        // A stream the client resets before its response began (rapid reset)
        // drops its exchange at once, and with it the upstream request.
        let reset = poll_fn(|cx| {
            if answered.get() {
                return std::task::Poll::Pending;
            }
            match respond.borrow_mut().poll_reset(cx) {
                std::task::Poll::Ready(Ok(reason)) => std::task::Poll::Ready(reason),
                _ => std::task::Poll::Pending,
            }
        });
        tokio::select! {
            () = work => {}
            reason = reset => {
                self.worker.shared.metrics.http2_resets.inc();
                tracing::debug!(peer = %self.peer, %reason, path = parts.uri.path(), "client reset the stream before its response");
            }
        }
        down.finish();
        self.open.set(self.open.get() - 1);
        self.last_active.set(tokio::time::Instant::now());
    }
}

/// One HTTP/2 stream as the client side of an exchange.
struct H2Stream {
    peer: SocketAddr,
    tls: bool,
    has_body: bool,
    body: RecvStream,
    /// Shared with the task's reset watch, borrowed only between awaits.
    respond: Rc<RefCell<SendResponse<Bytes>>>,
    reply: Reply,
    kind: StreamKind,
    /// Set once the response head went out: a reset after it is not a rapid reset.
    answered: Rc<Cell<bool>>,
}

/// What a stream carries, as far as answering it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// A request like any.
    Plain,
    /// A gRPC call: the gateway's own answers are in gRPC form.
    Grpc,
    /// An extended CONNECT for a WebSocket: only a tunnel may answer it with 2xx.
    WebSocket,
}

/// Where a stream's response stands.
enum Reply {
    /// Nothing sent yet.
    Pending,
    /// The head went out; the body follows on this stream.
    Open(SendStream<Bytes>),
    /// The response reached its end of stream.
    Ended,
}

fn client_error(e: &h2::Error) -> ProxyError {
    ProxyError::ClientIo(std::io::Error::other(e.to_string()))
}

fn client_io(message: String) -> ProxyError {
    ProxyError::ClientIo(std::io::Error::other(message))
}

impl H2Stream {
    /// Sends a response head; the body follows unless `end`.
    fn send_head(&mut self, response: ::http::Response<()>, end: bool) -> Result<(), ProxyError> {
        let send = self
            .respond
            .borrow_mut()
            .send_response(response, end)
            .map_err(|e| client_error(&e))?;
        self.answered.set(true);
        self.reply = if end { Reply::Ended } else { Reply::Open(send) };
        Ok(())
    }

    /// Sends `data` as the client's window allows; `end` closes the stream after it.
    async fn send_data(&mut self, data: Bytes, end: bool, wait: Duration) -> Result<(), ProxyError> {
        let Reply::Open(send) = &mut self.reply else {
            return Ok(());
        };
        upstream::send_all(send, data, end, wait)
            .await
            .map_err(client_io)?;
        if end {
            self.reply = Reply::Ended;
        }
        Ok(())
    }

    /// Ends the stream if the exchange left it open (a failure mid-body): reset, not truncated silently.
    fn finish(&mut self) {
        if let Reply::Open(send) = &mut self.reply {
            send.send_reset(Reason::INTERNAL_ERROR);
        }
    }

    /// The next DATA frame of the request body; `None` at its end.
    async fn next_data(&mut self, wait: Duration) -> Result<Option<Bytes>, ProxyError> {
        upstream::next_data(&mut self.body, wait, client_io).await
    }
}

/// A response head for `status` with `fields`, dropping any field HTTP/2 cannot carry.
fn response_head<'a>(
    status: u16,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> ::http::Response<()> {
    let mut response = ::http::Response::new(());
    *response.status_mut() = ::http::StatusCode::from_u16(status).unwrap_or(::http::StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    for (name, value) in fields {
        if let (Ok(name), Ok(value)) = (
            ::http::HeaderName::from_bytes(name),
            ::http::HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    response
}

impl Downstream for H2Stream {
    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn tls(&self) -> bool {
        self.tls
    }

    /// The stream ends with the answer; the connection carries on.
    fn keeps_alive(&self, _answer: &Answer, _head: &Head) -> bool {
        true
    }

    fn grpc(&self) -> bool {
        self.kind == StreamKind::Grpc
    }

    async fn send_answer(&mut self, answer: &Answer, _version: Version, _keep: bool) -> u64 {
        let (fields, body) = answer.parts();
        if self.kind == StreamKind::Grpc {
            // Trailers-only, as a gRPC server refuses a call: HTTP 200, the
            // status in grpc-status, the reason in grpc-message.
            let code = super::grpc::status_of(answer.status()).to_string();
            let message = answer.label();
            let all = fields
                .iter()
                .filter(|(n, _)| {
                    n.eq_ignore_ascii_case("www-authenticate") || n.eq_ignore_ascii_case("retry-after")
                })
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .chain([
                    (&b"content-type"[..], &b"application/grpc"[..]),
                    (b"grpc-status", code.as_bytes()),
                    (b"grpc-message", message.as_bytes()),
                ]);
            let _ = self.send_head(response_head(200, all), true);
            return 0;
        }
        let length = body.len().to_string();
        let date = crate::http::date();
        let all = fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).chain([
            (&b"content-type"[..], CONTENT_TYPE.as_bytes()),
            (b"content-length", length.as_bytes()),
            (b"date", &date[..]),
        ]);
        if self
            .send_head(response_head(answer.status(), all), false)
            .is_err()
        {
            return 0;
        }
        let sent = body.len() as u64;
        match self.send_data(Bytes::from(body), true, ANSWER_WRITE).await {
            Ok(()) => sent,
            Err(_) => 0,
        }
    }

    async fn send_continue(&mut self, _wait: Duration) -> Result<(), ProxyError> {
        let head = response_head(100, std::iter::empty());
        self.respond
            .borrow_mut()
            .send_informational(head)
            .map_err(|e| client_error(&e))
    }

    async fn copy_request(
        &mut self,
        up: &mut Conn,
        framing: Framing,
        max: u64,
        waits: Waits,
    ) -> Result<u64, CopyError> {
        // An extended CONNECT's stream stays open for the tunnel, not for a body.
        if !self.has_body || framing == Framing::Empty {
            return Ok(0);
        }
        let mut payload: u64 = 0;
        let chunked = framing == Framing::Chunked;
        while let Some(data) = self.next_data(waits.client).await.map_err(CopyError::Source)? {
            payload += data.len() as u64;
            if let Framing::Length(n) = framing
                && payload > n
            {
                let e = HttpError::Malformed("more body than content-length");
                return Err(CopyError::Source(ProxyError::Client(e)));
            }
            if chunked && payload > max {
                return Err(CopyError::Source(ProxyError::BodyTooLarge { limit: max }));
            }
            if data.is_empty() {
                continue;
            }
            let out = if chunked {
                let mut out = Vec::with_capacity(data.len() + 16);
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
                out
            } else {
                data.to_vec()
            };
            body::to_upstream(up, out, waits.upstream).await?;
        }
        if let Framing::Length(n) = framing
            && payload != n
        {
            let e = HttpError::Malformed("less body than content-length");
            return Err(CopyError::Source(ProxyError::Client(e)));
        }
        if chunked {
            body::to_upstream(up, b"0\r\n\r\n".to_vec(), waits.upstream).await?;
        }
        Ok(payload)
    }

    async fn interim(&mut self, response: &Head, _wait: Duration) -> Result<(), ProxyError> {
        let head = response_head(response.status, response.headers());
        self.respond
            .borrow_mut()
            .send_informational(head)
            .map_err(|e| client_error(&e))
    }

    async fn relay(
        &mut self,
        ex: &Exchange<'_>,
        response: &Head,
        edits: &HeaderEdits,
        (up, mut up_buf, endpoint): (&mut Conn, Vec<u8>, &str),
        waits: Waits,
    ) -> (Result<Sent, (u64, ProxyError)>, bool) {
        if self.kind == StreamKind::WebSocket && response.status < 300 {
            // The upstream (or the API, with WebSockets off) did not switch
            // protocols: a 2xx would tell the client its tunnel is open.
            let e = ProxyError::UpstreamProtocol {
                endpoint: endpoint.to_owned(),
                source: HttpError::Malformed("the upstream did not switch to WebSocket"),
            };
            return (Err((0, e)), true);
        }
        let no_body = ex.head().method() == "HEAD" || matches!(response.status, 204 | 304);
        let framing = if no_body { Framing::Empty } else { response.framing };
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        heads::response_fields(ex, response, edits, |n, v| fields.push((n.to_vec(), v.to_vec())));
        let head = response_head(
            response.status,
            fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        if let Err(e) = self.send_head(head, framing == Framing::Empty) {
            return (Err((0, e)), true);
        }
        let mut sent: u64 = 0;
        let mut decoder = ChunkedDecoder::default();
        let mut remaining = match framing {
            Framing::Empty => {
                let reusable = up_buf.is_empty() && ex.head().method() != "HEAD";
                return (Ok((0, reusable, up_buf)), true);
            }
            Framing::Length(n) => n,
            Framing::Chunked | Framing::UntilClose => u64::MAX,
        };
        loop {
            let out = if framing == Framing::Chunked {
                let mut out = Vec::with_capacity(up_buf.len());
                match decoder.feed(&up_buf, &mut out, Reencode::Raw) {
                    Ok(used) => drop(up_buf.drain(..used)),
                    Err(source) => {
                        let e = ProxyError::UpstreamProtocol {
                            endpoint: endpoint.to_owned(),
                            source,
                        };
                        return (Err((sent, e)), true);
                    }
                }
                out
            } else {
                let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(up_buf.len());
                remaining -= take as u64;
                if take == up_buf.len() {
                    std::mem::take(&mut up_buf)
                } else {
                    up_buf.drain(..take).collect()
                }
            };
            let done = match framing {
                Framing::Chunked => decoder.is_done(),
                _ => remaining == 0,
            };
            sent += out.len() as u64;
            if let Err(e) = self.send_data(Bytes::from(out), done, waits.client).await {
                return (Err((sent, e)), true);
            }
            if done {
                return (Ok((sent, up_buf.is_empty(), up_buf)), true);
            }
            match body::read_upstream(up, up_buf, waits.upstream, endpoint).await {
                Ok((buf, 0)) if framing == Framing::UntilClose => {
                    if let Err(e) = self.send_data(Bytes::new(), true, waits.client).await {
                        return (Err((sent, e)), true);
                    }
                    return (Ok((sent, false, buf)), true);
                }
                Ok((_, 0)) => {
                    let e = ProxyError::UpstreamIo {
                        endpoint: endpoint.to_owned(),
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    };
                    return (Err((sent, e)), true);
                }
                Ok((buf, _)) => up_buf = buf,
                Err(e) => return (Err((sent, e)), true),
            }
        }
    }

    /// RFC 8441: the upstream's `101` becomes a `200` on the CONNECT stream,
    /// whose DATA frames then carry the WebSocket's bytes both ways.
    async fn tunnel(
        &mut self,
        worker: &Worker,
        ex: &mut Exchange<'_>,
        response: &Head,
        mut up: Conn,
        up_buf: Vec<u8>,
    ) {
        let Some(route) = ex.route else { return };
        if !tunnel::accepts(ex.head(), response) {
            let e = ProxyError::UpstreamProtocol {
                endpoint: "upstream".into(),
                source: HttpError::Malformed("Sec-WebSocket-Accept does not answer the key"),
            };
            ex.answer(self, worker, Answer::Failed(e)).await;
            return;
        }
        let edits = ex.response_edits(response);
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        heads::response_fields(ex, response, &edits, |n, v| {
            if !n.eq_ignore_ascii_case(b"sec-websocket-accept") {
                fields.push((n.to_vec(), v.to_vec()));
            }
        });
        ex.record.status = 101;
        let head = response_head(200, fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        if let Err(e) = self.send_head(head, false) {
            ex.note(worker, &e);
            ex.finish(worker);
            return;
        }
        let cfg = &route.websocket;
        let open = tunnel::opened(worker, &route.api);
        let started = Instant::now();
        let last = Cell::new(started);
        let (to_upstream, to_client) = (Cell::new(0u64), Cell::new(0u64));
        let up_side = up.duplex();
        let (body, reply) = (&mut self.body, &mut self.reply);
        let Reply::Open(send) = reply else { return };
        let upward = async {
            let carried = async {
                while let Some(data) = upstream::next_data(body, cfg.max_duration, client_io).await? {
                    last.set(Instant::now());
                    to_upstream.set(to_upstream.get() + data.len() as u64);
                    let (res, _) = up_side.write_all(data.to_vec()).await;
                    res.map_err(|e| upstream_io("upstream", e.to_string()))?;
                }
                up_side.shutdown_write().await;
                Ok::<(), ProxyError>(())
            }
            .await;
            if carried.is_err() {
                // The client's side failed: end the upstream's, and with it the other direction.
                up_side.shutdown();
            }
            carried
        };
        let downward = async {
            let mut buf = up_buf;
            loop {
                if !buf.is_empty() {
                    to_client.set(to_client.get() + buf.len() as u64);
                    let data = Bytes::copy_from_slice(&buf);
                    upstream::send_all(send, data, false, cfg.idle_timeout)
                        .await
                        .map_err(client_io)?;
                    buf.clear();
                }
                buf.reserve(super::client::BODY_CHUNK);
                let (res, back) = up_side.read(buf).await;
                buf = back;
                if res.map_err(|e| upstream_io("upstream", e.to_string()))? == 0 {
                    upstream::send_all(send, Bytes::new(), true, cfg.idle_timeout)
                        .await
                        .map_err(client_io)?;
                    return Ok::<(), ProxyError>(());
                }
                last.set(Instant::now());
            }
        };
        let reason = tokio::select! {
            (a, b) = async { tokio::join!(upward, downward) } => {
                if a.is_ok() && b.is_ok() { tunnel::Close::Ended } else { tunnel::Close::Error }
            }
            reason = tunnel::watch(worker, cfg, started, &last) => reason,
        };
        up_side.shutdown();
        if reason == tunnel::Close::Ended {
            *reply = Reply::Ended;
        } else if let Reply::Open(send) = reply {
            send.send_reset(Reason::CANCEL);
            *reply = Reply::Ended;
        }
        drop(open);
        tunnel::closed(worker, ex, reason, (to_upstream.get(), to_client.get()), 0);
    }

    /// Both ways at once, so a streaming call never waits on itself: the
    /// request body (and trailers) go up while the response comes down.
    async fn call_h2(
        &mut self,
        ex: &Exchange<'_>,
        call: upstream::Call,
        waits: Waits,
        endpoint: &str,
    ) -> Result<upstream::Called, upstream::CallError> {
        let upstream::Call {
            response,
            body: mut upstream_tx,
            deadline,
            max_body,
        } = call;
        let bytes_in = Cell::new(0u64);
        let (has_body, rx_client) = (self.has_body, &mut self.body);
        let upload = async {
            if !has_body {
                return Ok(());
            }
            while let Some(data) = upstream::next_data(rx_client, waits.client, client_io).await? {
                bytes_in.set(bytes_in.get() + data.len() as u64);
                if bytes_in.get() > max_body {
                    upstream_tx.send_reset(Reason::CANCEL);
                    return Err(ProxyError::BodyTooLarge { limit: max_body });
                }
                upstream::send_all(&mut upstream_tx, data, false, waits.upstream)
                    .await
                    .map_err(|m| upstream_io(endpoint, m))?;
            }
            match rx_client.trailers().await {
                Ok(Some(trailers)) => upstream_tx
                    .send_trailers(trailers)
                    .map_err(|e| upstream_io(endpoint, e.to_string())),
                _ => upstream::send_all(&mut upstream_tx, Bytes::new(), true, waits.upstream)
                    .await
                    .map_err(|m| upstream_io(endpoint, m)),
            }
        };
        let download = relay_response(
            ex,
            response,
            deadline,
            (&self.respond, &mut self.reply, &self.answered),
            waits,
            endpoint,
        );
        let upload_failed = {
            tokio::pin!(upload, download);
            tokio::select! {
                done = &mut download => Ok(done),
                sent = &mut upload => match sent {
                    Ok(()) => Ok(download.await),
                    Err(e) => Err(e),
                },
            }
        };
        match upload_failed {
            Ok(done) => done.map(|mut d| {
                d.bytes_in = bytes_in.get();
                d
            }),
            // The client's body failed (too large, reset, timed out): the response cannot follow.
            Err(e) if matches!(self.reply, Reply::Pending) => Err(upstream::CallError::Early(e)),
            Err(e) => Err(upstream::CallError::Late(0, e)),
        }
    }
}

fn upstream_io(endpoint: &str, message: String) -> ProxyError {
    ProxyError::UpstreamIo {
        endpoint: endpoint.to_owned(),
        source: std::io::Error::other(message),
    }
}

/// An HTTP/2 upstream's response relayed on the client's stream: the head
/// (with the response policies' edits), the body as the client's window
/// allows, and the trailers.
async fn relay_response(
    ex: &Exchange<'_>,
    response: ::h2::client::ResponseFuture,
    deadline: Duration,
    (respond, reply, answered): (&RefCell<SendResponse<Bytes>>, &mut Reply, &Cell<bool>),
    waits: Waits,
    endpoint: &str,
) -> Result<upstream::Called, upstream::CallError> {
    let (head, edits, mut rx) = upstream::response(ex, response, deadline, endpoint)
        .await
        .map_err(upstream::CallError::Early)?;
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    heads::response_fields(ex, &head, &edits, |n, v| fields.push((n.to_vec(), v.to_vec())));
    let end = rx.is_end_stream();
    let mut grpc_status = head
        .header("grpc-status")
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
    let head_out = response_head(
        head.status,
        fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
    );
    let stream = respond
        .borrow_mut()
        .send_response(head_out, end)
        .map_err(|e| upstream::CallError::Early(client_error(&e)))?;
    answered.set(true);
    let mut relayed = 0u64;
    if end {
        *reply = Reply::Ended;
    } else {
        *reply = Reply::Open(stream);
        let Reply::Open(client_tx) = reply else {
            return Err(upstream::CallError::Early(client_io("no response stream".into())));
        };
        let late = |relayed: u64| move |e: ProxyError| upstream::CallError::Late(relayed, e);
        while let Some(data) = upstream::next_data(&mut rx, waits.upstream, |m| upstream_io(endpoint, m))
            .await
            .map_err(late(relayed))?
        {
            relayed += data.len() as u64;
            upstream::send_all(client_tx, data, false, waits.client)
                .await
                .map_err(|m| late(relayed)(client_io(m)))?;
        }
        match rx.trailers().await {
            Ok(Some(trailers)) => {
                grpc_status = upstream::grpc_status(&trailers).or(grpc_status);
                client_tx
                    .send_trailers(trailers)
                    .map_err(|e| late(relayed)(client_error(&e)))?;
            }
            Ok(None) => upstream::send_all(client_tx, Bytes::new(), true, waits.client)
                .await
                .map_err(|m| late(relayed)(client_io(m)))?,
            Err(e) => return Err(late(relayed)(upstream_io(endpoint, e.to_string()))),
        }
        *reply = Reply::Ended;
    }
    Ok(upstream::Called {
        bytes_in: 0,
        bytes_out: relayed,
        status: head.status,
        grpc_status,
        keep_alive: true,
    })
}

/// Reads the start of a cleartext connection on an h2c listener: whether it
/// opens with the HTTP/2 preface, and the bytes read either way; `None`
/// when the client sent too little in `wait`.
pub(super) async fn sniff_preface(stream: &super::io::Stream, wait: Duration) -> Option<(bool, Vec<u8>)> {
    let mut buf = Vec::with_capacity(super::client::IDLE_READ);
    let deadline = tokio::time::Instant::now() + wait;
    while buf.len() < PREFACE.len() && PREFACE.starts_with(&buf) {
        match tokio::time::timeout_at(deadline, stream.read(buf)).await {
            Ok((Ok(n), b)) => {
                buf = b;
                if n == 0 {
                    break;
                }
            }
            Ok((Err(_), b)) => {
                buf = b;
                break;
            }
            Err(_) => return None,
        }
    }
    Some((buf.starts_with(PREFACE), buf))
}
