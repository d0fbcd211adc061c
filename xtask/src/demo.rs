//! `cargo xtask demo`: the gateway in namespaces of its own: one client
//! allowed and one dropped at the NIC, a route gated until its contracts are
//! loaded and then opened, XDP answering while the proxy is down, and a
//! replica in connected mode following a control plane through an outage,
//! a canary split by a weighted route, and a WebSocket carried after its
//! handshake was policed.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context as _, bail, ensure};
use nix::sys::signal::{SigSet, Signal};
use portcullis_harness::grpc;
use portcullis_harness::http::{GatewayProcess, Issued, Pki, TempDir, Upstream, mobile_contract};
use portcullis_harness::ws::{self, Py};
use portcullis_harness::{Gateway, Topology};

use crate::{cargo, root, run as sh, setup};

const PORT: u16 = 8443;
const PLAIN_PORT: u16 = 8080;

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
    let _client_xdp = topo.accept_xdp_replies()?;
    let gw = Gateway::with_bin(&topo.gw, bin.clone());
    let gw_ip = topo.gw_ip(false);
    let (good, bad) = (topo.client_ip(2, false), topo.client_ip(3, false));
    let listener = SocketAddr::new(gw_ip, PORT).to_string();
    let plain = SocketAddr::new(gw_ip, PLAIN_PORT).to_string();

    // The upstream and a certificate for the API, made for this run.
    let dir = TempDir::new("demo")?;
    let pki = Pki::new(&dir.0, "portcullis-demo")?;
    let cert = pki.issue("api.demo", &["api.demo"], false)?;
    let upstream = Upstream::start(&topo.gw, "127.0.0.1:9000".parse()?)?;
    let canary = Upstream::start(&topo.gw, "127.0.0.1:9001".parse()?)?;
    let mut echo = Py::start(&topo.gw, &dir.0, &["serve", "9100"])?;
    ensure!(echo.line()? == "ready", "the WebSocket echo server did not start");
    let _grpc_server = grpc::serve(&topo.gw, &dir.0, 9200, None)?;
    let conf = dir.0.join("conf.d");
    std::fs::create_dir_all(&conf)?;
    let json_log = dir.0.join("access.json");
    std::fs::write(
        conf.join("orders.yaml"),
        demo_config(&listener, &plain, &cert, &json_log),
    )?;

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
    print!("{}", gw.cli(&["xdp", "attach", "--iface", &topo.veth.a])?);
    let state = dir.0.join("state");
    let envs: [(&str, &std::path::Path); 2] = [
        ("PORTCULLIS_INSTANCE", std::path::Path::new(gw.instance())),
        ("PORTCULLIS_STATE_DIR", &state),
    ];
    let start = || GatewayProcess::start_env(&topo.gw, &bin, &conf, "127.0.0.1:9901".parse()?, &envs);
    let proxy = start()?;
    println!(
        "== portcullis run --config {} (pid {}) is ready; it holds the gates at the NIC",
        conf.display(),
        proxy.pid()
    );
    print!(
        "{}",
        gw.cli(&["acl", "add", "--deny", "--listener", &listener, &bad.to_string()])?
    );

    let url = format!("https://api.demo:{PORT}/orders/hello");
    let resolve = format!("api.demo:{PORT}:{gw_ip}");
    let ca = pki.ca.display().to_string();
    let tls = ["--cacert", ca.as_str(), "--resolve", resolve.as_str()];
    acl_steps(&topo, (good, bad), &tls, &url, &proxy)?;
    http2_steps(&topo, good, &tls, &url)?;

    let inventory = format!("http://{plain}/inventory/hello");
    let creds = ["-i", "-u", "mobile:password"];
    gatekeeper_steps(&topo, good, &creds, &inventory, &conf)?;
    println!(
        "   requests the upstream answered: {} (gated and denied ones never reached it)",
        upstream.requests()
    );
    routing_steps(&topo, good, &plain, (&upstream, &canary))?;
    syn_cookie_steps(&topo, &gw, good, &plain)?;
    websocket_steps(&topo, &plain, &dir.0)?;
    grpc_steps(&topo, &plain, &dir.0)?;
    access_log_steps(&proxy, &json_log)?;

    stopped_steps(&topo, good, (&creds, &inventory), (&tls, &url), proxy)?;
    connected_steps(&topo, good, &bin, &dir.0)?;
    appliance_steps()?;
    let status_args = ["status", "--state-dir", &state.display().to_string()];
    println!("\n== portcullis status");
    print!("{}", gw.cli(&status_args)?);

    if !once {
        let proxy = start()?;
        println!(
            "\nThe gateway runs again (pid {}); XDP stays attached to {} in {}.\nTry `nsenter --net=/run/netns/{} curl {} {url}` (add `--interface {bad}` to be dropped).\nCtrl-C to stop and clean up.",
            proxy.pid(),
            topo.veth.a,
            topo.gw.name(),
            topo.client.name(),
            tls.join(" ")
        );
        stop.wait().context("waiting for Ctrl-C")?;
        println!("\n== final counters");
        print!("{}", gw.cli(&status_args)?);
    }
    Ok(())
}

