//! The HTTP/2 connection's transport: tokio's `AsyncRead`/`AsyncWrite` (what
//! the `h2` crate drives) over the proxy's owned-buffer [`Transport`], with
//! rustls run in place for a TLS connection, and the client's control frames
//! metered on the way in.
//!
//! Reads and writes are each one owned-buffer operation in flight at most,
//! held as a future over a shared handle to the stream, so `h2` may poll
//! both directions at once as it does.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::io::{Stream, Transport as _};

/// Bytes one read asks the stream for.
const READ_SIZE: usize = 16 * 1024 + 64;
/// Plaintext queued for the socket before `poll_write` pushes back.
const WRITE_HIGH: usize = 64 * 1024;

type ReadOp = Pin<Box<dyn Future<Output = (io::Result<usize>, Vec<u8>)>>>;
type WriteOp = Pin<Box<dyn Future<Output = (io::Result<()>, Vec<u8>)>>>;

/// One HTTP/2 connection's bytes, plain or TLS.
pub(in crate::proxy) struct H2Io {
    stream: Rc<Stream>,
    tls: Option<rustls::Connection>,
    /// Bytes read and not yet handed on (plaintext, or ciphertext for rustls).
    input: Vec<u8>,
    taken: usize,
    eof: bool,
    reading: Option<ReadOp>,
    /// What waits to be written (plaintext or ciphertext).
    output: Vec<u8>,
    writing: Option<WriteOp>,
    meter: FrameMeter,
    /// Set once the client went over its control-frame budget.
    flooded: Rc<Cell<bool>>,
}

impl H2Io {
    /// The transport of `stream`, with `tls` if it is TLS; `already` holds
    /// plaintext read before HTTP/2 was known (an h2c preface).
    pub fn new(
        stream: Stream,
        tls: Option<rustls::Connection>,
        already: Vec<u8>,
        control_per_second: u32,
    ) -> Self {
        Self {
            stream: Rc::new(stream),
            tls,
            input: already,
            taken: 0,
            eof: false,
            reading: None,
            output: Vec::new(),
            writing: None,
            meter: FrameMeter::new(control_per_second),
            flooded: Rc::new(Cell::new(false)),
        }
    }

    /// The transport of a connection to an upstream: its frames are not metered.
    pub fn upstream(stream: Stream, tls: Option<rustls::Connection>) -> Self {
        let mut io = Self::new(stream, tls, Vec::new(), u32::MAX);
        io.meter.scan = Scan::Off;
        io
    }

    /// A flag that turns true when the client floods control frames; the
    /// task reading is woken then, so it sees the flag on its next poll.
    pub fn flood_flag(&self) -> Rc<Cell<bool>> {
        self.flooded.clone()
    }

    /// A handle to the socket, to shut it down once `h2` is done with it.
    pub fn stream(&self) -> Rc<Stream> {
        self.stream.clone()
    }

