//! HTTP/2 to upstreams (`h2c://` and `h2://` services), which gRPC needs:
//! one multiplexed connection per endpoint per worker, kept while it lasts;
//! each request a stream on it, its body and the response carried as the
//! client side allows (at once both ways to an HTTP/2 client, so every gRPC
//! streaming kind works), trailers passed on.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use tokio::time::timeout;

use super::io::H2Io;
use crate::config::RouteConfig;
use crate::http::{self, Framing, Head};
use crate::policy::HeaderEdits;
use crate::proxy::Worker;
use crate::proxy::answer::Answer;
use crate::proxy::downstream::{Downstream, Waits};
use crate::proxy::error::ProxyError;
use crate::proxy::exchange::Exchange;
use crate::proxy::{forward, grpc, heads};
use crate::runtime::service::{Outcome, Upstream};

/// Each worker's HTTP/2 upstream connections, by service and endpoint.
#[derive(Debug, Default)]
pub struct H2Pool {
    conns: RefCell<HashMap<(u64, usize), SendRequest<Bytes>>>,
}

impl H2Pool {
    /// A handle ready for one more stream to `endpoint` of `upstream`,
    /// connecting when there is none or the last one ended.
    async fn get(
        &self,
        worker: &Worker,
        upstream: &Arc<Upstream>,
        endpoint: usize,
    ) -> Result<SendRequest<Bytes>, ProxyError> {
        let key = (upstream.id, endpoint);
        let cached = self.conns.borrow().get(&key).cloned();
        if let Some(send) = cached {
            if let Ok(send) = send.ready().await {
                return Ok(send);
            }
            self.conns.borrow_mut().remove(&key);
        }
        let send = connect(worker, upstream, endpoint).await?;
        self.conns.borrow_mut().insert(key, send.clone());
        send.ready().await.map_err(|e| h2_error(upstream, endpoint, &e))
    }

    /// Forgets the connection to `endpoint`, after it failed.
    fn drop_conn(&self, upstream: &Upstream, endpoint: usize) {
        self.conns.borrow_mut().remove(&(upstream.id, endpoint));
    }
}

fn h2_error(upstream: &Upstream, endpoint: usize, e: &h2::Error) -> ProxyError {
    ProxyError::UpstreamIo {
        endpoint: upstream.cfg.endpoints[endpoint].addr.to_string(),
        source: io::Error::other(e.to_string()),
    }
}

/// A new HTTP/2 connection, its driver running on the worker until it ends.
async fn connect(
    worker: &Worker,
    upstream: &Arc<Upstream>,
    endpoint: usize,
) -> Result<SendRequest<Bytes>, ProxyError> {
    let slot = forward::connection_slot(upstream)?;
    let conn = forward::fresh(worker, upstream, endpoint, None).await?;
    let addr = upstream.cfg.endpoints[endpoint].addr.to_string();
    if conn.is_tls() && conn.alpn() != Some(b"h2") {
        return Err(ProxyError::UpstreamTls {
            endpoint: addr,
            source: io::Error::other("the endpoint did not agree to h2 by ALPN; is it an HTTP/2 server?"),
        });
    }
    let (stream, tls) = conn.into_parts();
    let limits = worker.current().settings.http2;
    let handshake = h2::client::Builder::new()
        .initial_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .handshake::<_, Bytes>(H2Io::upstream(stream, tls));
    let (send, connection) = timeout(upstream.cfg.connect_timeout, handshake)
        .await
        .map_err(|_| ProxyError::ConnectTimeout {
            endpoint: addr.clone(),
        })?
        .map_err(|e| h2_error(upstream, endpoint, &e))?;
    crate::proxy::io::spawn(async move {
        // The connection counts under `maxConnections` while its driver runs.
        let _slot = slot;
        if let Err(e) = connection.await {
            tracing::debug!(endpoint = %addr, error = %e, "HTTP/2 upstream connection ended");
        }
    });
    Ok(send)
}

/// One request in flight on an upstream stream.
pub(in crate::proxy) struct Call {
    /// The upstream's response head, when it comes.
    pub response: ResponseFuture,
    /// Where the request body goes.
    pub body: SendStream<Bytes>,
    /// Longest wait for the response head.
    pub deadline: Duration,
    /// Largest request body accepted when its length was not announced.
    pub max_body: u64,
}

