//! The proxy's I/O layer: the only module that knows the io_uring.
//!
//! Routing, HTTP and TLS see a [`Stream`] with owned-buffer `read`/`write_all`
//! (the [`Transport`] operations) and `spawn`/`start`; the ring itself
//! ([`ring`]) is driven directly with the `io-uring` crate, and nothing
//! outside this module knows. A stream is a TCP connection on the ring or, in tests, an in-memory
//! one ([`mem`]), so the whole data path runs in plain `cargo test`.

pub mod mem;
mod ring;

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

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

/// Runs `fut` to completion on this thread: a tokio reactor for timers and
/// the control sockets, with the worker's io_uring ([`ring`]) beside it.
pub fn start<F: Future>(fut: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(ring::flush)
        .build()
        .expect("a current-thread tokio runtime is built from memory alone");
    let local = tokio::task::LocalSet::new();
    let ring_fd = ring::install(RING_ENTRIES).expect("io_uring is available (checked by probe at start)");
    let out = runtime.block_on(async {
        local.spawn_local(ring::drive(ring_fd));
        local.run_until(fut).await
    });
    // Tasks still parked hold connections whose drops reach the ring.
    drop(local);
    drop(runtime);
    ring::uninstall();
    out
}

/// Returns the pages of the worker's idle receive buffers to the kernel.
pub fn trim() {
    ring::trim();
}

/// Spawns a task on the current thread's runtime.
pub fn spawn<F: Future + 'static>(fut: F) {
    drop(tokio::task::spawn_local(fut));
}

/// Binds a listening socket with SO_REUSEPORT so each worker thread owns one.
///
/// `TCP_NODELAY` is set here: accepted connections inherit it.
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

/// A listening socket on the current worker's ring, with one multishot
/// accept armed while anyone waits.
pub struct Listener {
    socket: Option<std::net::TcpListener>,
    arrivals: Rc<ring::Arrivals>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Listener")
            .field(&self.socket.as_ref().and_then(|s| s.local_addr().ok()))
            .finish()
    }
}

impl Listener {
    /// Adopts a bound std listener; must be called inside [`start`].
    pub fn from_std(listener: std::net::TcpListener) -> Self {
        Self {
            socket: Some(listener),
            arrivals: ring::Arrivals::new(),
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<(TcpConn, SocketAddr)> {
        let socket = self
            .socket
            .as_ref()
            .expect("a listener has its socket until dropped");
        let fd = ring::accept(socket.as_raw_fd(), &self.arrivals).await?;
        let stream = std::net::TcpStream::from(fd);
        let peer = stream.peer_addr()?;
        Ok((TcpConn::from_std(stream), peer))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.arrivals.disarm();
        if let Some(socket) = self.socket.take() {
            ring::close_later(socket.into());
        }
    }
}

/// A TCP connection on the current worker's ring. Its receive stays armed
/// (multishot, into the worker's provided buffers) while it is open, so an
/// idle connection's close or stray bytes are known without a system call.
pub struct TcpConn {
    stream: Option<std::net::TcpStream>,
    inbox: Rc<ring::Inbox>,
}

impl std::fmt::Debug for TcpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TcpConn")
    }
}

impl TcpConn {
    fn from_std(stream: std::net::TcpStream) -> Self {
        Self {
            stream: Some(stream),
            inbox: ring::Inbox::new(),
        }
    }

    fn fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }

    fn socket(&self) -> &std::net::TcpStream {
        self.stream
            .as_ref()
            .expect("a connection has its socket until dropped")
    }

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
        Ok(Self::from_std(std))
    }
}

