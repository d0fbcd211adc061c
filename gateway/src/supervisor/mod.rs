//! The supervisor: `portcullis run` as a library. It reads the configuration
//! source, builds the first generation, takes the gates at the NIC over,
//! starts one proxy worker per core and the admin endpoints, then reloads on
//! SIGHUP or a change of the source until SIGINT or SIGTERM drains it.
//!
//! ```text
//! source ─► generation (runtime) ─► publish ─► workers (proxy)
//!                                      ├─────► gates at the NIC (xdp)
//!                                      └─────► gate report (`portcullis status`)
//! ```

mod lkg;
mod nic;
mod notify;
mod reload;
pub mod report;
mod shared;
mod source;
mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use crate::config::ConfigErrors;
use crate::gatekeeper::Gates;
use crate::proxy::{self, admin, io};
use crate::runtime::{Generation, NewListener, Shared};
use crate::store::cache::Cache;
use crate::telemetry::Metrics;
use nic::Nic;
use report::{GATES_FILE, GateReport};
use source::Remote;

/// Why `portcullis run` could not start or stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// io_uring cannot be used on this host.
    #[error("{0}")]
    IoUring(String),
    /// The configuration source holds errors (each located).
    #[error("{} configuration error(s) in {}", .errors.0.len(), .dir.display())]
    Config { dir: PathBuf, errors: ConfigErrors },
    /// Shared storage cannot be used with these settings.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A listener, admin socket or socket duplicate could not be made.
    #[error("{what}: {source}")]
    Socket {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("spawning {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Signals could not be blocked or waited for.
    #[error("signals: {0}")]
    Signals(#[source] nix::Error),
    /// Connected mode could not start (the registration's files).
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

/// What `portcullis run` needs besides the configuration it reads.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The configuration directory (the configuration source).
    pub config: PathBuf,
    /// Where the last-known-good cache and the gate report live.
    pub state_dir: PathBuf,
    /// Key file of the cache; `None`: the systemd credential, or no cache.
    pub cache_key: Option<PathBuf>,
    /// XDP instance whose pinned maps mirror the gates at the NIC (if it is loaded).
    pub instance: String,
}

/// Applies a log level (`error` … `trace`) unless `RUST_LOG` overrides it.
pub type SetLevel = Box<dyn Fn(&str)>;

/// SIGINT and SIGTERM stop the gateway, SIGHUP reloads it, SIGUSR1 reopens
/// the log files (after logrotate moved them); `main` blocks
/// them in every thread before the first one is spawned.
pub fn stop_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.add(Signal::SIGUSR1);
    signals
}

/// Puts the log level, log outputs and trace exporter of `generation` in
/// force; an output that cannot be opened leaves the ones in force as they
/// were, said on stderr and in every output.
fn apply_logging(generation: &Generation, set_level: &SetLevel) {
    set_level(&generation.config.gateway.log_level);
    if let Err(e) = crate::telemetry::logs::configure(&generation.config.gateway.log_outputs) {
        tracing::error!(error = %e, "log outputs unchanged: the ones in force stay (stderr always)");
    }
    if let Err(e) = crate::telemetry::trace::configure(generation.config.gateway.tracing.clone()) {
        tracing::error!(error = %e, "the trace exporter did not start: no spans are exported");
    }
}

/// Where the gates in force are mirrored: the NIC (if XDP is loaded) and the report file.
#[derive(Debug)]
struct Mirror {
    nic: Option<Nic>,
    report: PathBuf,
    remote: Option<Arc<Remote>>,
}

impl Mirror {
    /// Has `/metrics` carry what XDP counted, read from the pinned maps at each scrape.
    fn export_counters(&self, metrics: &Metrics) {
        let Some(nic) = &self.nic else { return };
        let instance = nic.instance().clone();
        metrics.scrape.set(Box::new(move |out: &mut String| {
            if let Err(e) = instance
                .maps()
                .and_then(|maps| crate::xdp::metrics::write(&maps, out))
            {
                tracing::debug!(error = %e, "the XDP maps could not be read for /metrics");
            }
        }));
    }

    fn sync_nic(&mut self, generation: &Generation) {
        if let Some(nic) = self.nic.as_mut()
            && let Err(e) = nic.sync(generation)
        {
            tracing::error!(error = %e, "writing the gates to the NIC failed; the proxy still answers 503 for gated routes");
        }
    }

    fn report(&self, generation: &Generation) {
        write_report(&self.report, generation, self.remote.as_deref());
    }
}

/// Writes the gates of `generation` (and the control-plane link) to `path`.
fn write_report(path: &std::path::Path, generation: &Generation, remote: Option<&Remote>) {
    let mut report = GateReport::of(generation);
    report.control_plane = remote.map(Remote::status);
    if let Err(e) = report.write(path) {
        tracing::warn!(path = %path.display(), error = %e, "gate report not written; `portcullis status` shows older states");
    }
}

/// Looks at the report every second and rewrites it when what it says
/// changed (endpoint health moves between reloads), and always in connected
/// mode, so `status` shows the control-plane link as it is.
fn refresh_report(
    path: PathBuf,
    shared: Arc<Shared>,
    remote: Option<Arc<Remote>>,
) -> Result<(), SupervisorError> {
    std::thread::Builder::new()
        .name("report".into())
        .spawn(move || {
            let mut last = None;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let generation = shared.current();
                let endpoints = GateReport::endpoints_of(&generation);
                if remote.is_some() || last.as_ref() != Some(&endpoints) {
                    write_report(&path, &generation, remote.as_deref());
                    last = Some(endpoints);
                }
            }
        })
        .map_err(|source| SupervisorError::Spawn {
            what: "the report refresher",
            source,
        })?;
    Ok(())
}

