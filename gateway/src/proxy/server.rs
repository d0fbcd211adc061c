//! One client connection: TLS if the listener has it, then requests read in
//! order, each handled as an exchange, until the connection closes.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tokio::time::timeout;

use super::Worker;
use super::client::{self, Client};
use super::conn::Conn;
use super::exchange;
use super::h2::{self, H2Io};
use super::io::Stream;
use super::proxy_protocol;
use crate::runtime::ListenerRt;
use crate::telemetry::HandshakeLabels;

/// An open client connection, counted against the worker's limit and in the
/// gauge from its accept (before its task first runs, so a burst of accepts
/// cannot pass the limit) until its task ends.
pub struct OpenGuard(Rc<Worker>);

impl std::fmt::Debug for OpenGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenGuard")
    }
}

impl OpenGuard {
    /// Counts a connection just accepted by `worker`.
    pub fn count(worker: &Rc<Worker>) -> Self {
        worker.open.set(worker.open.get() + 1);
        worker.shared.metrics.open_connections.inc();
        Self(worker.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
        self.0.shared.metrics.open_connections.dec();
    }
}

/// Counts one exchange in progress on a worker (see [`Worker::busy`]) while it lives.
struct Busy<'a>(&'a Worker);

impl<'a> Busy<'a> {
    fn count(worker: &'a Worker) -> Self {
        let (busy, busiest) = worker.busy.get();
        worker.busy.set((busy + 1, busiest.max(busy + 1)));
        Self(worker)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let (busy, busiest) = self.0.busy.get();
        self.0.busy.set((busy - 1, busiest));
    }
}

/// Completes the TLS handshake of `stream` if the listener has a context; `None` when it failed.
async fn handshake(worker: &Worker, listener: &ListenerRt, stream: Stream, peer: SocketAddr) -> Option<Conn> {
    let Some(config) = &listener.tls else {
        return Some(Conn::Plain(stream));
    };
    let handshake_timeout = worker.current().settings.timeouts.request_headers;
    let handshake = async {
        let server = rustls::ServerConnection::new(config.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Conn::tls(stream, server).await
    };
    let result = timeout(handshake_timeout, Box::pin(handshake)).await;
    let label = HandshakeLabels {
        result: if matches!(result, Ok(Ok(_))) {
            "ok"
        } else {
            "error"
        }
        .into(),
    };
    worker.shared.metrics.tls_handshakes.get_or_create(&label).inc();
    match result {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Serves one accepted connection until it closes.
pub async fn serve(open: OpenGuard, listener: Arc<ListenerRt>, stream: Stream, mut peer: SocketAddr) {
    let worker = open.0.clone();
    if listener.proxy_protocol.is_some() {
        let wait = worker.current().settings.timeouts.request_headers;
        match Box::pin(proxy_protocol::read(&stream, wait)).await {
            Ok(Some(client)) => peer = client,
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "PROXY protocol header refused; closing");
                worker.shared.metrics.refuse_proxy_protocol("bad_header");
                return;
            }
        }
    }
    let Some(mut conn) = handshake(&worker, &listener, stream, peer).await else {
        return;
    };
    let http2 = worker.current().settings.http2;
    let mut already = Vec::new();
    if conn.alpn() == Some(b"h2") {
        let (stream, tls) = conn.into_parts();
        let transport = H2Io::new(stream, tls, Vec::new(), http2.control_frames_per_second);
        // Boxed, as every HTTP/2 path here: an HTTP/1.1 connection's task
        // then carries none of the HTTP/2 state in its size.
        Box::pin(h2::serve(worker.clone(), listener, transport, peer, true)).await;
        return;
    }
    if listener.h2c
        && let Conn::Plain(stream) = &conn
    {
        let wait = worker.current().settings.timeouts.request_headers;
        let Some((preface, bytes)) = Box::pin(h2::sniff_preface(stream, wait)).await else {
            return;
        };
        if preface {
            let (stream, _) = conn.into_parts();
            let transport = H2Io::new(stream, None, bytes, http2.control_frames_per_second);
            Box::pin(h2::serve(worker.clone(), listener, transport, peer, false)).await;
            return;
        }
        already = bytes;
    }
    let mut client = Client::new(
        &mut conn,
        peer,
        listener.tls.is_some(),
        worker.shared.draining.clone(),
    );
    client.buf = already;
    let mut first = true;
    loop {
        let generation = worker.current();
        let head = match client
            .read_head(&worker.shared, &generation.settings, first)
            .await
        {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(e) => {
                exchange::refuse_head(&mut client, &worker, e).await;
                client.linger().await;
                return;
            }
        };
        first = false;
        let started = Instant::now();
        let busy = Busy::count(&worker);
        // Boxed: an idle keep-alive connection then holds only the small
        // head-reading state, not the largest state of a whole exchange.
        let keep = Box::pin(exchange::handle(
            &mut client,
            &worker,
            listener.addr,
            head,
            started,
        ))
        .await;
        drop(busy);
        if !keep {
            client.linger().await;
            return;
        }
        // The next head is read into this buffer: keep it unless a body read
        // grew it, so steady traffic allocates nothing and an idle
        // connection's read holds no more than IDLE_READ.
        if client.buf.is_empty() && client.buf.capacity() > client::IDLE_READ {
            client.buf = Vec::new();
        }
    }
    conn.close().await;
}
