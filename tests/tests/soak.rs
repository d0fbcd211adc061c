//! The soak (`cargo xtask soak --minutes N`; two minutes in `cargo xtask
//! test`): mixed load through a connected-mode gateway while a production
//! gateway's faults come every few seconds. Keep-alive clients (refused and
//! admitted), 1 MiB bodies, slow clients, a new TLS connection per request
//! (curl), HTTP/2 (h2load) and WebSockets (Python `websockets`) run at once.
//! Meanwhile the control plane publishes edits, Redis and the control plane
//! are killed and restarted, one of the two upstream endpoints flaps, and
//! the gateway is restarted (in the first half only).
//!
//! It fails on:
//! - a gateway that exits on its own;
//! - a request that reached an upstream without its policies, or an
//!   unauthenticated one that was let through;
//! - descriptors or memory that grow over the second half, where the gateway
//!   runs without restarts.
//!
//! It prints the totals.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use portcullis_tests::control::{ADMIN, ControlPlane, Replica, register};
use portcullis_tests::http::{
    GatewayProcess, Issued, Pki, RedisServer, TempDir, Upstream, api_instance, curl, mobile_contract,
    read_response, tls_binding,
};
use portcullis_tests::load::{MOBILE, TAG, Tally, connect_counted, hammer, n, say};
use portcullis_tests::ws::Py;
use portcullis_tests::{NetNs, wait_for};

const GW: &str = "127.0.0.1:8080";
const GW_TLS: &str = "127.0.0.1:8443";
const REDIS: &str = "127.0.0.1:6391";
const REDIS_PASSWORD: &str = "r3dis-soak-pw";
const STABLE: &str = "127.0.0.1:9000";
const FLAPPING: &str = "127.0.0.1:9001";
const WS_PORT: &str = "9002";
/// Seconds between two faults.
const STEP: Duration = Duration::from_secs(3);

/// How long the soak runs: `PORTCULLIS_SOAK_MINUTES` (fractions allowed), 2 by default.
fn duration() -> Duration {
    let minutes = std::env::var("PORTCULLIS_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse::<f64>().ok())
        .filter(|m| *m > 0.0)
        .unwrap_or(2.0);
    Duration::from_secs_f64(minutes * 60.0)
}

/// Every policy chain of the cluster: client-id enforcement, a rate limit
/// shared in Redis (high enough never to refuse), and the tag of `edit`.
fn chain(edit: usize) -> String {
    format!(
        "  policies:
    - policyRef:
        name: client-id-enforcement-flex
    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: 100000000
            timePeriodInMilliseconds: 60000
    - policyRef:
        name: header-injection-flex
      config:
        inboundHeaders:
          - key: {TAG}
            value: \"edit-{edit}\"
"
    )
}

/// What the control plane serves, at edit `edit`.
fn cluster_files(edit: usize, cert: &Issued) -> String {
    let h2c = "  http2:\n    cleartext: true\n";
    let orders = api_instance("orders", &format!("http://{GW}/orders"), "http://unused/", "")
        .replace("    up:\n      address: http://unused/\n", "    pool: {}\n")
        .replace("---\n", &format!("{h2c}{}---\n", chain(edit)));
    let secure = api_instance(
        "secure",
        &format!("https://{GW_TLS}/orders"),
        &format!("http://{STABLE}/"),
        &chain(edit),
    );
    let chat = api_instance(
        "chat",
        &format!("http://{GW}/chat"),
        &format!("http://127.0.0.1:{WS_PORT}/"),
        &format!("{h2c}{}", chain(edit)),
    );
    // The flapping endpoint is ejected on connect failures and tried again later.
    let pool = format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: pool
spec:
  endpoints: [\"http://{STABLE}/\", \"http://{FLAPPING}/\"]
  outlierDetection:
    consecutive5xx: 2
    baseEjectionTime: 1s
---
"
    );
    format!(
        "{pool}{orders}{secure}{}{chat}{}",
        tls_binding("secure", &[cert], ""),
        mobile_contract("orders, secure, chat")
    )
}

/// The replica's own settings: flexible, with Redis as shared storage.
fn settings() -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: soak
spec:
  proxy:
    workers: 2
    admin: {ADMIN}
  gatekeeper:
    level: flexible
  sharedStorage:
    redis:
      address: {REDIS}
      username: gateway
      password: ${{file:redis.password}}
"
    )
}

