//! Connected mode end to end: `portcullis control-plane` as a real process,
//! replicas registering with one-time tokens over TLS that pins the CA, and a
//! gateway following the control plane's snapshots over mTLS — edits
//! enforced, outages survived, levels honoured at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use portcullis_tests::control::{ADMIN, CP_URL, ControlPlane, Replica, portcullis, register, register_at};
use portcullis_tests::http::{RedisServer, TempDir, Upstream, api_instance, request, run_ok, status_of};
use portcullis_tests::{NetNs, wait_for};

const GW: &str = "127.0.0.1:8080";

/// A namespace, a home directory, and a control plane there serving `orders` v1 for cluster `prod`.
fn cluster(tag: &str) -> anyhow::Result<(NetNs, TempDir, PathBuf, ControlPlane)> {
    let ns = NetNs::new(tag)?;
    let home = TempDir::new(&format!("{tag}c"))?;
    let cp_dir = home.0.join("cp");
    ControlPlane::init(&cp_dir)?;
    let cp = ControlPlane::start(&ns, &cp_dir)?;
    cp.publish("prod", "orders.yaml", &orders("v1"))?;
    Ok((ns, home, cp_dir, cp))
}

/// The names in `dir`, sorted, and whether each is a link.
fn listing(dir: &Path) -> anyhow::Result<Vec<(String, bool)>> {
    let mut names = std::fs::read_dir(dir)?
        .map(|e| {
            let e = e?;
            Ok((
                e.file_name().to_string_lossy().into_owned(),
                e.file_type()?.is_symlink(),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map_or(0, |m| m.mode() & 0o777)
}

#[test]
fn registration_pins_the_ca_and_a_token_works_once() -> anyhow::Result<()> {
    let ns = NetNs::new("cr")?;
    let home = TempDir::new("crc")?;
    let cp_dir = home.0.join("cp");
    ControlPlane::init(&cp_dir)?;
    ensure!(mode(&cp_dir.join("ca.key")) == 0o600, "the CA key is private");
    let cp = ControlPlane::start(&ns, &cp_dir)?;
    let token = cp.token("prod", "10m")?;
    let gw = home.0.join("gw");
    let out = register(&ns, &token, "replica-1", &gw)?;
    ensure!(out.contains("in cluster prod"), "{out}");
    for file in ["registration.yaml", "replica.key", "replica.crt", "ca.crt"] {
        ensure!(mode(&gw.join(file)) == 0o600, "{file} is written 0600");
    }
    let inspect = run_ok(portcullis(&["registration", "inspect"]).arg(gw.join("registration.yaml")))?;
    ensure!(
        inspect.contains("replica:       replica-1")
            && inspect.contains("cluster:       prod")
            && inspect.contains(CP_URL),
        "{inspect}"
    );

    let again = register(&ns, &token, "replica-2", &home.0.join("gw2"));
    ensure!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("token unknown, already used or expired")),
        "a token works once: {again:?}"
    );
    let short = cp.token("prod", "1s")?;
    std::thread::sleep(Duration::from_millis(2100));
    let expired = register(&ns, &short, "replica-3", &home.0.join("gw3"));
    ensure!(expired.is_err(), "an expired token is refused: {expired:?}");
    let (prefix, _) = token.rsplit_once('.').context("a token")?;
    let forged = format!("{prefix}.{}", "0123456789abcdef".repeat(4));
    let forged = register(&ns, &forged, "replica-4", &home.0.join("gw4"));
    ensure!(
        forged.as_ref().is_err_and(|e| e.to_string().contains("401")),
        "a forged token is refused: {forged:?}"
    );
    let other = home.0.join("other-cp");
    ControlPlane::init(&other)?;
    let foreign =
        run_ok(portcullis(&["control-plane", "token", "create", "--cluster", "prod", "--dir"]).arg(&other))?;
    let pinned = register(&ns, foreign.trim(), "replica-5", &home.0.join("gw5"));
    ensure!(
        pinned
            .as_ref()
            .is_err_and(|e| e.to_string().contains("does not match the token's fingerprint")),
        "a control plane whose CA the token does not pin is refused: {pinned:?}"
    );
    let fresh = cp.token("prod", "10m")?;
    let twice = register(&ns, &fresh, "replica-1", &gw);
    ensure!(
        twice
            .as_ref()
            .is_err_and(|e| e.to_string().contains("exists already")),
        "a registration is never overwritten: {twice:?}"
    );
    let log = cp.log_text();
    ensure!(
        log.contains("replica registered replica=\"replica-1\"") && !log.contains(&token),
        "an audit line per registration, never a secret: {log}"
    );

    // Loose modes are refused with the fix.
    for file in ["replica.key", "registration.yaml"] {
        let path = gw.join(file);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        let check = portcullis(&["check"]).arg(&gw).output()?;
        let err = String::from_utf8_lossy(&check.stderr);
        ensure!(
            !check.status.success()
                && err.contains("readable by group or others")
                && err.contains("chmod 600"),
            "{file} 0644: {err}"
        );
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    Ok(())
}

fn settings(level: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: prod
spec:
  proxy:
    workers: 2
    admin: {ADMIN}
  gatekeeper:
    level: {level}
"
    )
}

/// The cluster's API: `/orders` to the upstream, tagged by a policy with `version`.
fn orders(version: &str) -> String {
    api_instance(
        "orders",
        &format!("http://{GW}/orders"),
        "http://127.0.0.1:9000/",
        &format!(
            "  policies:
    - policyRef:
        name: header-injection-flex
      config:
        inboundHeaders:
          - key: x-policy
            value: applied
        outboundHeaders:
          - key: x-version
            value: \"{version}\"
"
        ),
    )
}

/// `(status, x-version)` of one request for `/orders/hello`.
fn version_of(ns: &NetNs) -> (u16, String) {
    let gw: SocketAddr = GW.parse().expect("address");
    let raw = request(
        ns,
        gw,
        b"GET /orders/hello HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("x-version: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    (status_of(&raw).unwrap_or(0), version)
}

fn replica(ns: &NetNs, cp: &ControlPlane, level: &str) -> anyhow::Result<Replica> {
    let dir = TempDir::new("crg")?;
    dir.write("settings.yaml", &settings(level))?;
    register(ns, &cp.token("prod", "10m")?, "gw-a", &dir.0)?;
    Replica::with_new_key(dir)
}

#[test]
fn edits_on_the_control_plane_are_enforced_and_its_outage_changes_nothing() -> anyhow::Result<()> {
    let (ns, _home, cp_dir, mut cp) = cluster("ce")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    up.expect_header("x-policy");
    let r = replica(&ns, &cp, "flexible")?;
    let gw = r.start(&ns)?;
    wait_for("v1 from the control plane", || {
        Ok(version_of(&ns) == (200, "v1".into()))
    })
    .with_context(|| gw.log_text())?;

    // An edit is pushed, applied behind the gate, and enforced.
    cp.publish("prod", "orders.yaml", &orders("v2"))?;
    wait_for("v2 enforced", || Ok(version_of(&ns) == (200, "v2".into()))).with_context(|| gw.log_text())?;
    gw.wait_log("gate applying", "the edit was applied behind the gate")?;
    let status = || {
        run_ok(portcullis(&["status", "--state-dir"]).arg(r.dir.0.with_extension("state")))
            .unwrap_or_default()
    };
    wait_for("status shows the link", || {
        Ok(status().contains(&format!(
            "control plane {CP_URL} (replica gw-a, cluster prod): connected; snapshot v2"
        )))
    })
    .with_context(status)?;

    // Traffic while the control plane is killed, an edit waits for it, and it comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, gated, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (stop, ok, gated, failed) = (stop.clone(), ok.clone(), gated.clone(), failed.clone());
        let gw_addr: SocketAddr = GW.parse()?;
        ns.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let raw = request_plain(gw_addr);
                match status_of(&raw) {
                    Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                    // The pending edit is applied behind the gate when the control plane returns.
                    Some(503) => gated.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    cp.kill();
    gw.wait_log("control plane lost", "the replica noticed the outage")?;
    wait_for("status shows the outage", || {
        Ok(status().contains("NOT CONNECTED"))
    })
    .with_context(status)?;
    std::thread::sleep(Duration::from_millis(500));
    cp.publish("prod", "orders.yaml", &orders("v3"))?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        version_of(&ns).1 == "v2",
        "nothing changes while the control plane is away"
    );
    cp.restart(&ns)?;
    wait_for("the pending edit applied after the return", || {
        Ok(version_of(&ns).1 == "v3")
    })
    .with_context(|| gw.log_text())?;
    stop.store(true, Ordering::Relaxed);
    load.join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    let (ok, gated, failed) = (
        ok.load(Ordering::Relaxed),
        gated.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "connected: {ok} requests answered 200 through a control-plane outage and return, {gated} gated while the pending edit was applied, {failed} failed, {} without their policies",
        up.unmarked()
    );
    ensure!(
        ok > 100 && failed == 0,
        "{ok} ok, {failed} failed\n{}",
        gw.log_text()
    );
    ensure!(
        up.unmarked() == 0,
        "{} requests reached the upstream without their policies",
        up.unmarked()
    );

    // A revoked replica is refused from its next request on, and keeps serving what it applied.
    run_ok(portcullis(&["control-plane", "revoke", "gw-a", "--dir"]).arg(&cp_dir))?;
    gw.wait_log("replica `gw-a` is revoked", "the replica was refused")?;
    ensure!(
        version_of(&ns) == (200, "v3".into()),
        "what is applied stays in force"
    );
    ensure!(cp.log_text().contains("refused: revoked"), "{}", cp.log_text());
    Ok(())
}

/// One request on a new connection, from inside the namespace already.
fn request_plain(addr: SocketAddr) -> Vec<u8> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /orders/hello HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn levels_decide_a_start_while_the_control_plane_is_down() -> anyhow::Result<()> {
    let (ns, _home, _cp_dir, mut cp) = cluster("cl")?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    for (level, cached) in [("flexible", 200), ("strict", 503), ("disabled", 200)] {
        let r = replica(&ns, &cp, level)?;
        // A first run with the control plane up leaves a last-known-good cache.
        let mut gw = r.start(&ns)?;
        wait_for("v1 applied", || Ok(version_of(&ns) == (200, "v1".into())))
            .with_context(|| gw.log_text())?;
        gw.terminate()?;
        gw.wait_exit(Duration::from_secs(15))?;
        cp.kill();
        let mut gw = r.start(&ns)?;
        let (status, _) = version_of(&ns);
        ensure!(
            status == cached,
            "{level}, a cache, the control plane down: {status}, want {cached}\n{}",
            gw.log_text()
        );
        cp.restart(&ns)?;
        wait_for("v1 once the control plane is back", || {
            Ok(version_of(&ns) == (200, "v1".into()))
        })
        .with_context(|| format!("{level}: {}", gw.log_text()))?;
        gw.terminate()?;
        gw.wait_exit(Duration::from_secs(15))?;
    }
    // No cache: nothing of the control plane's is known until it answers.
    let r = replica(&ns, &cp, "flexible")?;
    cp.kill();
    let gw = r.start(&ns)?;
    ensure!(
        version_of(&ns).0 == 0,
        "no cache and no control plane: nothing is served yet, not even a listener"
    );
    cp.restart(&ns)?;
    wait_for("v1 once the control plane answers", || {
        Ok(version_of(&ns) == (200, "v1".into()))
    })
    .with_context(|| gw.log_text())?;
    Ok(())
}

#[test]
fn certificates_renew_under_load_without_a_restart() -> anyhow::Result<()> {
    let ns = NetNs::new("cn")?;
    let home = TempDir::new("cnc")?;
    let cp_dir = home.0.join("cp");
    ControlPlane::init(&cp_dir)?;
    let cp = ControlPlane::start_for(&ns, &cp_dir, "20s")?;
    cp.publish("prod", "orders.yaml", &orders("v1"))?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    up.expect_header("x-policy");
    // As the packaged unit has it: the registration in the state directory
    // (writable), a link to it in the read-only conf.d.
    let r = replica(&ns, &cp, "flexible")?;
    let state = TempDir::new("cns")?;
    for file in ["registration.yaml", "replica.key", "replica.crt", "ca.crt"] {
        std::fs::rename(r.dir.0.join(file), state.0.join(file))?;
    }
    std::os::unix::fs::symlink(
        state.0.join("registration.yaml"),
        r.dir.0.join("registration.yaml"),
    )?;
    let conf_before = listing(&r.dir.0)?;
    let gw = r.start(&ns)?;
    wait_for("v1 applied", || Ok(version_of(&ns) == (200, "v1".into()))).with_context(|| gw.log_text())?;
    let first = std::fs::read_to_string(state.0.join("registration.yaml"))?;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let gw_addr: SocketAddr = GW.parse()?;
        ns.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if status_of(&request_plain(gw_addr)) == Some(200) {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Three renewals of a 20-second certificate: the first at about 13 s, then every 13 s.
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    while gw.log_text().matches("certificate renewed").count() < 3 {
        ensure!(
            std::time::Instant::now() < deadline,
            "three renewals within 60 s: {}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    load.join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    // The control plane still knows the replica: an edit after the renewals arrives
    // (after the load: the edit is applied behind the gate, which answers 503 meanwhile).
    cp.publish("prod", "orders.yaml", &orders("v2"))?;
    wait_for("v2 after the renewals", || Ok(version_of(&ns).1 == "v2")).with_context(|| gw.log_text())?;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let now = std::fs::read_to_string(state.0.join("registration.yaml"))?;
    ensure!(
        now != first && mode(&state.0.join("registration.yaml")) == 0o600,
        "the registration was rewritten 0600: {now}"
    );
    ensure!(
        !state.0.join("replica.crt").exists(),
        "the first certificate is gone"
    );
    ensure!(
        listing(&r.dir.0)? == conf_before,
        "renewal wrote into the configuration directory: {:?}",
        listing(&r.dir.0)?
    );
    ensure!(
        cp.log_text().matches("replica renewed").count() >= 3,
        "{}",
        cp.log_text()
    );
    println!(
        "renewal: {ok} requests answered 200 across 3 renewals, {failed} failed, {} without their policies",
        up.unmarked()
    );
    ensure!(
        ok > 100 && failed == 0 && up.unmarked() == 0,
        "{ok} ok, {failed} failed"
    );
    Ok(())
}

const REDIS: &str = "127.0.0.1:6390";
const REDIS_PASSWORD: &str = "r3dis-connected-pw";

/// A replica of the cluster `prod` named `name`, using shared storage and the cluster's cache `key`.
fn redis_replica(ns: &NetNs, cp: &ControlPlane, name: &str, key: &Path) -> anyhow::Result<Replica> {
    let dir = TempDir::new("crr")?;
    dir.write_private("redis.password", REDIS_PASSWORD)?;
    dir.write(
        "settings.yaml",
        &format!(
            "{}  sharedStorage:\n    redis:\n      address: {REDIS}\n      username: gateway\n      password: ${{file:redis.password}}\n",
            settings("flexible")
        ),
    )?;
    register(ns, &cp.token("prod", "10m")?, name, &dir.0)?;
    Ok(Replica {
        dir,
        key: key.to_path_buf(),
    })
}

fn redis_cli(ns: &NetNs, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = ns
        .command("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "6390",
            "--user",
            "gateway",
            "--pass",
            REDIS_PASSWORD,
            "--no-auth-warning",
        ])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Scans Redis's whole keyspace: nothing of the configuration in clear. The keys.
fn nothing_in_clear(ns: &NetNs) -> anyhow::Result<String> {
    let keys = String::from_utf8(redis_cli(ns, &["--scan"])?)?;
    ensure!(!keys.trim().is_empty(), "the copy is in Redis");
    for k in keys.lines().filter(|k| !k.is_empty()) {
        ensure!(!k.contains("orders"), "a key names a resource: {k}");
        let value = redis_cli(ns, &["--raw", "GET", k])?;
        let text = String::from_utf8_lossy(&value);
        for secret in [
            "orders",
            "x-policy",
            "header-injection",
            "ApiInstance",
            "127.0.0.1:9000",
            REDIS_PASSWORD,
        ] {
            ensure!(!text.contains(secret), "{k} holds `{secret}` in clear");
        }
    }
    Ok(keys)
}

/// Flips one bit of the value at `key`.
fn tamper(ns: &NetNs, dir: &Path, key: &str) -> anyhow::Result<()> {
    let value = redis_cli(ns, &["--raw", "GET", key])?;
    let mut tampered = value.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x01;
    let file = dir.join("tampered.bin");
    std::fs::write(&file, &tampered[..tampered.len().saturating_sub(1)])?;
    let set = ns
        .command("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -h 127.0.0.1 -p 6390 --user gateway --pass {REDIS_PASSWORD} --no-auth-warning -x SET {key} < {}",
            file.display()
        ))
        .output()?;
    ensure!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    Ok(())
}

#[test]
fn replicas_share_an_encrypted_last_known_good_through_redis() -> anyhow::Result<()> {
    let (ns, home, _cp_dir, mut cp) = cluster("cs")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    up.expect_header("x-policy");
    let mut redis = RedisServer::start(&ns, &home.0, REDIS.parse()?, "gateway", REDIS_PASSWORD)?;
    // The cluster's cache key: the operator gives every replica the same one; Redis never sees it.
    let key = home.0.join("cluster.key");
    run_ok(portcullis(&["secret", "keygen", "--out"]).arg(&key))?;
    let (a, b, c) = (
        redis_replica(&ns, &cp, "gw-a", &key)?,
        redis_replica(&ns, &cp, "gw-b", &key)?,
        redis_replica(&ns, &cp, "gw-c", &key)?,
    );
    let mut gw = a.start(&ns)?;
    wait_for("v1 on replica a", || Ok(version_of(&ns) == (200, "v1".into())))
        .with_context(|| gw.log_text())?;
    gw.wait_log("copy stored in Redis", "replica a stored the cluster's copy")?;

    // The control plane and Redis both killed under load: open routes keep answering,
    // and an edit made meanwhile is applied (and shared) when they return.
    let traffic = load(&ns);
    std::thread::sleep(Duration::from_millis(200));
    cp.kill();
    redis.kill();
    cp.publish("prod", "orders.yaml", &orders("v2"))?;
    std::thread::sleep(Duration::from_millis(800));
    ensure!(
        version_of(&ns) == (200, "v1".into()),
        "nothing changes while both are away"
    );
    redis.restart()?;
    cp.restart(&ns)?;
    wait_for("v2 after both return", || Ok(version_of(&ns).1 == "v2")).with_context(|| gw.log_text())?;
    let [ok, gated, failed] = traffic.finish()?;
    println!(
        "control plane and Redis killed: {ok} answered 200, {gated} gated while v2 was applied, {failed} failed, {} without their policies",
        up.unmarked()
    );
    ensure!(
        ok > 50 && failed == 0 && up.unmarked() == 0,
        "{ok} ok, {gated} gated, {failed} failed"
    );
    wait_for("the v2 copy stored", || {
        Ok(gw.log_text().contains("copy stored in Redis version=2"))
    })
    .with_context(|| gw.log_text())?;
    gw.terminate()?;
    gw.wait_exit(Duration::from_secs(15))?;
    cp.kill();

    // A new replica, no local cache, the control plane down: open from the Redis copy.
    let mut gw = b.start(&ns)?;
    ensure!(
        version_of(&ns) == (200, "v2".into()),
        "replica b from the cluster's copy: {}",
        gw.log_text()
    );
    gw.wait_log(
        "applying the cluster's last-known-good copy from Redis",
        "b used the copy",
    )?;
    gw.terminate()?;
    gw.wait_exit(Duration::from_secs(15))?;

    let keys = nothing_in_clear(&ns)?;
    tamper(&ns, &home.0, keys.lines().next().context("a key")?)?;
    let gw = c.start(&ns)?;
    ensure!(
        version_of(&ns).0 == 0,
        "a tampered copy is not applied: {}",
        gw.log_text()
    );
    gw.wait_log("copy in Redis refused", "c refused the tampered copy")?;
    Ok(())
}

/// Load on one replica: `(200s, 503s, failures)` counted until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 3]>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

fn load(ns: &NetNs) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 3]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let (s, c) = (stop.clone(), counts.clone());
    let gw: SocketAddr = GW.parse().expect("address");
    let thread = ns.spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let slot = match status_of(&request_plain(gw)) {
                Some(200) => 0,
                Some(503) => 1,
                _ => 2,
            };
            c[slot].fetch_add(1, Ordering::Relaxed);
        }
    });
    Load { stop, counts, thread }
}

