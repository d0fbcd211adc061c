//! The data path: an HTTP/1.1 reverse proxy, one io_uring worker per core.
//!
//! ```text
//! accept (SO_REUSEPORT, per worker) → TLS (rustls, if the listener has a context)
//!   → read head (strict HTTP/1.1, limits, timeouts) → route (host, base path)
//!   → upstream (pooled per worker, plain/TLS/mTLS, LB + passive health)
//!   → stream body both ways → access log + metrics
//! ```

pub mod admin;
pub mod conn;
pub mod error;
pub mod http;
pub mod io;
pub mod route;
pub mod server;
pub mod upstream;

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls::ServerConfig;

use crate::config::{Config, ConfigError, ConfigErrors, ProxySettings};
use crate::telemetry::{LocalMetrics, Metrics};
use route::Router;
use upstream::{Pool, Upstream};

/// A listener at run time.
#[derive(Debug)]
pub struct ListenerRt {
    /// Where it listens.
    pub addr: SocketAddr,
    /// TLS server config, if the listener is `https`.
    pub tls: Option<Arc<ServerConfig>>,
    /// Its routes.
    pub router: Router,
}

/// State shared by every worker.
#[derive(Debug)]
pub struct Shared {
    /// Listeners.
    pub listeners: Vec<Arc<ListenerRt>>,
    /// Services, indexed as in the config.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Proxy settings.
    pub settings: ProxySettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Workers that have started accepting.
    pub ready_workers: AtomicUsize,
}

/// One worker thread's state.
#[derive(Debug)]
pub struct Worker {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// This worker's idle upstream connections.
    pub pool: Pool,
    /// Client connections open on this worker.
    pub open: Cell<usize>,
    /// Cached metric handles.
    pub metrics: LocalMetrics,
}

/// Builds the run-time state from a validated config, loading all TLS material.
pub fn prepare(config: &Config, metrics: Arc<Metrics>) -> Result<Shared, ConfigErrors> {
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let tls = match &l.tls {
            Some(t) => match crate::tls::server_config(t) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.extend(e);
                    None
                }
            },
            None => None,
        };
        listeners.push(Arc::new(ListenerRt {
            addr: l.addr,
            tls,
            router: Router::new(l.routes.clone()),
        }));
    }
    let mut upstreams = Vec::new();
    for s in &config.services {
        let (tls, names) = match &s.tls {
            Some(t) => {
                let client = match crate::tls::client_config(t) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        errors.extend(e);
                        None
                    }
                };
                let mut names = Vec::new();
                for ep in &s.endpoints {
                    match crate::tls::upstream_name(t.sni.as_deref(), &ep.host) {
                        Ok(n) => names.push(n),
                        Err(e) => errors.push(t.origin.error(e)),
                    }
                }
                (client, names)
            }
            None => (None, Vec::new()),
        };
        upstreams.push(Arc::new(Upstream::new(s.clone(), tls, names)));
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Shared {
        listeners,
        upstreams,
        settings: config.proxy.clone(),
        metrics,
        ready_workers: AtomicUsize::new(0),
    })
}

/// Listening sockets for one worker, bound before any worker starts so a
/// taken port fails the start instead of one worker.
pub fn bind_all(shared: &Shared) -> std::io::Result<Vec<std::net::TcpListener>> {
    shared
        .listeners
        .iter()
        .map(|l| {
            io::bind_reuseport(l.addr, 4096)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", l.addr)))
        })
        .collect()
}

/// Runs one worker on the current thread until the process exits.
pub fn run_worker(shared: Arc<Shared>, sockets: Vec<std::net::TcpListener>) {
    io::start(async move {
        let worker = Rc::new(Worker {
            shared: shared.clone(),
            pool: Pool::default(),
            open: Cell::new(0),
            metrics: LocalMetrics::new(shared.metrics.clone()),
        });
        let mut accepting = Vec::new();
        for (socket, rt) in sockets.into_iter().zip(&shared.listeners) {
            let listener = io::Listener::from_std(socket);
            accepting.push((listener, rt.clone()));
        }
        shared.ready_workers.fetch_add(1, Ordering::SeqCst);
        // Several accepts in flight per listener, so a burst of new clients is
        // taken in one pass of the scheduler rather than one per pass.
        for (listener, rt) in accepting {
            let listener = Rc::new(listener);
            let rt = Rc::new(ListenerRt {
                addr: rt.addr,
                tls: rt.tls.clone(),
                router: rt.router.clone(),
            });
            for _ in 0..ACCEPTORS {
                io::spawn(accept_loop(worker.clone(), listener.clone(), rt.clone()));
            }
        }
        loop {
            tokio::time::sleep(upstream::SWEEP_EVERY).await;
            worker.pool.sweep();
        }
    });
}

/// Accept operations kept in flight per listener and worker.
const ACCEPTORS: usize = 16;

async fn accept_loop(worker: Rc<Worker>, listener: Rc<io::Listener>, rt: Rc<ListenerRt>) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                if worker.open.get() >= worker.shared.settings.max_connections {
                    tracing::warn!(%peer, limit = worker.shared.settings.max_connections, "connection limit reached; closing");
                    drop(tcp);
                    continue;
                }
                io::spawn(server::serve(worker.clone(), rt.clone(), tcp, peer));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(listener = %rt.addr, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