/// How a call ended.
pub(in crate::proxy) struct Called {
    /// Request body bytes sent upstream.
    pub bytes_in: u64,
    /// Response bytes sent to the client.
    pub bytes_out: u64,
    /// The response's status.
    pub status: u16,
    /// The gRPC status its trailers (or trailers-only head) carried.
    pub grpc_status: Option<u32>,
    /// Whether the client connection may carry another request.
    pub keep_alive: bool,
}

/// Why a call failed: before anything reached the client (it gets an
/// answer) or after (its response is cut short).
pub(in crate::proxy) enum CallError {
    /// Nothing was sent to the client yet.
    Early(ProxyError),
    /// The response had begun; the bytes sent.
    Late(u64, ProxyError),
}

/// Forwards the exchange to an HTTP/2 service; whether the client connection may carry another request.
pub(in crate::proxy) async fn forward(
    client: &mut impl Downstream,
    worker: &Rc<Worker>,
    ex: &mut Exchange<'_>,
    route: &RouteConfig,
    upstream: &Arc<Upstream>,
) -> bool {
    let started = Instant::now();
    let mut tried = Vec::new();
    let mut last_error = None;
    let max_attempts = 1 + upstream.cfg.retries as usize;
    while let Some(endpoint) = upstream.pick(&tried) {
        if tried.len() >= max_attempts {
            break;
        }
        tried.push(endpoint);
        ex.record.upstream = Some(upstream.cfg.endpoints[endpoint].addr);
        let mut sender = match worker.h2_pool.get(worker, upstream, endpoint).await {
            Ok(sender) => sender,
            Err(e @ ProxyError::CircuitOpen { .. }) => {
                return ex.answer(client, worker, Answer::Unreachable(e)).await;
            }
            Err(e) => {
                forward::connect_failed(worker, upstream, endpoint, &e);
                // Nothing reached the upstream: another endpoint is safe for any method.
                last_error = Some(e);
                continue;
            }
        };
        let _in_flight = upstream.begin(endpoint);
        let request = match request(ex, upstream, endpoint, client) {
            Ok(r) => r,
            Err(e) => return ex.answer(client, worker, Answer::Failed(e)).await,
        };
        let end = ex.head().framing == Framing::Empty;
        let (response, body) = match sender.send_request(request, end) {
            Ok(pair) => pair,
            Err(e) => {
                worker.h2_pool.drop_conn(upstream, endpoint);
                last_error = Some(h2_error(upstream, endpoint, &e));
                continue;
            }
        };
        let mut deadline = ex.response_timeout(upstream.cfg.response_timeout);
        if let Some(call_deadline) = grpc::deadline(ex.head()) {
            deadline = deadline.min(call_deadline);
        }
        let call = Call {
            response,
            body,
            deadline,
            max_body: route.max_body,
        };
        let waits = Waits {
            client: ex.generation.settings.timeouts.idle,
            upstream: upstream.cfg.response_timeout,
        };
        let endpoint_name = upstream.cfg.endpoints[endpoint].addr.to_string();
        let result = client.call_h2(ex, call, waits, &endpoint_name).await;
        ex.record.upstream_time = Some(started.elapsed());
        return match result {
            Ok(done) => {
                ex.record.status = done.status;
                forward::observed(worker, upstream, endpoint, Outcome::Status(done.status));
                ex.record.bytes_in = done.bytes_in;
                ex.record.bytes_out = done.bytes_out;
                if let Some(code) = done.grpc_status {
                    worker
                        .metrics
                        .grpc(ex.route.map_or("-", |r| r.api.as_str()), code);
                }
                ex.finish(worker);
                done.keep_alive
            }
            Err(CallError::Early(e)) => ex.answer(client, worker, Answer::Failed(e)).await,
            Err(CallError::Late(sent, e)) => {
                ex.record.bytes_out = sent;
                ex.note(worker, &e);
                ex.finish(worker);
                false
            }
        };
    }
    let e = last_error.unwrap_or_else(|| ProxyError::Connect {
        service: upstream.cfg.name.clone(),
        source: io::Error::new(io::ErrorKind::NotConnected, "no endpoint left to try"),
    });
    ex.record.upstream_time = Some(started.elapsed());
    ex.answer(client, worker, Answer::Unreachable(e)).await
}

fn malformed<E>(_: E) -> ProxyError {
    ProxyError::Client(http::HttpError::Malformed("request not expressible in HTTP/2"))
}

