//! WebSockets end to end: Python `websockets` (Debian's python3-websockets)
//! as both the upstream echo server and the client, through `portcullis run`
//! in a fresh namespace, plain and TLS.

use anyhow::{Context, ensure};
use portcullis_tests::http::{
    GatewayProcess, Pki, TempDir, api_instance, curl, strict_settings, tls_binding,
};
use portcullis_tests::ws::{self, Py};
use portcullis_tests::{NetNs, wait_for};

fn client(ns: &NetNs, dir: &TempDir, part: &str, uri: &str, ca: Option<&str>) -> anyhow::Result<String> {
    ws::client(ns, &dir.0, part, uri, ca.map(|ca| (ca, None)))
}

/// A namespace with the echo server on :9000 and the gateway running `resources`.
struct Scene {
    ns: NetNs,
    dir: TempDir,
    server: Py,
    gw: GatewayProcess,
}

fn scene(resources: &str) -> anyhow::Result<Scene> {
    let ns = NetNs::new("ws")?;
    let dir = TempDir::new("ws")?;
    let mut server = Py::start(&ns, &dir.0, &["serve"])?;
    ensure!(server.line()? == "ready", "echo server started");
    dir.write("gateway.yaml", &format!("{}{resources}", strict_settings("ws")))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    Ok(Scene { ns, dir, server, gw })
}

fn api(name: &str, address: &str, extra: &str) -> String {
    api_instance(name, address, "http://127.0.0.1:9000/", extra)
}

fn metrics(ns: &NetNs) -> anyhow::Result<String> {
    Ok(curl(ns, &["http://127.0.0.1:9901/metrics"])?.1)
}

#[test]
fn websockets_carried_plain_and_tls_after_their_policies() -> anyhow::Result<()> {
    let pki_dir = TempDir::new("wsp")?;
    let pki = Pki::new(&pki_dir.0, "ws")?;
    let leaf = pki.issue("gw", &["ws.test"], false)?;
    let tls = tls_binding("secure", &[&leaf], "");
    let locked = "  policies:\n    - policyRef:\n        name: ip-blocklist-flex\n      config:\n        ips: [127.0.0.1]\n";
    let gated = "  policies:\n    - policyRef:\n        name: client-id-enforcement-flex\n";
    let mut s = scene(&format!(
        "{}{}{}{}{tls}",
        api("chat", "http://127.0.0.1:8080/", ""),
        api("secure", "https://127.0.0.1:8443/", ""),
        api("locked", "http://127.0.0.1:8081/", locked),
        api("gated", "http://127.0.0.1:8082/", gated),
    ))?;
    let ca = pki.ca.display().to_string();

    ensure!(client(&s.ns, &s.dir, "echo", "ws://127.0.0.1:8080/chat", None)? == "ok");
    ensure!(
        s.server.line()? == "connection 1 127.0.0.1",
        "forwarded with X-Forwarded-For"
    );
    ensure!(client(&s.ns, &s.dir, "echo", "wss://127.0.0.1:8443/chat", Some(&ca))? == "ok");
    ensure!(s.server.line()?.starts_with("connection 2"));

    // Refused handshakes never reach the upstream.
    let refused = client(&s.ns, &s.dir, "status", "ws://127.0.0.1:8081/chat", None)?;
    ensure!(
        refused == "status 403",
        "the blocklist refuses the handshake: {refused}"
    );
    let gated = client(&s.ns, &s.dir, "status", "ws://127.0.0.1:8082/chat", None)?;
    ensure!(
        gated == "status 503",
        "a gated API refuses the handshake: {gated}"
    );
    ensure!(client(&s.ns, &s.dir, "echo", "ws://127.0.0.1:8080/chat", None)? == "ok");
    ensure!(
        s.server.line()?.starts_with("connection 3"),
        "no refused handshake reached the upstream"
    );

    let m = metrics(&s.ns)?;
    for needle in [
        "portcullis_websocket_closed_total{api=\"chat\",reason=\"closed\"} 2",
        "portcullis_websocket_closed_total{api=\"secure\",reason=\"closed\"} 1",
        "portcullis_websocket_open{api=\"chat\"} 0",
        "portcullis_requests_total{api=\"chat\",status=\"101\"} 2",
        "portcullis_requests_total{api=\"locked\",status=\"403\"} 1",
    ] {
        ensure!(m.contains(needle), "{needle} in /metrics:\n{m}");
    }
    // Each way: the 1 MiB message and "hello", with their frame headers
    // (client frames masked); the upstream's share also carries the close frames.
    let bytes = |direction: &str| -> anyhow::Result<u64> {
        let key = format!("portcullis_websocket_bytes_total{{api=\"secure\",direction=\"{direction}\"}} ");
        let line = m
            .lines()
            .find(|l| l.starts_with(&key))
            .context("bytes in /metrics")?;
        Ok(line[key.len()..].trim().parse()?)
    };
    for direction in ["upstream", "client"] {
        let n = bytes(direction)?;
        ensure!(
            ((1 << 20) + 5..(1 << 20) + 100).contains(&n),
            "{direction}: {n} bytes in\n{m}"
        );
    }
    // One access line per tunnel, written when it closes.
    s.gw.wait_log("status=101", "the tunnel's access line")?;
    let log = s.gw.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("status=101")).collect();
    ensure!(lines.len() == 3, "one line per tunnel: {lines:#?}");
    for line in &lines {
        let field = line.split_whitespace().find_map(|w| w.strip_prefix("bytes_in="));
        let n: u64 = field.context("bytes_in")?.parse()?;
        ensure!(n > 1 << 20, "the tunnel's bytes, not the handshake's: {line}");
    }
    Ok(())
}

