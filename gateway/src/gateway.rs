//! `portcullis run` and `portcullis check`: configuration in, workers out, reloads on change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigSet, Signal};
use portcullis::config::{self, ConfigErrors, GateLevel, Source as _};
use portcullis::gatekeeper::nic::Nic;
use portcullis::gatekeeper::{self, Gate, Gates, Reason, State};
use portcullis::proxy::{self, Generation, Shared, admin, io};
use portcullis::store::cache::{Cache, Snapshot};
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
        Generation::build_checked(c).map(|g| (g, warnings))
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

/// `(file name, contents)` of every resource file read from the source.
type Files = Vec<(String, String)>;

/// What `portcullis run` needs besides the configuration it reads.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The configuration directory (the configuration source).
    pub config: PathBuf,
    /// Where the last-known-good cache lives.
    pub state_dir: PathBuf,
    /// Key file of the cache; `None`: the systemd credential, or no cache.
    pub cache_key: Option<PathBuf>,
    /// XDP instance whose pinned maps mirror the gates at the NIC (if it is loaded).
    pub instance: String,
}

/// Resource files of `dir`; the outer error means the source itself cannot be
/// read (unreachable), the inner one that what it holds is not usable.
fn read_source(dir: &Path) -> Result<Result<Files, ConfigErrors>, std::io::Error> {
    std::fs::read_dir(dir)?;
    Ok(config::DirSource(dir.to_path_buf())
        .files()
        .map_err(|e| ConfigErrors(vec![e])))
}

/// The configuration `files` of `dir` make, its warnings logged.
fn parse(dir: &Path, files: Files) -> Result<config::Config, ConfigErrors> {
    let config = config::load(&config::MemSource {
        files,
        base: dir.to_path_buf(),
    })?;
    for w in &config.warnings {
        tracing::warn!(warning = %w, "configuration");
    }
    Ok(config)
}

fn load(dir: &Path, files: Files, previous: Option<&Generation>) -> Result<Generation, ConfigErrors> {
    Generation::build(parse(dir, files)?, previous)
}

fn open_cache(options: &RunOptions) -> Option<Cache> {
    match Cache::open(&options.state_dir, options.cache_key.as_deref()) {
        Ok(Some(cache)) => Some(cache),
        Ok(None) => {
            tracing::info!(
                "no cache key (--cache-key or the credential `portcullis-cache-key`): the last-known-good cache is off"
            );
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "the last-known-good cache is off");
            None
        }
    }
}

/// What to serve when the source cannot be read at start: the cache, gated
/// under `strict`; or nothing at all until the source is back.
fn from_cache(dir: &Path, cache: Option<&Cache>) -> Generation {
    let snapshot = match cache.map(|c| c.load(dir)) {
        Some(Ok(Some(snapshot))) => Some(snapshot),
        Some(Ok(None)) => {
            tracing::warn!("no last-known-good cache has been written yet");
            None
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "last-known-good cache not used");
            None
        }
        None => None,
    };
    if let Some(snapshot) = snapshot {
        let written = snapshot.written_unix;
        match load(dir, snapshot.files, None) {
            Ok(generation) => {
                let level = generation.config.gateway.gate_level;
                tracing::warn!(
                    written_unix = written,
                    ?level,
                    "applying the last-known-good cache"
                );
                if level != GateLevel::Strict {
                    return generation;
                }
                let mut gates = generation.gates.clone();
                gates.close_all(
                    Reason::SourceUnreachable,
                    "strict: 503 until the configuration source can be read again",
                );
                return generation.with_gates(gates);
            }
            Err(errors) => tracing::error!(
                errors = %errors,
                "the cached configuration no longer loads; treating the cache as absent"
            ),
        }
    }
    tracing::warn!("nothing to serve until the configuration source can be read");
    match Generation::build(config::Config::empty(dir), None) {
        Ok(g) => g,
        Err(e) => unreachable!("a configuration without listeners or services has nothing to fail: {e}"),
    }
}

/// Writes the cache when everything in `generation` is applied and open.
fn remember(cache: Option<&Cache>, dir: &Path, files: Files, generation: &Generation) {
    let Some(cache) = cache else { return };
    let closed = generation.gates.sorted().into_iter().find(|(_, g)| !g.is_open());
    if let Some((api, _)) = closed {
        tracing::info!(
            api,
            "last-known-good cache kept: a gate is closed in this configuration"
        );
        return;
    }
    if !generation.policy_errors.is_empty() {
        tracing::info!("last-known-good cache kept: a policy failed in this configuration");
        return;
    }
    if let Err(e) = cache.store(&Snapshot::new(dir, files)) {
        tracing::error!(error = %e, "writing the last-known-good cache failed; the previous one stays");
    }
}

