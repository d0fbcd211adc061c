//! Two gateway replicas share one rate limit through a real redis-server,
//! and keep serving (counting locally) while Redis is down.

use std::time::Duration;

use anyhow::ensure;
use portcullis_tests::NetNs;
use portcullis_tests::http::{GatewayProcess, RedisServer, TempDir, Upstream, request, status_of};

const LIMIT: u64 = 20;

fn config(dir: &TempDir, listen: u16, admin: u16) -> anyhow::Result<()> {
    dir.write_private("redis.password", "r3dis-pw")?;
    dir.write(
        "gateway.yaml",
        &format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: gateway
spec:
  sharedStorage:
    redis:
      address: 127.0.0.1:6390
      username: gateway
      password: ${{file:redis.password}}
  proxy:
    workers: 2
    admin: 127.0.0.1:{admin}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: orders
spec:
  address: http://127.0.0.1:{listen}/orders
  services:
    up:
      address: http://127.0.0.1:9000/
  policies:
    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: {LIMIT}
            timePeriodInMilliseconds: 600000
        keySelector: \"#[attributes.headers['x-client']]\"
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: strict
spec:
  address: http://127.0.0.1:{listen}/strict
  services:
    up:
      address: http://127.0.0.1:9000/
  policies:
    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: 1000
            timePeriodInMilliseconds: 600000
        redisFailMode: closed
"
        ),
    )?;
    Ok(())
}

/// Sends `n` requests for `client`, alternating replicas; the number answered 200.
fn allowed(ns: &NetNs, client: &str, n: usize, pause: Duration) -> anyhow::Result<(u64, Vec<u16>)> {
    let mut ok = 0;
    let mut seen = Vec::new();
    for i in 0..n {
        let port = if i % 2 == 0 { 8080 } else { 8081 };
        let raw = request(
            ns,
            format!("127.0.0.1:{port}").parse()?,
            format!(
                "GET /orders/hello HTTP/1.1\r\nHost: a\r\nx-client: {client}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        let status = status_of(&raw).unwrap_or(0);
        ok += u64::from(status == 200);
        seen.push(status);
        std::thread::sleep(pause);
    }
    Ok((ok, seen))
}

#[test]
fn two_replicas_enforce_one_limit_and_survive_redis_restarts() -> anyhow::Result<()> {
    let ns = NetNs::new("rd")?;
    let dir_a = TempDir::new("rda")?;
    let dir_b = TempDir::new("rdb")?;
    let mut redis = RedisServer::start(&ns, &dir_a.0, "127.0.0.1:6390".parse()?, "gateway", "r3dis-pw")?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    config(&dir_a, 8080, 9901)?;
    config(&dir_b, 8081, 9902)?;
    let a = GatewayProcess::start(&ns, &dir_a.0, "127.0.0.1:9901".parse()?)?;
    let b = GatewayProcess::start(&ns, &dir_b.0, "127.0.0.1:9902".parse()?)?;
    // 60 requests spread over both replicas: the cluster lets through the limit,
    // give or take what one replica admits before the other's counts arrive
    // (the store syncs every 10 ms; requests here are 20 ms apart).
    let (ok, seen) = allowed(&ns, "alice", 60, Duration::from_millis(20))?;
    eprintln!("alice: {ok} of 60 allowed across two replicas with a limit of {LIMIT}");
    ensure!(
        (LIMIT..=LIMIT + 2).contains(&ok),
        "{ok} allowed, want {LIMIT}..={}: {seen:?}",
        LIMIT + 2
    );
    ensure!(seen.iter().all(|s| *s == 200 || *s == 429), "{seen:?}");
    // Redis down: both replicas keep answering, counting locally, and say why in the log.
    redis.kill();
    let (ok_down, seen) = allowed(&ns, "bob", 20, Duration::from_millis(5))?;
    ensure!(
        seen.iter().all(|s| *s == 200 || *s == 429),
        "no 5xx and no hang while Redis is down: {seen:?}"
    );
    ensure!(ok_down == 20, "bob is under the limit on each replica: {seen:?}");
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        a.log_text()
            .contains("rate limits are counted locally until Redis answers"),
        "{}",
        a.log_text()
    );
    // A limit configured to fail closed refuses while Redis is down.
    let strict = |port: u16| -> anyhow::Result<Option<u16>> {
        let raw = request(
            &ns,
            format!("127.0.0.1:{port}").parse()?,
            b"GET /strict/hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )?;
        Ok(status_of(&raw))
    };
    ensure!(
        strict(8080)? == Some(503),
        "redisFailMode: closed must refuse while Redis is down"
    );
    // Redis back (empty, as after a crash): the replicas reconnect without a restart
    // and share a limit again.
    redis.restart()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(a.log_text().matches("shared storage connected").count() >= 2
        && b.log_text().matches("shared storage connected").count() >= 2)
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "replicas did not reconnect to Redis"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(strict(8081)? == Some(200), "and pass again once Redis is back");
    let (ok, seen) = allowed(&ns, "carol", 60, Duration::from_millis(20))?;
    eprintln!("carol after the Redis restart: {ok} of 60 allowed");
    ensure!(
        (LIMIT..=LIMIT + 2).contains(&ok),
        "{ok} allowed after the restart: {seen:?}"
    );
    ensure!(
        !a.log_text().contains("r3dis-pw") && !b.log_text().contains("r3dis-pw"),
        "the Redis password leaked"
    );
    Ok(())
}

#[test]
fn shared_storage_over_tls() -> anyhow::Result<()> {
    let ns = NetNs::new("rt")?;
    let dir = TempDir::new("rtc")?;
    let pki = portcullis_tests::http::Pki::new(&dir.0, "redis-ca")?;
    let cert = pki.issue("redis", &["127.0.0.1"], false)?;
    let _redis = RedisServer::start_tls(
        &ns,
        &dir.0,
        "127.0.0.1:6390".parse()?,
        "gateway",
        "r3dis-pw",
        &cert,
    )?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    config(&dir, 8080, 9901)?;
    let text = std::fs::read_to_string(dir.0.join("gateway.yaml"))?.replace(
        "      password: ${file:redis.password}\n",
        &format!(
            "      password: ${{file:redis.password}}\n      tls:\n        trustedCA: ${{file:{}}}\n",
            pki.ca.display()
        ),
    );
    dir.write("gateway.yaml", &text)?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    gw.wait_log("shared storage connected", "no TLS connection to Redis")?;
    let mut ok = 0;
    for _ in 0..25 {
        let raw = request(
            &ns,
            "127.0.0.1:8080".parse()?,
            b"GET /orders/hello HTTP/1.1\r\nHost: a\r\nx-client: dave\r\nConnection: close\r\n\r\n",
        )?;
        ok += u64::from(status_of(&raw) == Some(200));
        std::thread::sleep(Duration::from_millis(15));
    }
    ensure!(
        ok == LIMIT,
        "{ok} allowed with the limit counted through Redis over TLS"
    );
    ensure!(!gw.log_text().contains("cannot reach Redis"), "{}", gw.log_text());
    Ok(())
}
