//! `cargo xtask demo`: the gateway's XDP side in namespaces of its own, with
//! one client allowed and one dropped at the NIC.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigSet, Signal};
use portcullis_harness::http::{GatewayProcess, Issued, Pki, TempDir, Upstream};
use portcullis_harness::{Gateway, Topology};

use crate::{cargo, root, run as sh, setup};

const PORT: u16 = 8443;

fn curl(topo: &Topology, src: std::net::IpAddr, extra: &[&str], url: &str) -> anyhow::Result<(bool, String)> {
    let started = Instant::now();
    let out = topo
        .client
        .command("curl")
        .args(["-sS", "--max-time", "2", "--interface", &src.to_string()])
        .args(extra)
        .arg(url)
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
    let gw = Gateway::with_bin(&topo.gw, bin.clone());
    let gw_ip = topo.gw_ip(false);
    let (good, bad) = (topo.client_ip(2, false), topo.client_ip(3, false));
    let listener = SocketAddr::new(gw_ip, PORT).to_string();

    // The upstream and a certificate for the API, made for this run.
    let dir = TempDir::new("demo")?;
    let pki = Pki::new(&dir.0, "portcullis-demo")?;
    let cert = pki.issue("api.demo", &["api.demo"], false)?;
    let upstream = Upstream::start(&topo.gw, "127.0.0.1:9000".parse()?)?;
    let conf = dir.0.join("conf.d");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(conf.join("orders.yaml"), demo_config(&listener, &cert))?;

    println!();
    println!(
        "== namespaces: gateway {} ({gw_ip}), clients {} ({good} allowed, {bad} denied)",
        topo.gw.name(),
        topo.client.name()
    );
    println!(
        "== configuration {}:\n{}",
        conf.display(),
        std::fs::read_to_string(conf.join("orders.yaml"))?
    );
    let proxy = GatewayProcess::start_with(&topo.gw, &bin, &conf, "127.0.0.1:9901".parse()?)?;
    println!(
        "== portcullis run --config {} (pid {}) is ready",
        conf.display(),
        proxy.pid()
    );
    print!("{}", gw.cli(&["xdp", "attach", "--iface", &topo.veth.a])?);
    print!("{}", gw.cli(&["listener", "add", &listener])?);
    print!(
        "{}",
        gw.cli(&["acl", "add", "--deny", "--listener", &listener, &bad.to_string()])?
    );

    let url = format!("https://api.demo:{PORT}/orders/hello");
    let resolve = format!("api.demo:{PORT}:{gw_ip}");
    let ca = pki.ca.display().to_string();
    let tls = ["--cacert", ca.as_str(), "--resolve", resolve.as_str()];
    let (ok, text) = curl(&topo, good, &tls, &url)?;
    println!(
        "\n== allowed client {good}: curl {url}\n   {}: {text}",
        if ok { "proxied over TLS" } else { "FAILED" }
    );
    if !ok {
        bail!("the allowed client was not answered: {}", proxy.log_text());
    }
    let (ok, text) = curl(&topo, good, &tls, &format!("https://api.demo:{PORT}/untracked"))?;
    println!(
        "== allowed client {good}: a path no API serves\n   {}: {text}",
        if ok { "answered" } else { "FAILED" }
    );
    let (ok, text) = curl(&topo, bad, &tls, &url)?;
    println!(
        "== denied client {bad}: curl {url}\n   {}: {text}",
        if ok { "ANSWERED" } else { "dropped at the NIC" }
    );
    if ok {
        bail!("the denied client got through");
    }
    println!(
        "   requests the upstream answered: {} (the denied SYNs never reached a socket)",
        upstream.requests()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    println!("\n== access log");
    for line in proxy.log_text().lines().filter(|l| l.contains("access")) {
        println!("   {line}");
    }
    println!("\n== portcullis status");
    print!("{}", gw.cli(&["status"])?);

    if !once {
        println!(
            "\nThe gateway stays up; XDP stays attached to {} in {}.\nTry `nsenter --net=/run/netns/{} curl {} {url}` (add `--interface {bad}` to be dropped).\nCtrl-C to stop and clean up.",
            topo.veth.a,
            topo.gw.name(),
            topo.client.name(),
            tls.join(" ")
        );
        stop.wait().context("waiting for Ctrl-C")?;
        println!("\n== final counters");
        print!("{}", gw.cli(&["status"])?);
    }
    Ok(())
}

fn demo_config(listener: &str, cert: &Issued) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: orders
spec:
  address: https://{listener}/orders
  services:
    orders:
      address: http://127.0.0.1:9000/
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: orders-tls
spec:
  targetRef:
    name: orders
  policyRef:
    name: tls
  config:
    certificate:
      crt: ${{file:{}}}
      key: ${{file:{}}}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: proxy
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
",
        cert.crt.display(),
        cert.key.display()
    )
}
