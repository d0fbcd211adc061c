//! `cargo xtask bench flood`: legitimate traffic under a SYN flood.
//!
//! wrk (keep-alive, and one request per connection) against a listener of
//! the gateway, without and then with a flood of spoofed SYNs from random
//! sources (the [`raw::flood`] generator, on an `AF_PACKET` socket in a
//! namespace of its own, joined to the gateway's by a second veth pair whose
//! far end, like a wire to spoofed addresses, takes no answer home: XDP's
//! replies are dropped by the veth, the kernel's die in that namespace's IP
//! layer), on two set-ups in turn: the kernel's own SYN cookies with
//! an nftables SYN rate limit on the listener (XDP not attached: the peer),
//! and Portcullis's XDP program with its default SYN budget, answering SYNs
//! over it with cookies at the NIC. On a 2-core machine the generator takes
//! one core, so the ratio under flood measures what the flood costs the
//! other core's work, on both sides alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use portcullis_tests::{Gateway, NetNs, Topology, Veth, wait_for};

use super::{Scene, link, raw, wrk};

/// Length of each wrk run.
const RUN: &str = "5s";
/// The peer's nftables SYN rate limit on the listener, per second.
const PEER_SYN_LIMIT: u32 = 20_000;

/// wrk's rate and its failed requests (socket errors and non-2xx answers).
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    rps: f64,
    failed: u64,
}

fn load(ns: &NetNs, url: &str, close: bool) -> anyhow::Result<Load> {
    let shape = if close {
        "-t1 -c32 -H 'Connection: close'"
    } else {
        "-t1 -c50"
    };
    let run = wrk(ns, &format!("{shape} -d{RUN}"), url)?;
    Ok(Load {
        rps: run.rps,
        failed: run.non_2xx + run.socket_errors,
    })
}

/// One set-up's four numbers, and the flood's rate while they were taken.
#[derive(Debug, Default)]
struct Cell {
    keep_alive: (Load, Load),
    new_connections: (Load, Load),
    flood_pps: f64,
}

/// Both wrk shapes, then both again under the flood.
fn measure(topo: &Topology, flooder: &NetNs, path: &raw::Path, url: &str) -> anyhow::Result<Cell> {
    let mut cell = Cell {
        keep_alive: (load(&topo.client, url, false)?, Load::default()),
        new_connections: (load(&topo.client, url, true)?, Load::default()),
        flood_pps: 0.0,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (path, stop) = (path.clone(), stop.clone());
        flooder.spawn(move || raw::flood(&path, &stop))
    };
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let under = (load(&topo.client, url, false), load(&topo.client, url, true));
    stop.store(true, Ordering::Relaxed);
    let (sent, _refused) = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood generator panicked"))???;
    cell.flood_pps = f64::from(u32::try_from(sent).unwrap_or(u32::MAX)) / started.elapsed().as_secs_f64();
    cell.keep_alive.1 = under.0?;
    cell.new_connections.1 = under.1?;
    Ok(cell)
}

fn nft(ns: &NetNs, script: &str) -> anyhow::Result<()> {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, script.as_bytes())?;
    ensure!(child.wait()?.success(), "nft -f failed on:\n{script}");
    Ok(())
}

