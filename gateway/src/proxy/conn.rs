//! A client or upstream connection, plain or TLS, with owned-buffer I/O.
//!
//! TLS runs rustls's `read_tls`/`write_tls` over the connection's own
//! ciphertext buffers, so the ring always owns what it reads into.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};

use super::io::{Stream, Transport as _};

/// Ciphertext read size; one TLS record plus header.
const TLS_READ: usize = 17 * 1024;

/// Appends the plaintext rustls holds to the spare capacity of `buf`: the
/// bytes taken, end of stream (`Ok(0)`, also for a peer that closed without
/// close_notify) or an error; `None` when more ciphertext must be read first.
fn take_plaintext(tls: &mut rustls::Connection, buf: &mut Vec<u8>) -> Option<io::Result<usize>> {
    let old = buf.len();
    buf.resize(buf.capacity(), 0);
    let got = tls.reader().read(&mut buf[old..]);
    buf.truncate(old + *got.as_ref().unwrap_or(&0));
    match got {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Some(Ok(0)),
        other => Some(other),
    }
}

/// A connection the proxy reads requests from or forwards them to.
#[derive(Debug)]
pub enum Conn {
    /// Cleartext.
    Plain(Stream),
    /// TLS over a stream.
    Tls(Box<TlsConn>),
}

/// TLS state of one connection.
#[derive(Debug)]
pub struct TlsConn {
    stream: Stream,
    tls: rustls::Connection,
    cipher_in: Vec<u8>,
    cipher_out: Vec<u8>,
    eof: bool,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Conn {
    /// Wraps `stream` in TLS and completes the handshake.
    pub async fn tls(stream: Stream, tls: impl Into<rustls::Connection>) -> io::Result<Self> {
        let mut conn = TlsConn {
            stream,
            tls: tls.into(),
            cipher_in: Vec::new(),
            cipher_out: Vec::new(),
            eof: false,
        };
        conn.handshake().await?;
        Ok(Self::Tls(Box::new(conn)))
    }

    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` is end of stream.
    pub async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            Self::Plain(stream) => stream.read(buf).await,
            Self::Tls(tls) => tls.read(buf).await,
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Self::Plain(stream) => stream.write_all(buf).await,
            Self::Tls(tls) => {
                let res = tls.write_all(&buf).await;
                (res, buf)
            }
        }
    }

    /// Shuts the connection down in both directions.
    pub fn shutdown(&self) {
        match self {
            Self::Plain(stream) => stream.shutdown(),
            Self::Tls(tls) => tls.stream.shutdown(),
        }
    }

    /// Ends the sending direction, with TLS close_notify first (RFC 9112
    /// §9.8); what the peer still sends can be read.
    pub async fn close_write(&mut self) {
        match self {
            Self::Plain(stream) => stream.shutdown_write(),
            Self::Tls(tls) => {
                tls.tls.send_close_notify();
                let _ = tls.flush().await;
                tls.stream.shutdown_write();
            }
        }
    }

    /// Sends TLS close_notify if this is TLS, then shuts down.
    pub async fn close(mut self) {
        if let Self::Tls(tls) = &mut self {
            tls.tls.send_close_notify();
            let _ = tls.flush().await;
        }
        self.shutdown();
    }

    /// SNI name the client asked for (inbound TLS only).
    pub fn server_name(&self) -> Option<&str> {
        match self {
            Self::Tls(tls) => match &tls.tls {
                rustls::Connection::Server(s) => s.server_name(),
                rustls::Connection::Client(_) => None,
            },
            Self::Plain(_) => None,
        }
    }

    /// Whether an idle (pooled) connection can carry another request.
    pub fn is_idle_and_open(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_idle_and_open(),
            Self::Tls(tls) => tls.stream.is_idle_and_open(),
        }
    }

    /// Whether this connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// The protocol the TLS handshake settled on by ALPN.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Self::Tls(tls) => tls.tls.alpn_protocol(),
            Self::Plain(_) => None,
        }
    }

    /// The stream and, for TLS, its rustls state, for a protocol that drives
    /// them itself. Every ciphertext byte read so far is already inside rustls.
    pub fn into_parts(self) -> (Stream, Option<rustls::Connection>) {
        match self {
            Self::Plain(stream) => (stream, None),
            Self::Tls(tls) => {
                let TlsConn { stream, tls, .. } = *tls;
                (stream, Some(tls))
            }
        }
    }
}

impl TlsConn {
    async fn handshake(&mut self) -> io::Result<()> {
        while self.tls.is_handshaking() {
            if self.tls.wants_write() {
                self.flush().await?;
            } else if self.read_tls().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ));
            }
        }
        self.flush().await
    }

    /// Reads one batch of ciphertext and processes it; returns bytes read.
    async fn read_tls(&mut self) -> io::Result<usize> {
        let mut cipher = std::mem::take(&mut self.cipher_in);
        cipher.clear();
        cipher.reserve(TLS_READ);
        let (res, cipher) = self.stream.read(cipher).await;
        self.cipher_in = cipher;
        let n = res?;
        if n == 0 {
            self.eof = true;
            return Ok(0);
        }
        let mut input = &self.cipher_in[..n];
        while !input.is_empty() {
            self.tls.read_tls(&mut input)?;
            if let Err(e) = self.tls.process_new_packets() {
                // Send the alert explaining why before giving up.
                let _ = self.flush().await;
                return Err(tls_err(e));
            }
        }
        Ok(n)
    }

    async fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            let mut out = std::mem::take(&mut self.cipher_out);
            out.clear();
            while self.tls.wants_write() {
                self.tls.write_tls(&mut out)?;
            }
            let (res, out) = self.stream.write_all(out).await;
            self.cipher_out = out;
            res?;
        }
        Ok(())
    }

    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        loop {
            if let Some(done) = take_plaintext(&mut self.tls, &mut buf) {
                return (done, buf);
            }
            if self.eof {
                return (Ok(0), buf);
            }
            if let Err(e) = self.flush().await {
                return (Err(e), buf);
            }
            if let Err(e) = self.read_tls().await {
                return (Err(e), buf);
            }
        }
    }

    async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.tls.writer().write(data)?;
            data = &data[n..];
            self.flush().await?;
        }
        Ok(())
    }
}

/// A connection split for a tunnel: reads and writes may be in flight at
/// the same time, from two tasks' worth of work joined on one worker.
pub struct Duplex<'a> {
    stream: &'a Stream,
    tls: Option<SharedTls<'a>>,
}

/// The TLS state both directions of a [`Duplex`] share. A borrow of the
/// rustls connection never spans an await; ciphertext writes take the lock,
/// so records reach the socket in the order rustls produced them.
struct SharedTls<'a> {
    tls: RefCell<&'a mut rustls::Connection>,
    cipher_in: Cell<Vec<u8>>,
    eof: Cell<bool>,
    cipher_out: tokio::sync::Mutex<Vec<u8>>,
}

impl std::fmt::Debug for Duplex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Duplex")
            .field("stream", self.stream)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Conn {
    /// Splits the connection for a tunnel; it is closed, not reused, after.
    pub fn duplex(&mut self) -> Duplex<'_> {
        match self {
            Self::Plain(stream) => Duplex { stream, tls: None },
            Self::Tls(t) => {
                let t = &mut **t;
                Duplex {
                    stream: &t.stream,
                    tls: Some(SharedTls {
                        tls: RefCell::new(&mut t.tls),
                        cipher_in: Cell::new(std::mem::take(&mut t.cipher_in)),
                        eof: Cell::new(t.eof),
                        cipher_out: tokio::sync::Mutex::new(std::mem::take(&mut t.cipher_out)),
                    }),
                }
            }
        }
    }
}

impl Duplex<'_> {
    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` is end of stream.
    pub async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let Some(tls) = &self.tls else {
            return self.stream.read(buf).await;
        };
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        loop {
            let taken = take_plaintext(&mut tls.tls.borrow_mut(), &mut buf);
            if let Some(done) = taken {
                return (done, buf);
            }
            if tls.eof.get() {
                return (Ok(0), buf);
            }
            if let Err(e) = self.read_tls(tls).await {
                return (Err(e), buf);
            }
        }
    }

