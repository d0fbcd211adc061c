//! The client side of one exchange, whatever its protocol: an HTTP/1.1
//! connection ([`Client`]) or one stream of an HTTP/2 connection. Routing,
//! the Gatekeeper, the policies, forwarding and the answer path are written
//! once over this trait; only how bytes reach the client differs.

use std::net::SocketAddr;
use std::time::Duration;

use super::Worker;
use super::answer::Answer;
use super::body::{self, CopyError, Pump, Sent};
use super::client::Client;
use super::conn::Conn;
use super::error::ProxyError;
use super::exchange::{ANSWER_WRITE, Exchange};
use super::h2::upstream::{self, Call, CallError, Called};
use super::heads::{self, Relay};
use super::tunnel;
use crate::http::{ChunkedDecoder, Framing, Head, Reencode, Version};
use crate::policy::HeaderEdits;
use bytes::Bytes;

/// How long each side of a body copy may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waits {
    /// For the client to send or take the next bytes.
    pub client: Duration,
    /// For the upstream to do the same.
    pub upstream: Duration,
}

/// Where one exchange's request comes from and its response goes.
pub(super) trait Downstream {
    /// The client's address.
    fn peer(&self) -> SocketAddr;
    /// Whether the client speaks TLS to the gateway.
    fn tls(&self) -> bool;
    /// Whether the connection may carry another request after `answer` to `head`.
    fn keeps_alive(&self, answer: &Answer, head: &Head) -> bool;
    /// Sends one of the gateway's own answers to a request of `version`; the bytes sent.
    async fn send_answer(&mut self, answer: &Answer, version: Version, keep: bool) -> u64;
    /// Tells a client that waits for it to send its body (`100 Continue`).
    async fn send_continue(&mut self, wait: Duration) -> Result<(), ProxyError>;
    /// Streams the request body of `framing` to the upstream, refusing more
    /// than `max` bytes when its length was not announced; the payload size.
    async fn copy_request(
        &mut self,
        up: &mut Conn,
        framing: Framing,
        max: u64,
        waits: Waits,
    ) -> Result<u64, CopyError>;
    /// Passes an interim (1xx) response on.
    async fn interim(&mut self, response: &Head, wait: Duration) -> Result<(), ProxyError>;
    /// Sends the final response head, with the response policies' `edits`,
    /// and streams its body; what was sent and whether the upstream
    /// connection may be pooled, and whether the client connection may be kept.
    async fn relay(
        &mut self,
        ex: &Exchange<'_>,
        response: &Head,
        edits: &HeaderEdits,
        up: (&mut Conn, Vec<u8>, &str),
        waits: Waits,
    ) -> (Result<Sent, (u64, ProxyError)>, bool);
    /// Carries the WebSocket the upstream's `101` opened, to its end.
    async fn tunnel(
        &mut self,
        worker: &Worker,
        ex: &mut Exchange<'_>,
        response: &Head,
        up: Conn,
        up_buf: Vec<u8>,
    );
    /// Carries one call to an HTTP/2 upstream: the request body out, the
    /// response (head, policies' edits, body, trailers) back.
    async fn call_h2(
        &mut self,
        ex: &Exchange<'_>,
        call: Call,
        waits: Waits,
        endpoint: &str,
    ) -> Result<Called, CallError>;
    /// Whether the request is a gRPC call the gateway must answer in gRPC form.
    fn grpc(&self) -> bool {
        false
    }
}

