//! Idle upstream connections of one worker, kept for reuse, and the read
//! buffers they lend each other.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::conn::Conn;

/// An idle upstream connection kept for reuse. It holds no buffer: an idle
/// connection costs its socket and its armed receive, not a read buffer's
/// pages, however many of them wait.
#[derive(Debug)]
pub struct Pooled {
    /// The connection.
    pub conn: Conn,
    idle_since: Instant,
}

/// Idle upstream connections of one worker, keyed by (upstream id, endpoint),
/// and the read buffers their last exchanges left.
#[derive(Debug)]
pub struct Pool {
    idle: RefCell<HashMap<(u64, usize), Vec<Pooled>>>,
    /// Emptied read buffers, at most [`SPARE_MAX`], so steady traffic allocates nothing.
    spare: RefCell<Vec<Vec<u8>>>,
    /// When a spare buffer was last taken or given.
    spare_used: Cell<Instant>,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            idle: RefCell::default(),
            spare: RefCell::default(),
            spare_used: Cell::new(Instant::now()),
        }
    }
}

/// Longest an upstream connection sits idle before it is closed.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Time without use after which the spare buffers are freed.
const BUFFER_IDLE: Duration = Duration::from_secs(2);
/// How often each worker sweeps its pool.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Most idle connections per endpoint per worker.
const POOL_MAX: usize = 1024;
/// Most spare read buffers per worker.
const SPARE_MAX: usize = 32;
/// Capacity of a new upstream read buffer.
const UPSTREAM_BUF: usize = 32 * 1024;

impl Pool {
    /// An idle connection to the endpoint, if a fresh one is pooled, with a
    /// read buffer from [`Pool::buffer`].
    pub fn take(&self, service: u64, endpoint: usize) -> Option<(Conn, Vec<u8>)> {
        let conn = {
            let mut idle = self.idle.borrow_mut();
            let list = idle.get_mut(&(service, endpoint))?;
            loop {
                let p = list.pop()?;
                // A connection the upstream closed while it sat here is dropped, not tried.
                if p.idle_since.elapsed() < POOL_IDLE && p.conn.is_idle_and_open() {
                    break p.conn;
                }
            }
        };
        Some((conn, self.buffer()))
    }

    /// A read buffer for an upstream exchange: a spare one, emptied, when
    /// one is kept, else a new one of [`UPSTREAM_BUF`].
    pub fn buffer(&self) -> Vec<u8> {
        let Some(buf) = self.spare.borrow_mut().pop() else {
            return Vec::with_capacity(UPSTREAM_BUF);
        };
        self.spare_used.set(Instant::now());
        buf
    }

    /// Closes connections idle past [`POOL_IDLE`] and frees the spare
    /// buffers once none has been used for [`BUFFER_IDLE`], so a burst leaves
    /// no memory behind. Returns the bytes of buffer it freed.
    pub fn sweep(&self) -> usize {
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|p| p.idle_since.elapsed() < POOL_IDLE);
        }
        idle.retain(|_, list| !list.is_empty());
        if self.spare_used.get().elapsed() < BUFFER_IDLE {
            return 0;
        }
        std::mem::take(&mut *self.spare.borrow_mut())
            .iter()
            .map(Vec::capacity)
            .sum()
    }

    /// Returns a connection whose last exchange completed cleanly; its read
    /// buffer, emptied, becomes a spare.
    pub fn put(&self, service: u64, endpoint: usize, conn: Conn, mut buf: Vec<u8>) {
        let mut spare = self.spare.borrow_mut();
        if spare.len() < SPARE_MAX && buf.capacity() > 0 {
            buf.clear();
            spare.push(buf);
            self.spare_used.set(Instant::now());
        }
        drop(spare);
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry((service, endpoint)).or_default();
        if list.len() < POOL_MAX {
            list.push(Pooled {
                conn,
                idle_since: Instant::now(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::io::{self, Stream, TcpConn};

    #[test]
    fn idle_connections_hold_no_buffer_and_a_sweep_frees_the_spares() {
        io::start(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
            let addr = listener.local_addr().expect("address");
            let pool = Pool::default();
            let mut accepted = Vec::new();
            for _ in 0..SPARE_MAX + 2 {
                let conn = TcpConn::connect(addr, Duration::from_secs(5))
                    .await
                    .expect("connected");
                accepted.push(listener.accept().expect("accepted"));
                pool.put(1, 0, Conn::Plain(Stream::Tcp(conn)), Vec::with_capacity(20_000));
            }
            assert_eq!(pool.spare.borrow().len(), SPARE_MAX, "spares are bounded");
            assert_eq!(pool.sweep(), 0, "spares used just now are kept");
            let (_, buf) = pool.take(1, 0).expect("a pooled connection");
            assert!(buf.capacity() >= 20_000 && buf.is_empty(), "a take lends a spare");
            pool.spare_used
                .set(Instant::now().checked_sub(BUFFER_IDLE).expect("after boot"));
            assert!(
                pool.sweep() >= (SPARE_MAX - 1) * 20_000,
                "the spares freed and counted"
            );
            assert_eq!(pool.sweep(), 0, "nothing left to free");
            let (_, buf) = pool.take(1, 0).expect("the connections stay pooled");
            assert_eq!(
                buf.capacity(),
                UPSTREAM_BUF,
                "no spare left to lend: a new buffer"
            );
        });
    }
}
