//! Endpoint health through `portcullis run`: an active health check takes an
//! endpoint that went down out of balancing and brings it back when it
//! returns; outlier detection ejects an endpoint that answers 5xx in a row;
//! the circuit breaker answers 503 with its reason beyond its limits.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use portcullis_tests::http::{
    GatewayProcess, TempDir, Upstream, UpstreamStats, curl, run_ok, strict_settings,
};
use portcullis_tests::{NetNs, portcullis_bin, wait_for};

const CONFIG: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: checked
spec:
  endpoints: [\"http://127.0.0.1:9001\", \"http://127.0.0.1:9002\"]
  healthCheck:
    path: /status/204
    interval: 200ms
    timeout: 200ms
    healthyThreshold: 2
    unhealthyThreshold: 2
    expectedStatuses: [204]
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: flaky
spec:
  endpoints: [\"http://127.0.0.1:9003\", \"http://127.0.0.1:9004\"]
  outlierDetection:
    consecutive5xx: 2
    baseEjectionTime: 1m
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: narrow
spec:
  address: http://127.0.0.1:9005
  circuitBreaker:
    maxPendingRequests: 1
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: few-conns
spec:
  address: http://127.0.0.1:9006
  circuitBreaker:
    maxConnections: 1
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: checked
spec:
  address: http://127.0.0.1:8080/checked
  services:
    checked: {}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: flaky
spec:
  address: http://127.0.0.1:8080/flaky
  services:
    flaky: {}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: narrow
spec:
  address: http://127.0.0.1:8080/narrow
  services:
    narrow: {}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: few-conns
spec:
  address: http://127.0.0.1:8080/few
  services:
    few-conns: {}
";

/// An endpoint that answers every request 500, counting them.
struct Failing {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Failing {
    fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        let (served, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, halt) = (served.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(&conn);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if line == "\r\n" {
                            count.fetch_add(1, Ordering::SeqCst);
                            let _ = (&conn).write_all(
                                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\nfail\n",
                            );
                        }
                        line.clear();
                    }
                });
            }
        });
        Ok(Self { addr, served, stop })
    }
}

impl Drop for Failing {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

fn metrics(ns: &NetNs) -> anyhow::Result<String> {
    Ok(curl(ns, &["http://127.0.0.1:9901/metrics"])?.1)
}

fn health_is(ns: &NetNs, endpoint: &str, state: &str) -> anyhow::Result<bool> {
    let line = format!("{{service=\"checked\",endpoint=\"{endpoint}\",state=\"{state}\"}} 1");
    Ok(metrics(ns)?.contains(&line))
}

/// `n` GETs of `url`; every status seen.
fn statuses(ns: &NetNs, url: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}\n"];
    for _ in 1..n {
        args.extend(["-o", "/dev/null", url]);
    }
    args.push(url);
    let (code, out, err) = curl(ns, &args)?;
    ensure!(code == 0, "curl: {err}");
    Ok(out.lines().map(str::to_owned).collect())
}

/// Requests `stats` saw that came through the gateway: health checks carry no `x-forwarded-for`.
fn served(stats: &UpstreamStats) -> u64 {
    stats.requests.load(Ordering::SeqCst) - stats.unmarked.load(Ordering::SeqCst)
}

