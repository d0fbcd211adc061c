//! The Gatekeeper at the NIC with a real XDP attach on a veth pair: while the
//! proxy is stopped, killed or has every route of a listener gated, XDP
//! answers a plain listener with the canned 503 and a TLS listener with a
//! reset, and the kernel never sees the connection; an API instance that owns
//! its listener has its IP block list enforced at the NIC.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use portcullis_tests::http::{GatewayProcess, Pki, TempDir, Upstream, api_instance, tls_binding};
use portcullis_tests::{Gateway, Topology, portcullis_bin, wait_for};

const SETTINGS: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: nic
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
---
";

struct Scene {
    topo: Topology,
    xdp: Gateway,
    _client_xdp: Gateway,
    dir: TempDir,
    _up: Upstream,
}

impl Scene {
    fn new(resources: impl Fn(&Topology, &TempDir) -> anyhow::Result<String>) -> anyhow::Result<Self> {
        let topo = Topology::new()?;
        let client_xdp = topo.accept_xdp_replies()?;
        let xdp = Gateway::new(&topo.gw);
        xdp.cli(&["xdp", "attach", "--iface", &topo.veth.a])?;
        let up = Upstream::start(&topo.gw, "127.0.0.1:9000".parse()?)?;
        let dir = TempDir::new("nic")?;
        let text = resources(&topo, &dir)?;
        dir.write("gateway.yaml", &format!("{SETTINGS}{text}"))?;
        Ok(Self {
            topo,
            xdp,
            _client_xdp: client_xdp,
            dir,
            _up: up,
        })
    }

    fn start(&self) -> anyhow::Result<GatewayProcess> {
        GatewayProcess::start_env(
            &self.topo.gw,
            &portcullis_bin(),
            &self.dir.0,
            "127.0.0.1:9901".parse()?,
            &[
                ("PORTCULLIS_INSTANCE", Path::new(self.xdp.instance())),
                ("PORTCULLIS_STATE_DIR", &self.dir.0.join("state")),
            ],
        )
    }