/// Allowed, untracked and denied clients on the TLS listener.
fn acl_steps(
    topo: &Topology,
    (good, bad): (std::net::IpAddr, std::net::IpAddr),
    tls: &[&str],
    url: &str,
    proxy: &GatewayProcess,
) -> anyhow::Result<()> {
    let (ok, text) = curl(topo, good, tls, url)?;
    println!(
        "\n== allowed client {good}: curl {url}\n   {}: {text}",
        if ok { "proxied over TLS" } else { "FAILED" }
    );
    if !ok {
        bail!("the allowed client was not answered: {}", proxy.log_text());
    }
    let (ok, text) = curl(topo, good, tls, &format!("https://api.demo:{PORT}/untracked"))?;
    println!(
        "== allowed client {good}: a path no API serves\n   {}: {text}",
        if ok { "answered" } else { "FAILED" }
    );
    let (ok, text) = curl(topo, bad, tls, url)?;
    println!(
        "== denied client {bad}: curl {url}\n   {}: {text}",
        if ok { "ANSWERED" } else { "dropped at the NIC" }
    );
    if ok {
        bail!("the denied client got through");
    }

    Ok(())
}

/// Five requests multiplexed on one HTTP/2 connection, negotiated by ALPN.
fn http2_steps(topo: &Topology, good: std::net::IpAddr, tls: &[&str], url: &str) -> anyhow::Result<()> {
    let mut args = tls.to_vec();
    args.extend([
        "--http2",
        "-Z",
        "-o",
        "/dev/null",
        "-w",
        "HTTP/%{http_version} %{http_code} new connections: %{num_connects}\n",
    ]);
    for _ in 0..4 {
        args.extend(["-o", "/dev/null", url]);
    }
    let (ok, text) = curl(topo, good, &args, url)?;
    println!(
        "\n== HTTP/2 (ALPN h2): curl --http2 --parallel, five requests\n   {}",
        text.replace('\n', "\n   ")
    );
    ensure!(ok && text.contains("HTTP/2 200"), "HTTP/2 failed: {text}");
    Ok(())
}

/// The access log on stderr, and as a `logging.outputs` file output wrote it in JSON lines.
fn access_log_steps(proxy: &GatewayProcess, json_log: &std::path::Path) -> anyhow::Result<()> {
    std::thread::sleep(std::time::Duration::from_millis(200));
    println!("\n== access log");
    for line in proxy.log_text().lines().filter(|l| l.contains("access")) {
        println!("   {line}");
    }
    let json = std::fs::read_to_string(json_log).unwrap_or_default();
    println!(
        "\n== the same access lines as JSON (logging.outputs: a file output, format json), {} lines; the last:\n   {}",
        json.lines().count(),
        json.lines().last().unwrap_or("NONE")
    );
    ensure!(
        json.lines().count() > 0,
        "no JSON access lines in {}",
        json_log.display()
    );
    Ok(())
}

