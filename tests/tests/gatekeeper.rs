//! Gatekeeper in the proxy: a route whose policies are not all in force
//! answers 503 and never reaches its upstream; levels with an unreadable
//! configuration source, with and without the last-known-good cache.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance, curl, mobile_contract};
use portcullis_tests::{NetNs, portcullis_bin, wait_for};

fn settings(level: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: gk
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
  gatekeeper:
    level: {level}
---
"
    )
}

fn api(name: &str, policies: &str) -> String {
    let extra = if policies.is_empty() {
        String::new()
    } else {
        format!("  policies:\n{policies}")
    };
    api_instance(
        name,
        &format!("http://127.0.0.1:8080/{name}"),
        "http://127.0.0.1:9000/",
        &extra,
    )
}

fn rate_limit(maximum: &str) -> String {
    format!(
        "    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: {maximum}
            timePeriodInMilliseconds: 60000
"
    )
}

const CLIENT_ID: &str = "    - policyRef:\n        name: client-id-enforcement-flex\n";

/// curl arguments carrying `mobile`'s credentials (Basic, the policy's default origin).
const CREDENTIALS: [&str; 2] = ["-u", "mobile:password"];

/// Status line and headers (lowercase) of a GET, or `None` when nothing answers.
fn get(ns: &NetNs, path: &str, extra: &[&str]) -> anyhow::Result<Option<String>> {
    let url = format!("http://127.0.0.1:8080{path}");
    let mut args = vec!["-sS", "-i", "--max-time", "5"];
    args.extend_from_slice(extra);
    args.push(&url);
    let (code, out, _) = curl(ns, &args)?;
    if code == 7 {
        return Ok(None);
    }
    ensure!(code == 0, "curl {path} exited {code}");
    let head = out.split("\r\n\r\n").next().unwrap_or_default();
    Ok(Some(head.to_ascii_lowercase()))
}

fn status(ns: &NetNs, path: &str, extra: &[&str]) -> anyhow::Result<Option<u16>> {
    Ok(get(ns, path, extra)?.and_then(|h| h.get(9..12).and_then(|s| s.parse().ok())))
}

fn metrics(ns: &NetNs) -> anyhow::Result<String> {
    let (code, out, err) = curl(ns, &["-sS", "http://127.0.0.1:9901/metrics"])?;
    ensure!(code == 0, "metrics: {err}");
    Ok(out)
}

#[test]
fn a_malformed_policy_gates_its_api_until_it_is_fixed() -> anyhow::Result<()> {
    let ns = NetNs::new("gkm")?;
    let dir = TempDir::new("gkm")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    let write = |bad: &str| {
        dir.write(
            "gateway.yaml",
            &format!(
                "{}{}{}",
                settings("flexible"),
                api("bad", &rate_limit(bad)),
                api("good", "")
            ),
        )
    };
    write("lots")?;
    // `check` refuses what `run` gates.
    let out = std::process::Command::new(portcullis_bin())
        .args(["check"])
        .arg(&dir.0)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && stderr.contains("gateway.yaml:")
            && stderr.contains("spec.policies[0].config"),
        "check must name the failing policy: {stderr}"
    );
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let head = get(&ns, "/bad/hello", &[])?.context("gateway answers")?;
    ensure!(
        head.starts_with("http/1.1 503") && head.contains("retry-after: 5"),
        "{head}"
    );
    ensure!(status(&ns, "/good/hello", &[])? == Some(200));
    ensure!(
        up.requests() == 1,
        "only the open API reaches the upstream, saw {}",
        up.requests()
    );
    let m = metrics(&ns)?;
    ensure!(
        m.contains("portcullis_gate_rejections_total{api=\"bad\",reason=\"policy_failed\"} 1")
            && m.contains("portcullis_gate_open{api=\"bad\"} 0")
            && m.contains("portcullis_gate_open{api=\"good\"} 1"),
        "{m}"
    );
    ensure!(
        gw.log_text().contains("answers 503 until the policy is fixed"),
        "{}",
        gw.log_text()
    );

    // Fixed: the gate opens and the policy is in force.
    write("1")?;
    wait_for("the fixed policy", || {
        Ok(status(&ns, "/bad/hello", &[])? == Some(200))
    })?;
    ensure!(status(&ns, "/bad/hello", &[])? == Some(429));

    // Broken again by an edit: gated, not served with the old policy and not without one.
    write("-3")?;
    wait_for("the broken edit", || {
        Ok(status(&ns, "/bad/hello", &[])? == Some(503))
    })?;
    ensure!(status(&ns, "/good/hello", &[])? == Some(200));
    Ok(())
}