/// The gateway's open descriptors and resident memory (KiB).
fn footprint(gw: &GatewayProcess) -> anyhow::Result<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))?.count();
    let (_, rss) = gw.memory_kib()?;
    Ok((fds, rss))
}

/// Authenticated 1 MiB uploads on a keep-alive connection, until `stop`.
fn bodies(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let body = vec![b'x'; 1 << 20];
    let head = format!(
        "POST /orders/sink HTTP/1.1\r\nHost: api\r\nAuthorization: Basic {MOBILE}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(mut conn) = connect_counted(addr, tally, Duration::from_millis(20)) else {
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        for _ in 0..8 {
            if conn
                .write_all(head.as_bytes())
                .and_then(|()| conn.write_all(&body))
                .is_err()
            {
                tally.count(None);
                break;
            }
            // The upstream answers the size it read: a 200 for less is a failure.
            let status = match read_response(&mut conn, &mut buf) {
                Ok(200) if !buf.ends_with(b"1048576\n") => None,
                Ok(s) => Some(s),
                Err(_) => None,
            };
            tally.count(status);
            if status != Some(200) {
                break;
            }
        }
    }
}

/// Clients that send their head one byte at a time, 10 ms apart, until `stop`.
fn slow(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let head = format!(
        "GET /orders/hello HTTP/1.1\r\nHost: api\r\nAuthorization: Basic {MOBILE}\r\nConnection: close\r\n\r\n"
    );
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(mut conn) = connect_counted(addr, tally, Duration::from_millis(20)) else {
            continue;
        };
        let _ = conn.set_nodelay(true);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let sent = head.as_bytes().chunks(1).all(|b| {
            std::thread::sleep(Duration::from_millis(10));
            conn.write_all(b).is_ok()
        });
        tally.count(if sent {
            read_response(&mut conn, &mut buf).ok()
        } else {
            None
        });
    }
}

/// A new TLS connection per request, by curl, until `stop`.
fn tls(ns_ca: &Path, stop: &AtomicBool, tally: &Tally) {
    let auth = format!("Authorization: Basic {MOBILE}");
    while !stop.load(Ordering::Relaxed) {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                "-H",
                &auth,
                "--cacert",
            ])
            .arg(ns_ca)
            .arg(format!("https://{GW_TLS}/orders/hello"))
            .output();
        let status = out
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u16>().ok())
            .filter(|s| *s != 0);
        tally.count(status);
    }
}

/// HTTP/2 totals from h2load runs: requests done, 2xx, 4xx, 5xx, failed.
#[derive(Debug, Default)]
struct H2 {
    runs: AtomicU64,
    done: AtomicU64,
    ok: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    failed: AtomicU64,
}

/// The number before `label` in h2load's `line`.
fn h2load_count(text: &str, line: &str, label: &str) -> u64 {
    text.lines()
        .find(|l| l.trim_start().starts_with(line))
        .and_then(|l| {
            l.split(',')
                .find(|part| part.contains(label))
                .and_then(|part| part.split_whitespace().rev().find_map(|w| w.parse().ok()))
        })
        .unwrap_or(0)
}