/// An upstream at `addr` that tells proxied requests from health checks.
fn upstream(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Upstream> {
    let up = Upstream::start(ns, addr)?;
    up.expect_header("x-forwarded-for");
    Ok(up)
}

#[test]
fn health_checks_outlier_ejection_and_the_circuit_breaker_keep_traffic_on_what_works() -> anyhow::Result<()> {
    let ns = NetNs::new("hc")?;
    let dir = TempDir::new("hc")?;
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut first = Some(upstream(&ns, at(9001))?);
    let second = upstream(&ns, at(9002))?;
    let good = Upstream::start(&ns, at(9003))?;
    let bad = Failing::start(&ns, at(9004))?;
    let narrow = Upstream::start(&ns, at(9005))?;
    let _few = Upstream::start(&ns, at(9006))?;
    dir.write("gateway.yaml", &format!("{}{CONFIG}", strict_settings("hc")))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let url = "http://127.0.0.1:8080/checked/hello";

    // Both endpoints healthy: round robin shares the requests.
    wait_for("both endpoints checked", || {
        Ok(metrics(&ns)?.contains(
            "upstream_health_checks_total{service=\"checked\",endpoint=\"127.0.0.1:9001\",result=\"pass\"}",
        ))
    })?;
    let first_stats = first
        .as_ref()
        .map(|u| u.stats.clone())
        .context("first upstream")?;
    let before = (served(&first_stats), served(&second.stats));
    ensure!(statuses(&ns, url, 20)?.iter().all(|s| s == "200"));
    let shares = (served(&first_stats) - before.0, served(&second.stats) - before.1);
    ensure!(
        shares.0 >= 8 && shares.1 >= 8,
        "round robin over both: {shares:?}"
    );

    // The first goes down: its checks fail, it leaves balancing, nothing is lost.
    drop(first.take());
    wait_for("the stopped endpoint to be unhealthy", || {
        health_is(&ns, "127.0.0.1:9001", "unhealthy")
    })?;
    let before = (served(&first_stats), served(&second.stats));
    let codes = statuses(&ns, url, 20)?;
    ensure!(codes.iter().all(|s| s == "200"), "{codes:?}");
    ensure!(
        served(&first_stats) == before.0 && served(&second.stats) == before.1 + 20,
        "all to the healthy endpoint"
    );
    let state_dir = dir.0.join("gateway.state");
    wait_for("status to show it", || {
        let out = run_ok(
            std::process::Command::new(portcullis_bin())
                .args(["--instance", "hc-none", "status", "--state-dir"])
                .arg(&state_dir),
        )?;
        Ok(out
            .lines()
            .any(|l| l.contains("127.0.0.1:9001") && l.contains("unhealthy") && l.contains("active")))
    })?;

    // It comes back: two passing checks in a row, and it takes requests again.
    let back = upstream(&ns, at(9001))?;
    wait_for("the endpoint to be healthy again", || {
        health_is(&ns, "127.0.0.1:9001", "healthy")
    })?;
    let before = served(&first_stats) + served(&back.stats);
    ensure!(statuses(&ns, url, 20)?.iter().all(|s| s == "200"));
    // Connections the gateway pooled before the stop may still reach the first process.
    let again = served(&first_stats) + served(&back.stats) - before;
    ensure!(again >= 8, "back in balancing: {again} of 20\n{}", gw.log_text());
    gw.wait_log("endpoint healthy again", "the return logged")?;

    // Outlier detection: two 5xx in a row eject the failing endpoint; then every request succeeds.
    let codes = statuses(&ns, "http://127.0.0.1:8080/flaky/hello", 30)?;
    let failed = bad.served.load(Ordering::SeqCst);
    ensure!(failed == 2, "ejected after two 500s, not {failed}: {codes:?}");
    ensure!(
        codes.iter().filter(|c| *c == "500").count() == 2 && good.requests() == 28,
        "{codes:?}"
    );
    ensure!(
        metrics(&ns)?.contains("portcullis_upstream_ejections_total{service=\"flaky\",endpoint=\"127.0.0.1:9004\",result=\"consecutive_5xx\"} 1"),
        "the ejection is counted"
    );

    circuit_breaker_steps(&ns, &narrow)
}

/// A second request while one is in (`maxPendingRequests`) or holds the one
/// connection (`maxConnections`) gets 503 with the limit's name; once the
/// first ends, requests pass again.
fn circuit_breaker_steps(ns: &NetNs, narrow: &Upstream) -> anyhow::Result<()> {
    // The circuit breaker: a second request while one is pending gets 503 with the reason.
    for (path, limit) in [("narrow", "maxPendingRequests"), ("few", "maxConnections")] {
        let slow = format!("http://127.0.0.1:8080/{path}/slow/1500");
        let holder = {
            let ns_path = ns.path();
            std::thread::spawn(move || {
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", ns_path.display()))
                    .args(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", &slow])
                    .output();
                out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        let (_, refused, _) = curl(ns, &["-i", &format!("http://127.0.0.1:8080/{path}/hello")])?;
        ensure!(
            refused.starts_with("HTTP/1.1 503")
                && refused.contains("retry-after: 5")
                && refused.contains(limit),
            "{path}: {refused}"
        );
        let held = holder
            .join()
            .map_err(|_| anyhow::anyhow!("the slow request panicked"))??;
        ensure!(held == "200", "the request within the limit: {held}");
        let codes = statuses(ns, &format!("http://127.0.0.1:8080/{path}/hello"), 3)?;
        ensure!(
            codes.iter().all(|c| c == "200"),
            "{path} after the slow one: {codes:?}"
        );
    }
    ensure!(
        narrow.requests() == 4,
        "the refused request never reached the upstream"
    );
    ensure!(
        metrics(ns)?.contains("portcullis_upstream_errors_total{service=\"narrow\",kind=\"circuit_open\"} 1"),
        "the refusal is counted"
    );
    Ok(())
}
