//! The leak test: no request ever reaches the upstream without its policies.
//!
//! Clients hammer an API whose chain rejects every unauthenticated request
//! (client-id enforcement) and tags what it lets through (header injection),
//! while the gateway is restarted gracefully 100 times, killed with SIGKILL
//! 100 times and has its policy configuration edited 100 times, with XDP
//! attached. The upstream counts every request that arrives without the tag:
//! it must stay 0. Totals are printed.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance, read_response};
use portcullis_tests::{Gateway, Topology, portcullis_bin};

const ROUNDS: usize = 100;
const TAG: &str = "x-policies-applied";

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    unauthorized: AtomicU64,
    unavailable: AtomicU64,
    other: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn count(&self, status: Option<u16>) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let slot = match status {
            Some(200) => &self.ok,
            Some(401) => &self.unauthorized,
            Some(503) => &self.unavailable,
            Some(_) => &self.other,
            None => &self.failed,
        };
        slot.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self, name: &str) -> String {
        format!(
            "{name}: sent {}, 200 {}, 401 {}, 503 {}, other {}, failed {}",
            n(&self.sent),
            n(&self.ok),
            n(&self.unauthorized),
            n(&self.unavailable),
            n(&self.other),
            n(&self.failed)
        )
    }
}

/// Writes past the test harness's output capture: the totals show in every run.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn n(slot: &AtomicU64) -> u64 {
    slot.load(Ordering::Relaxed)
}

/// Requests in a loop, a few per connection, until `stop`.
fn hammer(addr: SocketAddr, auth: Option<&'static str>, stop: &AtomicBool, tally: &Tally) {
    let request = format!(
        "GET /orders/hello HTTP/1.1\r\nHost: api\r\n{}\r\n",
        auth.map(|a| format!("Authorization: Basic {a}\r\n"))
            .unwrap_or_default()
    );
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            tally.count(None);
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        for _ in 0..4 {
            if conn.write_all(request.as_bytes()).is_err() {
                tally.count(None);
                break;
            }
            let status = read_response(&mut conn, &mut buf).ok();
            let failed = status.is_none();
            tally.count(status);
            let closing = String::from_utf8_lossy(&buf)
                .to_ascii_lowercase()
                .contains("connection: close");
            if failed || closing {
                break;
            }
        }
    }
}

fn config(addr: &str, edit: usize) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: leak
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
---
{}apiVersion: gateway.mulesoft.com/v1alpha1
kind: Contract
metadata:
  name: mobile
spec:
  clientId: mobile
  clientSecretHash: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
  apis: [orders]
---
",
        api_instance(
            "orders",
            &format!("http://{addr}/orders"),
            "http://127.0.0.1:9000/",
            &format!(
                "  policies:
    - policyRef:
        name: client-id-enforcement-flex
    - policyRef:
        name: header-injection-flex
      config:
        inboundHeaders:
          - key: {TAG}
            value: \"edit-{edit}\"
"
            )
        )
    )
}

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
    deploy(&dir.0, &config(&listen.to_string(), 0))?;
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
        // "mobile:password"
        let auth = (n == 3).then_some("bW9iaWxlOnBhc3N3b3Jk");
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
        deploy(&dir.0, &config(&listen.to_string(), round + 1))?;
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
    ensure!(
        up.unmarked() == 0,
        "{} requests reached the upstream without their policies",
        up.unmarked()
    );
    ensure!(
        n(&anonymous.ok) == 0,
        "an unauthenticated request was let through"
    );
    ensure!(
        n(&anonymous.unauthorized) > 0 && n(&authenticated.ok) > 0,
        "the route must have been open between the events"
    );
    ensure!(
        counters["gate_503"].as_u64().unwrap_or(0) > 0,
        "XDP must have answered while the gateway was down"
    );
    Ok(())
}