    /// Completes the read in flight, or starts one; `Ok(false)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.eof {
            return Poll::Ready(Ok(false));
        }
        let op = self.reading.get_or_insert_with(|| {
            let stream = self.stream.clone();
            let mut buf = std::mem::take(&mut self.input);
            buf.clear();
            buf.reserve(READ_SIZE);
            Box::pin(async move { stream.read(buf).await })
        });
        let (res, buf) = ready!(op.as_mut().poll(cx));
        self.reading = None;
        self.input = buf;
        self.taken = 0;
        match res {
            Ok(0) => {
                self.eof = true;
                Poll::Ready(Ok(false))
            }
            Ok(_) => Poll::Ready(Ok(true)),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Moves what rustls has to send into `output` and writes `output` out;
    /// ready once everything queued is on the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(op) = &mut self.writing {
                let (res, mut buf) = ready!(op.as_mut().poll(cx));
                self.writing = None;
                res?;
                buf.clear();
                if self.output.is_empty() {
                    self.output = buf;
                }
            }
            if let Some(tls) = &mut self.tls {
                while tls.wants_write() {
                    tls.write_tls(&mut self.output)?;
                }
            }
            if self.output.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let stream = self.stream.clone();
            let buf = std::mem::take(&mut self.output);
            self.writing = Some(Box::pin(async move { stream.write_all(buf).await }));
        }
    }

    fn read_plain(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.taken < self.input.len() {
                let n = out.remaining().min(self.input.len() - self.taken);
                out.put_slice(&self.input[self.taken..self.taken + n]);
                self.taken += n;
                return Poll::Ready(Ok(()));
            }
            if !ready!(self.poll_fill(cx))? {
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn read_tls(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(tls) = &mut self.tls else {
                return Poll::Ready(Ok(()));
            };
            // Plaintext first: rustls takes no more ciphertext while its plaintext buffer is full.
            match tls.reader().read(out.initialize_unfilled()) {
                Ok(n) => {
                    out.advance(n);
                    if tls.wants_write() {
                        // Key updates and alerts rustls answers on its own.
                        let _ = self.poll_drain(cx);
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.taken < self.input.len() {
                let mut rest = &self.input[self.taken..];
                let before = rest.len();
                tls.read_tls(&mut rest)?;
                self.taken += before - rest.len();
                if let Err(e) = tls.process_new_packets() {
                    // Let the alert go out before the error ends the connection.
                    let _ = self.poll_drain(cx);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
                continue;
            }
            if !ready!(self.poll_fill(cx))? {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flooded.get() {
            // The connection is being told to calm down and closed; nothing more is read.
            return Poll::Pending;
        }
        let before = out.filled().len();
        let res = if this.tls.is_some() {
            ready!(this.read_tls(cx, out))
        } else {
            ready!(this.read_plain(cx, out))
        };
        if this.meter.scan(&out.filled()[before..], Instant::now()) {
            this.flooded.set(true);
            cx.waker().wake_by_ref();
        }
        Poll::Ready(res)
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let taken = if let Some(tls) = &mut this.tls {
                tls.writer().write(data)?
            } else {
                let n = WRITE_HIGH.saturating_sub(this.output.len()).min(data.len());
                this.output.extend_from_slice(&data[..n]);
                n
            };
            let drained = this.poll_drain(cx)?;
            if taken > 0 || data.is_empty() {
                return Poll::Ready(Ok(taken));
            }
            // Full: wait for the write in flight, then take more.
            ready!(drained);
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if let Some(tls) = &mut this.tls
            && tls.wants_write()
        {
            return this.poll_drain(cx);
        }
        if let Some(tls) = &mut this.tls {
            tls.send_close_notify();
            ready!(this.poll_drain(cx))?;
        }
        this.stream.shutdown_write();
        Poll::Ready(Ok(()))
    }
}

/// The client connection preface (RFC 9113 §3.4).
pub(in crate::proxy) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frames under this window increment count as control frames (the "data dribble").
const SMALL_WINDOW_UPDATE: u32 = 1024;

/// Where the meter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Inside the connection preface; bytes left.
    Preface(usize),
    /// Inside a frame header; bytes seen.
    Header(usize),
    /// Inside a WINDOW_UPDATE's increment; bytes of it seen, and payload bytes left.
    Increment(usize, usize),
    /// Inside a payload; bytes left.
    Payload(usize),
    /// Not metering (an upstream connection).
    Off,
}

/// Counts the control frames a client sends (SETTINGS and PING that are not
/// acknowledgements, PRIORITY, RST_STREAM, a WINDOW_UPDATE under
/// [`SMALL_WINDOW_UPDATE`], an empty DATA frame that does not end its
/// stream, frames of unknown type) against a token bucket. It reads only
/// frame headers; `h2` parses the frames themselves.
#[derive(Debug, Clone)]
pub(in crate::proxy) struct FrameMeter {
    scan: Scan,
    header: [u8; 9],
    increment: [u8; 4],
    tokens: u64,
    rate: u64,
    refilled: Instant,
}

impl FrameMeter {
    /// A meter allowing `per_second` control frames, with twice that as a burst.
    pub fn new(per_second: u32) -> Self {
        Self {
            scan: Scan::Preface(PREFACE.len()),
            header: [0; 9],
            increment: [0; 4],
            tokens: 2 * u64::from(per_second),
            rate: u64::from(per_second),
            refilled: Instant::now(),
        }
    }

    /// Scans bytes from the client; whether they went over the budget.
    pub fn scan(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        let mut over = false;
        while !bytes.is_empty() {
            match self.scan {
                Scan::Off => return false,
                Scan::Preface(left) | Scan::Payload(left) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    self.scan = if n == left {
                        Scan::Header(0)
                    } else if matches!(self.scan, Scan::Preface(_)) {
                        Scan::Preface(left - n)
                    } else {
                        Scan::Payload(left - n)
                    };
                }
                Scan::Header(seen) => {
                    let n = (9 - seen).min(bytes.len());
                    self.header[seen..seen + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if seen + n < 9 {
                        self.scan = Scan::Header(seen + n);
                    } else {
                        over |= self.on_header(now);
                    }
                }
                Scan::Increment(seen, left) => {
                    let n = (4 - seen).min(bytes.len());
                    self.increment[seen..seen + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if seen + n < 4 {
                        self.scan = Scan::Increment(seen + n, left);
                        continue;
                    }
                    let increment = u32::from_be_bytes(self.increment) & 0x7fff_ffff;
                    if increment < SMALL_WINDOW_UPDATE {
                        over |= self.spend(now);
                    }
                    self.scan = if left > 4 {
                        Scan::Payload(left - 4)
                    } else {
                        Scan::Header(0)
                    };
                }
            }
        }
        over
    }

    /// Where the scan stands and the tokens left: equal for two meters that
    /// saw the same bytes, however they were cut.
    pub fn position(&self) -> impl PartialEq + std::fmt::Debug {
        (self.scan, self.tokens)
    }

    /// A frame header is complete: count it if it is a control frame, and skip its payload.
    fn on_header(&mut self, now: Instant) -> bool {
        let h = self.header;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let ack = flags & 0x1 != 0;
        let control = match kind {
            0 => len == 0 && !ack,
            4 | 6 => !ack,
            8 if len >= 4 => {
                self.scan = Scan::Increment(0, len);
                return false;
            }
            // HEADERS, PUSH_PROMISE, GOAWAY, a malformed WINDOW_UPDATE (h2's to refuse), CONTINUATION.
            1 | 5 | 7 | 8 | 9 => false,
            // PRIORITY, RST_STREAM, and every type h2 would skip unread.
            _ => true,
        };
        self.scan = if len == 0 {
            Scan::Header(0)
        } else {
            Scan::Payload(len)
        };
        control && self.spend(now)
    }

    /// Takes one token; whether none was left.
    fn spend(&mut self, now: Instant) -> bool {
        if self.tokens == 0 {
            let elapsed = now.duration_since(self.refilled);
            let earned = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX) * self.rate / 1000;
            if earned == 0 {
                return true;
            }
            self.tokens = earned.min(2 * self.rate);
            self.refilled = now;
        }
        self.tokens -= 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len())
            .expect("a small payload")
            .to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn counts_control_frames_and_not_requests_or_acks() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(2);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(4, 0, &[0; 6])); // SETTINGS: 1
        bytes.extend(frame(4, 1, &[])); // SETTINGS ACK: free
        bytes.extend(frame(1, 4, &[0x82; 40])); // HEADERS: free
        bytes.extend(frame(0, 1, &[])); // empty DATA that ends the stream: free
        bytes.extend(frame(8, 0, &70_000u32.to_be_bytes())); // large WINDOW_UPDATE: free
        bytes.extend(frame(6, 0, &[0; 8])); // PING: 2
        bytes.extend(frame(6, 1, &[0; 8])); // PING ACK: free
        bytes.extend(frame(8, 0, &1u32.to_be_bytes())); // tiny WINDOW_UPDATE: 3
        // One byte at a time: frame boundaries across reads are kept.
        let mut over = false;
        for b in &bytes {
            over |= meter.scan(std::slice::from_ref(b), now);
        }
        assert!(!over, "3 of a burst of 4");
        assert!(!meter.scan(&frame(3, 0, &[0; 4]), now), "RST_STREAM: 4");
        assert!(meter.scan(&frame(2, 0, &[0; 5]), now), "PRIORITY: 5 is over");
        let later = now + std::time::Duration::from_secs(1);
        assert!(
            !meter.scan(&frame(0xfe, 0, &[1, 2]), later),
            "a second refills the bucket"
        );
    }

    #[test]
    fn a_flood_of_pings_is_caught() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(1000);
        let mut bytes = PREFACE.to_vec();
        for _ in 0..2001 {
            bytes.extend(frame(6, 0, &[7; 8]));
        }
        assert!(meter.scan(&bytes, now));
    }
}
