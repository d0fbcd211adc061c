//! Idle upstream connections of one worker, kept for reuse.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::conn::Conn;

/// An idle upstream connection kept for reuse.
#[derive(Debug)]
pub struct Pooled {
    /// The connection.
    pub conn: Conn,
    /// Its read buffer, kept so steady traffic allocates nothing.
    pub buf: Vec<u8>,
    idle_since: Instant,
}

/// Idle upstream connections of one worker, keyed by (upstream id, endpoint).
#[derive(Debug, Default)]
pub struct Pool {
    idle: RefCell<HashMap<(u64, usize), Vec<Pooled>>>,
}

/// Longest an upstream connection sits idle before it is closed.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle time after which a pooled connection's read buffer is freed.
const BUFFER_IDLE: Duration = Duration::from_secs(2);
/// How often each worker sweeps its pool.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Most idle connections per endpoint per worker.
const POOL_MAX: usize = 1024;

impl Pool {
    /// An idle connection to the endpoint, if a fresh one is pooled.
    pub fn take(&self, service: u64, endpoint: usize) -> Option<(Conn, Vec<u8>)> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&(service, endpoint))?;
        while let Some(p) = list.pop() {
            // A connection the upstream closed while it sat here is dropped, not tried.
            if p.idle_since.elapsed() < POOL_IDLE && p.conn.is_idle_and_open() {
                return Some((p.conn, p.buf));
            }
        }
        None
    }

    /// Closes connections idle past [`POOL_IDLE`] and frees the buffers of
    /// those idle past [`BUFFER_IDLE`], so a burst leaves no memory behind.
    /// Returns the bytes of buffer it freed.
    pub fn sweep(&self) -> usize {
        let mut idle = self.idle.borrow_mut();
        let mut freed = 0;
        for list in idle.values_mut() {
            list.retain(|p| {
                let keep = p.idle_since.elapsed() < POOL_IDLE;
                if !keep {
                    freed += p.buf.capacity();
                }
                keep
            });
            for p in list.iter_mut().filter(|p| p.idle_since.elapsed() >= BUFFER_IDLE) {
                freed += std::mem::take(&mut p.buf).capacity();
            }
        }
        idle.retain(|_, list| !list.is_empty());
        freed
    }

    /// Returns a connection whose last exchange completed cleanly.
    pub fn put(&self, service: u64, endpoint: usize, conn: Conn, mut buf: Vec<u8>) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry((service, endpoint)).or_default();
        if list.len() < POOL_MAX {
            buf.clear();
            list.push(Pooled {
                conn,
                buf,
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
    fn a_sweep_frees_idle_buffers_and_says_how_much() {
        io::start(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
            let addr = listener.local_addr().expect("address");
            let pool = Pool::default();
            let mut accepted = Vec::new();
            for _ in 0..2 {
                let conn = TcpConn::connect(addr, Duration::from_secs(5))
                    .await
                    .expect("connected");
                accepted.push(listener.accept().expect("accepted"));
                pool.put(1, 0, Conn::Plain(Stream::Tcp(conn)), Vec::with_capacity(20_000));
            }
            assert_eq!(pool.sweep(), 0, "fresh buffers are kept");
            for list in pool.idle.borrow_mut().values_mut() {
                for p in list.iter_mut() {
                    p.idle_since -= BUFFER_IDLE;
                }
            }
            assert!(pool.sweep() >= 40_000, "both buffers freed and counted");
            assert_eq!(pool.sweep(), 0, "nothing left to free");
            assert!(pool.take(1, 0).is_some(), "the connections stay pooled");
        });
    }
}
