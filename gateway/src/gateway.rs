//! `portcullis run` and `portcullis check`: configuration in, workers out, reloads on change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigSet, Signal};
use portcullis::config::{self, ConfigErrors};
use portcullis::proxy::{self, Generation, Shared, admin, io};
use portcullis::telemetry::Metrics;

/// Output format of `portcullis check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One `file:line:column: field: message` line per problem.
    Text,
    /// One JSON document: `{"ok", "errors", "warnings", "summary"}`.
    Json,
}

fn located(e: &config::ConfigError) -> serde_json::Value {
    serde_json::json!({"file": e.file, "line": e.line, "column": e.column, "field": e.field, "message": e.message})
}

/// Validates `dir` (resources, secrets and TLS files) and reports every problem.
pub fn check(dir: &Path, format: Format) -> anyhow::Result<()> {
    let loaded = config::load_dir(dir).and_then(|c| {
        let warnings = c.warnings.clone();
        Generation::build(c, None).map(|g| (g, warnings))
    });
    match (loaded, format) {
        (Ok((generation, warnings)), Format::Text) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            let config = &generation.config;
            println!(
                "{}: {} listener(s), {} route(s), {} service(s), {} contract(s): OK",
                dir.display(),
                config.listeners.len(),
                config.listeners.iter().map(|l| l.routes.len()).sum::<usize>(),
                config.services.len(),
                config.contracts.len()
            );
            Ok(())
        }
        (Ok((generation, warnings)), Format::Json) => {
            let config = &generation.config;
            let out = serde_json::json!({
                "ok": true,
                "errors": [],
                "warnings": warnings.iter().map(located).collect::<Vec<_>>(),
                "summary": {
                    "listeners": config.listeners.len(),
                    "routes": config.listeners.iter().map(|l| l.routes.len()).sum::<usize>(),
                    "services": config.services.len(),
                    "contracts": config.contracts.len(),
                },
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        (Err(errors), Format::Text) => Err(report(dir, &errors)),
        (Err(errors), Format::Json) => {
            let out = serde_json::json!({
                "ok": false,
                "errors": errors.0.iter().map(located).collect::<Vec<_>>(),
                "warnings": [],
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            bail!("{} configuration error(s) in {}", errors.0.len(), dir.display())
        }
    }
}

/// `portcullis secret keygen`: a new key file, mode 0600, never overwriting.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = config::secret::SecretKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    writeln!(file, "{key}")?;
    println!("wrote a new key to {} (mode 0600)", out.display());
    Ok(())
}

/// `portcullis secret encrypt`: stdin in, `${encrypted:v1:...}` out.
pub fn encrypt(key_file: &Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    let key = config::secret::SecretKey::from_file(key_file)?;
    let mut plain = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin().read_to_end(&mut plain)?;
    // A trailing newline from `echo` or a heredoc is not part of the secret.
    while plain.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        plain.pop();
    }
    if plain.is_empty() {
        bail!("nothing on stdin to encrypt");
    }
    println!("{}", key.encrypt(&plain)?);
    Ok(())
}

fn report(dir: &Path, errors: &ConfigErrors) -> anyhow::Error {
    for e in &errors.0 {
        eprintln!("{e}");
    }
    anyhow::anyhow!("{} configuration error(s) in {}", errors.0.len(), dir.display())
}

fn load(dir: &Path) -> anyhow::Result<Generation> {
    let config = config::load_dir(dir).map_err(|e| report(dir, &e))?;
    for w in &config.warnings {
        tracing::warn!(warning = %w, "configuration");
    }
    Generation::build(config, None).map_err(|e| report(dir, &e))
}

/// Applies a log level (`error` … `trace`) unless `RUST_LOG` overrides it.
pub type SetLevel = Box<dyn Fn(&str)>;

/// Runs the gateway until SIGINT or SIGTERM; SIGHUP or a change in `dir` reloads.
pub fn run(dir: &Path, set_level: &SetLevel) -> anyhow::Result<()> {
    if let Err(why) = io::probe() {
        bail!("{why}");
    }
    let generation = load(dir)?;
    set_level(&generation.config.gateway.log_level);
    if let Some(redis) = &generation.config.gateway.redis {
        portcullis::store::start(redis)?;
    }
    raise_open_files();
    let settings = generation.settings.clone();
    let workers = settings.workers;
    let addrs: Vec<SocketAddr> = generation.listeners.keys().copied().collect();
    let mut handles = Handles::default();
    let mut per_worker = Vec::new();
    for _ in 0..workers {
        let sockets = proxy::bind_all(&addrs)?;
        handles.keep(&sockets)?;
        per_worker.push(sockets);
    }
    let admin_socket = match settings.admin {
        Some(addr) => Some(
            io::bind_reuseport(addr, 128)
                .with_context(|| format!("cannot listen on admin address {addr}"))?,
        ),
        None => None,
    };
    for (addr, l) in &generation.listeners {
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        tracing::info!(listener = %addr, scheme, "listening");
    }
    let shared = Arc::new(Shared::new(generation, Arc::new(Metrics::default())));
    let signals = stop_signals();
    signals.thread_block().context("blocking SIGINT/SIGTERM/SIGHUP")?;
    for (n, sockets) in per_worker.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        shared
            .new_listeners
            .lock()
            .map_err(|_| anyhow::anyhow!("worker list poisoned"))?
            .push(tx);
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || proxy::run_worker(shared, sockets, rx))
            .context("spawning a worker thread")?;
    }
    if let Some(socket) = admin_socket {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || admin::run(socket, shared, workers))
            .context("spawning the admin thread")?;
        tracing::info!(addr = %settings.admin.map(|a| a.to_string()).unwrap_or_default(), "admin endpoints /healthz /readyz /metrics");
    }
    watch(dir)?;
    tracing::info!(workers, config = %dir.display(), "portcullis running");
    loop {
        match signals.wait().context("waiting for signals")? {
            Signal::SIGHUP => {
                reload(dir, &shared, &mut handles);
                set_level(&shared.current().config.gateway.log_level);
            }
            signal => {
                drain(&shared, &mut handles, signal);
                return Ok(());
            }
        }
    }
}