/// A 90/10 canary by a `route-weighted` binding, counted at the two upstreams.
fn routing_steps(
    topo: &Topology,
    good: std::net::IpAddr,
    plain: &str,
    (stable, canary): (&Upstream, &Upstream),
) -> anyhow::Result<()> {
    let requests = 100;
    let before = (stable.requests(), canary.requests());
    let url = format!("http://{plain}/shop/cart/1");
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}\n"];
    for _ in 1..requests {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    let (ok, codes) = curl(topo, good, &args, &url)?;
    let to = (stable.requests() - before.0, canary.requests() - before.1);
    println!(
        "\n== routing: {requests} requests to {url}, a route-weighted binding 90/10 (rules: pathPrefix /cart)\n   stable upstream: {}, canary upstream: {}",
        to.0, to.1
    );
    ensure!(
        ok && codes.lines().all(|c| c == "200") && to == (90, 10),
        "the canary split was {to:?}: {codes}"
    );
    let (ok, text) = curl(
        topo,
        good,
        &["-o", "/dev/null", "-w", "%{http_code}"],
        &format!("http://{plain}/shop/account"),
    )?;
    println!("   /shop/account (the `route` binding, no rules): {text} from the stable upstream");
    ensure!(ok && text == "200", "the catch-all route: {text}");
    Ok(())
}

