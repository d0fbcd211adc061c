//! The proxy's I/O layer: the only module that names the io_uring runtime.
//!
//! Routing, HTTP and TLS see a [`Stream`] with owned-buffer `read`/`write_all`
//! (the [`Transport`] operations) and `spawn`/`start`; swapping tokio-uring
//! for another completion-based runtime (compio) means rewriting this file
//! only. A stream is a TCP connection on the ring or, in tests, an in-memory
//! one ([`mem`]), so the whole data path runs in plain `cargo test`.

pub mod mem;

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio_uring::buf::BoundedBuf;

/// The owned-buffer operations every connection offers, whatever carries it.
/// Buffers are moved in and handed back, as a completion-based ring needs.
pub trait Transport {
    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` is end of stream.
    fn read(&self, buf: Vec<u8>) -> impl Future<Output = (io::Result<usize>, Vec<u8>)>;
    /// Writes all of `buf`.
    fn write_all(&self, buf: Vec<u8>) -> impl Future<Output = (io::Result<()>, Vec<u8>)>;
    /// Whether an idle connection is still usable: no EOF, reset or stray bytes wait.
    fn is_idle_and_open(&self) -> bool;
    /// Shuts both directions down, completing any read still in flight.
    fn shutdown(&self);
    /// Sends the end of stream after what is queued, keeping the read side open.
    fn shutdown_write(&self);
}

/// A connection of the data path. An enum rather than a `dyn Transport`:
/// static dispatch, and no boxed future per operation.
#[derive(Debug)]
pub enum Stream {
    /// TCP on the worker's ring.
    Tcp(TcpConn),
    /// In memory (tests).
    Mem(mem::MemConn),
}

impl From<TcpConn> for Stream {
    fn from(tcp: TcpConn) -> Self {
        Self::Tcp(tcp)
    }
}

impl From<mem::MemConn> for Stream {
    fn from(conn: mem::MemConn) -> Self {
        Self::Mem(conn)
    }
}

impl Transport for Stream {
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            Self::Tcp(c) => c.read(buf).await,
            Self::Mem(c) => c.read(buf).await,
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Self::Tcp(c) => c.write_all(buf).await,
            Self::Mem(c) => c.write_all(buf).await,
        }
    }

    fn is_idle_and_open(&self) -> bool {
        match self {
            Self::Tcp(c) => c.is_idle_and_open(),
            Self::Mem(c) => c.is_idle_and_open(),
        }
    }

    fn shutdown(&self) {
        match self {
            Self::Tcp(c) => c.shutdown(),
            Self::Mem(c) => c.shutdown(),
        }
    }

    fn shutdown_write(&self) {
        match self {
            Self::Tcp(c) => c.shutdown_write(),
            Self::Mem(c) => c.shutdown_write(),
        }
    }
}

/// How a worker reaches upstream endpoints.
#[derive(Debug, Clone, Default)]
pub enum Connector {
    /// Real TCP.
    #[default]
    Tcp,
    /// The in-memory peers of a [`mem::Network`] (tests).
    Mem(mem::Network),
}

impl Connector {
    /// Connects to `addr`, giving up after `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<Stream> {
        match self {
            Self::Tcp => TcpConn::connect(addr, timeout).await.map(Stream::Tcp),
            Self::Mem(net) => net.connect(addr).map(Stream::Mem),
        }
    }
}

/// Checks that this host lets the process create an io_uring.
pub fn probe() -> Result<(), String> {
    match io_uring::IoUring::new(4) {
        Ok(_) => Ok(()),
        Err(e) => {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
            Err(unavailable(&e, &sysctl))
        }
    }
}

/// The one line said at start when io_uring cannot be used, and why.
fn unavailable(error: &io::Error, io_uring_disabled: &str) -> String {
    let why = match io_uring_disabled.trim() {
        "2" => "kernel.io_uring_disabled=2 disables it for every process; set it to 0".to_string(),
        "1" => "kernel.io_uring_disabled=1 limits it to members of kernel.io_uring_group; add the gateway's group or set it to 0".to_string(),
        _ => format!("io_uring_setup failed ({error}); a seccomp profile or container runtime is blocking it"),
    };
    format!("io_uring is unavailable on this host: {why}. The portcullis proxy runs on io_uring")
}

