//! `cargo xtask bench gate`: the Gatekeeper's two numbers.
//!
//! 1. 503 rate for the same client when a gated listener is answered by XDP
//!    (stateless SYN-cookie exchange at the NIC) and when it is answered by the
//!    proxy (XDP not loaded): wrk, one request per connection
//!    (`Connection: close`), since a gated client is a new connection each time.
//!    On one 2-core machine the client's own TCP stack shares the cores, so
//!    the gateway's cost per 503 is measured too: the proxy's process CPU time
//!    and the XDP program's run time (BPF_ENABLE_STATS).
//! 2. Latency from a policy edit (the file renamed into place) to enforcement:
//!    in the proxy (a keep-alive client sees the new status) and in the maps
//!    (the listener's gate bit flips), p50 and p99 over 100 edits each way.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use portcullis::xdp::{Instance, ListenerAddr};
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance, read_response};
use portcullis_tests::{Gateway, NetNs, Topology, portcullis_bin, unique_name, wait_for};

mod flood;
mod raw;

const EDITS: usize = 100;
/// Length of each raw-client run.
const RAW_RUN: Duration = Duration::from_secs(5);
/// Exchanges the raw client keeps in flight.
const RAW_WINDOW: usize = 256;
/// Source addresses per raw-client run (each gives 55,535 ports).
const SOURCES: u8 = 16;

/// The raw client on every core, each thread with its own sources.
fn raw_run(ns: &NetNs, path: &raw::Path) -> anyhow::Result<raw::Outcome> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let per = path.sources.len() / threads;
    let mut handles = Vec::new();
    for t in 0..threads {
        let part = raw::Path {
            sources: path.sources[t * per..(t + 1) * per].to_vec(),
            ..path.clone()
        };
        handles.push(ns.spawn(move || raw::run(&part, RAW_RUN, RAW_WINDOW / threads, 10_000)));
    }
    let mut total = raw::Outcome::default();
    for handle in handles {
        let one = handle
            .join()
            .map_err(|_| anyhow::anyhow!("raw client panicked"))???;
        total.completed += one.completed;
        total.timed_out += one.timed_out;
        total.other += one.other;
        total.lost += one.lost;
        total.elapsed = total.elapsed.max(one.elapsed);
    }
    Ok(total)
}

/// The interface index and MAC of `dev` in `ns`.
fn link(ns: &NetNs, dev: &str) -> anyhow::Result<(i32, [u8; 6])> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-j", "link", "show", "dev", dev])
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let index = json[0]["ifindex"].as_i64().context("ifindex")?;
    let mac: Vec<u8> = json[0]["address"]
        .as_str()
        .context("address")?
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    Ok((
        i32::try_from(index)?,
        mac.try_into().map_err(|_| anyhow::anyhow!("MAC"))?,
    ))
}

/// The raw client's path to `listen`: `SOURCES` addresses from host
/// `100 + offset` on the client's subnet, which the client kernel does not
/// own and the gateway's neighbour table points at the client's end.
fn raw_path(topo: &Topology, listen: SocketAddr, offset: u8) -> anyhow::Result<raw::Path> {
    let (ifindex, client_mac) = link(&topo.client, &topo.veth.b)?;
    let (_, gateway_mac) = link(&topo.gw, &topo.veth.a)?;
    let sources: Vec<std::net::Ipv4Addr> = (0..SOURCES)
        .map(|i| std::net::Ipv4Addr::new(10, topo.subnet, 0, 100 + offset + i))
        .collect();
    let mac = client_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for source in &sources {
        let out = std::process::Command::new("ip")
            .args(["-n", topo.gw.name(), "neigh", "replace", &source.to_string()])
            .args(["lladdr", &mac, "dev", &topo.veth.a, "nud", "permanent"])
            .output()?;
        ensure!(
            out.status.success(),
            "ip neigh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let std::net::IpAddr::V4(server) = listen.ip() else {
        bail!("the raw client speaks IPv4");
    };
    Ok(raw::Path {
        ifindex,
        client_mac,
        gateway_mac,
        sources,
        server,
        port: listen.port(),
    })
}

fn config(listen: SocketAddr, maximum: &str) -> String {
    config_with(listen, maximum, "")
}

/// [`config`] with more of the ApiInstance's spec.
fn config_with(listen: SocketAddr, maximum: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: gate-bench
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
  logging:
    accessLogs: false
---
{}",
        api_instance(
            "orders",
            &format!("http://{listen}/orders"),
            "http://127.0.0.1:9000/",
            &format!(
                "{spec}  policies:
    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: {maximum}
            timePeriodInMilliseconds: 1000
        clusterizable: false
"
            )
        )
    )
}

