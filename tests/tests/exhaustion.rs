//! Exhaustion degrades: a gateway whose descriptor limit cannot hold what
//! its clients open keeps a connection limit that fits, closes the
//! connections beyond it at accept (counted, and logged at most once a
//! second), serves the connections it holds, and takes new ones again once
//! load drops. It never fails an accept on EMFILE. Under a cgroup memory
//! limit the gateway closes new connections, then sheds new requests (503),
//! before the OOM killer would end it, and takes new work again once memory
//! is back. The upstream pool's limit
//! (the circuit breaker's 503) is `health.rs`'s.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use portcullis_tests::http::{
    GatewayProcess, TempDir, Upstream, api_instance, connect, curl, read_response, strict_settings,
};
use portcullis_tests::{NetNs, portcullis_bin, wait_for};

/// Descriptors the gateway is started with.
const OPEN_FILES: u64 = 1024;
/// What `runtime::descriptor_fit` leaves each of the 2 workers at 1024.
const PER_WORKER: usize = 224;
const CLIENTS: usize = 700;

/// Whether the gateway closed `conn` (EOF or reset), without waiting long.
fn closed_by_peer(conn: &mut TcpStream) -> bool {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(5)));
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// The value of the metric line starting with `name` (labels included).
fn metric(ns: &NetNs, name: &str) -> anyhow::Result<u64> {
    let (_, m, _) = curl(ns, &["http://127.0.0.1:9901/metrics"])?;
    Ok(m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Connections closed at accept for the worker's connection limit.
const LIMIT_REFUSED: &str = "portcullis_connections_refused_total{reason=\"connection_limit\"}";

/// A gateway in a new namespace with one API before an upstream on 9000,
/// started by a shell that first runs `prelude` (a limit, a cgroup), as a
/// service manager would; what it holds lives as long as the returned tuple.
fn limited_gateway(name: &str, prelude: &str) -> anyhow::Result<(NetNs, TempDir, Upstream, GatewayProcess)> {
    // The tests hold more sockets than a default soft limit allows.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let ns = NetNs::new(name)?;
    let dir = TempDir::new(name)?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!(
            "{}{}",
            strict_settings(name),
            api_instance("any", "http://127.0.0.1:8080/", "http://127.0.0.1:9000/", "")
        ),
    )?;
    let wrapper = dir.0.join("limited.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{prelude}\nexec {} \"$@\"\n",
            portcullis_bin().display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let gw = GatewayProcess::start_with(&ns, &wrapper, &dir.0, "127.0.0.1:9901".parse()?)?;
    Ok((ns, dir, up, gw))
}

#[test]
fn at_the_descriptor_limit_new_connections_are_closed_and_the_held_ones_served() -> anyhow::Result<()> {
    let (ns, _dir, _up, gw) = limited_gateway("ex", &format!("ulimit -n {OPEN_FILES}"))?;
    gw.wait_log(
        "the descriptor limit caps client connections",
        "the limit fitted to 1024",
    )?;

    let mut conns = Vec::new();
    for _ in 0..CLIENTS {
        conns.push(connect(&ns, "127.0.0.1:8080".parse()?)?);
    }
    let want_refused = u64::try_from(CLIENTS - 2 * PER_WORKER)?;
    wait_for("every connection beyond the limit refused", || {
        Ok(metric(&ns, LIMIT_REFUSED)? >= want_refused)
    })
    .with_context(|| {
        let (_, metrics, _) = curl(&ns, &["http://127.0.0.1:9901/metrics"]).unwrap_or_default();
        let counts: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("portcullis_connections"))
            .collect();
        format!("{}\n{}", counts.join("\n"), gw.log_text())
    })?;
    let mut held: Vec<TcpStream> = conns
        .into_iter()
        .filter_map(|mut c| (!closed_by_peer(&mut c)).then_some(c))
        .collect();
    ensure!(
        held.len() == 2 * PER_WORKER,
        "{} connections held, want {} (2 workers × {PER_WORKER})",
        held.len(),
        2 * PER_WORKER
    );
    ensure!(
        metric(&ns, LIMIT_REFUSED)? == want_refused,
        "each refusal counted once"
    );

    // The connections held are served.
    let mut buf = Vec::new();
    for conn in held.iter_mut().step_by(37) {
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")?;
        ensure!(read_response(conn, &mut buf)? == 200, "a held connection served");
    }

    // Load drops: new connections are taken again.
    held.truncate(PER_WORKER);
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..20 {
        let mut conn = connect(&ns, "127.0.0.1:8080".parse()?)?;
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")?;
        ensure!(
            read_response(&mut conn, &mut buf)? == 200,
            "a new connection served after the drop"
        );
    }

    let log = gw.log_text();
    let lines = log.matches("connection limit reached").count();
    ensure!(
        (1..=5).contains(&lines),
        "{lines} warnings for {want_refused} refusals: at most one a second\n{log}"
    );
    ensure!(
        !log.contains("accept failed") && !log.contains("panicked"),
        "{log}"
    );
    Ok(())
}

/// A memory cgroup of the test's own (v2 where the unified hierarchy has the
/// controller, else v1), removed on drop once its processes are gone.
struct TestCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl TestCgroup {
    fn new(name: &str) -> anyhow::Result<Self> {
        let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let root = if v2 {
            "/sys/fs/cgroup"
        } else {
            "/sys/fs/cgroup/memory"
        };
        let dir = std::path::Path::new(root).join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, v2 })
    }

    /// Sets its limit (`None`: none).
    fn limit(&self, bytes: Option<u64>) -> anyhow::Result<()> {
        let (file, none) = if self.v2 {
            ("memory.max", "max")
        } else {
            ("memory.limit_in_bytes", "-1")
        };
        let value = bytes.map_or_else(|| none.to_owned(), |b| b.to_string());
        std::fs::write(self.dir.join(file), value).with_context(|| format!("setting {file}"))
    }

    /// Processes the kernel's OOM killer ended in it.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