    /// `portcullis status --json` with this scene's state directory.
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        let state = self.dir.0.join("state");
        let out = self
            .xdp
            .cli(&["status", "--json", "--state-dir", &state.display().to_string()])?;
        Ok(serde_json::from_str(&out)?)
    }

    fn url(&self, scheme: &str, port: u16, path: &str) -> String {
        format!("{scheme}://{}:{port}{path}", self.topo.gw_ip(false))
    }

    /// curl from client host `host`: (exit code, status line and headers, body).
    fn curl(&self, host: u8, extra: &[&str], url: &str) -> anyhow::Result<(i32, String, String)> {
        let from = self.topo.client_ip(host, false).to_string();
        let out = self
            .topo
            .client
            .command("curl")
            .args(["-sS", "-i", "--max-time", "2", "--interface", &from])
            .args(extra)
            .arg(url)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((out.status.code().unwrap_or(-1), head.to_owned(), body.to_owned()))
    }

    fn diagnostics(&self) -> String {
        let run = |ns: &portcullis_tests::NetNs, args: &[&str]| {
            ns.command(args[0])
                .args(&args[1..])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        format!(
            "{:?}\n{}\n{}\n{}",
            self.xdp.status().ok(),
            run(&self.topo.gw, &["ethtool", "-S", &self.topo.veth.a]),
            run(&self.topo.client, &["ethtool", "-S", &self.topo.veth.b]),
            run(&self.topo.client, &["nstat", "-az"])
                .lines()
                .filter(|l| !l.contains(" 0 "))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    fn counter(&self, listener: &str, name: &str) -> anyhow::Result<u64> {
        self.xdp.listener_counters(listener)?[name]
            .as_u64()
            .with_context(|| format!("counter {name}"))
    }

    fn gate(&self, listener: &str) -> anyhow::Result<serde_json::Value> {
        let status = self.xdp.status()?;
        status["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["listener"] == listener))
            .map(|l| l["gate"].clone())
            .with_context(|| format!("{listener} in {status}"))
    }
}

/// The gateway namespace's TCP sockets on `port` (any state), one `ss` line each.
fn kernel_sockets(topo: &Topology, port: u16) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let out = topo
        .gw
        .command("ss")
        .args(["-Htan", "state", "all", &format!("( sport = :{port} )")])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect())
}

#[test]
fn a_stopped_or_killed_proxy_leaves_xdp_answering() -> anyhow::Result<()> {
    let pki_dir = TempDir::new("nicpki")?;
    let s = Scene::new(|topo, dir| {
        let pki = Pki::new(&pki_dir.0, "nic")?;
        let leaf = pki.issue("gw", &[&topo.gw_ip(false).to_string()], false)?;
        let ip = topo.gw_ip(false);
        let tls = tls_binding("secure", &[&leaf], "");
        let _ = dir;
        Ok(format!(
            "{}{}{tls}",
            api_instance(
                "plain",
                &format!("http://{ip}:8080/orders"),
                "http://127.0.0.1:9000/",
                ""
            ),
            api_instance(
                "secure",
                &format!("https://{ip}:8443/orders"),
                "http://127.0.0.1:9000/",
                ""
            ),
        ))
    })?;
    let plain = format!("{}:8080", s.topo.gw_ip(false));
    let secure = format!("{}:8443", s.topo.gw_ip(false));
    let url = s.url("http", 8080, "/orders/hello");
    let tls_url = s.url("https", 8443, "/orders/hello");
    let mut gw = s.start()?;
    let (code, head, _) = s.curl(2, &[], &url)?;
    ensure!(
        code == 0 && head.starts_with("HTTP/1.1 200"),
        "proxy serves: {code} {head}"
    );
    let (code, head, _) = s.curl(2, &["-k"], &tls_url)?;
    ensure!(
        code == 0 && head.starts_with("HTTP/2 200"),
        "proxy serves TLS, HTTP/2 by ALPN: {code} {head}"
    );
    ensure!(s.gate(&plain)?["open"] == true, "{}", s.gate(&plain)?);
    ensure!(s.gate(&plain)?["mode"] == "503" && s.gate(&secure)?["mode"] == "reset");

    // Graceful stop: the gates close at once and XDP answers.
    gw.terminate()?;
    gw.wait_exit(Duration::from_secs(15))?;
    let sockets_before = kernel_sockets(&s.topo, 8080)?;
    for _ in 0..3 {
        let (code, head, body) = s.curl(2, &[], &url)?;
        ensure!(
            code == 0 && head.starts_with("HTTP/1.1 503") && head.contains("Retry-After: 5"),
            "XDP answers 503 while the proxy is down: {code} {head} {}",
            s.diagnostics()
        );
        ensure!(body == "503 Service Unavailable\n", "{body:?}");
    }
    let sockets_after = kernel_sockets(&s.topo, 8080)?;
    ensure!(
        sockets_after.difference(&sockets_before).count() == 0,
        "the kernel never made a socket: {sockets_after:?}"
    );
    ensure!(s.counter(&plain, "gate_503")? == 3);
    ensure!(s.counter(&plain, "gate_syn_ack")? >= 3);
    ensure!(s.counter(&plain, "gate_failed")? == 0, "every reply was written");
    let (code, _, _) = s.curl(2, &["-k"], &tls_url)?;
    ensure!(code == 7, "a TLS listener is reset (curl exit {code})");
    ensure!(s.counter(&secure, "gate_reset")? >= 1);

    // Restart, then SIGKILL: no goodbye, so the stale heartbeat closes the gates.
    let mut gw = s.start()?;
    let (code, head, _) = s.curl(2, &[], &url)?;
    ensure!(code == 0 && head.starts_with("HTTP/1.1 200"), "reopened: {head}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(gw.pid())?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    gw.wait_exit(Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(700));
    let (code, head, _) = s.curl(2, &[], &url)?;
    ensure!(
        code == 0 && head.starts_with("HTTP/1.1 503"),
        "after a kill, XDP answers once the heartbeat is stale: {code} {head}"
    );
    ensure!(s.gate(&plain)?["open"] == true && s.gate(&plain)?["attended"] == false);
    Ok(())
}

#[test]
fn a_listener_whose_routes_are_all_gated_is_answered_at_the_nic() -> anyhow::Result<()> {
    let broken = "  policies:\n    - policyRef:\n        name: rate-limiting-flex\n      config:\n        rateLimits:\n          - maximumRequests: lots\n            timePeriodInMilliseconds: 1000\n";
    let s = Scene::new(|topo, _| {
        let ip = topo.gw_ip(false);
        Ok(api_instance(
            "orders",
            &format!("http://{ip}:8080/orders"),
            "http://127.0.0.1:9000/",
            broken,
        ))
    })?;
    let plain = format!("{}:8080", s.topo.gw_ip(false));
    let gw = s.start()?;
    let url = s.url("http", 8080, "/orders/hello");
    let (code, head, _) = s.curl(2, &[], &url)?;
    ensure!(code == 0 && head.starts_with("HTTP/1.1 503"), "{code} {head}");
    ensure!(
        s.counter(&plain, "gate_503")? == 1,
        "answered by XDP, not the proxy"
    );
    let status = s.status()?;
    let api = &status["gates"]["apis"][0];
    ensure!(
        api["api"] == "orders" && api["state"] == "blocked" && api["reason"] == "policy_failed",
        "{status}"
    );
    ensure!(
        api["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rate-limiting")),
        "{status}"
    );
    ensure!(status["gates"]["proxy_running"] == true);
    ensure!(s.gate(&plain)?["gated"] == true && s.gate(&plain)?["mode"] == "503");
    ensure!(
        !gw.log_text().contains("api=\"orders\" status=503"),
        "the proxy never saw the request: {}",
        gw.log_text()
    );
    // Fixed: the gate opens at the NIC too.
    s.dir.write(
        "gateway.yaml",
        &format!(
            "{SETTINGS}{}",
            api_instance(
                "orders",
                &format!("http://{}:8080/orders", s.topo.gw_ip(false)),
                "http://127.0.0.1:9000/",
                &broken.replace("lots", "100")
            )
        ),
    )?;
    wait_for("the gate to open", || {
        Ok(s.curl(2, &[], &url)?.1.starts_with("HTTP/1.1 200"))
    })?;
    ensure!(s.gate(&plain)?["open"] == true);
    ensure!(s.status()?["gates"]["apis"][0]["state"] == "open");
    // What XDP counted is in the proxy's own scrape, read from the maps: the
    // wait above may have met the gate once more, so the maps say how many.
    let answered = s.counter(&plain, "gate_503")?;
    ensure!(answered >= 1, "XDP answered the gated listener");
    let out = s
        .topo
        .gw
        .command("curl")
        .args(["-sS", "http://127.0.0.1:9901/metrics"])
        .output()?;
    let metrics = String::from_utf8_lossy(&out.stdout);
    for needle in [
        format!("portcullis_xdp_packets_total{{listener=\"{plain}\",verdict=\"gate_503\"}} {answered}\n"),
        format!("portcullis_xdp_gate_open{{listener=\"{plain}\",mode=\"503\"}} 1\n"),
        "portcullis_xdp_listeners 1\n".to_owned(),
        "portcullis_requests_total{api=\"orders\",status=\"200\"}".to_owned(),
    ] {
        ensure!(metrics.contains(&needle), "{needle} in /metrics:\n{metrics}");
    }
    ensure!(metrics.ends_with("# EOF\n"), "one OpenMetrics exposition");
    // With the proxy gone, status still tells what was in force and that XDP answers.
    let mut gw = gw;
    gw.terminate()?;
    gw.wait_exit(Duration::from_secs(15))?;
    let status = s.status()?;
    ensure!(
        status["gates"]["proxy_running"] == false
            && status["gates"]["apis"][0]["api"] == "orders"
            && status["listeners"][0]["gate"]["gated"] == true,
        "{status}"
    );
    let text = s.xdp.cli(&[
        "status",
        "--state-dir",
        &s.dir.0.join("state").display().to_string(),
    ])?;
    ensure!(text.contains("proxy DOWN") && text.contains("orders"), "{text}");
    Ok(())
}

#[test]
fn an_api_that_owns_its_listener_has_its_block_list_at_the_nic() -> anyhow::Result<()> {
    let s = Scene::new(|topo, _| {
        let ip = topo.gw_ip(false);
        let denied = topo.client_ip(3, false);
        Ok(api_instance(
            "orders",
            &format!("http://{ip}:8080/orders"),
            "http://127.0.0.1:9000/",
            &format!(
                "  policies:\n    - policyRef:\n        name: ip-blocklist-flex\n      config:\n        ips: [\"{denied}/32\"]\n"
            ),
        ))
    })?;
    let plain = format!("{}:8080", s.topo.gw_ip(false));
    let gw = s.start()?;
    let url = s.url("http", 8080, "/orders/hello");
    ensure!(s.curl(2, &[], &url)?.1.starts_with("HTTP/1.1 200"));
    let (code, _, _) = s.curl(3, &[], &url)?;
    ensure!(
        code == 28,
        "the denied client's SYN is dropped (curl exit {code})"
    );
    ensure!(s.counter(&plain, "drop_listener_deny")? >= 1);
    ensure!(
        !gw.log_text().contains("status=403"),
        "never reached the proxy: {}",
        gw.log_text()
    );
    Ok(())
}

#[test]
fn drop_mode_drops_the_syns_of_a_gated_listener() -> anyhow::Result<()> {
    let s = Scene::new(|topo, _| {
        let ip = topo.gw_ip(false);
        Ok(api_instance(
            "orders",
            &format!("http://{ip}:8080/orders"),
            "http://127.0.0.1:9000/",
            "  policies:\n    - policyRef:\n        name: client-id-enforcement-flex\n",
        ))
    })?;
    let file = s.dir.0.join("gateway.yaml");
    let text = std::fs::read_to_string(&file)?.replacen(
        "    admin: 127.0.0.1:9901\n",
        "    admin: 127.0.0.1:9901\n  gatekeeper:\n    nicAction: drop\n",
        1,
    );
    std::fs::write(&file, text)?;
    let plain = format!("{}:8080", s.topo.gw_ip(false));
    let _gw = s.start()?;
    let (code, _, _) = s.curl(2, &[], &s.url("http", 8080, "/orders/hello"))?;
    ensure!(
        code == 28,
        "a gated listener in drop mode never answers (curl exit {code})"
    );
    ensure!(s.gate(&plain)?["mode"] == "drop" && s.counter(&plain, "gate_drop")? >= 1);
    Ok(())
}

#[test]
fn syn_limits_and_budgets_in_the_configuration_reach_the_nic_and_cli_ones_stay_otherwise()
-> anyhow::Result<()> {
    let config = |ip: std::net::IpAddr, limit: &str| {
        format!(
            "{}{}",
            api_instance(
                "limited",
                &format!("http://{ip}:8080/"),
                "http://127.0.0.1:9000/",
                limit
            ),
            api_instance(
                "open",
                &format!("http://{ip}:8081/"),
                "http://127.0.0.1:9000/",
                ""
            )
        )
    };
    let s = Scene::new(|topo, _| Ok(config(topo.gw_ip(false), "  synLimit:\n    perSourceRate: 50\n")))?;
    let (limited, open) = (
        format!("{}:8080", s.topo.gw_ip(false)),
        format!("{}:8081", s.topo.gw_ip(false)),
    );
    let syn_counts = |listener: &str| -> anyhow::Result<serde_json::Value> {
        let status = s.xdp.status()?;
        status["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["listener"] == listener))
            .map(|l| l["syn"].clone())
            .with_context(|| format!("{listener} in {status}"))
    };
    let syn = |listener: &str| -> anyhow::Result<(u64, u64)> {
        let syn = syn_counts(listener)?;
        Ok((
            syn["rate"].as_u64().context("rate")?,
            syn["burst"].as_u64().context("burst")?,
        ))
    };
    let armed = |listener: &str| -> anyhow::Result<(u64, bool)> {
        let syn = syn_counts(listener)?;
        Ok((
            syn["budget"].as_u64().context("budget")?,
            syn["cookies_armed"] == true,
        ))
    };
    let _gw = s.start()?;
    wait_for("the configured SYN limit", || Ok(syn(&limited)? == (50, 100)))?;
    // SYN cookies are on by default: the default budget, armed by the gateway.
    wait_for("the default SYN budget armed", || {
        Ok(armed(&limited)? == (20_000, true))
    })?;
    // The listener the configuration is silent about keeps what the operator set.
    s.xdp
        .cli(&["listener", "syn-limit", &open, "--rate", "7", "--burst", "9"])?;
    let edited = config(
        s.topo.gw_ip(false),
        "  synLimit:\n    perSourceRate: 70\n    burst: 80\n    budget: 1\n",
    );
    s.dir.write("gateway.yaml", &format!("{SETTINGS}{edited}"))?;
    wait_for("the edited SYN limit", || Ok(syn(&limited)? == (70, 80)))?;
    wait_for("the edited SYN budget", || Ok(armed(&limited)? == (1, true)))?;
    ensure!(syn(&open)? == (7, 9), "the CLI's limit stays: {:?}", syn(&open)?);
    ensure!(armed(&open)? == (20_000, true), "{:?}", armed(&open)?);
    // Over a budget of 1 per second per CPU, new connections to the proxy
    // are made through SYN cookies, and answered.
    for i in 0..10 {
        let (code, head, _) = s.curl(2, &[], &s.url("http", 8080, "/"))?;
        ensure!(
            code == 0 && head.starts_with("HTTP/1.1 200"),
            "request {i}: {code} {head}"
        );
    }
    let cookies = syn_counts(&limited)?["cookies"].as_u64().unwrap_or(0);
    ensure!(
        cookies >= 5,
        "connections through cookies: {}",
        syn_counts(&limited)?
    );
    Ok(())
}