fn deploy(dir: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(".gateway.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join("gateway.yaml"))?;
    Ok(())
}

/// What one wrk run printed: its rate, its non-2xx answers and its socket errors.
#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    rps: f64,
    non_2xx: u64,
    socket_errors: u64,
}

/// Runs `wrk ARGS URL` from `ns`, with the descriptor limit raised.
fn wrk(ns: &NetNs, args: &str, url: &str) -> anyhow::Result<Wrk> {
    let out = ns
        .command("sh")
        .args(["-c", &format!("ulimit -n $(ulimit -Hn); exec wrk {args} {url}")])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = Wrk::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => run.rps = v.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => run.non_2xx = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                run.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    ensure!(run.rps > 0.0, "wrk printed no rate: {text}");
    Ok(run)
}

/// wrk from `ns`, one request per connection: requests per second and non-2xx answers.
fn wrk_503(ns: &NetNs, url: &str) -> anyhow::Result<(f64, u64)> {
    let run = wrk(ns, "-t2 -c64 -d5s -H 'Connection: close'", url)?;
    Ok((run.rps, run.non_2xx))
}

/// The `p`-th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len().saturating_sub(1) + 50) / 100;
    sorted.get(rank).copied().unwrap_or(0.0)
}

struct Probe {
    status: AtomicU16,
    at_ns: AtomicU64,
    stop: AtomicBool,
}

/// Sends requests back to back on one keep-alive connection, recording the
/// last status and when it came (ns since `base`).
fn probe(addr: SocketAddr, base: Instant, p: &Probe) -> anyhow::Result<()> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_nodelay(true)?;
    let mut buf = Vec::new();
    while !p.stop.load(Ordering::Relaxed) {
        conn.write_all(b"GET /orders/hello HTTP/1.1\r\nHost: api\r\n\r\n")?;
        let status = read_response(&mut conn, &mut buf)?;
        let at = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        p.status.store(status, Ordering::Release);
        p.at_ns.store(at, Ordering::Release);
    }
    Ok(())
}

/// What both benchmarks start from: the two namespaces (the client's end
/// taking XDP's replies), the upstream, the configuration's directory, and
/// the listener with its URL.
struct Scene {
    topo: Topology,
    _client_xdp: Gateway,
    _up: Upstream,
    dir: TempDir,
    listen: SocketAddr,
    url: String,
}

impl Scene {
    fn new(name: &str) -> anyhow::Result<Self> {
        let topo = Topology::new()?;
        let client_xdp = topo.accept_xdp_replies()?;
        let up = Upstream::start(&topo.gw, "127.0.0.1:9000".parse()?)?;
        let listen = SocketAddr::new(topo.gw_ip(false), 8080);
        Ok(Self {
            _client_xdp: client_xdp,
            _up: up,
            dir: TempDir::new(name)?,
            url: format!("http://{listen}/orders/hello"),
            listen,
            topo,
        })
    }