/// Submission queue size: one in-flight read per open connection is common, and
/// a full queue forces a synchronous submit.
const RING_ENTRIES: u32 = 4096;

/// Runs `fut` to completion on a new io_uring runtime on this thread.
///
/// The ring has one submitter (`SINGLE_ISSUER`) and runs completions when
/// the worker next enters the kernel instead of interrupting it with an IPI
/// (`COOP_TASKRUN`), where the kernel has them (6.0, 5.19).
pub fn start<F: Future>(fut: F) -> F::Output {
    let mut tuned = tokio_uring::uring_builder();
    tuned.setup_coop_taskrun().setup_single_issuer();
    let setup = if tuned.build(4).is_ok() {
        tuned
    } else {
        tokio_uring::uring_builder()
    };
    tokio_uring::builder()
        .entries(RING_ENTRIES)
        .uring_builder(&setup)
        .start(fut)
}

/// Spawns a task on the current thread's runtime.
pub fn spawn<F: Future + 'static>(fut: F) {
    drop(tokio_uring::spawn(fut));
}

/// Binds a listening socket with SO_REUSEPORT so each worker thread owns one.
pub fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// A listening socket on the current worker's ring.
pub struct Listener(tokio_uring::net::TcpListener);

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Listener")
            .field(&self.0.local_addr().ok())
            .finish()
    }
}

impl Listener {
    /// Adopts a bound std listener; must be called inside [`start`].
    pub fn from_std(listener: std::net::TcpListener) -> Self {
        Self(tokio_uring::net::TcpListener::from_std(listener))
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<(TcpConn, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        Ok((TcpConn(stream), peer))
    }
}

/// A TCP connection on the current worker's ring.
pub struct TcpConn(tokio_uring::net::TcpStream);

impl std::fmt::Debug for TcpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TcpConn")
    }
}

impl TcpConn {
    /// Connects to `addr`, giving up after `timeout`.
    ///
    /// The connect itself waits on the tokio reactor that runs beside the
    /// ring: its future owns the socket, so a timeout closes it at once.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_nodelay(true)?;
        let stream = tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let std = stream.into_std()?;
        std.set_nonblocking(false)?;
        Ok(Self(tokio_uring::net::TcpStream::from_std(std)))
    }
}

impl Transport for TcpConn {
    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` is end of stream.
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        let len = buf.len();
        let (res, slice) = self.0.read(buf.slice(len..)).await;
        (res, slice.into_inner())
    }

    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if buf.is_empty() {
            return (Ok(()), buf);
        }
        self.0.write_all(buf).await
    }

    /// Whether an idle connection is still usable: no EOF, reset or stray
    /// bytes from the peer are waiting (checked without blocking).
    #[expect(unsafe_code, reason = "tokio-uring's stream exposes only a raw descriptor")]
    fn is_idle_and_open(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::{AsRawFd, BorrowedFd};
        let raw = self.0.as_raw_fd();
        // SAFETY: `self.0` owns the descriptor and outlives the borrow, which ends with this call.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// Shuts both directions down, which also completes any read still in flight.
    fn shutdown(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }

    /// Sends FIN after what is queued, keeping the read side open.
    fn shutdown_write(&self) {
        let _ = self.0.shutdown(Shutdown::Write);
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        // An operation still in flight holds the descriptor open until it
        // completes; shutting down completes it, so the socket really closes.
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_why_io_uring_is_unavailable() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(unavailable(&eperm, "2\n").contains("kernel.io_uring_disabled=2"));
        assert!(unavailable(&eperm, "1").contains("io_uring_group"));
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert!(unavailable(&enosys, "0").contains("seccomp"));
        assert!(probe().is_ok(), "this machine has io_uring");
    }
}