/// The running gateway as the supervisor holds it.
#[derive(Debug)]
struct Supervisor {
    dir: PathBuf,
    /// The control plane's side of the source (connected mode).
    remote: Option<Arc<Remote>>,
    shared: Arc<Shared>,
    handles: Handles,
    cache: Option<Arc<Cache>>,
    /// The cluster's last-known-good copy in Redis (connected mode with shared storage).
    copy: Option<shared::ClusterCopy>,
    mirror: Mirror,
}

impl Supervisor {
    /// Puts `generation` in force, and its gates at the NIC and in the report.
    fn publish(&mut self, generation: Generation) {
        self.shared.publish(generation);
        let current = self.shared.current();
        crate::runtime::health::start(&current, &self.shared.metrics);
        self.mirror.sync_nic(&current);
        self.mirror.report(&current);
    }

    /// Stops accepting, lets requests in flight finish (up to [`DRAIN_TIMEOUT`]), closes idle connections.
    fn drain(&mut self, signal: Signal) {
        let started = Instant::now();
        self.shared.start_drain();
        let addrs: Vec<SocketAddr> = self.handles.0.keys().copied().collect();
        for addr in &addrs {
            self.handles.close(addr);
        }
        let open = || self.shared.metrics.open_connections.get();
        tracing::info!(
            ?signal,
            open = open(),
            "draining: no new connections; requests in flight finish"
        );
        while open() > 0 && started.elapsed() < DRAIN_TIMEOUT {
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(left = open(), took_ms = started.elapsed().as_millis(), "stopped");
    }
}

/// The admin listener, bound before the workers start so a busy port fails the start.
fn bind_admin(addr: SocketAddr) -> Result<std::net::TcpListener, SupervisorError> {
    io::bind_reuseport(addr, 128).map_err(|source| SupervisorError::Socket {
        what: format!("cannot listen on admin address {addr}"),
        source,
    })
}

/// Runs the gateway until SIGINT or SIGTERM; SIGHUP or a change in the source reloads.
pub fn run(options: &RunOptions, set_level: &SetLevel) -> Result<(), SupervisorError> {
    io::probe().map_err(SupervisorError::IoUring)?;
    let dir = options.config.as_path();
    let cache = lkg::open(options).map(Arc::new);
    // The local files alone say whether this replica follows a control plane.
    let local = local_config(dir);
    let remote = connect(dir, local.as_ref())?;
    let copy = local
        .as_ref()
        .and_then(|c| shared::ClusterCopy::open(c, cache.as_ref(), &options.state_dir));
    let readable = std::fs::read_dir(dir).is_ok();
    let (generation, source_files) =
        first_generation(dir, remote.as_deref(), cache.as_deref(), copy.as_ref())?;
    reload::log_policy_errors(&generation);
    reload::log_gates(&Gates::default(), &generation.gates);
    if let Some(files) = source_files.clone() {
        lkg::remember(cache.as_deref(), dir, files, &generation);
        share(copy.as_ref(), remote.as_deref(), &generation);
    }
    let mirror = Mirror {
        nic: nic::open(&options.instance, &generation),
        report: options.state_dir.join(GATES_FILE),
        remote: remote.clone(),
    };
    mirror.report(&generation);
    apply_logging(&generation, set_level);
    if let Some(redis) = &generation.config.gateway.redis {
        crate::store::start(redis)?;
    }
    let open_files = raise_open_files();
    let settings = generation.settings.clone();
    let workers = settings.workers;
    let addrs: Vec<SocketAddr> = generation.listeners.keys().copied().collect();
    let (per_worker, handles) = bind_workers(&addrs, workers)?;
    let admin_socket = settings.admin.map(bind_admin).transpose()?;
    for (addr, l) in &generation.listeners {
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        tracing::info!(listener = %addr, scheme, "listening");
    }
    let shared = Arc::new(fit_descriptors(
        Shared::new(generation, Arc::new(Metrics::default())),
        open_files,
    ));
    mirror.export_counters(&shared.metrics);
    crate::runtime::health::start(&shared.current(), &shared.metrics);
    crate::runtime::memory::start(shared.clone());
    let signals = stop_signals();
    signals.thread_block().map_err(SupervisorError::Signals)?;
    start_workers(&shared, per_worker)?;
    refresh_report(options.state_dir.join(GATES_FILE), shared.clone(), remote.clone())?;
    if let Some(socket) = admin_socket {
        start_admin(&shared, socket, workers)?;
    }
    let mut supervisor = Supervisor {
        dir: dir.to_path_buf(),
        remote,
        shared,
        handles,
        cache,
        copy,
        mirror,
    };
    if supervisor.mirror.nic.is_some() {
        wait_ready(&supervisor.shared, workers);
        supervisor.mirror.sync_nic(&supervisor.shared.current());
        if let Some(n) = supervisor.mirror.nic.as_ref()
            && let Err(e) = n.start_heartbeat()
        {
            tracing::error!(error = %e, "no heartbeat: XDP keeps every listener gated");
        }
    }
    watch::watch(dir, readable)?;
    announce_ready(&supervisor.shared, workers);
    notify::watchdog(supervisor.shared.clone(), workers);
    tracing::info!(workers, config = %dir.display(), "portcullis running");
    loop {
        match signals.wait().map_err(SupervisorError::Signals)? {
            Signal::SIGUSR1 => {
                crate::telemetry::logs::reopen();
                tracing::info!("log files reopened (SIGUSR1)");
            }
            Signal::SIGHUP => {
                supervisor.reload();
                apply_logging(&supervisor.shared.current(), set_level);
            }
            signal => {
                notify::notify("STOPPING=1");
                if let Some(n) = supervisor.mirror.nic.as_mut()
                    && let Err(e) = n.stop()
                {
                    tracing::error!(error = %e, "closing the gates at the NIC failed; the heartbeat stops anyway");
                }
                supervisor.drain(signal);
                return Ok(());
            }
        }
    }
}

/// The generation a start serves, and the source files it was read from
/// (`None` when it comes from the last-known-good cache, or lacks the control
/// plane's part, so it is not remembered as last-known-good).
fn first_generation(
    dir: &std::path::Path,
    remote: Option<&Remote>,
    cache: Option<&Cache>,
    copy: Option<&shared::ClusterCopy>,
) -> Result<(Generation, Option<source::Files>), SupervisorError> {
    let config_error = |errors: ConfigErrors| SupervisorError::Config {
        dir: dir.to_path_buf(),
        errors,
    };
    let waiting = remote.is_some_and(|r| !r.wait_first(FIRST_SNAPSHOT_WAIT));
    Ok(match source::read(dir, remote) {
        Ok(files) if waiting => {
            tracing::warn!(
                "the control plane cannot be reached; its APIs come from the last-known-good cache if there is one"
            );
            let files = files.map_err(config_error)?;
            let from_redis =
                || copy.and_then(|c| c.fetch().and_then(|s| c.generation(dir, files.clone(), s)));
            match lkg::cached(dir, cache).or_else(from_redis) {
                Some(generation) => (generation, None),
                None => (source::load(dir, files, None).map_err(config_error)?, None),
            }
        }
        Ok(files) => {
            let files = files.map_err(config_error)?;
            let generation = source::load(dir, files.clone(), None).map_err(config_error)?;
            (generation, Some(files))
        }
        Err(e) => {
            tracing::warn!(config = %dir.display(), error = %e, "configuration source unreachable");
            (lkg::serve_from(dir, cache), None)
        }
    })
}

/// The local configuration alone (for the settings connected mode needs).
fn local_config(dir: &std::path::Path) -> Option<crate::config::Config> {
    let Ok(Ok(files)) = source::read(dir, None) else {
        return None;
    };
    source::parse(dir, files).ok()
}

/// Stores the applied snapshot as the cluster's copy when everything in `generation` is open.
fn share(copy: Option<&shared::ClusterCopy>, remote: Option<&Remote>, generation: &Generation) {
    let (Some(copy), Some(remote)) = (copy, remote) else {
        return;
    };
    if lkg::not_good(generation).is_none()
        && let Some(snapshot) = remote.latest_copy()
    {
        copy.publish(&snapshot);
    }
}

/// Longest a start waits for the control plane's first snapshot before it
/// treats the control plane as unreachable.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(3);

/// Connected mode, when the local configuration holds a registration: the
/// control plane followed on a thread of its own, each snapshot a reload.
fn connect(
    dir: &std::path::Path,
    local: Option<&crate::config::Config>,
) -> Result<Option<Arc<Remote>>, SupervisorError> {
    let Some(registration) = local.and_then(|c| c.registration.clone()) else {
        return Ok(None);
    };
    let remote = Arc::new(Remote::new(registration.clone()));
    let delivered = remote.clone();
    let file = dir.join(&registration.origin.file);
    crate::control::client::follow(&file, &registration, 0, remote.link.clone(), move |snapshot| {
        tracing::info!(version = snapshot.version, cluster = %snapshot.cluster, "snapshot received from the control plane");
        delivered.deliver(snapshot);
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGHUP);
    })?;
    tracing::info!(
        replica = %registration.replica,
        cluster = %registration.cluster,
        control_plane = %registration.control_plane,
        "connected mode: following the control plane"
    );
    Ok(Some(remote))
}

