//! Policies end to end: header injection and removal both ways, IP allow and
//! block lists, chain order, and a reload that changes a policy.

use std::time::Duration;

use anyhow::ensure;
use portcullis_tests::NetNs;
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, curl};

const SETTINGS: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: proxy
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
---
";

fn api(name: &str, path: &str, policies: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: {name}
spec:
  address: http://127.0.0.1:8080/{path}
  services:
    up:
      address: http://127.0.0.1:9000/
  policies:
{policies}---
"
    )
}

const HEADERS: &str = "    - policyRef:
        name: header-injection-flex
      config:
        inboundHeaders:
          - key: x-gateway
            value: portcullis
        outboundHeaders:
          - key: x-served-by
            value: portcullis
    - policyRef:
        name: header-removal-flex
      config:
        inboundHeaders: [X-Debug, \"X-Internal-.*\"]
        outboundHeaders: [x-upstream-secret]
";

fn ip_list(kind: &str, cidrs: &str) -> String {
    format!("    - policyRef:\n        name: {kind}\n      config:\n        ips: [{cidrs}]\n")
}

struct Scene {
    ns: NetNs,
    dir: TempDir,
    up: Upstream,
    gw: GatewayProcess,
}

fn scene(resources: &str) -> anyhow::Result<Scene> {
    let ns = NetNs::new("po")?;
    let dir = TempDir::new("poc")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write("gateway.yaml", &format!("{SETTINGS}{resources}"))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    Ok(Scene { ns, dir, up, gw })
}

fn get(s: &Scene, path: &str, headers: &[&str]) -> anyhow::Result<(String, String)> {
    let mut args = vec!["-i".to_string()];
    for h in headers {
        args.push("-H".into());
        args.push((*h).to_string());
    }
    args.push(format!("http://127.0.0.1:8080{path}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = curl(&s.ns, &args)?;
    ensure!(code == 0, "curl {path}: {err}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((head.to_ascii_lowercase(), body.to_string()))
}

#[test]
fn headers_are_injected_and_removed_both_ways() -> anyhow::Result<()> {
    let s = scene(&api("orders", "orders", HEADERS))?;
    let (_, body) = get(
        &s,
        "/orders/headers",
        &["X-Debug: 1", "X-Internal-Trace: abc", "X-Keep: yes"],
    )?;
    let seen = body.to_ascii_lowercase();
    ensure!(
        seen.contains("x-gateway: portcullis") && seen.contains("x-keep: yes"),
        "{seen}"
    );
    ensure!(
        !seen.contains("x-debug") && !seen.contains("x-internal-trace"),
        "removed headers reached the upstream: {seen}"
    );
    let (head, body) = get(&s, "/orders/tagged", &[])?;
    ensure!(body == "tagged\n", "{body}");
    ensure!(
        head.contains("x-served-by: portcullis") && head.contains("x-keep: 1"),
        "{head}"
    );
    ensure!(
        !head.contains("x-upstream-secret"),
        "the response header must be removed: {head}"
    );
    let _ = (&s.dir, &s.up);
    Ok(())
}

#[test]
fn ip_lists_refuse_with_403_before_the_upstream() -> anyhow::Result<()> {
    let resources = format!(
        "{}{}{}",
        api(
            "office",
            "office",
            &ip_list("ip-allowlist-flex", "10.0.0.0/8, \"2001:db8::/32\"")
        ),
        api("open", "open", &ip_list("ip-allowlist-flex", "127.0.0.0/8")),
        api("blocked", "blocked", &ip_list("ip-blocklist", "127.0.0.1")),
    );
    let s = scene(&resources)?;
    let before = s.up.requests();
    for (path, want) in [
        ("/office/hello", "403"),
        ("/open/hello", "200"),
        ("/blocked/hello", "403"),
    ] {
        let (head, _) = get(&s, path, &[])?;
        ensure!(head.starts_with(&format!("http/1.1 {want}")), "{path}: {head}");
    }
    ensure!(
        s.up.requests() == before + 1,
        "refused requests must never reach the upstream"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = s.gw.log_text();
    ensure!(
        log.contains("status=403") && log.contains("error=\"not in ip-allowlist\""),
        "{log}"
    );
    Ok(())
}

#[test]
fn chain_order_and_a_policy_edit_by_reload() -> anyhow::Result<()> {
    // Inline policies run first, bound ones after by `order`: the blocklist
    // (order 1) refuses before the injection (order 2) would have run.
    let binding = |name: &str, order: u32, policy: &str, config: &str| {
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: {name}
spec:
  targetRef:
    name: orders
  policyRef:
    name: {policy}
  order: {order}
  config:
{config}---
"
        )
    };
    let inject = "    inboundHeaders:\n      - key: x-bound\n        value: yes\n";
    let resources = format!(
        "{}{}{}",
        api("orders", "orders", &ip_list("ip-blocklist-flex", "10.9.9.9")),
        binding("inject", 2, "header-injection-flex", inject),
        binding("block-local", 1, "ip-blocklist-flex", "    ips: [127.0.0.1]\n"),
    );
    let s = scene(&resources)?;
    let (head, _) = get(&s, "/orders/headers", &[])?;
    ensure!(head.starts_with("http/1.1 403"), "{head}");
    // Editing the binding (reload) opens the API and the injection runs.
    let edited = resources.replace("    ips: [127.0.0.1]\n", "    ips: [10.1.1.1]\n");
    s.dir.write("gateway.yaml", &format!("{SETTINGS}{edited}"))?;
    s.gw.reload()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (head, body) = get(&s, "/orders/headers", &[])?;
        if head.starts_with("http/1.1 200") {
            ensure!(body.to_ascii_lowercase().contains("x-bound: yes"), "{body}");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the edited policy never applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
