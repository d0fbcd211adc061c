//! WebSocket tunnels: once the upstream answers a policed handshake with
//! `101`, the two connections carry bytes both ways until either side closes,
//! bounded by the API's idle timeout and maximum duration.
//!
//! ```text
//! client ──read──► write ──► upstream        one join on the worker: both
//! client ◄──write ◄──read── upstream         directions in flight at once
//!            ▲
//!            └─ watch: idle, max duration, drain, reload (if asked) → shut both down
//! ```
//!
//! The frames inside are not parsed: the handshake is the request the
//! policies judged, and a policy edit later leaves an open tunnel alone
//! unless the API sets `closeOnReload`.

use std::cell::Cell;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Worker;
use super::client::{BODY_CHUNK, Client};
use super::conn::{Conn, Duplex};
use super::exchange::Exchange;
use super::heads::{self, Relay};
use crate::config::WebSocketConfig;
use crate::http::Head;
use crate::telemetry::{ApiLabels, TunnelBytesLabels, TunnelLabels};

/// Longest wait for the client to take the `101`.
const HEAD_WRITE: Duration = Duration::from_secs(5);
/// How often the watch looks at reloads when nothing else is due.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Why a tunnel closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    /// Both sides closed.
    Ended,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// Open for the maximum duration.
    MaxDuration,
    /// A reload, on an API with `closeOnReload`.
    Reload,
    /// The gateway is stopping.
    Drain,
    /// A read or write failed on either side.
    Error,
}

impl Close {
    /// The label in `/metrics` and the access log.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ended => "closed",
            Self::IdleTimeout => "idle_timeout",
            Self::MaxDuration => "max_duration",
            Self::Reload => "reload",
            Self::Drain => "drain",
            Self::Error => "error",
        }
    }
}

/// What one direction of a tunnel saw.
struct Flow<'a, 'f, 't> {
    from: &'a Duplex<'f>,
    to: &'a Duplex<'t>,
    last: &'a Cell<Instant>,
    bytes: Cell<u64>,
}

impl Flow<'_, '_, '_> {
    /// Carries bytes until `from` ends (then ends `to`'s sending side) or
    /// either side fails (then shuts both down, ending the other direction too).
    async fn run(&self, mut buf: Vec<u8>) -> io::Result<()> {
        let result = self.carry(&mut buf).await;
        if result.is_err() {
            self.from.shutdown();
            self.to.shutdown();
        }
        result
    }

    async fn carry(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        loop {
            if !buf.is_empty() {
                self.bytes.set(self.bytes.get() + buf.len() as u64);
                let (res, back) = self.to.write_all(std::mem::take(buf)).await;
                *buf = back;
                res?;
                buf.clear();
            }
            if buf.capacity() < BODY_CHUNK {
                buf.reserve(BODY_CHUNK);
            }
            let (res, back) = self.from.read(std::mem::take(buf)).await;
            *buf = back;
            if res? == 0 {
                self.to.shutdown_write().await;
                return Ok(());
            }
            self.last.set(Instant::now());
        }
    }
}

/// Relays the upstream's `101` to the client and carries the tunnel until it
/// closes; the access line is written then, with the bytes each way.
pub(super) async fn carry(
    client: &mut Client<'_>,
    worker: &Worker,
    ex: &mut Exchange<'_>,
    response: &Head,
    mut up: Conn,
    up_buf: Vec<u8>,
) {
    let Some(route) = ex.route else { return };
    let edits = ex.response_edits(response);
    let head = heads::client_response(ex, response, &edits, Relay::upgrade());
    let head_len = head.len() as u64;
    ex.record.status = 101;
    if let Err(e) = client.write(head, HEAD_WRITE).await {
        ex.record.bytes_out = 0;
        ex.note(worker, &e);
        ex.finish(worker);
        return;
    }
    let open = opened(worker, &route.api);
    let early = std::mem::take(&mut client.buf);
    let client_side = client.conn.duplex();
    let up_side = up.duplex();
    let (reason, to_upstream, to_client) =
        run(worker, &route.websocket, &client_side, &up_side, (early, up_buf)).await;
    drop(open);
    closed(worker, ex, reason, (to_upstream, to_client), head_len);
}