/// Prints the gateway's metrics whose names start with `prefix`.
fn print_metrics(topo: &Topology, prefix: &str) -> anyhow::Result<()> {
    let metrics = topo
        .gw
        .command("curl")
        .args(["-sS", "http://127.0.0.1:9901/metrics"])
        .output()?;
    for line in String::from_utf8_lossy(&metrics.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
    {
        println!("   {line}");
    }
    Ok(())
}

/// New connections over a listener's SYN budget, made through SYN cookies
/// answered by XDP and the kernel's synproxy; the default budget put back.
fn syn_cookie_steps(
    topo: &Topology,
    gw: &Gateway,
    good: std::net::IpAddr,
    plain: &str,
) -> anyhow::Result<()> {
    println!(
        "\n== SYN budget: {plain} takes 1 SYN a second per CPU through the kernel, XDP answers the rest with cookies"
    );
    print!("{}", gw.cli(&["listener", "syn-budget", plain, "--budget", "1"])?);
    let url = format!("http://{plain}/inventory/hello");
    let answered = (0..10)
        .filter(|_| curl(topo, good, &["-u", "mobile:password"], &url).is_ok_and(|(ok, _)| ok))
        .count();
    println!("   10 new connections from {good}: {answered} answered");
    print_metrics(topo, "portcullis_xdp_syns_total")?;
    if answered < 10 {
        bail!("connections over the SYN budget were not made through cookies");
    }
    // Without --budget: the default.
    print!("{}", gw.cli(&["listener", "syn-budget", plain])?);
    Ok(())
}

/// gRPC calls (Python `grpcio`) over h2c through the gateway to an HTTP/2 upstream.
fn grpc_steps(topo: &Topology, plain: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    println!(
        "\n== gRPC to {plain} (h2c beside HTTP/1.1 and WebSocket on one port), upstream h2c://127.0.0.1:9200"
    );
    for (case, want) in [
        ("unary", "echo:hello seen"),
        ("server-stream", "item 0,item 1,item 2,item 3,item 4"),
        ("bidi", "re:one,re:two,re:three"),
        ("fail", "status 5 no such order"),
    ] {
        let got = grpc::call(&topo.client, dir, plain, case, None)?;
        println!("   {case:<14} {got}");
        ensure!(got == want, "gRPC {case}: {got}, expected {want}");
    }
    print_metrics(topo, "portcullis_grpc_calls_total")
}

/// A WebSocket client (Python `websockets`) through the gateway to an echo server.
fn websocket_steps(topo: &Topology, plain: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let uri = format!("ws://{plain}/chat");
    let said = ws::client(&topo.client, dir, "echo", &uri, None)?;
    println!(
        "\n== WebSocket {uri}: a text message and 1 MiB of binary echoed through the tunnel\n   {}",
        if said == "ok" { "ok" } else { "FAILED" }
    );
    ensure!(said == "ok", "the WebSocket echo failed: {said}");
    print_metrics(topo, "portcullis_websocket")
}

/// An API whose policy needs contracts is gated until a Contract is written, then opens.
fn gatekeeper_steps(
    topo: &Topology,
    good: std::net::IpAddr,
    creds: &[&str],
    inventory: &str,
    conf: &std::path::Path,
) -> anyhow::Result<()> {
    // Gatekeeper: an API whose policy needs contracts stays gated until they are loaded.
    let (_, text) = curl(topo, good, creds, inventory)?;
    println!(
        "\n== gated: inventory enforces client ids and no Contract is loaded yet\n   curl {inventory}\n   {}",
        first_line(&text)
    );
    ensure!(
        text.starts_with("HTTP/1.1 503"),
        "inventory must be gated: {text}"
    );
    println!("   (its listener has no open route, so XDP answered: no socket, no proxy cycle)");
    std::fs::write(conf.join("contracts.yaml"), mobile_contract("inventory"))?;
    println!(
        "== a Contract for `mobile` is written to {}",
        conf.join("contracts.yaml").display()
    );
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let (_, text) = curl(topo, good, creds, inventory)?;
        if text.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    println!(
        "== opened: curl -u mobile:password {inventory}\n   {}",
        first_line(&text)
    );
    ensure!(text.starts_with("HTTP/1.1 200"), "inventory must open: {text}");
    let (_, text) = curl(topo, good, &["-i"], inventory)?;
    println!("   without credentials: {}", first_line(&text));
    Ok(())
}

/// The proxy goes away: the gates close at the NIC and XDP answers.
fn stopped_steps(
    topo: &Topology,
    good: std::net::IpAddr,
    (creds, inventory): (&[&str], &str),
    (tls, url): (&[&str], &str),
    mut proxy: GatewayProcess,
) -> anyhow::Result<()> {
    proxy.terminate()?;
    proxy.wait_exit(std::time::Duration::from_secs(15))?;
    let (_, text) = curl(topo, good, creds, inventory)?;
    println!(
        "\n== the proxy is stopped; curl {inventory}\n   {} (answered by XDP)",
        first_line(&text)
    );
    let (ok, text) = curl(topo, good, tls, url)?;
    println!(
        "== curl {url}\n   {}: {text}",
        if ok {
            "ANSWERED"
        } else {
            "reset by XDP (a 503 would need TLS)"
        }
    );
    Ok(())
}

/// A control plane in the gateway's namespace, killed on drop.
struct ControlPlane(std::process::Child);

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const CP_LISTEN: &str = "127.0.0.1:7443";

fn serve_control_plane(
    topo: &Topology,
    bin: &std::path::Path,
    cp: &std::path::Path,
) -> anyhow::Result<ControlPlane> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cp.join("control-plane.log"))?;
    let child = topo
        .gw
        .command(bin)
        .args(["control-plane", "serve", "--listen", CP_LISTEN, "--dir"])
        .arg(cp)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the control plane")?;
    let addr: SocketAddr = CP_LISTEN.parse()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !topo.gw.run(move || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).is_ok()
    })? {
        ensure!(Instant::now() < deadline, "the control plane did not listen");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(ControlPlane(child))
}

/// The pushed API, tagged with `version` by a header-injection policy.
fn pushed_api(listen: &str, version: &str) -> String {
    crate::bench_control::tagged_api(
        "catalog",
        &format!("http://{listen}/catalog"),
        "x-policy-version",
        version,
    )
}