    /// The release gateway on the directory's configuration, with `instance`'s maps.
    fn start(&self, instance: &str) -> anyhow::Result<GatewayProcess> {
        GatewayProcess::start_env(
            &self.topo.gw,
            &portcullis_bin(),
            &self.dir.0,
            "127.0.0.1:9901".parse()?,
            &[("PORTCULLIS_INSTANCE", Path::new(instance))],
        )
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("flood") {
        // wrk is one source opening more than the default 10,000 SYNs a
        // second: the per-source limit would throttle the legitimate client.
        return flood::run(|listen| config_with(listen, "1000000000", "  synLimit:\n    perSourceRate: 0\n"));
    }
    let scene = Scene::new("gateb")?;
    let Scene {
        topo,
        dir,
        listen,
        url,
        ..
    } = &scene;
    let (listen, url) = (*listen, url.as_str());
    deploy(&dir.0, &config(listen, "lots"))?;
    let start = |instance: &str| scene.start(instance);

    // 1. The same gated route, answered by the proxy, then by XDP, for two
    //    clients: wrk (a kernel TCP socket per request) and the raw client.
    let unloaded = unique_name("none");
    let gw = start(&unloaded)?;
    let proxy_path = raw_path(topo, listen, 0)?;
    let cpu_before = portcullis_tests::cpu_seconds(gw.pid())?;
    let proxy_wrk = wrk_503(&topo.client, url)?;
    let proxy_raw = raw_run(&topo.client, &proxy_path)?;
    let proxy_cpu = portcullis_tests::cpu_seconds(gw.pid())? - cpu_before;
    drop(gw);
    let xdp = Gateway::new(&topo.gw);
    xdp.cli(&["xdp", "attach", "--iface", &topo.veth.a])?;
    let gw = start(xdp.instance())?;
    let xdp_path = raw_path(topo, listen, SOURCES)?;
    let instance = Instance::new(xdp.instance())?;
    let stats_on = portcullis::xdp::enable_run_stats()?;
    let runs_before = instance.run_stats()?;
    let xdp_wrk = wrk_503(&topo.client, url)?;
    let xdp_raw = raw_run(&topo.client, &xdp_path)?;
    let runs_after = instance.run_stats()?;
    drop(stats_on);
    let xdp_cpu = runs_after
        .run_time
        .saturating_sub(runs_before.run_time)
        .as_secs_f64();
    let per_503 =
        |cpu: f64, answered: u64| cpu / f64::from(u32::try_from(answered.max(1)).unwrap_or(u32::MAX));
    let cost = (
        per_503(proxy_cpu, proxy_wrk.1 + proxy_raw.completed),
        per_503(xdp_cpu, xdp_wrk.1 + xdp_raw.completed),
    );
    let counters = xdp.listener_counters(&listen.to_string())?;
    ensure!(
        counters["gate_503"].as_u64().unwrap_or(0) >= xdp_wrk.1 + xdp_raw.completed,
        "XDP must have answered: {counters}"
    );
    ensure!(
        proxy_raw.other == 0 && xdp_raw.other == 0,
        "every answer must be a 503: {proxy_raw:?} {xdp_raw:?}"
    );

    // 2. Edit → enforced, with XDP attached and the gateway running.
    let (mut proxy_ms, mut maps_ms) = edits(topo, &dir.0, listen, xdp.instance())?;
    drop(gw);
    proxy_ms.sort_by(f64::total_cmp);
    maps_ms.sort_by(f64::total_cmp);

    report(
        (proxy_wrk, proxy_raw),
        (xdp_wrk, xdp_raw),
        cost,
        (&proxy_ms, &maps_ms),
    );
    Ok(())
}

/// Edits the policy back and forth: milliseconds until the proxy and the maps enforce each edit.
fn edits(
    topo: &Topology,
    dir: &Path,
    listen: SocketAddr,
    instance: &str,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    deploy(dir, &config(listen, "1000000"))?;
    let maps = Instance::new(instance)?.maps()?;
    let key = ListenerAddr::tcp(listen);
    wait_for("the gate to open", || Ok(maps.gate(&key)?.1))?;
    let base = Instant::now();
    let p = Arc::new(Probe {
        status: AtomicU16::new(0),
        at_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let prober = {
        let p = p.clone();
        topo.client.spawn(move || probe(listen, base, &p))
    };
    let mut proxy_ms = Vec::new();
    let mut maps_ms = Vec::new();
    for edit in 0..2 * EDITS {
        let close = edit % 2 == 0;
        let (maximum, status) = if close { ("lots", 503) } else { ("1000000", 200) };
        let text = config(listen, maximum);
        std::thread::sleep(Duration::from_millis(20));
        let t0 = base.elapsed();
        deploy(dir, &text)?;
        let (mut in_proxy, mut in_maps) = (None, None);
        let until = Instant::now() + Duration::from_secs(5);
        while in_proxy.is_none() || in_maps.is_none() {
            if Instant::now() > until {
                bail!("edit {edit} not enforced within 5 s (proxy {in_proxy:?}, maps {in_maps:?})");
            }
            // Poll, but leave the two cores to the gateway and the probe.
            std::thread::sleep(Duration::from_micros(50));
            if in_maps.is_none() && maps.gate(&key)?.1 != close {
                in_maps = Some(base.elapsed().saturating_sub(t0));
            }
            let at = Duration::from_nanos(p.at_ns.load(Ordering::Acquire));
            if in_proxy.is_none() && at > t0 && p.status.load(Ordering::Acquire) == status {
                in_proxy = Some(at.saturating_sub(t0));
            }
        }
        proxy_ms.push(in_proxy.context("proxy")?.as_secs_f64() * 1000.0);
        maps_ms.push(in_maps.context("maps")?.as_secs_f64() * 1000.0);
    }
    p.stop.store(true, Ordering::Relaxed);
    let _ = prober.join();
    Ok((proxy_ms, maps_ms))
}

fn report(
    proxy: ((f64, u64), raw::Outcome),
    xdp: ((f64, u64), raw::Outcome),
    cost: (f64, f64),
    (proxy_ms, maps_ms): (&[f64], &[f64]),
) {
    let (((proxy_wrk, _), proxy_raw), ((xdp_wrk, _), xdp_raw)) = (proxy, xdp);
    let (proxy_cost, xdp_cost) = cost;
    println!("503 for a gated route, answered by the proxy (XDP not loaded) or by XDP, same clients:");
    println!("| client | proxy 503/s | XDP 503/s | xdp/proxy |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| raw client (TCP spoken over AF_PACKET, {RAW_WINDOW} in flight, {} s) | {:.0} | {:.0} | {:.2} |",
        RAW_RUN.as_secs(),
        proxy_raw.rate(),
        xdp_raw.rate(),
        xdp_raw.rate() / proxy_raw.rate()
    );
    println!(
        "| wrk -t2 -c64, Connection: close (a kernel socket per request) | {proxy_wrk:.0} | {xdp_wrk:.0} | {:.2} |",
        xdp_wrk / proxy_wrk
    );
    println!(
        "raw client: timed out proxy {} / XDP {}, frames refused by the client's queue proxy {} / XDP {}",
        proxy_raw.timed_out, xdp_raw.timed_out, proxy_raw.lost, xdp_raw.lost
    );
    println!(
        "gateway CPU per 503: proxy {:.1} µs (process CPU, a lower bound), XDP {:.2} µs (program run time)",
        proxy_cost * 1e6,
        xdp_cost * 1e6
    );
    println!("xdp/proxy 503 rate: {:.2}", xdp_raw.rate() / proxy_raw.rate());
    println!(
        "xdp/proxy 503 capacity per gateway core: {:.1}",
        proxy_cost / xdp_cost
    );
    println!();
    println!(
        "policy edit → enforced ({} edits, file renamed into place):",
        proxy_ms.len()
    );
    println!("| where | p50 ms | p99 ms | max ms |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, v) in [
        ("proxy (keep-alive client sees it)", &proxy_ms),
        ("XDP maps (gate bit)", &maps_ms),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            percentile(v, 50),
            percentile(v, 99),
            v.last().copied().unwrap_or(0.0)
        );
    }
}
