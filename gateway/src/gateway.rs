//! `portcullis run` and `portcullis check`: configuration in, workers out.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigSet, Signal};
use portcullis::config;
use portcullis::proxy::{self, admin, io};
use portcullis::telemetry::Metrics;

/// Validates `dir` (resources and TLS files) and prints a summary.
pub fn check(dir: &Path) -> anyhow::Result<()> {
    let config = load(dir)?;
    println!(
        "{}: {} listener(s), {} route(s), {} service(s): OK",
        dir.display(),
        config.listeners.len(),
        config.listeners.iter().map(|l| l.routes.len()).sum::<usize>(),
        config.services.len()
    );
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<config::Config> {
    let report = |errors: &config::ConfigErrors| {
        for e in &errors.0 {
            eprintln!("{e}");
        }
        anyhow::anyhow!("{} configuration error(s) in {}", errors.0.len(), dir.display())
    };
    let config = config::load_dir(dir).map_err(|e| report(&e))?;
    proxy::prepare(&config, Arc::new(Metrics::default())).map_err(|e| report(&e))?;
    Ok(config)
}

/// Runs the gateway until SIGINT or SIGTERM.
pub fn run(dir: &Path) -> anyhow::Result<()> {
    if let Err(why) = io::probe() {
        bail!("{why}");
    }
    let config = load(dir)?;
    raise_open_files();
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(proxy::prepare(&config, metrics).map_err(|e| anyhow::anyhow!("{e}"))?);
    let workers = config.proxy.workers;
    let mut sockets = Vec::new();
    for _ in 0..workers {
        sockets.push(proxy::bind_all(&shared)?);
    }
    let admin_socket = match config.proxy.admin {
        Some(addr) => Some(
            io::bind_reuseport(addr, 128)
                .with_context(|| format!("cannot listen on admin address {addr}"))?,
        ),
        None => None,
    };
    // Workers inherit the mask, so only this thread receives the signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;
    for (n, socks) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || proxy::run_worker(shared, socks))
            .context("spawning a worker thread")?;
    }
    if let Some(socket) = admin_socket {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || admin::run(socket, shared, workers))
            .context("spawning the admin thread")?;
    }
    for l in &shared.listeners {
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        let apis: Vec<&str> = config
            .listeners
            .iter()
            .filter(|c| c.addr == l.addr)
            .flat_map(|c| c.routes.iter().map(|r| r.api.as_str()))
            .collect();
        tracing::info!(listener = %l.addr, scheme, apis = ?apis, "listening");
    }
    if let Some(addr) = config.proxy.admin {
        tracing::info!(%addr, "admin endpoints /healthz /readyz /metrics");
    }
    tracing::info!(workers, "portcullis running");
    let signal = signals.wait().context("waiting for signals")?;
    tracing::info!(?signal, "shutting down");
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