/// What the connected-mode part of the demo runs.
struct Connected {
    server: ControlPlane,
    replica: GatewayProcess,
    cp: std::path::PathBuf,
    cluster: std::path::PathBuf,
    listen: String,
    state: std::path::PathBuf,
}

/// Runs `portcullis` with `args`, outside the namespaces; its stdout.
fn cli(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin).args(args).output()?;
    ensure!(
        out.status.success(),
        "portcullis {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A control plane with one cluster's API, and a replica registered with it and running.
fn connected_setup(
    topo: &Topology,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<Connected> {
    let cp = dir.join("control-plane");
    let cp_arg = cp.display().to_string();
    println!("\n== connected mode: portcullis control-plane init --dir {cp_arg}");
    println!(
        "   {}",
        cli(bin, &["control-plane", "init", "--dir", &cp_arg])?
            .trim_end()
            .replace('\n', "\n   ")
    );
    let listen = SocketAddr::new(topo.gw_ip(false), 8081).to_string();
    let cluster = cp.join("clusters/demo");
    std::fs::create_dir_all(&cluster)?;
    std::fs::write(cluster.join("catalog.yaml"), pushed_api(&listen, "v1"))?;
    let server = serve_control_plane(topo, bin, &cp)?;
    let token = cli(
        bin,
        &[
            "control-plane",
            "token",
            "create",
            "--dir",
            &cp_arg,
            "--cluster",
            "demo",
            "--ttl",
            "10m",
        ],
    )?;
    let conf = dir.join("replica-b");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(
        conf.join("settings.yaml"),
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\nmetadata:\n  name: demo\nspec:\n  proxy:\n    workers: 1\n    admin: 127.0.0.1:9902\n",
    )?;
    let register = topo
        .gw
        .command(bin)
        .args([
            "register",
            "--control-plane",
            &format!("https://{CP_LISTEN}"),
            "--token",
            token.trim(),
            "--name",
            "replica-b",
            "--out",
        ])
        .arg(&conf)
        .output()?;
    ensure!(
        register.status.success(),
        "register: {}",
        String::from_utf8_lossy(&register.stderr)
    );
    println!(
        "== portcullis register --name replica-b (key made here, files 0600)\n   {}",
        String::from_utf8_lossy(&register.stdout).trim()
    );
    let state = dir.join("replica-b.state");
    let envs: [(&str, &std::path::Path); 2] = [
        ("PORTCULLIS_INSTANCE", std::path::Path::new("demo-replica-b")),
        ("PORTCULLIS_STATE_DIR", &state),
    ];
    let replica = GatewayProcess::start_log(
        &topo.gw,
        bin,
        &conf,
        "127.0.0.1:9902".parse()?,
        &envs,
        &dir.join("replica-b.log"),
    )?;
    Ok(Connected {
        server,
        replica,
        cp,
        cluster,
        listen,
        state,
    })
}

/// The hardened unit's exposure, and what builds the package and the image.
fn appliance_steps() -> anyhow::Result<()> {
    println!("\n== the appliance (images/)");
    let (score, _) = portcullis_harness::offline_exposure(&root().join("images/portcullis.service"))?;
    println!(
        "   portcullis.service (Type=notify, own user, 3 capabilities): systemd-analyze security exposure {score}"
    );
    println!(
        "   `cargo xtask deb`: target/debian/portcullis_<version>_amd64.deb with both units, man pages, completions"
    );
    println!(
        "   `cargo xtask image`: a qcow2 of Debian's packages and that .deb, configured from a seed drive at boot"
    );
    println!(
        "   `cargo xtask test` boots the image, serves through it, upgrades and rolls back under load: 0 untagged requests"
    );
    Ok(())
}

/// Connected mode: a control plane, a replica registering, a policy pushed
/// and enforced, and the control plane stopped while traffic keeps flowing.
fn connected_steps(
    topo: &Topology,
    good: std::net::IpAddr,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let Connected {
        mut server,
        replica,
        cp,
        cluster,
        listen,
        state,
    } = connected_setup(topo, bin, dir)?;
    let url = format!("http://{listen}/catalog/hello");
    let version = |topo: &Topology| -> anyhow::Result<String> {
        let (_, text) = curl(topo, good, &["-i"], &url)?;
        Ok(text
            .lines()
            .find(|l| l.starts_with("x-policy-version"))
            .unwrap_or(first_line(&text))
            .to_owned())
    };
    let wait_version = |topo: &Topology, want: &str| -> anyhow::Result<String> {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let v = version(topo)?;
            if v.contains(want) || Instant::now() > deadline {
                return Ok(v);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    println!(
        "== replica-b follows the control plane; curl {url}\n   {}",
        wait_version(topo, "v1")?
    );
    std::fs::write(cluster.join("catalog.yaml"), pushed_api(&listen, "v2"))?;
    println!(
        "== the policy is edited on the control plane (v2): pushed, applied behind the gate\n   {}",
        wait_version(topo, "v2")?
    );
    drop(server);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let still_answered = (0..20)
        .filter(|_| version(topo).is_ok_and(|v| v.contains("v2")))
        .count();
    println!(
        "== the control plane is stopped: {still_answered} of 20 requests still served with the v2 policy"
    );
    std::fs::write(cluster.join("catalog.yaml"), pushed_api(&listen, "v3"))?;
    server = serve_control_plane(topo, bin, &cp)?;
    println!(
        "== an edit made while it was away (v3) is applied when it returns\n   {}",
        wait_version(topo, "v3")?
    );
    println!("== portcullis status of replica-b");
    let status = cli(
        bin,
        &[
            "status",
            "--instance",
            "demo-replica-b",
            "--state-dir",
            &state.display().to_string(),
        ],
    )?;
    for line in status.lines().take(4) {
        println!("   {line}");
    }
    drop(replica);
    drop(server);
    Ok(())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn demo_config(listener: &str, plain: &str, cert: &Issued, json_log: &std::path::Path) -> String {
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
kind: ApiInstance
metadata:
  name: inventory
spec:
  address: http://{plain}/inventory
  http2:
    cleartext: true
  services:
    inventory:
      address: http://127.0.0.1:9000/
  policies:
    - policyRef:
        name: client-id-enforcement-flex
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: chat
spec:
  address: http://{plain}/chat
  http2:
    cleartext: true
  services:
    chat:
      address: http://127.0.0.1:9100/
  websocket:
    idleTimeout: 1m
    maxConnections: 100
---
{shop}apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: echo-grpc
spec:
  address: http://{plain}/demo.Echo
  http2:
    cleartext: true
  services:
    echo:
      address: h2c://127.0.0.1:9200/demo.Echo
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: proxy
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
  logging:
    outputs:
      - name: access-json
        type: file
        parameters:
          file: {json_log}
          format: json
    accessLogs:
      outputs: [access-json]
",
        cert.crt.display(),
        cert.key.display(),
        shop = shop_config(plain),
        json_log = json_log.display(),
    )
}

/// The `shop` API: a 90/10 canary on `/cart`, everything else to the stable upstream.
fn shop_config(plain: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: shop
spec:
  address: http://{plain}/shop
  services:
    stable:
      address: http://127.0.0.1:9000/
    canary:
      address: http://127.0.0.1:9001/
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: shop-cart-canary
spec:
  targetRef:
    name: shop
  policyRef:
    name: route-weighted
  order: 1
  rules:
    - pathPrefix: /cart
  config:
    routes:
      - weight: 90
        destinationRef:
          name: stable
      - weight: 10
        destinationRef:
          name: canary
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: shop-rest
spec:
  targetRef:
    name: shop
  policyRef:
    name: route
  order: 2
  config:
    destinationRef:
      name: stable
---
"
    )
}
