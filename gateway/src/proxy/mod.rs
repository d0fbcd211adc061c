//! The data path: an HTTP/1.1 reverse proxy over the generation in force, one
//! io_uring worker per core.
//!
//! ```text
//! accept (SO_REUSEPORT, per worker) → TLS (rustls, if the listener has a context)
//!   → read head (strict HTTP/1.1, limits, timeouts) → route (host, base path)
//!   → Gatekeeper admits → request policies → upstream (pooled per worker, plain/TLS/mTLS)
//!   → stream body both ways → response policies → access log + metrics
//! ```

pub mod admin;
mod answer;
mod body;
mod client;
pub mod conn;
mod downstream;
pub mod error;
mod exchange;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod h2;
mod heads;
pub mod io;
pub mod pool;
pub mod proxy_protocol;
pub mod server;
mod tunnel;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::runtime::memory::Pressure;
use crate::runtime::{Generation, NewListener, Shared};
use crate::telemetry::LocalMetrics;
use pool::Pool;

/// One worker thread's state.
#[derive(Debug)]
pub struct Worker {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// This worker's idle upstream connections.
    pub pool: Pool,
    /// This worker's HTTP/2 upstream connections.
    pub(crate) h2_pool: h2::upstream::H2Pool,
    /// Client connections open on this worker.
    pub open: Cell<usize>,
    /// HTTP/1.1 exchanges in progress on this worker, and the most since the last sweep.
    pub busy: Cell<(usize, usize)>,
    /// Cached metric handles.
    pub metrics: LocalMetrics,
    /// How it reaches upstream endpoints.
    pub connector: io::Connector,
    cached: RefCell<(u64, Arc<Generation>)>,
}

impl Worker {
    /// A worker over `shared`, reaching upstreams through `connector`.
    pub fn new(shared: Arc<Shared>, connector: io::Connector) -> Self {
        Self {
            pool: Pool::default(),
            h2_pool: h2::upstream::H2Pool::default(),
            open: Cell::new(0),
            busy: Cell::new((0, 0)),
            metrics: LocalMetrics::new(shared.metrics.clone()),
            connector,
            cached: RefCell::new((0, shared.current())),
            shared,
        }
    }

    /// The generation in force; a relaxed check of one counter unless a reload happened.
    pub fn current(&self) -> Arc<Generation> {
        let version = self.shared.version();
        let mut cached = self.cached.borrow_mut();
        if cached.0 != version {
            *cached = (version, self.shared.current());
        }
        cached.1.clone()
    }
}

/// Listening sockets for one worker, bound before any worker starts so a
/// taken port fails the start instead of one worker.
pub fn bind_all<'a>(addrs: impl IntoIterator<Item = &'a SocketAddr>) -> std::io::Result<Vec<NewListener>> {
    addrs
        .into_iter()
        .map(|addr| {
            io::bind_reuseport(*addr, 4096)
                .map(|socket| (*addr, socket))
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
        })
        .collect()
}

/// Runs one worker on the current thread until the process exits.
pub fn run_worker(
    shared: Arc<Shared>,
    sockets: Vec<NewListener>,
    mut added: tokio::sync::mpsc::UnboundedReceiver<NewListener>,
) {
    io::start(async move {
        let worker = Rc::new(Worker::new(shared.clone(), io::Connector::Tcp));
        for (addr, socket) in sockets {
            start_accepting(&worker, addr, socket);
        }
        shared.ready_workers.fetch_add(1, Ordering::SeqCst);
        let sweeper = worker.clone();
        io::spawn(async move {
            let mut peak = 0;
            loop {
                tokio::time::sleep(pool::SWEEP_EVERY).await;
                let freed = sweeper.pool.sweep();
                // After a burst, the allocator and the receive buffers keep
                // what it touched; give it back once the connections are gone,
                // once the pool has let go of their buffers (a sweep or more
                // later), and once a burst of requests on connections that
                // stay open is over.
                let open = sweeper.open.get();
                let (busy, busiest) = sweeper.busy.get();
                sweeper.busy.set((busy, busy));
                if open + TRIM_AFTER_CLOSED <= peak
                    || (open == 0 && peak > 0)
                    || freed >= GIVE_BACK_AFTER_FREED
                    || (busiest >= TRIM_AFTER_CLOSED && busy <= busiest / 4)
                {
                    io::trim();
                    crate::runtime::memory::give_back();
                    peak = open;
                } else {
                    peak = peak.max(open);
                }
            }
        });
        while let Some((addr, socket)) = added.recv().await {
            start_accepting(&worker, addr, socket);
        }
        std::future::pending::<()>().await;
    });
}

/// Client connections that must have closed since the busiest sweep before
/// a worker returns free memory to the kernel (as it also does once its
/// last client has gone); also the fewest exchanges in progress that count
/// as a burst.
const TRIM_AFTER_CLOSED: usize = 256;
/// Bytes of pooled connections' buffers a sweep must free before a worker
/// returns free memory to the kernel.
const GIVE_BACK_AFTER_FREED: usize = 4 << 20;

fn start_accepting(worker: &Rc<Worker>, addr: SocketAddr, socket: std::net::TcpListener) {
    // One loop per listener: the listener's accept stays armed, and a burst
    // of new clients is taken in one pass of the scheduler.
    io::spawn(accept_loop(worker.clone(), io::Listener::from_std(socket), addr));
}

async fn accept_loop(worker: Rc<Worker>, listener: io::Listener, addr: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let generation = worker.current();
                let Some(rt) = generation.listeners.get(&addr).cloned() else {
                    // A reload removed this listener.
                    return;
                };
                if let Some(trusted) = &rt.proxy_protocol
                    && !trusted.iter().any(|net| net.contains(&peer.ip()))
                {
                    // Refused at accept: only the load balancers may speak PROXY here.
                    tracing::debug!(%peer, listener = %addr, "not a trusted PROXY protocol source; closing");
                    worker.shared.metrics.refuse_proxy_protocol("untrusted_source");
                    drop(tcp);
                    continue;
                }
                if worker.shared.memory.pressure() >= Pressure::Refuse {
                    drop(tcp);
                    if let Some(held) = worker.shared.metrics.refuse_connection("memory") {
                        tracing::warn!(%peer, refused_since_last_line = held, "memory near the cgroup limit; closing new connections");
                    }
                    continue;
                }
                let limit = worker.shared.max_connections;
                if worker.open.get() >= limit {
                    drop(tcp);
                    if let Some(held) = worker.shared.metrics.refuse_connection("connection_limit") {
                        tracing::warn!(%peer, limit, refused_since_last_line = held, "connection limit reached; closing new connections");
                    }
                    continue;
                }
                let open = server::OpenGuard::count(&worker);
                io::spawn(server::serve(open, rt, tcp.into(), peer));
            }
            Err(e) => {
                if worker.shared.draining.load(Ordering::Acquire)
                    || !worker.current().listeners.contains_key(&addr)
                {
                    return;
                }
                // EMFILE and friends: back off instead of spinning.
                if let Some(held) = worker.shared.metrics.refuse_connection("accept_error") {
                    tracing::error!(listener = %addr, error = %e, refused_since_last_line = held, "accept failed; backing off");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
