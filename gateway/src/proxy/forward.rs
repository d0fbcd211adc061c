//! Forwarding: an endpoint chosen and connected (or a pooled connection
//! reused), the request head and body sent, interim responses passed on, and
//! the response streamed back through the response policies. A failed connect
//! is retried on another endpoint for any method; a reused connection that
//! fails before anything reached the upstream is retried only for an
//! idempotent request without a body.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tokio::time::timeout;

use super::Worker;
use super::answer::Answer;
use super::body::{self, CopyError};
use super::conn::Conn;
use super::downstream::{Downstream, Waits};
use super::error::ProxyError;
use super::exchange::Exchange;
use super::heads;
use super::io::Transport as _;
use crate::config::{Destination, RouteConfig};
use crate::http::{Framing, Head, HttpError, Version};
use crate::runtime::service::{Outcome, Slot, Upstream};

/// An upstream connection in use, with its place under the service's `maxConnections`.
type UpConn = (Conn, Slot);

/// Connects (or reuses a pooled connection) to an endpoint: the connection,
/// whether it was reused, and its read buffer. An idle pooled connection
/// holds no place under `maxConnections`; it takes one again when reused.
async fn connect(
    worker: &Worker,
    upstream: &Arc<Upstream>,
    endpoint: usize,
    proxy_header: Option<Vec<u8>>,
) -> Result<(UpConn, bool, Vec<u8>), ProxyError> {
    let slot = connection_slot(upstream)?;
    if proxy_header.is_none()
        && let Some((conn, buf)) = worker.pool.take(upstream.id, endpoint)
    {
        return Ok(((conn, slot), true, buf));
    }
    let conn = fresh(worker, upstream, endpoint, proxy_header).await?;
    Ok(((conn, slot), false, worker.pool.buffer()))
}

/// A place for one more connection to `upstream`, or the circuit breaker's refusal.
pub(super) fn connection_slot(upstream: &Arc<Upstream>) -> Result<Slot, ProxyError> {
    upstream
        .open_connection()
        .map_err(|limit| ProxyError::CircuitOpen {
            service: upstream.cfg.name.clone(),
            limit,
        })
}

/// Counts a failed connection to `endpoint` for outlier detection.
pub(super) fn connect_failed(worker: &Worker, upstream: &Upstream, endpoint: usize, e: &ProxyError) {
    if matches!(
        e,
        ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } | ProxyError::UpstreamTls { .. }
    ) {
        observed(worker, upstream, endpoint, Outcome::ConnectFailed);
    }
}

/// Counts what `endpoint` answered for outlier detection, and an ejection it causes.
pub(super) fn observed(worker: &Worker, upstream: &Upstream, endpoint: usize, outcome: Outcome) {
    if let Some(length) = upstream.observe(endpoint, outcome) {
        let addr = upstream.cfg.endpoints[endpoint].addr;
        worker
            .shared
            .metrics
            .ejection(&upstream.cfg.name, addr, outcome.label());
        tracing::warn!(
            service = %upstream.cfg.name,
            endpoint = %addr,
            reason = outcome.label(),
            seconds = length.as_secs(),
            "endpoint ejected by outlier detection"
        );
    }
}