fn log_policy_errors(generation: &Generation) {
    let disabled = generation.config.gateway.gate_level == GateLevel::Disabled;
    for e in &generation.policy_errors {
        if disabled {
            tracing::error!(error = %e, "policy failed to build; the Gatekeeper is disabled, so its API instance is served WITHOUT it");
        } else {
            tracing::error!(error = %e, "policy failed to build; its API instance answers 503 until the policy is fixed or removed");
        }
    }
}

fn log_gates(old: &Gates, new: &Gates) {
    for (api, _, gate) in new.changes(old) {
        match gate.reason {
            None => tracing::info!(api, "gate open"),
            Some(reason) => tracing::warn!(
                api,
                state = gate.state.label(),
                reason = reason.label(),
                detail = %gate.detail,
                "gate closed: requests get 503"
            ),
        }
    }
}

/// Applies a log level (`error` … `trace`) unless `RUST_LOG` overrides it.
pub type SetLevel = Box<dyn Fn(&str)>;

/// Runs the gateway until SIGINT or SIGTERM; SIGHUP or a change in `dir` reloads.
pub fn run(options: &RunOptions, set_level: &SetLevel) -> anyhow::Result<()> {
    if let Err(why) = io::probe() {
        bail!("{why}");
    }
    let dir = options.config.as_path();
    let cache = open_cache(options);
    let (generation, source_files) = match read_source(dir) {
        Ok(files) => {
            let files = files.map_err(|e| report(dir, &e))?;
            let generation = load(dir, files.clone(), None).map_err(|e| report(dir, &e))?;
            (generation, Some(files))
        }
        Err(e) => {
            tracing::warn!(config = %dir.display(), error = %e, "configuration source unreachable");
            (from_cache(dir, cache.as_ref()), None)
        }
    };
    log_policy_errors(&generation);
    log_gates(&Gates::default(), &generation.gates);
    if let Some(files) = source_files.clone() {
        remember(cache.as_ref(), dir, files, &generation);
    }
    let mut nic = Mirror {
        nic: open_nic(&options.instance, &generation),
        report: options.state_dir.join(GATES_FILE),
    };
    nic.report(&generation);
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
    start_workers(&shared, per_worker)?;
    if let Some(socket) = admin_socket {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || admin::run(socket, shared, workers))
            .context("spawning the admin thread")?;
        tracing::info!(addr = %settings.admin.map(|a| a.to_string()).unwrap_or_default(), "admin endpoints /healthz /readyz /metrics");
    }
    if let Some(n) = nic.nic.as_mut() {
        wait_ready(&shared, workers);
        sync_nic(n, &shared.current());
        if let Err(e) = n.start_heartbeat() {
            tracing::error!(error = %e, "no heartbeat: XDP keeps every listener gated");
        }
    }
    watch(dir, source_files.is_some())?;
    tracing::info!(workers, config = %dir.display(), "portcullis running");
    loop {
        match signals.wait().context("waiting for signals")? {
            Signal::SIGHUP => {
                reload(dir, &shared, &mut handles, cache.as_ref(), &mut nic);
                set_level(&shared.current().config.gateway.log_level);
            }
            signal => {
                if let Some(n) = nic.nic.as_mut()
                    && let Err(e) = n.stop()
                {
                    tracing::error!(error = %e, "closing the gates at the NIC failed; the heartbeat stops anyway");
                }
                drain(&shared, &mut handles, signal);
                return Ok(());
            }
        }
    }
}

