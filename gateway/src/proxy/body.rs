//! Body pumps, one per framing: the request body from the client to the
//! upstream, and the response body from the upstream to the client (passed
//! through, re-chunked, or raw to an HTTP/1.0 client), never buffered whole.

use std::io;
use std::time::Duration;

use tokio::time::timeout;

use super::client::{BODY_CHUNK, Client};
use super::conn::Conn;
use super::error::ProxyError;
use crate::http::{self, ChunkedDecoder, Framing, Head, HttpError, Reencode};

/// An error while copying a body: which side failed.
pub(super) enum CopyError {
    /// The side the body comes from.
    Source(ProxyError),
    /// The side it goes to.
    Sink(ProxyError),
}

/// Where a response body goes and how long each side may take.
pub(super) struct Pump<'p, 'c> {
    pub client: &'p mut Client<'c>,
    pub up: &'p mut Conn,
    pub endpoint: &'p str,
    pub client_wait: Duration,
    pub up_wait: Duration,
}

fn upstream_io(e: io::Error) -> ProxyError {
    ProxyError::UpstreamIo {
        endpoint: "upstream".into(),
        source: e,
    }
}

/// Writes `bytes` to the upstream within `wait`, for a request body; the emptied buffer back.
pub(super) async fn to_upstream(up: &mut Conn, bytes: Vec<u8>, wait: Duration) -> Result<Vec<u8>, CopyError> {
    write_to(up, bytes, wait)
        .await
        .map_err(|e| CopyError::Sink(upstream_io(e)))
}

async fn write_to(conn: &mut Conn, bytes: Vec<u8>, wait: Duration) -> io::Result<Vec<u8>> {
    match timeout(wait, conn.write_all(bytes)).await {
        Ok((Ok(()), buf)) => Ok(buf),
        Ok((Err(e), _)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// Streams the request body of `framing` to the upstream, refusing more than
/// `max` bytes of chunked payload; returns the payload size.
pub(super) async fn copy_request(
    client: &mut Client<'_>,
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
                client.fill(client_wait).await.map_err(CopyError::Source)?;
                let avail = client.buf.len() as u64;
                let out = if avail <= remaining {
                    remaining -= avail;
                    std::mem::take(&mut client.buf)
                } else {
                    let cut = usize::try_from(remaining).unwrap_or(usize::MAX);
                    remaining = 0;
                    let part = client.buf[..cut].to_vec();
                    client.buf.drain(..cut);
                    part
                };
                let mut out = to_upstream(up, out, up_wait).await?;
                if client.buf.is_empty() {
                    out.clear();
                    client.buf = out;
                }
            }
            Ok(n)
        }
        Framing::Chunked => {
            let mut dec = ChunkedDecoder::default();
            let mut out = Vec::with_capacity(BODY_CHUNK + 64);
            while !dec.is_done() {
                client.fill(client_wait).await.map_err(CopyError::Source)?;
                let used = dec
                    .feed(&client.buf, &mut out, Reencode::Chunked)
                    .map_err(|e| CopyError::Source(e.into()))?;
                client.buf.drain(..used);
                if dec.payload > max {
                    return Err(CopyError::Source(ProxyError::BodyTooLarge { limit: max }));
                }
                if !out.is_empty() {
                    out = to_upstream(up, out, up_wait).await?;
                    out.clear();
                }
            }
            Ok(dec.payload)
        }
    }
}

/// How a response body ended: bytes sent to the client, whether the upstream
/// connection may be pooled, and its read buffer.
pub(super) type Sent = (u64, bool, Vec<u8>);

impl Pump<'_, '_> {
    /// Writes `pending` to the client, counting it into `sent`; the emptied buffer back.
    async fn send(&mut self, pending: Vec<u8>, sent: &mut u64) -> Result<Vec<u8>, (u64, ProxyError)> {
        *sent += pending.len() as u64;
        let mut b = self
            .client
            .write(pending, self.client_wait)
            .await
            .map_err(|e| (*sent, e))?;
        b.clear();
        Ok(b)
    }

    /// Reads more of an upstream response into `buf`; `(buf, 0)` at the end of the stream.
    async fn read(&mut self, buf: Vec<u8>) -> Result<(Vec<u8>, usize), ProxyError> {
        read_upstream(self.up, buf, self.up_wait, self.endpoint).await
    }

    /// Reads more of a body the framing says is not over: a close now is an error.
    async fn read_more(&mut self, buf: Vec<u8>, sent: u64) -> Result<Vec<u8>, (u64, ProxyError)> {
        let (buf, n) = self.read(buf).await.map_err(|e| (sent, e))?;
        if n == 0 {
            return Err((
                sent,
                ProxyError::UpstreamIo {
                    endpoint: self.endpoint.to_string(),
                    source: io::ErrorKind::UnexpectedEof.into(),
                },
            ));
        }
        Ok(buf)
    }

    /// A body of `n` bytes; the head goes out with whatever body bytes already arrived behind it.
    pub async fn length(
        &mut self,
        n: u64,
        head: Vec<u8>,
        mut up_buf: Vec<u8>,
    ) -> Result<Sent, (u64, ProxyError)> {
        let mut sent = 0;
        let mut pending = head;
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
                let b = self.send(pending, &mut sent).await?;
                pending = Vec::new();
                if up_buf.capacity() == 0 {
                    up_buf = b;
                }
            }
            if remaining == 0 {
                return Ok((sent, up_buf.is_empty(), up_buf));
            }
            up_buf = self.read_more(up_buf, sent).await?;
        }
    }

    /// A chunked body, passed through or decoded to raw bytes for an HTTP/1.0 client.
    pub async fn chunked(
        &mut self,
        rechunk: bool,
        head: Vec<u8>,
        mut up_buf: Vec<u8>,
    ) -> Result<Sent, (u64, ProxyError)> {
        let mut sent = 0;
        let mut pending = head;
        let mode = if rechunk { Reencode::Chunked } else { Reencode::Raw };
        let mut dec = ChunkedDecoder::default();
        loop {
            let used = dec.feed(&up_buf, &mut pending, mode).map_err(|e| {
                (
                    sent,
                    ProxyError::UpstreamProtocol {
                        endpoint: self.endpoint.to_string(),
                        source: e,
                    },
                )
            })?;
            up_buf.drain(..used);
            if !pending.is_empty() {
                pending = self.send(pending, &mut sent).await?;
            }
            if dec.is_done() {
                return Ok((sent, up_buf.is_empty(), up_buf));
            }
            up_buf = self.read_more(up_buf, sent).await?;
        }
    }

    /// A body that ends when the upstream closes: re-chunked for an HTTP/1.1
    /// client, raw (and closed after) for an HTTP/1.0 one.
    pub async fn until_close(
        &mut self,
        rechunk: bool,
        head: Vec<u8>,
        mut up_buf: Vec<u8>,
    ) -> Result<Sent, (u64, ProxyError)> {
        let mut sent = 0;
        let mut pending = head;
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
                pending = self.send(pending, &mut sent).await?;
            }
            let (b, n) = self.read(up_buf).await.map_err(|e| (sent, e))?;
            if n == 0 {
                break;
            }
            up_buf = b;
        }
        if rechunk {
            self.send(b"0\r\n\r\n".to_vec(), &mut sent).await?;
        }
        Ok((sent, false, Vec::new()))
    }
}

/// Reads more of an upstream response into `buf`; `(buf, 0)` at the end of the stream.
pub(super) async fn read_upstream(
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

/// Reads a response head; bytes after it stay in `buf`.
pub(super) async fn read_response_head(
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
