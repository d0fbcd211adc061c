//! Hot reload: SIGHUP and inotify, under load, valid and invalid changes.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use portcullis_tests::http::{
    GatewayProcess, TempDir, Upstream, api_instance, connect, read_response, request, status_of,
};
use portcullis_tests::{NetNs, wait_for};

const ADMIN: &str = "127.0.0.1:9901";

const SETTINGS: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: proxy
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
";

struct Scene {
    ns: NetNs,
    dir: TempDir,
    _up: Upstream,
    gw: GatewayProcess,
}

fn scene() -> anyhow::Result<Scene> {
    let ns = NetNs::new("rl")?;
    let dir = TempDir::new("rlc")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "main.yaml",
        &format!(
            "{}{SETTINGS}",
            api("main", "http://127.0.0.1:8080/main", "http://127.0.0.1:9000/")
        ),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, ADMIN.parse()?)?;
    Ok(Scene { ns, dir, _up: up, gw })
}

/// Replaces `name` atomically (write, then rename), as deploy tools do.
fn replace(dir: &TempDir, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.0.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.0.join(name))?;
    Ok(())
}

fn status(ns: &NetNs, addr: &str, path: &str) -> Option<u16> {
    let addr: SocketAddr = addr.parse().ok()?;
    let raw = request(
        ns,
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    status_of(&raw)
}

#[test]
#[expect(clippy::too_many_lines, reason = "the scenario reads top to bottom")]
fn hundred_reloads_under_load_fail_no_request() -> anyhow::Result<()> {
    let s = scene()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    // Two keep-alive clients and one that opens a connection per request.
    for keep_alive in [true, true, false] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let mut conn = connect(&s.ns, "127.0.0.1:8080".parse()?)?;
        let ns_path = s.ns.path();
        let fresh = move || -> anyhow::Result<std::net::TcpStream> {
            let ns = std::fs::File::open(&ns_path)?;
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&ns),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )?;
            Ok(std::net::TcpStream::connect("127.0.0.1:8080")?)
        };
        clients.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                if !keep_alive {
                    conn = fresh()?;
                }
                let req: &[u8] = if keep_alive {
                    b"GET /main/hello HTTP/1.1\r\nHost: a\r\n\r\n"
                } else {
                    b"GET /main/hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                };
                let outcome = match conn.write_all(req) {
                    Err(e) => Err(format!("write: {e}")),
                    Ok(()) => match read_response(&mut conn, &mut buf) {
                        Ok(200) => Ok(()),
                        Ok(other) => Err(format!("status {other}")),
                        Err(e) => Err(format!("read: {e}")),
                    },
                };
                if let Err(why) = &outcome {
                    eprintln!("client (keep-alive {keep_alive}) failed: {why}");
                }
                let good = outcome.is_ok();
                if good {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                    if keep_alive {
                        conn = fresh()?;
                    }
                }
            }
            Ok(())
        }));
    }
    let reload_started = Instant::now();
    for i in 0..100 {
        // Each reload changes the routes; every other one also adds or removes a listener.
        let mut text = api(
            &format!("extra-{i}"),
            &format!("http://127.0.0.1:8080/v{i}"),
            "http://127.0.0.1:9000/",
        );
        if i % 2 == 0 {
            text.push_str(&api("side", "http://127.0.0.1:8081/", "http://127.0.0.1:9000/"));
        }
        replace(&s.dir, "extra.yaml", &text)?;
        s.gw.reload()?;
        wait_for(&format!("/v{i} to be routed"), || {
            Ok(status(&s.ns, "127.0.0.1:8080", &format!("/v{i}/hello")) == Some(200))
        })
        .map_err(|e| anyhow::anyhow!("{e}: {}", tail(&s.gw.log_text())))?;
        if i % 2 == 0 {
            wait_for("the side listener", || {
                Ok(status(&s.ns, "127.0.0.1:8081", "/hello") == Some(200))
            })
            .map_err(|e| anyhow::anyhow!("{e}: {}", tail(&s.gw.log_text())))?;
        } else {
            wait_for("the side listener to close", || {
                Ok(status(&s.ns, "127.0.0.1:8081", "/hello").is_none())
            })
            .map_err(|e| anyhow::anyhow!("{e}: {}", tail(&s.gw.log_text())))?;
        }
        if i > 0 {
            ensure!(
                status(&s.ns, "127.0.0.1:8080", &format!("/v{}/hello", i - 1)) == Some(404),
                "the previous route must be gone"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("reload phase took {:?}", reload_started.elapsed());
    eprintln!("during 100 reloads: {ok} requests answered 200, {failed} failed");
    ensure!(
        failed == 0,
        "{failed} requests failed during reloads ({ok} succeeded)"
    );
    ensure!(ok > 300, "the load was too light to mean anything: {ok}");
    let reloaded = s.gw.log_text().matches("configuration reloaded").count();
    ensure!(reloaded >= 100, "only {reloaded} reloads logged");
    Ok(())
}

fn api(name: &str, address: &str, upstream: &str) -> String {
    api_instance(name, address, upstream, "")
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains(" access: ")).collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

#[test]
fn an_invalid_change_is_rejected_whole_and_traffic_stays() -> anyhow::Result<()> {
    let s = scene()?;
    // One valid new API and one broken one in the same change: neither is applied.
    let text = format!(
        "{}{}",
        api("fine", "http://127.0.0.1:8080/fine", "http://127.0.0.1:9000/"),
        api(
            "broken",
            "http://127.0.0.1:8080/broken",
            "http://127.0.0.1:notaport/"
        )
    );
    replace(&s.dir, "extra.yaml", &text)?;
    s.gw.reload()?;
    s.gw.wait_log("reload rejected", "the rejection in the log")?;
    let log = s.gw.log_text();
    ensure!(
        log.contains("extra.yaml:19:7: spec.services.up.address"),
        "the error must be located: {log}"
    );
    ensure!(
        status(&s.ns, "127.0.0.1:8080", "/fine/hello") == Some(404),
        "half of an invalid change must not apply"
    );
    ensure!(
        status(&s.ns, "127.0.0.1:8080", "/main/hello") == Some(200),
        "traffic continues on the running configuration"
    );
    // Fixing the file (noticed by inotify, no signal) applies the whole change.
    replace(&s.dir, "extra.yaml", &text.replace("notaport", "9000"))?;
    wait_for("inotify to reload", || {
        Ok(status(&s.ns, "127.0.0.1:8080", "/broken/hello") == Some(200))
    })?;
    ensure!(status(&s.ns, "127.0.0.1:8080", "/fine/hello") == Some(200));
    Ok(())
}

#[test]
fn a_stop_drains_requests_in_flight() -> anyhow::Result<()> {
    let mut s = scene()?;
    let mut busy = connect(&s.ns, "127.0.0.1:8080".parse()?)?;
    let mut idle = connect(&s.ns, "127.0.0.1:8080".parse()?)?;
    let mut buf = Vec::new();
    idle.write_all(b"GET /main/hello HTTP/1.1\r\nHost: a\r\n\r\n")?;
    ensure!(read_response(&mut idle, &mut buf)? == 200);
    busy.write_all(b"GET /main/slow/800 HTTP/1.1\r\nHost: a\r\n\r\n")?;
    std::thread::sleep(Duration::from_millis(100));
    let stopped = Instant::now();
    s.gw.terminate()?;
    // The idle keep-alive connection is closed at once, the busy one gets its answer.
    idle.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut idle, &mut rest)?;
    ensure!(
        rest.is_empty() && stopped.elapsed() < Duration::from_secs(1),
        "idle connection not closed promptly"
    );
    let status = read_response(&mut busy, &mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    ensure!(
        status == 200 && text.contains("connection: close"),
        "the request in flight must finish: {text}"
    );
    std::thread::sleep(Duration::from_millis(100));
    ensure!(
        status_of(
            &request(
                &s.ns,
                "127.0.0.1:8080".parse()?,
                b"GET /main/hello HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            .unwrap_or_default()
        )
        .is_none(),
        "no new requests once stopping"
    );
    let exit = s.gw.wait_exit(Duration::from_secs(5))?;
    ensure!(exit.success(), "exit status {exit}");
    let log = s.gw.log_text();
    ensure!(
        log.contains("draining") && log.contains("stopped left=0"),
        "{log}"
    );
    Ok(())
}
