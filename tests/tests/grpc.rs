//! gRPC end to end: Python `grpcio` as client and server (h2c to the
//! gateway, h2c and TLS to the upstream), through `portcullis run` in a
//! fresh namespace: every streaming kind, trailers both ways, deadlines,
//! and the gateway's own refusals in gRPC form.

use anyhow::{Context, ensure};
use portcullis_tests::grpc;
use portcullis_tests::http::{GatewayProcess, Pki, TempDir, api_instance, curl, strict_settings};
use portcullis_tests::{NetNs, wait_for};

const H2C: &str = "  http2:\n    cleartext: true\n";

fn api(name: &str, port: u16, upstream: &str, policies: &str) -> String {
    api_instance(
        name,
        &format!("http://127.0.0.1:{port}/"),
        upstream,
        &format!("{H2C}{policies}"),
    )
}

fn policy(name: &str, config: &str) -> String {
    format!("  policies:\n    - policyRef:\n        name: {name}\n      config:\n{config}")
}

/// The gRPC servers on :9100 (h2c) and :9101 (TLS), and the gateway in front.
struct Scene {
    ns: NetNs,
    dir: TempDir,
    gw: GatewayProcess,
    _servers: [portcullis_tests::ws::Py; 2],
    /// Takes connections and never answers: only the gateway can end a call to it.
    _silent: std::net::TcpListener,
}

impl Scene {
    fn call(&self, port: u16, case: &str) -> anyhow::Result<String> {
        grpc::call(&self.ns, &self.dir.0, &format!("127.0.0.1:{port}"), case, None)
    }

    fn grpc_calls(&self, labels: &str) -> anyhow::Result<u64> {
        let (_, m, _) = curl(&self.ns, &["http://127.0.0.1:9901/metrics"])?;
        let key = format!("portcullis_grpc_calls_total{{{labels}}} ");
        let line = m
            .lines()
            .find(|l| l.starts_with(&key))
            .with_context(|| format!("{key} in\n{m}"))?;
        Ok(line[key.len()..].trim().parse()?)
    }
}

fn scene() -> anyhow::Result<Scene> {
    let ns = NetNs::new("grpc")?;
    let dir = TempDir::new("grpc")?;
    let pki = Pki::new(&dir.0, "grpc")?;
    let leaf = pki.issue("upstream", &["grpc.test"], false)?;
    let plain = grpc::serve(&ns, &dir.0, 9100, None)?;
    let tls = grpc::serve(&ns, &dir.0, 9101, Some((&leaf.crt, &leaf.key)))?;
    let silent = ns.run(|| std::net::TcpListener::bind("127.0.0.1:9102"))??;
    dir.write_private(
        "users.txt",
        "bob:sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n",
    )?;
    let outbound = format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: secure-grpc
spec:
  address: h2://127.0.0.1:9101/
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: secure-grpc-tls
spec:
  targetRef:
    kind: Service
    name: secure-grpc
  policyRef:
    name: tls-outbound
  config:
    trustedCA: ${{file:{}}}
    sni: grpc.test
---
",
        pki.ca.display()
    );
    let resources = [
        api("echo", 8080, "h2c://127.0.0.1:9100/", ""),
        api("silent", 8086, "h2c://127.0.0.1:9102/", ""),
        api(
            "blocked",
            8081,
            "h2c://127.0.0.1:9100/",
            &policy("ip-blocklist-flex", "        ips: [127.0.0.1]\n"),
        ),
        api(
            "gated",
            8082,
            "h2c://127.0.0.1:9100/",
            &policy("client-id-enforcement-flex", "        {}\n"),
        ),
        api(
            "authed",
            8083,
            "h2c://127.0.0.1:9100/",
            &policy(
                "http-basic-authentication-flex",
                "        credentialsFile: users.txt\n",
            ),
        ),
        api(
            "limited",
            8084,
            "h2c://127.0.0.1:9100/",
            &policy(
                "rate-limiting-flex",
                "        rateLimits:\n          - maximumRequests: 1\n            timePeriodInMilliseconds: 60000\n",
            ),
        ),
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: secure
spec:
  address: http://127.0.0.1:8085/
{H2C}  services:
    secure-grpc: {{}}
---
"
        ),
        outbound,
    ];
    dir.write(
        "gateway.yaml",
        &format!("{}{}", strict_settings("grpc"), resources.concat()),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    Ok(Scene {
        ns,
        dir,
        gw,
        _servers: [plain, tls],
        _silent: silent,
    })
}

