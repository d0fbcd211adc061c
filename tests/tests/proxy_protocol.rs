//! PROXY protocol behind a real load balancer: haproxy (`send-proxy` to a
//! plain listener, `send-proxy-v2` over TLS to another) in front of
//! `portcullis run`, clients on their own loopback addresses, so the
//! gateway's policies, forwarding headers and access log must see the
//! client's address and not haproxy's.

use std::process::{Child, Stdio};

use anyhow::{Context, ensure};
use portcullis_tests::http::{
    GatewayProcess, Pki, TempDir, Upstream, api_instance, curl, strict_settings, tls_binding,
};
use portcullis_tests::{NetNs, wait_for};

/// haproxy in the namespace, ended by its pid.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TRUSTED: &str = "  proxyProtocol:\n    trustedSources: [127.0.0.1/32]\n";

fn from(ns: &NetNs, source: &str, url: &str) -> anyhow::Result<(i32, String)> {
    let (code, out, _) = curl(ns, &["--interface", source, "-i", url])?;
    Ok((code, out))
}

/// haproxy in `ns`: `send-proxy` from :7000 to the plain listener,
/// `send-proxy-v2` from :7001 to the TLS one (the client's TLS passed
/// through), and on :9100 an `accept-proxy` frontend before the upstream
/// that tells it, in `x-proxy-src`, the client a PROXY header named.
fn haproxy(ns: &NetNs, dir: &TempDir) -> anyhow::Result<Haproxy> {
    let cfg = dir.write(
        "haproxy.cfg",
        "global
  maxconn 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend v1
  bind 127.0.0.1:7000
  default_backend gw_v1
frontend v2
  bind 127.0.0.1:7001
  default_backend gw_v2
backend gw_v1
  server gw 127.0.0.1:8080 send-proxy
backend gw_v2
  server gw 127.0.0.1:8443 send-proxy-v2
frontend from_gateway
  mode http
  bind 127.0.0.1:9100 accept-proxy
  http-request set-header x-proxy-src %[src]
  default_backend upstream
backend upstream
  mode http
  server up 127.0.0.1:9000
",
    )?;
    Ok(Haproxy(
        ns.command("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy (Debian's)")?,
    ))
}

/// Two Services behind haproxy's `accept-proxy` frontend, one sent PROXY v1
/// and one v2, with an ApiInstance each (on :8081 and :8082).
fn towards_upstream() -> String {
    [("v1", 8081), ("v2", 8082)]
        .map(|(version, port)| {
            format!(
                "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: via-lb-{version}
spec:
  address: http://127.0.0.1:9100/
  proxyProtocol: {version}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: tagged-{version}
spec:
  address: http://127.0.0.1:{port}/
  services:
    via-lb-{version}: {{}}
---
"
            )
        })
        .concat()
}

#[test]
fn the_client_behind_a_load_balancer_is_the_one_policies_and_logs_see() -> anyhow::Result<()> {
    let ns = NetNs::new("pp")?;
    let dir = TempDir::new("pp")?;
    let pki = Pki::new(&dir.0, "pp")?;
    let leaf = pki.issue("gw", &["pp.test"], false)?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    let blocked = "  policies:\n    - policyRef:\n        name: ip-blocklist-flex\n      config:\n        ips: [127.0.0.6]\n";
    dir.write(
        "gateway.yaml",
        &format!(
            "{}{}{}{}{}",
            strict_settings("pp"),
            api_instance(
                "orders",
                "http://127.0.0.1:8080/",
                "http://127.0.0.1:9000/",
                &format!("{TRUSTED}{blocked}")
            ),
            api_instance(
                "secure",
                "https://127.0.0.1:8443/",
                "http://127.0.0.1:9000/",
                TRUSTED
            ),
            tls_binding("secure", &[&leaf], ""),
            towards_upstream(),
        ),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let _lb = haproxy(&ns, &dir)?;
    wait_for("haproxy to listen", || {
        Ok(curl(&ns, &["http://127.0.0.1:7000/hello"])?.0 == 0)
    })?;

    // v1, plain: the upstream and the access log see the client, not haproxy.
    let (code, head) = from(&ns, "127.0.0.5", "http://127.0.0.1:7000/headers")?;
    ensure!(
        code == 0 && head.contains("x-forwarded-for: 127.0.0.5\r\n"),
        "{head}"
    );
    gw.wait_log("client=127.0.0.5:", "the client's own address in the access line")?;
    // The block list judges the client behind the balancer.
    let (code, head) = from(&ns, "127.0.0.6", "http://127.0.0.1:7000/headers")?;
    ensure!(code == 0 && head.starts_with("HTTP/1.1 403"), "{head}");
    // v2, under TLS (haproxy passes the client's TLS through).
    let ca = pki.ca.display().to_string();
    let (code, head, err) = curl(
        &ns,
        &[
            "--interface",
            "127.0.0.5",
            "--cacert",
            &ca,
            "--resolve",
            "pp.test:7001:127.0.0.1",
            "https://pp.test:7001/headers",
        ],
    )?;
    ensure!(
        code == 0
            && head.contains("x-forwarded-for: 127.0.0.5\r\n")
            && head.contains("x-forwarded-proto: https"),
        "{code} {head} {err}"
    );

    // Straight to the gateway: an untrusted source is closed at accept, a
    // trusted one without a header before anything is parsed.
    let (code, _) = from(&ns, "127.0.0.7", "http://127.0.0.1:8080/hello")?;
    ensure!(code != 0, "an untrusted source is refused (curl {code})");
    let (code, _) = from(&ns, "127.0.0.1", "http://127.0.0.1:8080/hello")?;
    ensure!(
        code != 0,
        "a connection without a header is refused (curl {code})"
    );
    // Towards a Service: each upstream connection opens with its client's
    // header, v1 or v2, and is never handed to another client.
    for (port, sources) in [
        (8081, ["127.0.0.5", "127.0.0.8"]),
        (8082, ["127.0.0.8", "127.0.0.5"]),
    ] {
        for source in sources {
            let (code, head) = from(&ns, source, &format!("http://127.0.0.1:{port}/headers"))?;
            ensure!(
                code == 0 && head.contains(&format!("x-proxy-src: {source}\r\n")),
                "{port} from {source}: {head}"
            );
        }
    }
    let (_, m, _) = curl(&ns, &["http://127.0.0.1:9901/metrics"])?;
    for needle in [
        "portcullis_proxy_protocol_refused_total{reason=\"untrusted_source\"} 1",
        "portcullis_proxy_protocol_refused_total{reason=\"bad_header\"} 1",
        "portcullis_requests_total{api=\"orders\",status=\"403\"} 1",
    ] {
        ensure!(m.contains(needle), "{needle} in\n{m}");
    }
    Ok(())
}