/// Longest a stop waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops accepting, lets requests in flight finish (up to [`DRAIN_TIMEOUT`]), closes idle connections.
fn drain(shared: &Shared, handles: &mut Handles, signal: Signal) {
    let started = Instant::now();
    shared.start_drain();
    let addrs: Vec<SocketAddr> = handles.0.keys().copied().collect();
    for addr in &addrs {
        handles.close(addr);
    }
    let open = || shared.metrics.open_connections.get();
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

/// SIGINT and SIGTERM stop the gateway, SIGHUP reloads it; `main` blocks
/// them in every thread before the first one is spawned.
pub fn stop_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals
}

/// Duplicates of every worker's listening sockets, to shut down the ones a reload removes.
#[derive(Default)]
struct Handles(HashMap<SocketAddr, Vec<std::net::TcpListener>>);

impl Handles {
    fn keep(&mut self, sockets: &[proxy::NewListener]) -> anyhow::Result<()> {
        for (addr, socket) in sockets {
            self.0
                .entry(*addr)
                .or_default()
                .push(socket.try_clone().context("duplicating a listening socket")?);
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

/// Re-reads `dir`; applies it only if all of it is valid, else keeps what runs.
fn reload(dir: &Path, shared: &Shared, handles: &mut Handles) {
    let started = Instant::now();
    let rejected = |errors: &ConfigErrors| {
        for e in &errors.0 {
            tracing::error!(error = %e, "configuration error");
        }
        tracing::error!(
            errors = errors.0.len(),
            "reload rejected: the running configuration stays in force; fix the errors above"
        );
    };
    let config = match config::load_dir(dir) {
        Ok(c) => c,
        Err(e) => return rejected(&e),
    };
    let current = shared.current();
    let fixed = &shared.startup;
    if config.proxy.workers != fixed.workers
        || config.proxy.admin != fixed.admin
        || config.proxy.max_connections != fixed.max_connections
    {
        tracing::warn!(
            "workers, admin and maxConnections take effect at the next start; the running values stay"
        );
    }
    let generation = match Generation::build(config, Some(&current)) {
        Ok(g) => g,
        Err(e) => return rejected(&e),
    };
    let added: Vec<SocketAddr> = generation
        .listeners
        .keys()
        .filter(|a| !current.listeners.contains_key(a))
        .copied()
        .collect();
    let removed: Vec<SocketAddr> = current
        .listeners
        .keys()
        .filter(|a| !generation.listeners.contains_key(a))
        .copied()
        .collect();
    let mut bound = Vec::new();
    for _ in 0..fixed.workers {
        match proxy::bind_all(&added) {
            Ok(sockets) => bound.push(sockets),
            Err(e) => {
                tracing::error!(error = %e, "reload rejected: the running configuration stays in force");
                return;
            }
        }
    }
    for sockets in &bound {
        if let Err(e) = handles.keep(sockets) {
            tracing::error!(error = %e, "reload rejected");
            return;
        }
    }
    let (listeners, routes) = (
        generation.listeners.len(),
        generation
            .config
            .listeners
            .iter()
            .map(|l| l.routes.len())
            .sum::<usize>(),
    );
    shared.publish(generation);
    if let Ok(senders) = shared.new_listeners.lock() {
        for (sender, sockets) in senders.iter().zip(bound) {
            for socket in sockets {
                let _ = sender.send(socket);
            }
        }
    }
    for addr in &removed {
        handles.close(addr);
    }
    tracing::info!(
        listeners,
        routes,
        added = ?added,
        removed = ?removed,
        took_ms = started.elapsed().as_millis(),
        "configuration reloaded"
    );
}

/// Watches `dir` with inotify and asks for a reload (SIGHUP to this process)
/// once a burst of changes has settled.
fn watch(dir: &Path) -> anyhow::Result<()> {
    use inotify::{Inotify, WatchMask};
    let mut inotify = Inotify::init().context("inotify_init")?;
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::CREATE;
    inotify
        .watches()
        .add(dir, mask)
        .with_context(|| format!("watching {}", dir.display()))?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                let relevant = match inotify.read_events_blocking(&mut buffer) {
                    Ok(events) => events.into_iter().any(|e| {
                        e.name.map(Path::new).is_some_and(|n| {
                            let hidden = n.to_str().is_none_or(|n| n.starts_with('.'));
                            let yaml = n.extension().is_some_and(|x| x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml"));
                            yaml && !hidden
                        })
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, "watching the configuration directory failed; reload with SIGHUP");
                        return;
                    }
                };
                if !relevant {
                    continue;
                }
                // Let an editor or deploy tool finish writing, then take the rest of the burst too.
                std::thread::sleep(Duration::from_millis(100));
                while inotify.read_events(&mut buffer).is_ok_and(|e| e.into_iter().next().is_some()) {}
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGHUP);
            }
        })
        .context("spawning the configuration watcher")?;
    Ok(())
}

/// Lifts the soft open-file limit to the hard one: every connection is a descriptor.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err()
    {
        tracing::warn!(
            soft,
            hard,
            "could not raise the open-file limit; connections beyond {soft} will fail"
        );
    }
}