#[test]
fn grpc_calls_of_every_kind_pass_through_with_their_trailers() -> anyhow::Result<()> {
    let s = scene()?;
    let call = |port: u16, case: &str| s.call(port, case);

    // Every streaming kind, to a cleartext upstream and to a TLS one.
    for port in [8080, 8085] {
        ensure!(
            call(port, "unary")? == "echo:hello seen",
            "unary with its trailer"
        );
        ensure!(
            call(port, "server-stream")? == "item 0,item 1,item 2,item 3,item 4",
            "server streaming"
        );
        ensure!(call(port, "client-stream")? == "a+b+c", "client streaming");
        ensure!(
            call(port, "bidi")? == "re:one,re:two,re:three",
            "bidirectional, each reply before the next message"
        );
        ensure!(call(port, "big")? == "ok 1048581", "a 1 MiB message both ways");
        ensure!(
            call(port, "fail")? == "status 5 no such order",
            "the upstream's status and message in its trailers"
        );
    }
    let peer = call(8080, "peer")?;
    ensure!(peer == "127.0.0.1|2 portcullis", "forwarding fields: {peer}");
    ensure!(s.grpc_calls("api=\"echo\",grpc_status=\"0\"")? == 6);
    ensure!(s.grpc_calls("api=\"echo\",grpc_status=\"5\"")? == 1);
    Ok(())
}

#[test]
fn a_grpc_deadline_bounds_the_wait_for_the_upstream() -> anyhow::Result<()> {
    let s = scene()?;
    let (ns, dir, gw) = (&s.ns, &s.dir, &s.gw);

    // The deadline: grpc-timeout bounds the wait for an upstream that never
    // answers, and the gateway answers DEADLINE_EXCEEDED itself (curl sends
    // the header: a gRPC client would cancel at the same instant and race it).
    let message = dir.write("message", "\0\0\0\0\x01x")?;
    let (_, head, _) = curl(
        ns,
        &[
            "--http2-prior-knowledge",
            "-i",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            "grpc-timeout: 300m",
            "--data-binary",
            &format!("@{}", message.display()),
            "http://127.0.0.1:8086/demo.Echo/Slow",
        ],
    )?;
    ensure!(
        head.starts_with("HTTP/2 200") && head.contains("grpc-status: 4\r\n"),
        "trailers-only DEADLINE_EXCEEDED: {head}"
    );
    wait_for("the deadline's access line", || {
        Ok(gw
            .log_text()
            .contains("path=\"/demo.Echo/Slow\" api=\"silent\" status=504"))
    })
    .with_context(|| gw.log_text())?;
    ensure!(s.grpc_calls("api=\"silent\",grpc_status=\"4\"")? == 1);
    Ok(())
}

#[test]
fn the_gateways_own_refusals_are_answered_in_grpc_form() -> anyhow::Result<()> {
    let s = scene()?;
    let call = |port: u16, case: &str| s.call(port, case);
    // The gateway's own refusals, in gRPC form.
    ensure!(
        call(8081, "unary")? == "status 7 in ip-blocklist",
        "403 → PERMISSION_DENIED"
    );
    let gated = call(8082, "unary")?;
    ensure!(gated.starts_with("status 14 "), "503 → UNAVAILABLE: {gated}");
    let unauthenticated = call(8083, "unary")?;
    ensure!(
        unauthenticated == "status 16 unauthorized",
        "401 → UNAUTHENTICATED: {unauthenticated}"
    );
    ensure!(
        call(8084, "unary")? == "echo:hello seen",
        "the first call is within the limit"
    );
    ensure!(
        call(8084, "unary")? == "status 8 rate_limited",
        "429 → RESOURCE_EXHAUSTED"
    );

    ensure!(s.grpc_calls("api=\"blocked\",grpc_status=\"7\"")? == 1);
    ensure!(s.grpc_calls("api=\"limited\",grpc_status=\"8\"")? == 1);
    ensure!(s.grpc_calls("api=\"authed\",grpc_status=\"16\"")? == 1);
    Ok(())
}