impl Load {
    fn finish(self) -> anyhow::Result<[u64; 3]> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        Ok([0, 1, 2].map(|i| self.counts[i].load(Ordering::Relaxed)))
    }
}

#[test]
fn two_replicas_follow_every_edit_and_no_request_skips_its_policies() -> anyhow::Result<()> {
    let infra = NetNs::new("ci")?;
    let (ns_a, ns_b) = (NetNs::new("ca")?, NetNs::new("cb")?);
    let _va = portcullis_tests::Veth::join(&infra, &["10.71.1.1/24"], &ns_a, &["10.71.1.2/24"])?;
    let _vb = portcullis_tests::Veth::join(&infra, &["10.71.2.1/24"], &ns_b, &["10.71.2.2/24"])?;
    let home = TempDir::new("c2c")?;
    let cp_dir = home.0.join("cp");
    run_ok(
        portcullis(&[
            "control-plane",
            "init",
            "--san",
            "10.71.1.1",
            "--san",
            "10.71.2.1",
            "--dir",
        ])
        .arg(&cp_dir),
    )?;
    let mut cp = ControlPlane::start(&infra, &cp_dir)?;
    cp.publish("prod", "orders.yaml", &orders("v1"))?;
    let mut replicas = Vec::new();
    for (ns, name, url) in [
        (&ns_a, "gw-a", "https://10.71.1.1:7443"),
        (&ns_b, "gw-b", "https://10.71.2.1:7443"),
    ] {
        let up = Upstream::start(ns, "127.0.0.1:9000".parse()?)?;
        up.expect_header("x-policy");
        let dir = TempDir::new("c2r")?;
        dir.write("settings.yaml", &settings("flexible"))?;
        register_at(ns, url, &cp.token("prod", "10m")?, name, &dir.0)?;
        let r = Replica::with_new_key(dir)?;
        let gw = r.start(ns)?;
        replicas.push((ns, r, gw, up));
    }
    for (ns, _, gw, _) in &replicas {
        wait_for("v1 on both replicas", || Ok(version_of(ns) == (200, "v1".into())))
            .with_context(|| gw.log_text())?;
    }
    let loads: Vec<Load> = replicas.iter().map(|(ns, ..)| load(ns)).collect();
    // Edits pushed one after another; the control plane and one replica restarted on the way.
    for n in 2..=8 {
        let version = format!("v{n}");
        cp.publish("prod", "orders.yaml", &orders(&version))?;
        if n == 4 {
            cp.kill();
            cp.restart(&infra)?;
        }
        if n == 6 {
            let (ns, r, gw, _) = &mut replicas[0];
            gw.terminate()?;
            gw.wait_exit(Duration::from_secs(15))?;
            *gw = r.start(ns)?;
        }
        for (ns, _, gw, _) in &replicas {
            wait_for("the edit on both replicas", || Ok(version_of(ns).1 == version))
                .with_context(|| format!("{version}: {}", gw.log_text()))?;
        }
    }
    let mut totals = Vec::new();
    for (l, (_, _, gw, up)) in loads.into_iter().zip(&replicas) {
        let [ok, gated, failed] = l.finish()?;
        totals.push((ok, gated, failed, up.unmarked(), up.requests()));
        gw.wait_log("gate applying", "edits were applied behind the gate")?;
    }
    println!(
        "two replicas, 7 edits, a control-plane and a gateway restart: (200, 503, failed, leaks, upstream requests) per replica {totals:?}"
    );
    for (ok, _, _, leaks, seen) in &totals {
        ensure!(*ok > 50 && *seen > 50, "traffic flowed: {totals:?}");
        ensure!(
            *leaks == 0,
            "requests reached an upstream without their policies: {totals:?}"
        );
    }
    Ok(())
}

