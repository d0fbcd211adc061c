//! Exhaustion degrades: a gateway whose descriptor limit cannot hold what
//! its clients open keeps a connection limit that fits, closes the
//! connections beyond it at accept (counted, and logged at most once a
//! second), serves the connections it holds, and takes new ones again once
//! load drops. It never fails an accept on EMFILE. The upstream pool's limit
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

fn refused_metric(ns: &NetNs) -> anyhow::Result<u64> {
    let (_, m, _) = curl(ns, &["http://127.0.0.1:9901/metrics"])?;
    Ok(m.lines()
        .find(|l| l.starts_with("portcullis_connections_refused_total{reason=\"connection_limit\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

#[test]
fn at_the_descriptor_limit_new_connections_are_closed_and_the_held_ones_served() -> anyhow::Result<()> {
    // This test holds more sockets than a default soft limit allows.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;

    let ns = NetNs::new("ex")?;
    let dir = TempDir::new("ex")?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!(
            "{}{}",
            strict_settings("ex"),
            api_instance("any", "http://127.0.0.1:8080/", "http://127.0.0.1:9000/", "")
        ),
    )?;
    let wrapper = dir.0.join("limited.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -n {OPEN_FILES}\nexec {} \"$@\"\n",
            portcullis_bin().display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let gw = GatewayProcess::start_with(&ns, &wrapper, &dir.0, "127.0.0.1:9901".parse()?)?;
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
        Ok(refused_metric(&ns)? >= want_refused)
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
    ensure!(refused_metric(&ns)? == want_refused, "each refusal counted once");

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
