//! The client side of a connection: its transport, the bytes read ahead of
//! the request in progress, and the reads and writes every exchange on it shares.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::timeout;

use super::conn::Conn;
use super::error::ProxyError;
use crate::config::ProxySettings;
use crate::http::{self, Head, HttpError};
use crate::runtime::Shared;

/// Body reads move this much at a time.
pub(super) const BODY_CHUNK: usize = 64 * 1024;
/// Read buffer an idle keep-alive connection waits with.
pub(super) const IDLE_READ: usize = 1024;
/// Most bytes read and discarded while closing after an error.
const LINGER_BYTES: usize = 256 * 1024;
/// Longest time spent discarding input while closing after an error.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// The client side of a connection. Nothing request-scoped lives here: that
/// is the exchange's.
pub(super) struct Client<'c> {
    pub conn: &'c mut Conn,
    /// Bytes read and not yet consumed (the next head, or body bytes).
    pub buf: Vec<u8>,
    pub peer: SocketAddr,
    /// Whether the client speaks TLS to us.
    pub tls: bool,
    draining: Arc<AtomicBool>,
}

impl<'c> Client<'c> {
    pub(super) fn new(conn: &'c mut Conn, peer: SocketAddr, tls: bool, draining: Arc<AtomicBool>) -> Self {
        Self {
            conn,
            buf: Vec::new(),
            peer,
            tls,
            draining,
        }
    }

    /// Whether the gateway is stopping (no further request on this connection).
    pub(super) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Reads the next request head; `None` when the client closed or idled out between requests.
    pub(super) async fn read_head(
        &mut self,
        shared: &Shared,
        settings: &ProxySettings,
        first: bool,
    ) -> Result<Option<Head>, ProxyError> {
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
                if shared.draining.load(Ordering::Acquire) {
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

    pub(super) async fn write(&mut self, bytes: Vec<u8>, wait: Duration) -> Result<Vec<u8>, ProxyError> {
        match timeout(wait, self.conn.write_all(bytes)).await {
            Ok((Ok(()), buf)) => Ok(buf),
            Ok((Err(e), _)) => Err(ProxyError::ClientIo(e)),
            Err(_) => Err(ProxyError::ClientIo(io::Error::new(
                io::ErrorKind::TimedOut,
                "client write timed out",
            ))),
        }
    }

    /// Half-closes and discards what the client still sends, so it reads our
    /// response instead of a reset.
    pub(super) async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let _ = tokio::time::timeout_at(deadline, self.conn.close_write()).await;
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

    /// Makes sure `buf` holds at least one unread byte.
    pub(super) async fn fill(&mut self, wait: Duration) -> Result<(), ProxyError> {
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
}
