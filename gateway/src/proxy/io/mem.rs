//! In-memory connections: the data path driven by scripted peers in plain
//! `cargo test`, with no socket, namespace or root. A [`Network`] stands in
//! for the upstreams' addresses; [`pair`] makes both ends of one connection.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::sync::{Notify, mpsc};

/// One direction of a connection.
#[derive(Debug, Default)]
struct Half {
    data: RefCell<VecDeque<u8>>,
    closed: Cell<bool>,
    readable: Notify,
}

impl Half {
    fn close(&self) {
        self.closed.set(true);
        self.readable.notify_one();
    }
}

/// One end of an in-memory connection.
#[derive(Debug)]
pub struct MemConn {
    inbox: Rc<Half>,
    outbox: Rc<Half>,
}

/// Both ends of a new connection.
pub fn pair() -> (MemConn, MemConn) {
    let (a, b) = (Rc::new(Half::default()), Rc::new(Half::default()));
    (
        MemConn {
            inbox: a.clone(),
            outbox: b.clone(),
        },
        MemConn { inbox: b, outbox: a },
    )
}

impl super::Transport for MemConn {
    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` once the peer closed.
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        loop {
            {
                let mut data = self.inbox.data.borrow_mut();
                if !data.is_empty() {
                    let n = data.len().min(buf.capacity() - buf.len());
                    buf.extend(data.drain(..n));
                    return (Ok(n), buf);
                }
            }
            if self.inbox.closed.get() {
                return (Ok(0), buf);
            }
            self.inbox.readable.notified().await;
        }
    }

    /// Writes all of `buf`; fails once the peer shut its reading side.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if self.outbox.closed.get() {
            return (Err(io::ErrorKind::BrokenPipe.into()), buf);
        }
        self.outbox.data.borrow_mut().extend(&buf);
        self.outbox.readable.notify_one();
        (Ok(()), buf)
    }

    /// Whether nothing is waiting to be read and the peer has not closed.
    fn is_idle_and_open(&self) -> bool {
        self.inbox.data.borrow().is_empty() && !self.inbox.closed.get()
    }

    /// Closes both directions: the peer reads the end, and its writes fail.
    fn shutdown(&self) {
        self.outbox.close();
        self.inbox.close();
    }

    /// Closes the sending direction: the peer reads the end after what was sent.
    fn shutdown_write(&self) {
        self.outbox.close();
    }
}

impl Drop for MemConn {
    fn drop(&mut self) {
        self.outbox.close();
        self.inbox.close();
    }
}

/// Addresses that in-memory peers listen on, for a worker's [`super::Connector`].
#[derive(Debug, Clone, Default)]
pub struct Network(Rc<RefCell<HashMap<SocketAddr, mpsc::UnboundedSender<MemConn>>>>);

/// Connections made to one address of a [`Network`].
#[derive(Debug)]
pub struct MemListener(mpsc::UnboundedReceiver<MemConn>);

impl MemListener {
    /// The next connection; `None` once the network is gone.
    pub async fn accept(&mut self) -> Option<MemConn> {
        self.0.recv().await
    }
}

impl Network {
    /// Listens on `addr`; a later listen on the same address replaces it.
    pub fn listen(&self, addr: SocketAddr) -> MemListener {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0.borrow_mut().insert(addr, tx);
        MemListener(rx)
    }

    /// Connects to `addr`; refused when nothing listens there.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<MemConn> {
        let (ours, theirs) = pair();
        let listeners = self.0.borrow();
        let listener = listeners.get(&addr).ok_or(io::ErrorKind::ConnectionRefused)?;
        listener
            .send(theirs)
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(ours)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Transport as _;
    use super::*;

    #[test]
    fn bytes_cross_in_order_and_a_close_ends_the_stream() {
        super::super::start(async {
            let (a, b) = pair();
            let (res, _) = a.write_all(b"hello ".to_vec()).await;
            res.expect("written");
            let (res, _) = a.write_all(b"world".to_vec()).await;
            res.expect("written");
            a.shutdown_write();
            let mut got = Vec::new();
            loop {
                let (n, buf) = b.read(got).await;
                got = buf;
                if n.expect("read") == 0 {
                    break;
                }
            }
            assert_eq!(got, b"hello world");
            assert!(!b.is_idle_and_open(), "the peer closed");
            drop(b);
            let (res, _) = a.write_all(b"late".to_vec()).await;
            assert_eq!(res.map_err(|e| e.kind()), Err(io::ErrorKind::BrokenPipe));
        });
    }

    #[test]
    fn a_network_refuses_addresses_nobody_listens_on() {
        super::super::start(async {
            let net = Network::default();
            let addr: SocketAddr = "10.0.0.1:80".parse().expect("addr");
            assert_eq!(
                net.connect(addr).map(drop).map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionRefused)
            );
            let mut listener = net.listen(addr);
            let ours = net.connect(addr).expect("connected");
            let theirs = listener.accept().await.expect("accepted");
            let (res, _) = ours.write_all(b"x".to_vec()).await;
            res.expect("written");
            let (n, buf) = theirs.read(Vec::new()).await;
            assert_eq!((n.expect("read"), buf), (1, b"x".to_vec()));
        });
    }
}
