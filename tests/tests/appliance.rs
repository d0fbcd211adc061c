//! The appliance's service: the hardened unit's exposure, and `portcullis run`
//! speaking the service manager's notification protocol.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use portcullis_tests::NetNs;
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance};

#[test]
fn the_unit_scores_at_most_2_0_in_systemd_analyze_security() -> anyhow::Result<()> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/portcullis.service");
    let (score, text) = portcullis_tests::offline_exposure(&unit)?;
    println!("portcullis.service exposure: {score}");
    ensure!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
    for needed in [
        "io_uring_setup",
        "io_uring_enter",
        "bpf",
        "Type=notify",
        "WatchdogSec=",
        "LoadCredential=portcullis-cache-key",
    ] {
        ensure!(
            std::fs::read_to_string(&unit)?.contains(needed),
            "the unit lacks {needed}"
        );
    }
    Ok(())
}

/// The next notification, or `None` after `wait`.
fn next(socket: &UnixDatagram, wait: Duration) -> Option<String> {
    socket.set_read_timeout(Some(wait)).ok()?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn run_notifies_ready_feeds_the_watchdog_and_says_when_it_stops() -> anyhow::Result<()> {
    let ns = NetNs::new("ap")?;
    let dir = TempDir::new("apc")?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!(
            "{}apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\nmetadata:\n  name: appliance\nspec:\n  proxy:\n    workers: 2\n    admin: 127.0.0.1:9901\n",
            api_instance("main", "http://127.0.0.1:8080/", "http://127.0.0.1:9000/", "")
        ),
    )?;
    let path = dir.0.with_extension("notify");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path)?;
    let mut gw = GatewayProcess::start_env(
        &ns,
        &portcullis_tests::portcullis_bin(),
        &dir.0,
        "127.0.0.1:9901".parse()?,
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", Path::new("200000"))],
    )?;
    let ready = next(&socket, Duration::from_secs(10)).context("no notification")?;
    ensure!(ready.starts_with("READY=1"), "first READY: {ready}");
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(700) {
        if next(&socket, Duration::from_millis(500)).is_some_and(|m| m == "WATCHDOG=1") {
            pings += 1;
        }
    }
    ensure!(
        pings >= 3,
        "the watchdog is fed every 100 ms: {pings} pings in 0.7 s"
    );
    gw.terminate()?;
    let mut stopping = false;
    while let Some(m) = next(&socket, Duration::from_secs(2)) {
        stopping |= m == "STOPPING=1";
        if stopping {
            break;
        }
    }
    ensure!(stopping, "STOPPING=1 when the drain starts: {}", gw.log_text());
    gw.wait_exit(Duration::from_secs(15))?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