const GIB: u64 = 1 << 30;

#[test]
fn under_a_cgroup_memory_limit_new_work_is_refused_before_the_oom_killer_and_recovers() -> anyhow::Result<()>
{
    let cgroup = TestCgroup::new("portcullis-test-mem")?;
    cgroup.limit(Some(GIB))?;
    // The gateway starts inside the cgroup, as systemd starts it in its unit's.
    let prelude = format!("echo $$ > {}/cgroup.procs", cgroup.dir.display());
    let (ns, _dir, _up, mut gw) = limited_gateway("mem", &prelude)?;
    gw.wait_log("memory guard:", "the memory guard on")?;
    wait_for("the guard reading the limit", || {
        Ok(metric(&ns, "portcullis_memory_limit_bytes")? == GIB)
    })?;
    let idle = metric(&ns, "portcullis_memory_working_set_bytes")?;
    ensure!(idle > 0, "the working set is read");

    // Real load: idle connections until memory nears a limit 16 MiB above idle.
    cgroup.limit(Some(idle + (16 << 20)))?;
    let addr: std::net::SocketAddr = "127.0.0.1:8080".parse()?;
    let refused = "portcullis_connections_refused_total{reason=\"memory\"}";
    let mut held: Vec<TcpStream> = Vec::new();
    while metric(&ns, refused)? == 0 {
        ensure!(
            held.len() < 8000,
            "8000 connections held and memory never neared the limit"
        );
        let batch = ns.run(move || {
            (0..250)
                .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
                .collect::<Vec<_>>()
        })?;
        held.extend(batch);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "idle working set {} KiB; {} connections held when memory neared {} KiB",
        idle >> 10,
        held.len(),
        (idle >> 10) + (16 << 10)
    );
    ensure!(gw.alive(), "the gateway survived the load:\n{}", gw.log_text());
    ensure!(cgroup.oom_kills() == 0, "the OOM killer ran");
    ensure!(metric(&ns, "portcullis_memory_pressure")? >= 1, "pressure shown");
    let mut fresh = connect(&ns, addr)?;
    wait_for("a new connection closed at accept", || {
        Ok(closed_by_peer(&mut fresh))
    })?;
    // The first batch was taken before memory neared the limit.
    let mut buf = Vec::new();
    for conn in held.iter_mut().take(10) {
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")?;
        ensure!(
            read_response(conn, &mut buf)? == 200,
            "a held connection served under pressure"
        );
    }

    // Closer still: new requests are answered 503 and their connections closed.
    let used = metric(&ns, "portcullis_memory_working_set_bytes")?;
    cgroup.limit(Some(used * 1000 / 960))?;
    wait_for("requests shed", || {
        Ok(metric(&ns, "portcullis_memory_pressure")? == 2)
    })?;
    let conn = held.get_mut(10).context("a held connection")?;
    conn.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")?;
    ensure!(read_response(conn, &mut buf)? == 503, "shed with 503");
    let answer = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    ensure!(
        answer.contains("retry-after:") && answer.contains("connection: close"),
        "{answer}"
    );
    ensure!(cgroup.oom_kills() == 0, "the OOM killer ran");

    // Load drops: the allocator gives back what the connections held, and new work is taken.
    held.clear();
    cgroup.limit(Some(GIB))?;
    wait_for("pressure eased", || {
        Ok(metric(&ns, "portcullis_memory_pressure")? == 0)
    })?;
    for _ in 0..20 {
        let mut conn = connect(&ns, addr)?;
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")?;
        ensure!(
            read_response(&mut conn, &mut buf)? == 200,
            "served after the drop"
        );
    }
    ensure!(gw.alive(), "the gateway is still up");
    let log = gw.log_text();
    ensure!(
        log.contains("memory near its limit") && log.contains("memory pressure eased"),
        "{log}"
    );
    let lines = log.matches("closing new connections").count();
    ensure!(
        (1..=10).contains(&lines),
        "{lines} refusal warnings: at most one a second\n{log}"
    );
    ensure!(!log.contains("panicked"), "{log}");
    drop(gw);
    Ok(())
}