impl Transport for TcpConn {
    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` is end of stream.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        ring::recv(self.fd(), &self.inbox, buf).await
    }

    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        ring::send_all(self.fd(), buf).await
    }

    /// Whether an idle connection is still usable: no EOF, reset or stray
    /// bytes from the peer are waiting. The armed receive knows; without
    /// one (provided buffers ran out) the socket is asked without blocking.
    fn is_idle_and_open(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        if let Some(known) = self.inbox.idle_and_open() {
            return known;
        }
        let mut fds = [PollFd::new(self.socket().as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// Shuts both directions down, which also completes any read still in flight.
    fn shutdown(&self) {
        let _ = self.socket().shutdown(Shutdown::Both);
    }

    /// Sends FIN after what is queued, keeping the read side open.
    fn shutdown_write(&self) {
        let _ = self.socket().shutdown(Shutdown::Write);
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        // An operation in flight holds the socket open until it completes;
        // shutting down completes it, so the socket really closes.
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(Shutdown::Both);
            ring::close_later(stream.into());
        }
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

    /// A connected pair over loopback: (the side `connect` made, the side accepted).
    async fn tcp_pair(listener: &Listener, addr: SocketAddr) -> (TcpConn, TcpConn) {
        let (ours, accepted) =
            tokio::join!(TcpConn::connect(addr, Duration::from_secs(5)), listener.accept());
        (ours.expect("connected"), accepted.expect("accepted").0)
    }

    fn loopback_listener() -> (Listener, SocketAddr) {
        let socket = bind_reuseport("127.0.0.1:0".parse().expect("addr"), 1024).expect("bound");
        let addr = socket.local_addr().expect("bound address");
        (Listener::from_std(socket), addr)
    }

    async fn read_exactly(conn: &TcpConn, len: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        while got.len() < len {
            let (n, buf) = conn.read(got).await;
            got = buf;
            assert_ne!(
                n.expect("read"),
                0,
                "the stream ended after {} of {len} bytes",
                got.len()
            );
        }
        got
    }

    /// Waits, a scheduler pass at a time, until `done` holds; fails after 5 s.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}: not within 5 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[test]
    fn bytes_cross_a_tcp_connection_in_order_past_what_the_ring_holds() {
        start(async {
            let (listener, addr) = loopback_listener();
            let (a, b) = tcp_pair(&listener, addr).await;
            // Well past HOLD_MAX: the receive is cancelled and re-armed as the reader drains.
            let sent: Vec<u8> = (0..1_000_000usize)
                .map(|i| u8::try_from(i % 251).expect("below 251"))
                .collect();
            let writer = tokio::task::spawn_local(async move {
                let (res, _) = a.write_all(sent).await;
                res.expect("written");
                a
            });
            let got = read_exactly(&b, 1_000_000).await;
            let a = writer.await.expect("writer");
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, &byte)| byte == u8::try_from(i % 251).expect("below 251")),
                "bytes arrived in order"
            );
            assert!(b.is_idle_and_open(), "nothing else waits and the peer is open");
            a.shutdown_write();
            let (n, _) = b.read(Vec::new()).await;
            assert_eq!(n.expect("end of stream"), 0);
            assert!(!b.is_idle_and_open(), "the peer's end was seen");
        });
    }

    #[test]
    fn an_idle_connection_knows_of_stray_bytes_and_of_the_peers_close() {
        start(async {
            let (listener, addr) = loopback_listener();
            let (pooled, upstream) = tcp_pair(&listener, addr).await;
            let (res, _) = upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
                .await;
            res.expect("written");
            let _ = read_exactly(&pooled, 40).await;
            assert!(pooled.is_idle_and_open(), "a drained connection is reusable");
            let (res, _) = upstream.write_all(b"x".to_vec()).await;
            res.expect("written");
            eventually("stray bytes seen", || !pooled.is_idle_and_open()).await;

            let (pooled, upstream) = tcp_pair(&listener, addr).await;
            let (n, buf) = tokio::time::timeout(Duration::from_millis(20), pooled.read(Vec::new()))
                .await
                .map_or((Ok(usize::MAX), Vec::new()), |r| r);
            assert_eq!(
                (n.expect("no error"), buf.len()),
                (usize::MAX, 0),
                "nothing was sent: the read waits"
            );
            assert!(
                pooled.is_idle_and_open(),
                "a read given up on leaves the receive armed"
            );
            drop(upstream);
            eventually("the close seen", || !pooled.is_idle_and_open()).await;
        });
    }

    #[test]
    fn connections_holding_more_than_the_provided_buffers_all_deliver_in_order() {
        start(async {
            let (listener, addr) = loopback_listener();
            let mut pairs = Vec::new();
            for _ in 0..400 {
                pairs.push(tcp_pair(&listener, addr).await);
            }
            // 400 readers arm their receives, then 400 × 48 KiB arrive at
            // once: three or four buffers each, more than the ring lends even
            // after it has grown to its 1,024.
            for (_, b) in &pairs {
                let waited = tokio::time::timeout(Duration::from_millis(1), b.read(Vec::new())).await;
                assert!(waited.is_err(), "nothing was sent yet");
            }
            for (i, (a, _)) in pairs.iter().enumerate() {
                for _ in 0..4 {
                    let (res, _) = a
                        .write_all(vec![u8::try_from(i % 256).expect("below 256"); 12 * 1024])
                        .await;
                    res.expect("written");
                }
            }
            for (i, (_, b)) in pairs.iter().enumerate() {
                let got = read_exactly(b, 48 * 1024).await;
                assert!(
                    got.iter()
                        .all(|&byte| byte == u8::try_from(i % 256).expect("below 256")),
                    "connection {i} got its own bytes"
                );
            }
            assert!(
                ring::starved_receives() > 0,
                "the ring ran out of buffers at least once"
            );
        });
    }

    #[test]
    fn a_dropped_listener_stops_accepting() {
        start(async {
            let (listener, addr) = loopback_listener();
            let (a, b) = tcp_pair(&listener, addr).await;
            drop((a, b, listener));
            // The cancel and the close reach the kernel when the worker next parks.
            let refused = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    match TcpConn::connect(addr, Duration::from_secs(1)).await {
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
                        Err(e) => panic!("connect failed other than refused: {e}"),
                        Ok(_) => {}
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(5), refused)
                .await
                .expect("the port refuses connections once its listener is dropped");
        });
    }
}