    /// Reads one batch of ciphertext, processes it, and sends what rustls
    /// has to say in return (alerts, key updates).
    async fn read_tls(&self, tls: &SharedTls<'_>) -> io::Result<()> {
        let mut cipher = tls.cipher_in.take();
        cipher.clear();
        cipher.reserve(TLS_READ);
        let (res, cipher) = self.stream.read(cipher).await;
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                tls.cipher_in.set(cipher);
                return Err(e);
            }
        };
        if n == 0 {
            tls.eof.set(true);
        }
        let processed = {
            let mut conn = tls.tls.borrow_mut();
            let mut input = &cipher[..n];
            let mut result = Ok(());
            while !input.is_empty() && result.is_ok() {
                result = conn
                    .read_tls(&mut input)
                    .and_then(|_| conn.process_new_packets().map(drop).map_err(tls_err));
            }
            result
        };
        tls.cipher_in.set(cipher);
        let flushed = self.flush(tls).await;
        processed.and(flushed)
    }

    /// Writes out every record rustls has queued, under the write lock.
    async fn flush(&self, tls: &SharedTls<'_>) -> io::Result<()> {
        let mut out = tls.cipher_out.lock().await;
        self.flush_locked(tls, &mut out).await
    }

    async fn flush_locked(&self, tls: &SharedTls<'_>, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            out.clear();
            {
                let mut conn = tls.tls.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(out)?;
                }
            }
            if out.is_empty() {
                return Ok(());
            }
            let (res, back) = self.stream.write_all(std::mem::take(out)).await;
            *out = back;
            res?;
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let Some(tls) = &self.tls else {
            return self.stream.write_all(buf).await;
        };
        let mut out = tls.cipher_out.lock().await;
        let mut data = &buf[..];
        while !data.is_empty() {
            let written = tls.tls.borrow_mut().writer().write(data);
            match written {
                Ok(n) => data = &data[n..],
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.flush_locked(tls, &mut out).await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Ends the sending direction (with TLS close_notify first), keeping the read side open.
    pub async fn shutdown_write(&self) {
        if let Some(tls) = &self.tls {
            tls.tls.borrow_mut().send_close_notify();
            let _ = self.flush(tls).await;
        }
        self.stream.shutdown_write();
    }

    /// Shuts both directions down, completing any read still in flight.
    pub fn shutdown(&self) {
        self.stream.shutdown();
    }
}