fn start_workers(shared: &Arc<Shared>, per_worker: Vec<Vec<proxy::NewListener>>) -> anyhow::Result<()> {
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
    Ok(())
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

/// The instance's gates at the NIC, all closed, if XDP is loaded for it.
fn open_nic(instance: &str, generation: &Generation) -> Option<Nic> {
    let mut nic = match Nic::open(instance) {
        Ok(Some(nic)) => nic,
        Ok(None) => {
            tracing::info!(
                instance,
                "XDP is not loaded for this instance: gates are enforced by the proxy only (attach with `portcullis xdp attach`)"
            );
            return None;
        }
        Err(e) => {
            tracing::error!(instance, error = %e, "the XDP maps cannot be used: gates are enforced by the proxy only");
            return None;
        }
    };
    match nic.close_all(generation) {
        Ok(()) => {
            tracing::info!(instance, pins = %nic.instance().pin_dir().display(), "gates at the NIC closed until policies are applied");
            Some(nic)
        }
        Err(e) => {
            tracing::error!(instance, error = %e, "closing the gates at the NIC failed: gates are enforced by the proxy only");
            None
        }
    }
}

fn sync_nic(nic: &mut Nic, generation: &Generation) {
    if let Err(e) = nic.sync(generation) {
        tracing::error!(error = %e, "writing the gates to the NIC failed; the proxy still answers 503 for gated routes");
    }
}

/// File in the state directory where the gates in force are reported for `portcullis status`.
pub const GATES_FILE: &str = "gates.json";

/// Where the gates in force are mirrored: the NIC (if XDP is loaded) and the report file.
struct Mirror {
    nic: Option<Nic>,
    report: PathBuf,
}

impl Mirror {
    /// Writes every API instance's gate to the report file (through a rename, mode 0640).
    fn report(&self, generation: &Generation) {
        use std::os::unix::fs::OpenOptionsExt as _;
        let unix =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let listener_of = |api: &str| {
            generation
                .config
                .listeners
                .iter()
                .find(|l| l.routes.iter().any(|r| r.api == api))
                .map(|l| l.addr.to_string())
        };
        let apis: Vec<serde_json::Value> = generation
            .gates
            .sorted()
            .into_iter()
            .map(|(api, gate)| {
                serde_json::json!({
                    "api": api,
                    "listener": listener_of(api),
                    "state": gate.state.label(),
                    "reason": gate.reason.map(Reason::label),
                    "detail": gate.detail,
                    "since_unix": unix(gate.since),
                })
            })
            .collect();
        let report = serde_json::json!({
            "pid": std::process::id(),
            "written_unix": unix(std::time::SystemTime::now()),
            "level": format!("{:?}", generation.config.gateway.gate_level).to_lowercase(),
            "apis": apis,
        });
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.report.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.report.with_extension("tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(&tmp)?;
            std::io::Write::write_all(&mut file, report.to_string().as_bytes())?;
            std::fs::rename(tmp, &self.report)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %self.report.display(), error = %e, "gate report not written; `portcullis status` shows older states");
        }
    }
}