/// The request head sent on an upstream stream: `:authority` as `Host`
/// would be, the end-to-end fields of the HTTP/1.1 request, and `te:
/// trailers` when the client said it takes them (gRPC servers require it).
fn request(
    ex: &Exchange<'_>,
    upstream: &Upstream,
    endpoint: usize,
    client: &impl Downstream,
) -> Result<::http::Request<()>, ProxyError> {
    let head = ex.head();
    let scheme = if upstream.tls.is_some() { "https" } else { "http" };
    let uri = ::http::Uri::builder()
        .scheme(scheme)
        .authority(heads::upstream_host(ex, upstream, endpoint))
        .path_and_query(ex.upstream_target())
        .build()
        .map_err(malformed)?;
    let method = ::http::Method::from_bytes(head.method().as_bytes()).map_err(malformed)?;
    let mut request = ::http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .map_err(malformed)?;
    let fields = request.headers_mut();
    let mut bad = false;
    heads::request_fields(ex, client.peer().ip(), client.tls(), |name, value| {
        match (
            ::http::HeaderName::from_bytes(name),
            ::http::HeaderValue::from_bytes(value),
        ) {
            (Ok(n), Ok(v)) => drop(fields.append(n, v)),
            _ => bad = true,
        }
    });
    if bad {
        return Err(ProxyError::Client(http::HttpError::Malformed(
            "a header field HTTP/2 cannot carry",
        )));
    }
    if head.lists_token("te", "trailers") {
        fields.insert(::http::header::TE, ::http::HeaderValue::from_static("trailers"));
    }
    Ok(request)
}

/// The upstream's response head as a [`Head`], the response policies' edits,
/// and its body.
pub(in crate::proxy) async fn response(
    ex: &Exchange<'_>,
    call: ResponseFuture,
    deadline: Duration,
    endpoint: &str,
) -> Result<(Head, HeaderEdits, RecvStream), ProxyError> {
    let response = match timeout(deadline, call).await {
        Err(_) => {
            return Err(ProxyError::UpstreamTimeout {
                endpoint: endpoint.to_owned(),
            });
        }
        Ok(Err(e)) => {
            return Err(ProxyError::UpstreamIo {
                endpoint: endpoint.to_owned(),
                source: io::Error::other(e.to_string()),
            });
        }
        Ok(Ok(r)) => r,
    };
    let (parts, body) = response.into_parts();
    let fields = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    let max_headers = ex.generation.settings.limits.headers.max(100);
    let mut head = http::h2_response(parts.status.as_u16(), fields, max_headers).map_err(|source| {
        ProxyError::UpstreamProtocol {
            endpoint: endpoint.to_owned(),
            source,
        }
    })?;
    if body.is_end_stream() {
        head.framing = Framing::Empty;
    } else if head.framing == Framing::Empty {
        head.framing = Framing::UntilClose;
    }
    let edits = ex.response_edits(&head);
    Ok((head, edits, body))
}

/// The gRPC status in `fields`, if any.
pub(in crate::proxy) fn grpc_status(fields: &::http::HeaderMap) -> Option<u32> {
    fields.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The next DATA frame of `body`, its window given back; `None` at its end.
pub(in crate::proxy) async fn next_data(
    body: &mut RecvStream,
    wait: Duration,
    error: impl Fn(String) -> ProxyError,
) -> Result<Option<Bytes>, ProxyError> {
    match timeout(wait, body.data()).await {
        Err(_) => Err(error("timed out".into())),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(error(e.to_string())),
        Ok(Some(Ok(data))) => {
            let _ = body.flow_control().release_capacity(data.len());
            Ok(Some(data))
        }
    }
}

/// Sends `data` on `send` as the peer's window allows; `end` closes the stream after it.
pub(in crate::proxy) async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    wait: Duration,
) -> Result<(), String> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = timeout(wait, poll_fn(|cx| send.poll_capacity(cx)))
            .await
            .map_err(|_| "the peer kept its HTTP/2 window closed".to_owned())?;
        match capacity {
            Some(Ok(0)) => {}
            Some(Ok(n)) => {
                let part = data.split_to(n.min(data.len()));
                let last = end && data.is_empty();
                send.send_data(part, last).map_err(|e| e.to_string())?;
                if last {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the peer closed the stream".to_owned()),
        }
    }
    if end {
        send.send_data(Bytes::new(), true).map_err(|e| e.to_string())?;
    }
    Ok(())
}