#[test]
fn missing_contracts_gate_until_they_are_loaded() -> anyhow::Result<()> {
    let ns = NetNs::new("gkc")?;
    let dir = TempDir::new("gkc")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!("{}{}", settings("strict"), api("orders", CLIENT_ID)),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let both = CREDENTIALS;
    ensure!(status(&ns, "/orders/hello", &both)? == Some(503));
    ensure!(
        metrics(&ns)?.contains("reason=\"contracts_missing\"} 1"),
        "counted per reason"
    );
    dir.write("contracts.yaml", &mobile_contract("orders"))?;
    wait_for("the contract", || {
        Ok(status(&ns, "/orders/hello", &both)? == Some(200))
    })?;
    ensure!(status(&ns, "/orders/hello", &[])? == Some(401));
    ensure!(up.requests() == 1, "saw {}", up.requests());
    let _ = gw;
    Ok(())
}

#[test]
fn an_edit_is_applied_behind_the_gate_and_order_alone_never_gates() -> anyhow::Result<()> {
    let ns = NetNs::new("gke")?;
    let dir = TempDir::new("gke")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    let inject = |key: &str, value: &str| {
        format!(
            "    - policyRef:\n        name: header-injection-flex\n      config:\n        inboundHeaders:\n          - key: {key}\n            value: \"{value}\"\n"
        )
    };
    let write = |policies: &str| {
        dir.write(
            "gateway.yaml",
            &format!("{}{}", settings("flexible"), api("orders", policies)),
        )
    };
    write(&format!("{}{}", inject("x-a", "1"), inject("x-b", "2")))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let reloads = |gw: &GatewayProcess| gw.log_text().matches("configuration reloaded").count();

    write(&format!("{}{}", inject("x-b", "2"), inject("x-a", "1")))?;
    wait_for("the reorder", || Ok(reloads(&gw) == 1))?;
    ensure!(
        !gw.log_text().contains("gate applying"),
        "an order change must not gate: {}",
        gw.log_text()
    );

    write(&format!("{}{}", inject("x-b", "2"), inject("x-a", "edited")))?;
    wait_for("the edit", || Ok(reloads(&gw) == 2))?;
    let log = gw.log_text();
    ensure!(
        log.contains(
            "gate applying: policy configuration edited or API instance redeployed apis=[\"orders\"]"
        ),
        "{log}"
    );
    ensure!(
        status(&ns, "/orders/headers", &[])? == Some(200),
        "{}",
        gw.log_text()
    );
    let seen = up.last_head().to_ascii_lowercase();
    ensure!(seen.contains("x-a: edited"), "{seen}");
    Ok(())
}

#[test]
fn disabled_serves_an_api_without_its_failed_policy() -> anyhow::Result<()> {
    let ns = NetNs::new("gkd")?;
    let dir = TempDir::new("gkd")?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!(
            "{}{}",
            settings("disabled"),
            api("orders", &format!("{}{CLIENT_ID}", rate_limit("lots")))
        ),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    // Contracts missing and a broken policy: disabled never answers 503.
    ensure!(status(&ns, "/orders/hello", &[])? == Some(401));
    ensure!(gw.log_text().contains("served WITHOUT it"), "{}", gw.log_text());
    Ok(())
}

