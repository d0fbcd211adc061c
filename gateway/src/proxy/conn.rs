//! A client or upstream connection, plain or TLS, with owned-buffer I/O.
//!
//! TLS runs rustls's `read_tls`/`write_tls` over the connection's own
//! ciphertext buffers, so the ring always owns what it reads into.

use std::io::{self, Read, Write};

use super::io::{Stream, Transport as _};

/// Ciphertext read size; one TLS record plus header.
const TLS_READ: usize = 17 * 1024;

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
            let old = buf.len();
            buf.resize(buf.capacity(), 0);
            let got = self.tls.reader().read(&mut buf[old..]);
            match got {
                Ok(n) => {
                    buf.truncate(old + n);
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.truncate(old),
                Err(e) => {
                    buf.truncate(old);
                    // A peer that closes without close_notify ends the stream too.
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        return (Ok(0), buf);
                    }
                    return (Err(e), buf);
                }
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