/// A new connection to an endpoint, opening with `proxy_header` if given,
/// then TLS when the service is.
pub(super) async fn fresh(
    worker: &Worker,
    upstream: &Upstream,
    endpoint: usize,
    proxy_header: Option<Vec<u8>>,
) -> Result<Conn, ProxyError> {
    let ep = &upstream.cfg.endpoints[endpoint];
    let stream = match worker
        .connector
        .connect(ep.addr, upstream.cfg.connect_timeout)
        .await
    {
        Ok(stream) => stream,
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
    if let Some(header) = proxy_header {
        let (res, _) = stream.write_all(header).await;
        res.map_err(|source| ProxyError::Connect {
            service: upstream.cfg.name.clone(),
            source,
        })?;
    }
    let Some(tls) = &upstream.tls else {
        return Ok(Conn::Plain(stream));
    };
    let name = upstream.server_names[endpoint].clone();
    let tls_err = |e: io::Error| ProxyError::UpstreamTls {
        endpoint: ep.addr.to_string(),
        source: e,
    };
    let client =
        rustls::ClientConnection::new(tls.clone(), name).map_err(|e| tls_err(io::Error::other(e)))?;
    match timeout(upstream.cfg.connect_timeout, Conn::tls(stream, client)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(tls_err(e)),
        Err(_) => Err(ProxyError::ConnectTimeout {
            endpoint: ep.addr.to_string(),
        }),
    }
}

/// What one attempt on one endpoint came to.
enum Attempt {
    /// The exchange ended (answered, relayed or failed): whether the client connection may be kept.
    Done(bool),
    /// Nothing reached the upstream: try again, on another endpoint unless the
    /// connection was a reused one that had gone stale.
    Retry { error: Option<ProxyError>, stale: bool },
}

/// Forwards the exchange to the service its routes chose; whether the client connection may carry another request.
pub(super) async fn forward(
    client: &mut impl Downstream,
    worker: &Rc<Worker>,
    ex: &mut Exchange<'_>,
    route: &RouteConfig,
    destination: &Destination,
) -> bool {
    let upstream = ex.generation.upstreams[destination.service].clone();
    let _pending = match upstream.admit() {
        Ok(slot) => slot,
        Err(limit) => {
            let refused = ProxyError::CircuitOpen {
                service: upstream.cfg.name.clone(),
                limit,
            };
            return ex.answer(client, worker, Answer::Unreachable(refused)).await;
        }
    };
    if upstream.cfg.http2 {
        return super::h2::upstream::forward(client, worker, ex, route, &upstream).await;
    }
    let mut tried: Vec<usize> = Vec::new();
    let mut sent_continue = false;
    let max_attempts = 1 + upstream.cfg.retries as usize;
    let mut attempts = 0;
    let mut last_error: Option<ProxyError> = None;
    let started = Instant::now();
    // A reused connection that failed before anything was sent does not use up an attempt.
    while let Some(endpoint) = upstream.pick(&tried) {
        if attempts >= max_attempts {
            break;
        }
        ex.record.upstream = Some(upstream.cfg.endpoints[endpoint].addr);
        let proxy_header = upstream
            .cfg
            .proxy_protocol
            .map(|version| super::proxy_protocol::encode(version, client.peer(), ex.listener));
        let (up, reused, up_buf) = match connect(worker, &upstream, endpoint, proxy_header).await {
            Ok(c) => c,
            Err(e @ ProxyError::CircuitOpen { .. }) => {
                return ex.answer(client, worker, Answer::Unreachable(e)).await;
            }
            Err(e) => {
                attempts += 1;
                connect_failed(worker, &upstream, endpoint, &e);
                tried.push(endpoint);
                // Nothing reached the upstream, so another endpoint is safe for any method.
                last_error = Some(e);
                continue;
            }
        };
        if !reused {
            attempts += 1;
        }
        if !sent_continue && ex.head().expects_continue() && ex.head().framing != Framing::Empty {
            sent_continue = true;
            let wait = ex.generation.settings.timeouts.idle;
            if let Err(e) = client.send_continue(wait).await {
                return ex.answer(client, worker, Answer::Failed(e)).await;
            }
        }
        let attempt = Attempt::on(
            client,
            worker,
            ex,
            route,
            &upstream,
            endpoint,
            (up, reused, up_buf),
            started,
        )
        .await;
        match attempt {
            Attempt::Done(keep) => return keep,
            Attempt::Retry { error, stale } => {
                if !stale {
                    tried.push(endpoint);
                }
                if error.is_some() {
                    last_error = error;
                }
            }
        }
    }
    let e = last_error.unwrap_or_else(|| ProxyError::Connect {
        service: upstream.cfg.name.clone(),
        source: io::Error::new(io::ErrorKind::NotConnected, "no endpoint left to try"),
    });
    ex.record.upstream_time = Some(started.elapsed());
    ex.answer(client, worker, Answer::Unreachable(e)).await
}

impl Attempt {
    /// Sends the request on `conn` to `endpoint` and relays the response.
    #[expect(
        clippy::too_many_arguments,
        reason = "one attempt's whole context; a struct would only rename it"
    )]
    async fn on(
        client: &mut impl Downstream,
        worker: &Rc<Worker>,
        ex: &mut Exchange<'_>,
        route: &RouteConfig,
        upstream: &Arc<Upstream>,
        endpoint: usize,
        ((mut up, _slot), reused, mut up_buf): (UpConn, bool, Vec<u8>),
        started: Instant,
    ) -> Self {
        let _in_flight = upstream.begin(endpoint);
        let endpoint_name = upstream.cfg.endpoints[endpoint].addr.to_string();
        let settings = &ex.generation.settings;
        let head = ex.head();
        let request_head = heads::upstream_request(ex, upstream, endpoint, client.peer().ip(), client.tls());
        let (res, _) = up.write_all(request_head).await;
        if let Err(e) = res {
            let error = (!reused).then_some(ProxyError::UpstreamIo {
                endpoint: endpoint_name,
                source: e,
            });
            return Self::Retry { error, stale: reused };
        }
        let up_wait = ex.response_timeout(upstream.cfg.response_timeout);
        let client_wait = settings.timeouts.idle;
        let waits = Waits {
            client: client_wait,
            upstream: up_wait,
        };
        match client
            .copy_request(&mut up, head.framing, route.max_body, waits)
            .await
        {
            Ok(n) => ex.record.bytes_in = n,
            Err(CopyError::Source(e) | CopyError::Sink(e)) => {
                return Self::Done(ex.answer(client, worker, Answer::Failed(e)).await);
            }
        }
        let max_headers = settings.limits.headers;
        let upgrade = ex.websocket;
        // An HTTP/1.0 client is never sent a 1xx (RFC 9110 §15.2).
        let interims = ex.head().version != Version::Http10;
        let response = final_response(
            client,
            &mut up,
            &mut up_buf,
            waits,
            (max_headers, upgrade, interims),
            &endpoint_name,
        )
        .await;
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
                return Self::Retry {
                    error: None,
                    stale: true,
                };
            }
            Err(e) => {
                ex.record.upstream_time = Some(started.elapsed());
                if e.blame() == super::error::Blame::Upstream {
                    observed(worker, upstream, endpoint, Outcome::Status(e.status()));
                }
                return Self::Done(ex.answer(client, worker, Answer::Failed(e)).await);
            }
        };
        ex.record.status = response.status;
        observed(worker, upstream, endpoint, Outcome::Status(response.status));
        if response.status == 101 {
            ex.record.upstream_time = Some(started.elapsed());
            client.tunnel(worker, ex, &response, up, up_buf).await;
            return Self::Done(false);
        }
        let edits = ex.response_edits(&response);
        let (result, keep_alive) = client
            .relay(ex, &response, &edits, (&mut up, up_buf, &endpoint_name), waits)
            .await;
        ex.record.upstream_time = Some(started.elapsed());
        let keep = match result {
            Ok((sent, reusable, buf)) => {
                ex.record.bytes_out = sent;
                // A connection that opened with a client's PROXY header is that client's alone.
                if reusable && response.keep_alive && upstream.cfg.proxy_protocol.is_none() {
                    worker.pool.put(upstream.id, endpoint, up, buf);
                }
                keep_alive
            }
            Err((sent, e)) => {
                ex.record.bytes_out = sent;
                ex.note(worker, &e);
                false
            }
        };
        ex.finish(worker);
        Self::Done(keep)
    }
}

/// Reads response heads until the final one, passing interim (1xx) ones on
/// to the client when it `interims` (a 100 the gateway already sent itself
/// is dropped). A `101`
/// is final when the request asked for a WebSocket (`upgrade`) and the
/// upstream switched to one; any other `101` is a protocol error.
async fn final_response(
    client: &mut impl Downstream,
    up: &mut Conn,
    up_buf: &mut Vec<u8>,
    waits: Waits,
    (max_headers, upgrade, interims): (usize, bool, bool),
    endpoint: &str,
) -> Result<Head, ProxyError> {
    loop {
        match body::read_response_head(up, up_buf, waits.upstream, max_headers, endpoint).await? {
            r if r.status == 100 => {}
            r if r.status == 101 && upgrade && r.lists_token("upgrade", "websocket") => return Ok(r),
            r if r.status == 101 => {
                return Err(ProxyError::UpstreamProtocol {
                    endpoint: endpoint.to_owned(),
                    source: HttpError::Malformed("upgrade is not supported"),
                });
            }
            r if r.status < 200 && interims => client.interim(&r, waits.client).await?,
            r if r.status < 200 => {}
            r => return Ok(r),
        }
    }
}