#[test]
fn contracts_from_the_control_plane_open_a_gated_route() -> anyhow::Result<()> {
    let ns = NetNs::new("ck")?;
    let home = TempDir::new("ckc")?;
    let cp_dir = home.0.join("cp");
    ControlPlane::init(&cp_dir)?;
    let cp = ControlPlane::start(&ns, &cp_dir)?;
    let enforced = orders("v1").replace(
        "  policies:\n",
        "  policies:\n    - policyRef:\n        name: client-id-enforcement-flex\n",
    );
    cp.publish("prod", "orders.yaml", &enforced)?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    let r = replica(&ns, &cp, "flexible")?;
    let gw = r.start(&ns)?;
    let gw_addr: SocketAddr = GW.parse()?;
    let with_credentials = |ns: &NetNs| {
        let raw = request(
            ns,
            gw_addr,
            b"GET /orders/hello HTTP/1.1\r\nHost: api\r\nAuthorization: Basic bW9iaWxlOnBhc3N3b3Jk\r\nConnection: close\r\n\r\n",
        )
        .unwrap_or_default();
        status_of(&raw).unwrap_or(0)
    };
    wait_for("the route gated: no contract yet", || {
        Ok(with_credentials(&ns) == 503)
    })
    .with_context(|| gw.log_text())?;
    cp.publish(
        "prod",
        "contracts.yaml",
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Contract\nmetadata:\n  name: mobile\nspec:\n  clientId: mobile\n  clientSecretHash: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n  apis: [orders]\n",
    )?;
    wait_for("open once the contract arrives", || {
        Ok(with_credentials(&ns) == 200)
    })
    .with_context(|| gw.log_text())?;
    ensure!(version_of(&ns).0 == 401, "without credentials: 401");
    Ok(())
}

#[test]
fn an_expired_certificate_is_a_clear_error_and_changes_nothing_applied() -> anyhow::Result<()> {
    let (ns, home, cp_dir, _) = cluster("cx")?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    // The control plane again, issuing certificates of 6 s; gone before the first renewal.
    let mut cp = ControlPlane::start_for(&ns, &cp_dir, "6s")?;
    let _keep = &home;
    let r = replica(&ns, &cp, "flexible")?;
    let gw = r.start(&ns)?;
    wait_for("v1 applied", || Ok(version_of(&ns) == (200, "v1".into()))).with_context(|| gw.log_text())?;
    cp.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !gw.log_text().contains("the replica's certificate expired") {
        ensure!(
            std::time::Instant::now() < deadline,
            "no expiry error: {}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        gw.log_text().contains("register again with a new token"),
        "the error says the way back"
    );
    ensure!(
        version_of(&ns) == (200, "v1".into()),
        "what is applied stays in force"
    );
    let inspect = run_ok(portcullis(&["registration", "inspect"]).arg(r.dir.0.join("registration.yaml")))?;
    ensure!(inspect.contains("EXPIRED"), "{inspect}");
    Ok(())
}