/// h2load over h2c, 200 requests on 2 connections a run, until `stop`.
fn h2(stop: &AtomicBool, totals: &H2) {
    let auth = format!("authorization: Basic {MOBILE}");
    while !stop.load(Ordering::Relaxed) {
        let Ok(out) = std::process::Command::new("h2load")
            .args(["-n", "200", "-c", "2", "-m", "8", "-T", "5", "-H", &auth])
            .arg(format!("http://{GW}/orders/hello"))
            .output()
        else {
            totals.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let add = |slot: &AtomicU64, v: u64| slot.fetch_add(v, Ordering::Relaxed);
        add(&totals.runs, 1);
        add(&totals.done, h2load_count(&text, "requests:", "done"));
        add(&totals.ok, h2load_count(&text, "status codes:", "2xx"));
        add(&totals.client_errors, h2load_count(&text, "status codes:", "4xx"));
        add(&totals.server_errors, h2load_count(&text, "status codes:", "5xx"));
        add(&totals.failed, h2load_count(&text, "requests:", "failed"));
        if !out.status.success() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The flapping endpoint: its upstream while up, and what earlier ones counted.
struct Flap {
    up: Option<Upstream>,
    requests: u64,
    unmarked: u64,
    flaps: u64,
}

impl Flap {
    fn start(ns: &NetNs) -> anyhow::Result<Upstream> {
        let addr: SocketAddr = FLAPPING.parse()?;
        let started = Instant::now();
        loop {
            // The old listener closes on its next accept; until then the port is taken.
            match Upstream::start(ns, addr) {
                Ok(up) => {
                    up.expect_header(TAG);
                    return Ok(up);
                }
                Err(e) if started.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn toggle(&mut self, ns: &NetNs) -> anyhow::Result<()> {
        if let Some(up) = self.up.take() {
            self.requests += up.requests();
            self.unmarked += up.unmarked();
            self.flaps += 1;
        } else {
            self.up = Some(Self::start(ns)?);
        }
        Ok(())
    }

    fn totals(&self) -> (u64, u64) {
        let (r, u) = self
            .up
            .as_ref()
            .map_or((0, 0), |up| (up.requests(), up.unmarked()));
        (self.requests + r, self.unmarked + u)
    }
}

/// The faults injected, by kind.
#[derive(Debug, Default)]
struct Faults {
    edits: u64,
    redis_kills: u64,
    control_plane_kills: u64,
    restarts: u64,
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn a_soak_under_faults_keeps_every_request_policed_and_leaks_nothing() -> anyhow::Result<()> {
    let length = duration();
    let ns = NetNs::new("soak")?;
    let home = TempDir::new("soak")?;
    let pki = Pki::new(&home.0, "soak")?;
    let cert = pki.issue("gateway", &["127.0.0.1"], false)?;

    let cp_dir = home.0.join("cp");
    ControlPlane::init(&cp_dir)?;
    let mut cp = ControlPlane::start(&ns, &cp_dir)?;
    cp.publish("soak", "soak.yaml", &cluster_files(0, &cert))?;
    let mut redis = RedisServer::start(&ns, &home.0, REDIS.parse()?, "gateway", REDIS_PASSWORD)?;
    let stable = Upstream::start(&ns, STABLE.parse()?)?;
    stable.expect_header(TAG);
    let mut flap = Flap {
        up: Some(Flap::start(&ns)?),
        requests: 0,
        unmarked: 0,
        flaps: 0,
    };
    let ws_server = {
        let script = home.0.join("ws.py");
        std::fs::write(&script, portcullis_tests::ws::SCRIPT)?;
        Py::start_script_env(&ns, &script, &["serve", WS_PORT], &[("WS_TAG", TAG)])?
    };

    let replica = {
        let dir = TempDir::new("soakgw")?;
        dir.write_private("redis.password", REDIS_PASSWORD)?;
        dir.write("settings.yaml", &settings())?;
        register(&ns, &cp.token("soak", "10m")?, "soak-a", &dir.0)?;
        Replica::with_new_key(dir)?
    };
    let mut gw = replica.start(&ns)?;
    let gw_addr: SocketAddr = GW.parse()?;
    let probe = format!("http://{GW}/orders/hello");
    wait_for("the cluster's API served and policed", || {
        Ok(curl(&ns, &["-o", "/dev/null", "-w", "%{http_code}", &probe])?.1 == "401")
    })
    .with_context(|| format!("{}\ncontrol plane:\n{}", gw.log_text(), cp.log_text()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<(&str, Arc<Tally>)> = [
        "unauthenticated keep-alive",
        "authenticated keep-alive",
        "1 MiB bodies",
        "slow clients",
        "new TLS connections",
    ]
    .into_iter()
    .map(|name| (name, Arc::new(Tally::default())))
    .collect();
    let h2_totals = Arc::new(H2::default());
    let mut load = Vec::new();
    for (i, (_, tally)) in tallies.iter().enumerate() {
        let (stop, tally) = (stop.clone(), tally.clone());
        let ca = pki.ca.clone();
        load.push(ns.spawn(move || match i {
            0 => hammer(gw_addr, None, &stop, &tally),
            1 => hammer(gw_addr, Some(MOBILE), &stop, &tally),
            2 => bodies(gw_addr, &stop, &tally),
            3 => slow(gw_addr, &stop, &tally),
            _ => tls(&ca, &stop, &tally),
        }));
    }
    {
        let (stop, totals) = (stop.clone(), h2_totals.clone());
        load.push(ns.spawn(move || h2(&stop, &totals)));
    }
    let ws_client = {
        let script = home.0.join("ws.py");
        let seconds = format!("{:.0}", length.as_secs_f64());
        Py::start_script_env(
            &ns,
            &script,
            &["soak", &format!("ws://{GW}/chat/"), &seconds],
            &[("WS_AUTH", MOBILE)],
        )?
    };

    let started = Instant::now();
    let mut faults = Faults::default();
    let mut last_restart = started;
    let mut before: Option<(usize, u64)> = None;
    let mut tick = 0usize;
    while started.elapsed() + STEP < length {
        std::thread::sleep(STEP);
        if !gw.alive() {
            bail!("the gateway exited on its own:\n{}", gw.log_text());
        }
        let second_half = started.elapsed() > length / 2;
        if second_half && before.is_none() && last_restart.elapsed() > Duration::from_secs(10) {
            before = Some(footprint(&gw)?);
        }
        match tick % 8 {
            0 | 4 => {
                faults.edits += 1;
                cp.publish(
                    "soak",
                    "soak.yaml",
                    &cluster_files(usize::try_from(faults.edits)?, &cert),
                )?;
            }
            1 => {
                faults.redis_kills += 1;
                redis.kill();
            }
            2 => redis.restart()?,
            3 | 6 => flap.toggle(&ns)?,
            5 => {
                faults.control_plane_kills += 1;
                cp.kill();
            }
            _ if !second_half => {
                cp.restart(&ns)?;
                faults.restarts += 1;
                gw.terminate()?;
                gw.wait_exit(Duration::from_secs(15))?;
                gw = replica.start(&ns)?;
                last_restart = Instant::now();
            }
            _ => cp.restart(&ns)?,
        }
        tick += 1;
    }
    if flap.up.is_none() {
        flap.toggle(&ns)?;
    }
    let after = footprint(&gw)?;
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        let _ = thread.join();
    }
    let mut ws_client = ws_client;
    let ws_line = ws_client.line().context("the WebSocket clients' totals")?;
    drop(ws_server);
    ensure!(gw.alive(), "the gateway exited on its own:\n{}", gw.log_text());

    let (flap_requests, flap_unmarked) = flap.totals();
    let unmarked = stable.unmarked() + flap_unmarked;
    say(&format!(
        "soak: {:.0} s; faults: {} edits, {} Redis kills, {} control-plane kills, {} upstream flaps, {} gateway restarts",
        started.elapsed().as_secs_f64(),
        faults.edits,
        faults.redis_kills,
        faults.control_plane_kills,
        flap.flaps,
        faults.restarts
    ));
    for (name, tally) in &tallies {
        say(&format!("  {}", tally.line(name)));
    }
    say(&format!(
        "  HTTP/2 (h2load, {} runs): {} done, 2xx {}, 4xx {}, 5xx {}, failed {}",
        n(&h2_totals.runs),
        n(&h2_totals.done),
        n(&h2_totals.ok),
        n(&h2_totals.client_errors),
        n(&h2_totals.server_errors),
        n(&h2_totals.failed)
    ));
    say(&format!("  WebSockets (3 messages each): {ws_line}"));
    say(&format!(
        "  upstreams: {} requests, {unmarked} without their policies",
        stable.requests() + flap_requests
    ));
    let before = before.context("no footprint taken in the second half: the soak is too short")?;
    say(&format!(
        "  gateway over the second half: descriptors {} -> {}, RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1
    ));

    ensure!(
        unmarked == 0,
        "{unmarked} requests reached an upstream without their policies"
    );
    let anonymous = &tallies[0].1;
    ensure!(
        n(&anonymous.ok) == 0,
        "an unauthenticated request was let through"
    );
    ensure!(
        n(&anonymous.unauthorized) > 0,
        "the refused clients were answered"
    );
    for (name, tally) in &tallies[1..] {
        ensure!(n(&tally.ok) > 0, "{name}: not one request served");
    }
    ensure!(n(&h2_totals.ok) > 0, "HTTP/2: not one request served");
    let ws: Vec<u64> = ws_line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    ensure!(ws.len() == 3 && ws[0] > 0 && ws[2] == 0, "WebSockets: {ws_line}");
    ensure!(
        after.0 <= before.0 + 32,
        "descriptors grew from {} to {} with no restart",
        before.0,
        after.0
    );
    ensure!(
        after.1 <= before.1 + before.1 / 4 + 16 * 1024,
        "RSS grew from {} to {} KiB with no restart",
        before.1,
        after.1
    );
    Ok(())
}