/// Holds one open tunnel in `portcullis_websocket_open` until dropped.
pub(super) struct OpenTunnel(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts a tunnel of `api` open.
pub(super) fn opened(worker: &Worker, api: &str) -> OpenTunnel {
    let labels = ApiLabels { api: api.to_owned() };
    let open = worker
        .shared
        .metrics
        .websocket_open
        .get_or_create(&labels)
        .clone();
    open.inc();
    OpenTunnel(open)
}

/// Counts a closed tunnel and writes its access line: why it closed, the
/// bytes carried to the upstream and to the client, after a head of `head_len`.
pub(super) fn closed(
    worker: &Worker,
    ex: &mut Exchange<'_>,
    reason: Close,
    (to_upstream, to_client): (u64, u64),
    head_len: u64,
) {
    let api = ex.route.map_or("-", |r| r.api.as_str()).to_owned();
    let metrics = &worker.shared.metrics;
    let labels = TunnelLabels {
        api: api.clone(),
        reason: reason.label().to_owned(),
    };
    metrics.websocket_closed.get_or_create(&labels).inc();
    for (direction, n) in [("upstream", to_upstream), ("client", to_client)] {
        let labels = TunnelBytesLabels {
            api: api.clone(),
            direction: direction.to_owned(),
        };
        metrics.websocket_bytes.get_or_create(&labels).inc_by(n);
    }
    ex.record.bytes_in = to_upstream;
    ex.record.bytes_out = head_len + to_client;
    if reason != Close::Ended {
        ex.record.error = Some(reason.label());
    }
    ex.finish(worker);
}

/// A fresh `Sec-WebSocket-Key`, for a handshake the gateway makes itself
/// (a WebSocket that arrived over HTTP/2).
pub(super) fn handshake_key() -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut nonce = [0u8; 16];
    // The key only has to be unpredictable to the upstream, not secret.
    let _ = ring::rand::SystemRandom::new().fill(&mut nonce);
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// Whether the upstream's `101` answers the handshake's key (RFC 6455 §4.2.2).
pub(super) fn accepts(request: &Head, response: &Head) -> bool {
    use base64::Engine as _;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let (Some(key), Some(accept)) = (
        request.header("sec-websocket-key"),
        response.header("sec-websocket-accept"),
    ) else {
        return false;
    };
    let mut input = key.trim_ascii().to_vec();
    input.extend_from_slice(GUID);
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD
        .encode(digest.as_ref())
        .as_bytes()
        == accept.trim_ascii()
}

/// Carries both directions, starting with the bytes each side sent early;
/// why it closed and the bytes carried to the upstream and to the client.
async fn run(
    worker: &Worker,
    cfg: &WebSocketConfig,
    client: &Duplex<'_>,
    up: &Duplex<'_>,
    (early_from_client, early_from_up): (Vec<u8>, Vec<u8>),
) -> (Close, u64, u64) {
    let started = Instant::now();
    let last = Cell::new(started);
    let upward = Flow {
        from: client,
        to: up,
        last: &last,
        bytes: Cell::new(0),
    };
    let downward = Flow {
        from: up,
        to: client,
        last: &last,
        bytes: Cell::new(0),
    };
    let both = async {
        let (a, b) = tokio::join!(upward.run(early_from_client), downward.run(early_from_up));
        if a.is_err() || b.is_err() {
            Close::Error
        } else {
            Close::Ended
        }
    };
    tokio::pin!(both);
    let reason = tokio::select! {
        reason = &mut both => reason,
        reason = watch(worker, cfg, started, &last) => {
            // Shutting down completes the reads in flight, so both flows end.
            client.shutdown();
            up.shutdown();
            both.await;
            reason
        }
    };
    (reason, upward.bytes.get(), downward.bytes.get())
}

/// Returns when the tunnel must close for a reason of the gateway's.
pub(super) async fn watch(
    worker: &Worker,
    cfg: &WebSocketConfig,
    started: Instant,
    last: &Cell<Instant>,
) -> Close {
    let shared = &worker.shared;
    let version = shared.version();
    let drained = shared.drain.notified();
    tokio::pin!(drained);
    drained.as_mut().enable();
    loop {
        let now = Instant::now();
        let end = started + cfg.max_duration;
        let idle_end = last.get() + cfg.idle_timeout;
        if shared.draining.load(Ordering::Acquire) {
            return Close::Drain;
        }
        if now >= end {
            return Close::MaxDuration;
        }
        if now >= idle_end {
            return Close::IdleTimeout;
        }
        if cfg.close_on_reload && shared.version() != version {
            return Close::Reload;
        }
        let next = end.min(idle_end).min(now + WATCH_EVERY);
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            () = &mut drained => return Close::Drain,
        }
    }
}