/// The kernel's SYN cookies sent in `ns` so far (`TcpExtSyncookiesSent`).
fn kernel_cookies(ns: &NetNs) -> u64 {
    ns.command("nstat")
        .args(["-az", "TcpExtSyncookiesSent"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                l.strip_prefix("TcpExtSyncookiesSent")
                    .map(|r| r.split_whitespace().next().unwrap_or("0").parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn row(name: &str, cell: &Cell) {
    let ratio = |(calm, flood): (Load, Load)| flood.rps / calm.rps;
    println!(
        "| {name} | {:.0} | {:.0} ({} failed) | {:.2} | {:.0} | {:.0} ({} failed) | {:.2} | {:.0} |",
        cell.keep_alive.0.rps,
        cell.keep_alive.1.rps,
        cell.keep_alive.1.failed,
        ratio(cell.keep_alive),
        cell.new_connections.0.rps,
        cell.new_connections.1.rps,
        cell.new_connections.1.failed,
        ratio(cell.new_connections),
        cell.flood_pps / 1000.0,
    );
}

/// The flood's own namespace and veth pair to the gateway's, and the
/// generator's path down it to `listen`.
fn flood_wire(topo: &Topology, listen: SocketAddr) -> anyhow::Result<(NetNs, Veth, raw::Path)> {
    let flooder = NetNs::new("f")?;
    let s = topo.subnet;
    let wire = Veth::join(
        &topo.gw,
        &[&format!("10.{s}.1.1/24")],
        &flooder,
        &[&format!("10.{s}.1.2/24")],
    )?;
    let (ifindex, client_mac) = link(&flooder, &wire.b)?;
    let (_, gateway_mac) = link(&topo.gw, &wire.a)?;
    let std::net::IpAddr::V4(server) = listen.ip() else {
        anyhow::bail!("the flood is IPv4");
    };
    let path = raw::Path {
        ifindex,
        client_mac,
        gateway_mac,
        sources: Vec::new(),
        server,
        port: listen.port(),
    };
    // The kernel answers spoofed sources too: back down the flood's wire.
    let routed = std::process::Command::new("ip")
        .args([
            "-n",
            topo.gw.name(),
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &format!("10.{s}.1.2"),
        ])
        .status()?;
    ensure!(routed.success(), "route to the flood's sources");
    Ok((flooder, wire, path))
}

/// Runs the flood benchmark and prints its table.
pub fn run(config: impl Fn(SocketAddr) -> String) -> anyhow::Result<()> {
    let scene = Scene::new("flood")?;
    let Scene {
        topo,
        dir,
        listen,
        url,
        ..
    } = &scene;
    let (topo, listen, url) = (topo, *listen, url.as_str());
    std::fs::write(dir.0.join("gateway.yaml"), config(listen))?;
    let (flooder, wire, path) = flood_wire(topo, listen)?;
    let xdp = Gateway::new(&topo.gw);
    let start = |instance: &str| scene.start(instance);

    // The peer: no XDP; the kernel's SYN cookies and an nftables SYN limit.
    let peer = {
        let gw = start(xdp.instance())?;
        nft(
            &topo.gw,
            &format!(
                "table inet flood_peer {{\n\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\t\t\
                 tcp dport {} tcp flags & (syn|ack) == syn limit rate over {PEER_SYN_LIMIT}/second drop\n\t}}\n}}\n",
                listen.port()
            ),
        )?;
        let before = kernel_cookies(&topo.gw);
        let cell = measure(topo, &flooder, &path, url)?;
        let cookies = kernel_cookies(&topo.gw) - before;
        nft(&topo.gw, "delete table inet flood_peer\n")?;
        drop(gw);
        (cell, cookies)
    };

    // Portcullis: XDP attached, the default SYN budget armed by the gateway.
    xdp.cli(&["xdp", "attach", "--iface", &topo.veth.a])?;
    xdp.cli(&["xdp", "attach", "--iface", &wire.a])?;
    let gw = start(xdp.instance())?;
    let listener = listen.to_string();
    let of_listener = || xdp.listener_status(&listener);
    wait_for("the SYN budget armed", || {
        Ok(of_listener()?["syn"]["cookies_armed"] == true)
    })?;
    let ours = measure(topo, &flooder, &path, url)?;
    let seen = of_listener()?;
    let counts = &seen["syn"];
    drop(gw);

    println!("Legitimate traffic under a SYN flood from random spoofed sources (wrk -t1, {RUN} per run):");
    println!(
        "| set-up | keep-alive req/s | under flood | ratio | new connections req/s | under flood | ratio | flood kpps |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    row(
        &format!("kernel SYN cookies + nftables SYN limit {PEER_SYN_LIMIT}/s (no XDP)"),
        &peer.0,
    );
    row(
        "Portcullis: XDP SYN budget (default 20,000/s per CPU), cookies at the NIC",
        &ours,
    );

    println!(
        "flood verdicts: kernel SYN cookies sent {}; XDP cookies {}, cookie failures {}, SYNs within the per-source rate {}; \
         packets passed {}, answered by a closed gate {}",
        peer.1,
        counts["cookies"],
        counts["cookie_failed"],
        counts["within"],
        seen["counters"]["passed"],
        seen["counters"]["gate_syn_ack"],
    );
    Ok(())
}