/// Every worker's listening sockets, and their duplicates.
fn bind_workers(
    addrs: &[SocketAddr],
    workers: usize,
) -> Result<(Vec<Vec<NewListener>>, Handles), SupervisorError> {
    let socket_error = |what: &str| {
        let what = what.to_owned();
        move |source| SupervisorError::Socket { what, source }
    };
    let mut handles = Handles::default();
    let mut per_worker = Vec::new();
    for _ in 0..workers {
        let sockets = proxy::bind_all(addrs).map_err(socket_error("binding the listeners"))?;
        handles
            .keep(&sockets)
            .map_err(socket_error("duplicating a listening socket"))?;
        per_worker.push(sockets);
    }
    Ok((per_worker, handles))
}

/// The admin endpoints, on a thread of their own.
fn start_admin(
    shared: &Arc<Shared>,
    socket: std::net::TcpListener,
    workers: usize,
) -> Result<(), SupervisorError> {
    let addr = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || admin::run(socket, shared, workers))
        .map_err(|source| SupervisorError::Spawn {
            what: "the admin thread",
            source,
        })?;
    tracing::info!(addr, "admin endpoints /healthz /readyz /metrics");
    Ok(())
}

fn start_workers(shared: &Arc<Shared>, per_worker: Vec<Vec<NewListener>>) -> Result<(), SupervisorError> {
    for (n, sockets) in per_worker.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut senders) = shared.new_listeners.lock() {
            senders.push(tx);
        }
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || proxy::run_worker(shared, sockets, rx))
            .map_err(|source| SupervisorError::Spawn {
                what: "a worker thread",
                source,
            })?;
    }
    Ok(())
}