#[test]
fn tunnels_close_when_idle_too_long_or_too_many() -> anyhow::Result<()> {
    let bounded = "  websocket:\n    idleTimeout: 1s\n    maxDuration: 3s\n    maxConnections: 2\n";
    let s = scene(&api("chat", "http://127.0.0.1:8080/", bounded))?;
    let uri = "ws://127.0.0.1:8080/";

    let idle = client(&s.ns, &s.dir, "idle", uri, None)?;
    let after: f64 = idle
        .strip_prefix("closed after ")
        .context(idle.clone())?
        .parse()?;
    ensure!((0.5..3.0).contains(&after), "closed when idle for 1s: {idle}");

    let busy = client(&s.ns, &s.dir, "busy", uri, None)?;
    let after: f64 = busy
        .strip_prefix("closed after ")
        .context(busy.clone())?
        .parse()?;
    ensure!((2.5..6.0).contains(&after), "closed at the 3s maximum: {busy}");

    let mut first = Py::start(&s.ns, &s.dir.0, &["hold", uri])?;
    let mut second = Py::start(&s.ns, &s.dir.0, &["hold", uri])?;
    ensure!(first.line()? == "open" && second.line()? == "open");
    let third = client(&s.ns, &s.dir, "status", uri, None)?;
    ensure!(
        third == "status 503",
        "a third tunnel over the limit of 2: {third}"
    );
    first.tell()?;
    ensure!(first.line()? == "echoed");
    drop(first);
    wait_for("the slot given back", || {
        Ok(client(&s.ns, &s.dir, "status", uri, None)? == "opened")
    })?;
    second.tell()?;
    ensure!(second.line()? == "echoed");

    let m = metrics(&s.ns)?;
    for needle in [
        "reason=\"idle_timeout\"} 1",
        "reason=\"max_duration\"} 1",
        "portcullis_requests_total{api=\"chat\",status=\"503\"} 1",
    ] {
        ensure!(m.contains(needle), "{needle} in /metrics:\n{m}");
    }
    Ok(())
}

#[test]
fn a_reload_leaves_tunnels_open_unless_the_api_asks() -> anyhow::Result<()> {
    let resources = |marker: &str| {
        let policy = format!(
            "  policies:\n    - policyRef:\n        name: header-injection-flex\n      config:\n        inboundHeaders:\n          - key: x-edit\n            value: \"{marker}\"\n"
        );
        format!(
            "{}{}",
            api("kept", "http://127.0.0.1:8080/", &policy),
            api(
                "renewed",
                "http://127.0.0.1:8081/",
                &format!("{policy}  websocket:\n    closeOnReload: true\n")
            )
        )
    };
    let s = scene(&resources("one"))?;
    let mut kept = Py::start(&s.ns, &s.dir.0, &["hold", "ws://127.0.0.1:8080/"])?;
    let mut renewed = Py::start(&s.ns, &s.dir.0, &["hold", "ws://127.0.0.1:8081/"])?;
    ensure!(kept.line()? == "open" && renewed.line()? == "open");

    s.dir.write(
        "gateway.yaml",
        &format!("{}{}", strict_settings("ws"), resources("two")),
    )?;
    s.gw.reload()?;
    wait_for("the reload", || {
        Ok(metrics(&s.ns)?.contains("reason=\"reload\"} 1"))
    })?;
    kept.tell()?;
    renewed.tell()?;
    ensure!(
        kept.line()? == "echoed",
        "a policy edit leaves an open tunnel alone"
    );
    ensure!(renewed.line()? == "closed", "closeOnReload closes it");
    Ok(())
}

#[test]
fn websockets_over_http2_by_extended_connect() -> anyhow::Result<()> {
    let h2c = "  http2:\n    cleartext: true\n";
    let locked = "  policies:\n    - policyRef:\n        name: ip-blocklist-flex\n      config:\n        ips: [127.0.0.1]\n";
    let mut s = scene(&format!(
        "{}{}",
        api("chat", "http://127.0.0.1:8080/", h2c),
        api("locked", "http://127.0.0.1:8081/", &format!("{h2c}{locked}")),
    ))?;
    // RFC 8441: the gateway offers SETTINGS_ENABLE_CONNECT_PROTOCOL, answers
    // the CONNECT with 200 once the upstream's 101 came, and carries frames.
    let case = |port: u16| {
        portcullis_tests::h2::case_on(&s.ns, &s.dir.0, "websocket", ("127.0.0.1", port), 0, "/chat")
    };
    let got = case(8080)?;
    ensure!(got == "connect-protocol 1 status 200 echo ok", "{got}");
    ensure!(
        s.server.line()? == "connection 1 127.0.0.1",
        "an HTTP/1.1 handshake upstream"
    );
    let refused = case(8081)?;
    ensure!(
        refused == "connect-protocol 1 status 403 echo b''",
        "policies judge the CONNECT: {refused}"
    );
    wait_for("the tunnel to close", || {
        Ok(metrics(&s.ns)?.contains("portcullis_websocket_open{api=\"chat\"} 0"))
    })?;
    s.gw.wait_log("status=101", "the tunnel's access line")?;
    Ok(())
}