impl Downstream for Client<'_> {
    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn tls(&self) -> bool {
        self.tls
    }

    fn keeps_alive(&self, answer: &Answer, head: &Head) -> bool {
        answer.keeps_alive(head, self.draining())
    }

    async fn send_answer(&mut self, answer: &Answer, version: Version, keep: bool) -> u64 {
        let version = if version == Version::Http10 {
            Version::Http10
        } else {
            Version::Http11
        };
        let bytes = answer.encode(version, keep);
        let sent = bytes.len() as u64;
        let _ = self.write(bytes, ANSWER_WRITE).await;
        sent
    }

    async fn send_continue(&mut self, wait: Duration) -> Result<(), ProxyError> {
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), wait)
            .await
            .map(drop)
    }

    async fn copy_request(
        &mut self,
        up: &mut Conn,
        framing: Framing,
        max: u64,
        waits: Waits,
    ) -> Result<u64, CopyError> {
        body::copy_request(self, up, framing, max, waits.client, waits.upstream).await
    }

    async fn interim(&mut self, response: &Head, wait: Duration) -> Result<(), ProxyError> {
        self.write(heads::interim(response), wait).await.map(drop)
    }

    async fn relay(
        &mut self,
        ex: &Exchange<'_>,
        response: &Head,
        edits: &HeaderEdits,
        (up, up_buf, endpoint): (&mut Conn, Vec<u8>, &str),
        waits: Waits,
    ) -> (Result<Sent, (u64, ProxyError)>, bool) {
        let relay = Relay::of(ex.head(), response, self.draining());
        let head = heads::client_response(ex, response, edits, relay);
        let mut pump = Pump {
            client: self,
            up,
            endpoint,
            client_wait: waits.client,
            up_wait: waits.upstream,
        };
        let result = match relay.framing {
            Framing::Empty => {
                let sent = head.len() as u64;
                match pump.client.write(head, pump.client_wait).await {
                    // Some upstreams send a body to HEAD anyway; such a connection
                    // would answer the next request with stale bytes, so it is not reused.
                    Ok(_) => Ok((sent, up_buf.is_empty() && ex.head().method() != "HEAD", up_buf)),
                    Err(e) => Err((sent, e)),
                }
            }
            Framing::Length(n) => pump.length(n, head, up_buf).await,
            Framing::Chunked => pump.chunked(relay.rechunk, head, up_buf).await,
            Framing::UntilClose => pump.until_close(relay.rechunk, head, up_buf).await,
        };
        (result, relay.keep_alive)
    }

    async fn tunnel(
        &mut self,
        worker: &Worker,
        ex: &mut Exchange<'_>,
        response: &Head,
        up: Conn,
        up_buf: Vec<u8>,
    ) {
        tunnel::carry(self, worker, ex, response, up, up_buf).await;
    }

    /// In turn: the request body (decoded from its HTTP/1.1 framing), then
    /// the response, re-chunked or raw as for an HTTP/1.1 upstream's; trailers are dropped.
    async fn call_h2(
        &mut self,
        ex: &Exchange<'_>,
        call: Call,
        waits: Waits,
        endpoint: &str,
    ) -> Result<Called, CallError> {
        let Call {
            response,
            mut body,
            deadline,
            max_body,
        } = call;
        let bytes_in = body_to_h2(self, &mut body, ex.head().framing, max_body, waits, endpoint)
            .await
            .map_err(CallError::Early)?;
        let (head, edits, mut rx) = upstream::response(ex, response, deadline, endpoint)
            .await
            .map_err(CallError::Early)?;
        let relay = Relay::of(ex.head(), &head, self.draining());
        let out = heads::client_response(ex, &head, &edits, relay);
        let mut sent = out.len() as u64;
        self.write(out, waits.client)
            .await
            .map_err(|e| CallError::Late(0, e))?;
        let upstream_error = |m: String| upstream_io(endpoint, m);
        let mut grpc_status = None;
        if relay.framing != Framing::Empty {
            while let Some(data) = upstream::next_data(&mut rx, waits.upstream, upstream_error)
                .await
                .map_err(|e| CallError::Late(sent, e))?
            {
                let mut chunk = Vec::with_capacity(data.len() + 16);
                if relay.rechunk {
                    chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                }
                chunk.extend_from_slice(&data);
                if relay.rechunk {
                    chunk.extend_from_slice(b"\r\n");
                }
                sent += data.len() as u64;
                if !data.is_empty() {
                    self.write(chunk, waits.client)
                        .await
                        .map_err(|e| CallError::Late(sent, e))?;
                }
            }
            if let Ok(Some(trailers)) = rx.trailers().await {
                grpc_status = upstream::grpc_status(&trailers);
            }
            if relay.rechunk {
                self.write(b"0\r\n\r\n".to_vec(), waits.client)
                    .await
                    .map_err(|e| CallError::Late(sent, e))?;
            }
        }
        Ok(Called {
            bytes_in,
            bytes_out: sent,
            status: head.status,
            grpc_status,
            keep_alive: relay.keep_alive,
        })
    }
}

fn upstream_io(endpoint: &str, message: String) -> ProxyError {
    ProxyError::UpstreamIo {
        endpoint: endpoint.to_owned(),
        source: std::io::Error::other(message),
    }
}

/// Sends an HTTP/1.1 request body of `framing` on an HTTP/2 upstream
/// stream as plain DATA; the payload size.
async fn body_to_h2(
    client: &mut Client<'_>,
    tx: &mut h2::SendStream<Bytes>,
    framing: Framing,
    max: u64,
    waits: Waits,
    endpoint: &str,
) -> Result<u64, ProxyError> {
    match framing {
        Framing::Empty | Framing::UntilClose => Ok(0),
        Framing::Length(n) => {
            let mut remaining = n;
            while remaining > 0 {
                client.fill(waits.client).await?;
                let take = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(client.buf.len());
                let part: Vec<u8> = client.buf.drain(..take).collect();
                remaining -= take as u64;
                upstream::send_all(tx, Bytes::from(part), remaining == 0, waits.upstream)
                    .await
                    .map_err(|m| upstream_io(endpoint, m))?;
            }
            Ok(n)
        }
        Framing::Chunked => {
            let mut dec = ChunkedDecoder::default();
            while !dec.is_done() {
                client.fill(waits.client).await?;
                let mut out = Vec::with_capacity(client.buf.len());
                let used = dec.feed(&client.buf, &mut out, Reencode::Raw)?;
                client.buf.drain(..used);
                if dec.payload > max {
                    tx.send_reset(h2::Reason::CANCEL);
                    return Err(ProxyError::BodyTooLarge { limit: max });
                }
                upstream::send_all(tx, Bytes::from(out), dec.is_done(), waits.upstream)
                    .await
                    .map_err(|m| upstream_io(endpoint, m))?;
            }
            Ok(dec.payload)
        }
    }
}