/// Says ready (to `/readyz` and systemd) once every worker accepts; called
/// only after the source is watched, so an edit made after `/readyz`
/// answers 200 is never missed.
fn announce_ready(shared: &Shared, workers: usize) {
    wait_ready(shared, workers);
    shared.started.store(true, std::sync::atomic::Ordering::Release);
    notify::notify("READY=1\nSTATUS=gates held; policies applied or gated");
}

/// Waits (up to 5 s) until every worker accepts.
fn wait_ready(shared: &Shared, workers: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.ready_workers.load(std::sync::atomic::Ordering::Acquire) < workers
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Longest a stop waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Duplicates of every worker's listening sockets, to shut down the ones a reload removes.
#[derive(Debug, Default)]
struct Handles(HashMap<SocketAddr, Vec<std::net::TcpListener>>);

impl Handles {
    fn keep(&mut self, sockets: &[NewListener]) -> std::io::Result<()> {
        for (addr, socket) in sockets {
            self.0.entry(*addr).or_default().push(socket.try_clone()?);
        }
        Ok(())
    }

    fn close(&mut self, addr: &SocketAddr) {
        for socket in self.0.remove(addr).unwrap_or_default() {
            // Wakes every worker's pending accept, which then sees the listener gone.
            let _ = socket2::SockRef::from(&socket).shutdown(std::net::Shutdown::Both);
        }
    }
}

/// `shared` with its connection limit fitted to `open_files`, said when that lowers it.
fn fit_descriptors(mut shared: Shared, open_files: u64) -> Shared {
    let configured = shared.max_connections;
    let limit = shared.fit_descriptors(open_files);
    if limit < configured {
        tracing::warn!(
            per_worker = limit,
            configured,
            open_files,
            "the descriptor limit caps client connections; raise LimitNOFILE for more"
        );
    }
    shared
}

/// Lifts the soft open-file limit to the hard one (every connection is a
/// descriptor); the soft limit now in force.
fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u64::MAX;
    };
    if soft < hard {
        if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            return hard;
        }
        tracing::warn!(soft, hard, "could not raise the open-file limit");
    }
    soft
}
