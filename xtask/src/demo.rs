//! `cargo xtask demo`: the gateway's XDP side in namespaces of its own, with
//! one client allowed and one dropped at the NIC.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigSet, Signal};
use portcullis_harness::{EchoServer, Gateway, Topology};

use crate::{cargo, root, run as sh, setup};

const PORT: u16 = 8080;

fn curl(topo: &Topology, src: std::net::IpAddr, url: &str) -> anyhow::Result<(bool, String)> {
    let started = Instant::now();
    let out = topo
        .client
        .command("curl")
        .args(["-sS", "--max-time", "2", "--interface", &src.to_string(), url])
        .output()
        .context("running curl")?;
    let took = started.elapsed();
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else {
        format!("{} ({took:.1?})", String::from_utf8_lossy(&out.stderr).trim())
    };
    Ok((out.status.success(), text))
}

/// Runs the demo; stays up until Ctrl-C unless `once`.
pub fn run(once: bool) -> anyhow::Result<()> {
    crate::require_root("cargo xtask demo")?;
    setup::test_packages()?;
    let object = setup::build_ebpf()?;
    sh(cargo()
        .args(["build", "-p", "portcullis"])
        .env("PORTCULLIS_XDP_OBJ", &object))?;
    let bin = root().join("target/debug/portcullis");
    // Block the stop signals before any thread exists, so sigwait gets them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block().context("blocking SIGINT/SIGTERM")?;

    let topo = Topology::new()?;
    let gw = Gateway::with_bin(&topo.gw, bin);
    let gw_ip = topo.gw_ip(false);
    let (good, bad) = (topo.client_ip(2, false), topo.client_ip(3, false));
    let upstream = EchoServer::start(&topo.gw, SocketAddr::new(gw_ip, PORT))?;
    let listener = upstream.addr.to_string();

    println!();
    println!(
        "== namespaces: gateway {} ({gw_ip}), clients {} ({good} allowed, {bad} denied)",
        topo.gw.name(),
        topo.client.name()
    );
    print!("{}", gw.cli(&["xdp", "attach", "--iface", &topo.veth.a])?);
    print!("{}", gw.cli(&["listener", "add", &listener])?);
    print!(
        "{}",
        gw.cli(&["acl", "add", "--deny", "--listener", &listener, &bad.to_string()])?
    );

    let url = format!("http://{listener}/");
    let (ok, text) = curl(&topo, good, &url)?;
    println!(
        "\n== allowed client {good}: curl {url}\n   {}: {text}",
        if ok { "answered" } else { "FAILED" }
    );
    if !ok {
        bail!("the allowed client was not answered");
    }
    let (ok, text) = curl(&topo, bad, &url)?;
    println!(
        "== denied client {bad}: curl {url}\n   {}: {text}",
        if ok { "ANSWERED" } else { "dropped at the NIC" }
    );
    if ok {
        bail!("the denied client got through");
    }
    println!(
        "   connections the upstream accepted: {} (the denied SYNs never reached a socket)",
        upstream.accepted()
    );
    println!("\n== portcullis status");
    print!("{}", gw.cli(&["status"])?);

    if !once {
        println!(
            "\nXDP stays attached to {} in {}: try `nsenter --net=/run/netns/{} curl --interface {bad} {url}`.\nCtrl-C to stop and clean up.",
            topo.veth.a,
            topo.gw.name(),
            topo.client.name()
        );
        stop.wait().context("waiting for Ctrl-C")?;
        println!("\n== final counters");
        print!("{}", gw.cli(&["status"])?);
    }
    Ok(())
}
