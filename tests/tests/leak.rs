//! The leak test: no request ever reaches the upstream without its policies.
//!
//! Clients hammer an API whose chain rejects every unauthenticated request
//! (client-id enforcement) and tags what it lets through (header injection),
//! while the gateway is restarted gracefully 100 times, killed with SIGKILL
//! 100 times and has its policy configuration edited 100 times, with XDP
//! attached. The upstream counts every request that arrives without the tag:
//! it must stay 0. Totals are printed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream};
use portcullis_tests::load::{TAG, Tally, hammer, no_leak, say, tagged_config};
use portcullis_tests::{Gateway, Topology, portcullis_bin};

const ROUNDS: usize = 100;

/// Writes the configuration the way a deploy tool should: a new file renamed into place.
fn deploy(dir: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(".gateway.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join("gateway.yaml"))?;
    Ok(())
}

#[test]
fn no_request_reaches_the_upstream_without_its_policies() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let _client_xdp = topo.accept_xdp_replies()?;
    let xdp = Gateway::new(&topo.gw);
    xdp.cli(&["xdp", "attach", "--iface", &topo.veth.a])?;
    let up = Upstream::start(&topo.gw, "127.0.0.1:9000".parse()?)?;
    up.expect_header(TAG);
    let dir = TempDir::new("leak")?;
    let listen = SocketAddr::new(topo.gw_ip(false), 8080);
    deploy(&dir.0, &tagged_config(&listen.to_string(), 0))?;
    let start = || {
        GatewayProcess::start_env(
            &topo.gw,
            &portcullis_bin(),
            &dir.0,
            "127.0.0.1:9901".parse()?,
            &[("PORTCULLIS_INSTANCE", Path::new(xdp.instance()))],
        )
    };
    let mut gw = start()?;

    let stop = Arc::new(AtomicBool::new(false));
    let anonymous = Arc::new(Tally::default());
    let authenticated = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for n in 0..4 {
        let (stop, tally) = if n < 3 {
            (stop.clone(), anonymous.clone())
        } else {
            (stop.clone(), authenticated.clone())
        };
        let auth = (n == 3).then_some(portcullis_tests::load::MOBILE);
        clients.push(topo.client.spawn(move || hammer(listen, auth, &stop, &tally)));
    }

    let started = Instant::now();
    let mut edits = 0;
    for round in 0..ROUNDS {
        // Graceful restart.
        gw.terminate()?;
        gw.wait_exit(Duration::from_secs(15))?;
        gw = start()?;
        // Crash.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(gw.pid())?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        gw.wait_exit(Duration::from_secs(5))?;
        gw = start()?;
        // Policy edit, applied by the running gateway.
        edits += 1;
        deploy(&dir.0, &tagged_config(&listen.to_string(), round + 1))?;
        gw.wait_log("configuration reloaded", &format!("edit {edits} not applied"))?;
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let counters = xdp.listener_counters(&listen.to_string())?;
    say(&format!(
        "leak test: {ROUNDS} graceful restarts, {ROUNDS} SIGKILLs, {edits} policy edits in {:.1} s",
        took.as_secs_f64()
    ));
    say(&format!("  {}", anonymous.line("unauthenticated clients")));
    say(&format!("  {}", authenticated.line("authenticated client")));
    say(&format!(
        "  upstream: {} requests, {} without the policy tag (leaks)",
        up.requests(),
        up.unmarked()
    ));
    say(&format!(
        "  XDP on the listener: {} answered 503, {} SYN-ACKs, {} resets, {} reply failures",
        counters["gate_503"], counters["gate_syn_ack"], counters["gate_reset"], counters["gate_failed"]
    ));
    no_leak(up.unmarked(), &anonymous, &authenticated, "leak test")?;
    ensure!(
        counters["gate_503"].as_u64().unwrap_or(0) > 0,
        "XDP must have answered while the gateway was down"
    );
    Ok(())
}