/// A cache key file (0600) in `dir`.
fn cache_key(dir: &TempDir) -> anyhow::Result<PathBuf> {
    let out = std::process::Command::new(portcullis_bin())
        .args(["secret", "keygen", "--out"])
        .arg(dir.0.join("cache.key"))
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(dir.0.join("cache.key"))
}

fn start(ns: &NetNs, config: &Path, state: &Path, key: &Path) -> anyhow::Result<GatewayProcess> {
    GatewayProcess::start_log(
        ns,
        &portcullis_bin(),
        config,
        "127.0.0.1:9901".parse()?,
        &[("PORTCULLIS_STATE_DIR", state), ("PORTCULLIS_CACHE_KEY", key)],
        &state.join(format!("gateway-{}.log", portcullis_tests::unique_name("r"))),
    )
}

/// The source is moved away between two runs: what the second run serves.
fn unreachable_source(level: &str) -> anyhow::Result<()> {
    let ns = NetNs::new("gku")?;
    let keys = TempDir::new("gkk")?;
    let key = cache_key(&keys)?;
    let config = TempDir::new("gku")?;
    let away = config.0.with_extension("away");
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    config.write(
        "gateway.yaml",
        &format!(
            "{}{}{}",
            settings(level),
            api("orders", CLIENT_ID),
            mobile_contract("orders")
        ),
    )?;
    let both = CREDENTIALS;
    let cached = TempDir::new("gks")?;
    let empty = TempDir::new("gkn")?;
    {
        let gw = start(&ns, &config.0, &cached.0, &key)?;
        ensure!(status(&ns, "/orders/hello", &both)? == Some(200));
        ensure!(
            cached.0.join("last-known-good.cache").exists(),
            "{}",
            gw.log_text()
        );
    }
    std::fs::rename(&config.0, &away)?;
    let result = (|| -> anyhow::Result<()> {
        // With the cache: strict stays 503; flexible and disabled apply the cached policies.
        {
            let gw = start(&ns, &config.0, &cached.0, &key)?;
            if level == "strict" {
                ensure!(
                    status(&ns, "/orders/hello", &both)? == Some(503),
                    "{}",
                    gw.log_text()
                );
            } else {
                ensure!(
                    status(&ns, "/orders/hello", &both)? == Some(200),
                    "{}",
                    gw.log_text()
                );
                ensure!(
                    status(&ns, "/orders/hello", &[])? == Some(401),
                    "cached policy in force"
                );
            }
        }
        // Without a cache, and with an altered one, nothing is served.
        let mut altered = std::fs::read(cached.0.join("last-known-good.cache"))?;
        let last = altered.len() - 1;
        altered[last] ^= 0x40;
        std::fs::write(empty.0.join("last-known-good.cache"), &altered)?;
        let gw = start(&ns, &config.0, &empty.0, &key)?;
        ensure!(
            status(&ns, "/orders/hello", &both)?.is_none(),
            "no listener without a usable cache"
        );
        ensure!(
            gw.log_text().contains("refused: it does not decrypt"),
            "{}",
            gw.log_text()
        );
        // The source comes back: its configuration is applied without a restart.
        std::fs::rename(&away, &config.0)?;
        wait_for("the source to be read again", || {
            Ok(status(&ns, "/orders/hello", &both)? == Some(200))
        })?;
        ensure!(status(&ns, "/orders/hello", &[])? == Some(401));
        Ok(())
    })();
    if away.exists() {
        let _ = std::fs::rename(&away, &config.0);
    }
    result
}

#[test]
fn strict_with_an_unreachable_source_stays_gated() -> anyhow::Result<()> {
    unreachable_source("strict")
}

#[test]
fn flexible_with_an_unreachable_source_applies_the_cache() -> anyhow::Result<()> {
    unreachable_source("flexible")
}

#[test]
fn disabled_with_an_unreachable_source_applies_the_cache() -> anyhow::Result<()> {
    unreachable_source("disabled")
}