/// Puts `generation` in force, and its gates at the NIC and in the report.
fn publish(shared: &Shared, nic: &mut Mirror, generation: Generation) {
    shared.publish(generation);
    let current = shared.current();
    if let Some(n) = nic.nic.as_mut() {
        sync_nic(n, &current);
    }
    nic.report(&current);
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

/// Gates (`applying`) every API instance that `config` redeploys or, with
/// `block_edit`, whose policy configuration it edits; returns them.
fn engage_edits(
    shared: &Shared,
    nic: &mut Mirror,
    current: &Generation,
    config: &config::Config,
) -> Vec<String> {
    let gk = &config.gateway;
    if gk.gate_level == GateLevel::Disabled {
        return Vec::new();
    }
    let engaged = gatekeeper::engaged(&current.config, config, gk.block_edit);
    if engaged.is_empty() {
        return Vec::new();
    }
    let mut gates = current.gates.clone();
    for (api, reason) in &engaged {
        let detail = match reason {
            Reason::Redeploy => "redeployed: applying its policies",
            _ => "applying an edited policy configuration",
        };
        gates.insert(api, Gate::closed(State::Applying, *reason, detail));
    }
    publish(shared, nic, current.with_gates(gates));
    tracing::info!(apis = ?engaged.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(), "gate applying: policy configuration edited or API instance redeployed");
    engaged.into_iter().map(|(api, _)| api).collect()
}

/// Binds listeners a reload adds, once per worker, keeping duplicates in `handles`.
fn bind_added(
    added: &[SocketAddr],
    workers: usize,
    handles: &mut Handles,
) -> anyhow::Result<Vec<Vec<proxy::NewListener>>> {
    let mut bound = Vec::new();
    for _ in 0..workers {
        bound.push(proxy::bind_all(added)?);
    }
    for sockets in &bound {
        handles.keep(sockets)?;
    }
    Ok(bound)
}

/// The source's files and the configuration they make; `Ok(None)` when the
/// source cannot be read (logged: what is applied stays in force).
fn read_config(dir: &Path) -> Result<Option<(Files, config::Config)>, ConfigErrors> {
    let files = match read_source(dir) {
        Ok(files) => files?,
        Err(e) => {
            tracing::warn!(config = %dir.display(), error = %e, "configuration source unreachable; what is applied stays in force");
            return Ok(None);
        }
    };
    let config = parse(dir, files.clone())?;
    Ok(Some((files, config)))
}

/// Re-reads `dir`; applies it only if all of it is valid, else keeps what runs.
/// A policy that fails is not a reason to keep the old one: its API instance
/// is gated. With `block_edit`, an API instance whose policy configuration
/// changed is gated (`applying`) until the new configuration is in force.
fn reload(dir: &Path, shared: &Shared, handles: &mut Handles, cache: Option<&Cache>, nic: &mut Mirror) {
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
    let (files, config) = match read_config(dir) {
        Ok(Some(read)) => read,
        Ok(None) => return,
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
    let engaged = engage_edits(shared, nic, &current, &config);
    // A change that is not applied leaves the gates as they were.
    let reopen = |nic: &mut Mirror| {
        if !engaged.is_empty() {
            publish(shared, nic, current.with_gates(current.gates.clone()));
        }
    };
    let generation = match Generation::build(config, Some(&current)) {
        Ok(g) => g,
        Err(e) => {
            reopen(nic);
            return rejected(&e);
        }
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
    let bound = match bind_added(&added, fixed.workers, handles) {
        Ok(bound) => bound,
        Err(e) => {
            reopen(nic);
            tracing::error!(error = %e, "reload rejected: the running configuration stays in force");
            return;
        }
    };
    let (listeners, routes) = (
        generation.listeners.len(),
        generation
            .config
            .listeners
            .iter()
            .map(|l| l.routes.len())
            .sum::<usize>(),
    );
    log_policy_errors(&generation);
    log_gates(&current.gates, &generation.gates);
    publish(shared, nic, generation);
    remember(cache, dir, files, &shared.current());
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

/// How long a burst of changes may go on before the reload starts anyway.
const SETTLE_MAX: Duration = Duration::from_millis(100);
/// Quiet time that ends a burst of changes.
const SETTLE_QUIET: Duration = Duration::from_micros(200);

/// Watches `dir` with inotify and asks for a reload (SIGHUP to this process)
/// once a burst of changes has settled. While `dir` cannot be read (the
/// source is unreachable) it is polled every second, and its return reloads.
fn watch(dir: &Path, reachable: bool) -> anyhow::Result<()> {
    use inotify::{EventMask, Inotify, WatchMask};
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::CREATE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    let dir = dir.to_path_buf();
    let reload = || {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGHUP);
    };
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut reachable = reachable;
            let mut buffer = [0u8; 4096];
            loop {
                let mut inotify = match Inotify::init() {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::error!(error = %e, "inotify_init failed; reload with SIGHUP");
                        return;
                    }
                };
                if inotify.watches().add(&dir, mask).is_err() || !dir.is_dir() {
                    if reachable {
                        tracing::warn!(config = %dir.display(), "configuration source unreachable; checking every second");
                        reachable = false;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                if !reachable {
                    tracing::info!(config = %dir.display(), "configuration source readable again");
                    reachable = true;
                    reload();
                }
                loop {
                    let (relevant, gone) = match inotify.read_events_blocking(&mut buffer) {
                        Ok(events) => events.fold((false, false), |(relevant, gone), e| {
                            let lost = e.mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED);
                            let yaml = e.name.map(Path::new).is_some_and(|n| {
                                let hidden = n.to_str().is_none_or(|n| n.starts_with('.'));
                                let ext = n.extension().is_some_and(|x| x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml"));
                                ext && !hidden
                            });
                            (relevant || yaml, gone || lost)
                        }),
                        Err(e) => {
                            tracing::error!(error = %e, "watching the configuration directory failed; reload with SIGHUP");
                            return;
                        }
                    };
                    if gone {
                        break;
                    }
                    if !relevant {
                        continue;
                    }
                    // Take the rest of a burst (a deploy writing several files) before reloading.
                    let started = Instant::now();
                    loop {
                        std::thread::sleep(SETTLE_QUIET);
                        let more = inotify.read_events(&mut buffer).is_ok_and(|mut e| e.next().is_some());
                        if !more || started.elapsed() > SETTLE_MAX {
                            break;
                        }
                    }
                    reload();
                }
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
