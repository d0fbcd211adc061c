//! `cargo xtask bench proxy`: wrk against Portcullis, nginx and haproxy
//! (configured alike, one worker per core) and the upstream directly, in one
//! namespace, one run. Each cell is run [`REPEATS`] times with the proxies in
//! a different order each round, and reports medians: req/s, p50/p99, and
//! each proxy's own CPU per request (its processes' utime + stime over the
//! requests wrk counted), the figure wrk's share of the cores cannot blur.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use portcullis_harness::NetNs;
use portcullis_harness::http::TempDir;

use crate::{cargo, profile, root, run as sh, setup};

const DURATION: &str = "5s";
/// Rounds of every cell; the order of the targets rotates each round.
const REPEATS: usize = 3;

/// Worker processes/threads given to each proxy under test: one per core,
/// as users run them.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
const UPSTREAM: &str = "127.0.0.1:9000";
/// Idle keep-alive connections the RSS measurement holds open.
const IDLE_CONNS: usize = 10_000;
/// The HTTP/2 row: connections, concurrent streams on each, seconds per run.
const H2_CONNS: usize = 10;
const H2_STREAMS: usize = 10;
const H2_SECONDS: &str = "5";

/// A process killed on drop.
struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master killed outright leaves its workers
        // behind, orphaned and still listening.
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(ns: &NetNs, what: &'static str, program: &str, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let file = std::fs::File::create(log)?;
    let child = ns
        .command("sh")
        .env("RUST_LOG", "warn")
        .args(["-c", "ulimit -n $(ulimit -Hn); exec \"$0\" \"$@\"", program])
        .args(args)
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    Ok(Proc(child, what))
}

fn wait_port(ns: &NetNs, addr: SocketAddr, proc: &mut Proc, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())? {
            return Ok(());
        }
        if let Some(status) = proc.0.try_wait()? {
            bail!(
                "{} exited with {status}: {}",
                proc.1,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("{} is not listening on {addr} after 15 s", proc.1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One wrk result.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    requests: u64,
    /// The target's own CPU per request, µs (0 when not measured).
    cpu_us: f64,
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of each figure over a cell's rounds.
fn median_run(runs: &[Run]) -> Run {
    let pick = |f: fn(&Run) -> f64| median_of(runs.iter().map(f).collect());
    Run {
        rps: pick(|r| r.rps),
        p50_ms: pick(|r| r.p50_ms),
        p99_ms: pick(|r| r.p99_ms),
        cpu_us: pick(|r| r.cpu_us),
        errors: runs.iter().map(|r| r.errors).sum(),
        requests: runs.iter().map(|r| r.requests).sum(),
    }
}

fn parse_latency(text: &str) -> Option<f64> {
    let (num, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn wrk(ns: &NetNs, url: &str, connections: usize) -> anyhow::Result<Run> {
    wrk_with(ns, url, connections, None)
}

fn wrk_with(ns: &NetNs, url: &str, connections: usize, header: Option<&str>) -> anyhow::Result<Run> {
    let threads = 2.min(connections);
    let header = header.map(|h| format!("-H '{h}' ")).unwrap_or_default();
    let script = format!(
        "ulimit -n $(ulimit -Hn); exec wrk -t{threads} -c{connections} -d{DURATION} --latency {header}{url}"
    );
    let out = ns.command("sh").args(["-c", &script]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk {url}: {}{text}", String::from_utf8_lossy(&out.stderr));
    }
    let mut run = Run::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => run.rps = v.parse().unwrap_or(0.0),
            [n, "requests", "in", ..] => run.requests = n.parse().unwrap_or(0),
            ["50%", v] => run.p50_ms = parse_latency(v).unwrap_or(0.0),
            ["99%", v] => run.p99_ms = parse_latency(v).unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                run.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if run.rps == 0.0 {
        bail!("wrk printed no Requests/sec for {url}: {text}");
    }
    Ok(run)
}

fn nginx_conf(dir: &Path, listen: &str, body: &str, workers: usize) -> String {
    let d = dir.display();
    format!(
        "worker_processes {workers};
pid {d}/nginx-{listen}.pid;
error_log {d}/nginx-{listen}.err warn;
events {{ worker_connections 9000; }}
worker_rlimit_nofile 20000;
http {{
  access_log off;
  client_body_temp_path {d}/body-{listen};
  proxy_temp_path {d}/proxy-{listen};
  fastcgi_temp_path {d}/fcgi-{listen};
  uwsgi_temp_path {d}/uwsgi-{listen};
  scgi_temp_path {d}/scgi-{listen};
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  {body}
}}
"
    )
}

/// Runs the proxy benchmark and prints its table.
#[expect(
    clippy::too_many_lines,
    reason = "the whole set-up reads top to bottom: upstream, three proxies, the matrix"
)]
pub fn proxy() -> anyhow::Result<()> {
    crate::require_root("cargo xtask bench proxy")?;
    // The gateway fits its connection limit to the descriptors it may open,
    // keeping one for an upstream connection beside each client's.
    let open_files = raise_nofile(IDLE_CONNS as u64 * 4)?;
    let idle_conns =
        IDLE_CONNS.min(usize::try_from(open_files.saturating_sub(2048) / 2).unwrap_or(IDLE_CONNS));
    setup::apt_install(&["nginx", "haproxy", "wrk", "curl", "nghttp2-client", "linux-perf"])?;
    let object = setup::build_ebpf()?;
    sh(cargo()
        .args(["build", "--release", "-p", "portcullis"])
        .env("PORTCULLIS_XDP_OBJ", &object))?;
    let bin = root().join("target/release/portcullis");
    let workers = workers();
    let ns = NetNs::new("bn")?;
    let dir = TempDir::new("bench")?;
    let www = dir.0.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("small"), "x".repeat(128))?;
    std::fs::write(www.join("16k"), "y".repeat(16 * 1024))?;
    let pki_dir = TempDir::new("bench-pki")?;
    let pki = portcullis_harness::http::Pki::new(&pki_dir.0, "bench")?;
    let leaf = pki.issue("proxy", &["bench.test"], false)?;

    // The upstream: nginx serving both bodies from memory-cached files.
    let up_conf = dir.write(
        "upstream.conf",
        &nginx_conf(
            &dir.0,
            "9000",
            &format!(
                "open_file_cache max=100; server {{ listen {UPSTREAM} backlog=4096; root {}; }}",
                www.display()
            ),
            1,
        ),
    )?;
    let log = dir.0.join("upstream.log");
    let mut upstream = spawn(
        &ns,
        "upstream nginx",
        "nginx",
        &["-c", &up_conf.to_string_lossy(), "-g", "daemon off;"],
        &log,
    )?;
    wait_port(&ns, UPSTREAM.parse()?, &mut upstream, &log)?;

    let nginx_proxy = dir.write(
        "proxy.conf",
        &nginx_conf(
            &dir.0,
            "8081",
            &format!(
                "upstream up {{ server {UPSTREAM}; keepalive 1024; keepalive_requests 10000000; }}
  server {{ listen 127.0.0.1:8081 backlog=4096;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering on; }} }}
  server {{ listen 127.0.0.1:8444 ssl http2 backlog=4096;
    ssl_certificate {}; ssl_certificate_key {};
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering on; }} }}",
                leaf.crt.display(),
                leaf.key.display()
            ),
            workers,
        ),
    )?;
    let log = dir.0.join("nginx.log");
    let mut nginx = spawn(
        &ns,
        "nginx",
        "nginx",
        &["-c", &nginx_proxy.to_string_lossy(), "-g", "daemon off;"],
        &log,
    )?;
    wait_port(&ns, "127.0.0.1:8081".parse()?, &mut nginx, &log)?;

    let haproxy_cfg = dir.write(
        "haproxy.cfg",
        &format!(
            "global
  nbthread {workers}
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:8082
  default_backend be
backend be
  server up {UPSTREAM}
"
        ),
    )?;
    let log = dir.0.join("haproxy.log");
    let mut haproxy = spawn(
        &ns,
        "haproxy",
        "haproxy",
        &["-db", "-f", &haproxy_cfg.to_string_lossy()],
        &log,
    )?;
    wait_port(&ns, "127.0.0.1:8082".parse()?, &mut haproxy, &log)?;

    let conf = dir.0.join("portcullis");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(
        conf.join("bench.yaml"),
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: bench
spec:
  address: http://127.0.0.1:8080/
  services:
    up:
      address: http://{UPSTREAM}/
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: proxy
spec:
  proxy:
    workers: {workers}
    admin: 127.0.0.1:9901
---
{}{}",
            portcullis_harness::http::api_instance(
                "bench-tls",
                "https://127.0.0.1:8443/",
                &format!("http://{UPSTREAM}/"),
                ""
            ),
            portcullis_harness::http::tls_binding("bench-tls", &[&leaf], "")
        ),
    )?;
    let log = dir.0.join("portcullis.log");
    // Access logs are off for all three proxies.
    let mut gateway = spawn(
        &ns,
        "portcullis",
        &bin.to_string_lossy(),
        &["run", "--config", &conf.to_string_lossy()],
        &log,
    )?;
    wait_port(&ns, "127.0.0.1:8080".parse()?, &mut gateway, &log)?;

    let targets = [
        ("portcullis", "127.0.0.1:8080", Some(gateway.0.id())),
        ("nginx", "127.0.0.1:8081", Some(nginx.0.id())),
        ("haproxy", "127.0.0.1:8082", Some(haproxy.0.id())),
        ("direct", UPSTREAM, None),
    ];
    // Each table is printed as soon as it is measured: a later failure keeps it.
    println!(
        "workers per proxy: {workers}; wrk 2 threads, {DURATION} per run, median of {REPEATS} rounds in rotating order; upstream nginx (1 worker) on the same loopback\n"
    );
    println!("{}", matrix(&ns, &targets)?);
    println!("{}", profiles(&ns, &dir, &targets[..2])?);
    let h2_targets = [
        ("portcullis", "127.0.0.1:8443", gateway.0.id()),
        ("nginx", "127.0.0.1:8444", nginx.0.id()),
    ];
    println!("{}", http2_rows(&ns, &dir, &h2_targets)?);
    let (plain, with) = policy_runs(&ns, &dir, &bin)?;
    println!("| workload (128 B, 50 conns) | req/s | p50 / p99 ms | vs no policies |");
    println!("| --- | ---: | --- | ---: |");
    println!(
        "| portcullis, no policies | {:.0} | {:.2}/{:.2} | 1.00× |",
        plain.rps, plain.p50_ms, plain.p99_ms
    );
    println!(
        "| portcullis, client-id enforcement + cluster rate limiting (Redis) + header injection | {:.0} | {:.2}/{:.2} | {:.2}× (p99 {:.2}×) |\n",
        with.rps,
        with.p50_ms,
        with.p99_ms,
        with.rps / plain.rps,
        with.p99_ms / plain.p99_ms
    );
    // Give the workers' pool sweep (every 2 s) time to let go of the burst.
    std::thread::sleep(Duration::from_secs(5));
    let rss = idle_rss(&ns, gateway.0.id(), "127.0.0.1:8080".parse()?, idle_conns)?;
    println!(
        "portcullis RSS with {idle_conns} idle keep-alive connections (the open-file limit is {open_files}), after the runs above: {:.1} MiB (idle before opening them: {:.1} MiB)",
        rss.1, rss.0
    );
    drop((gateway, haproxy, nginx, upstream));
    Ok(())
}

/// CPU µs per request: `spent` CPU seconds over `requests`.
fn per_request_us(spent: f64, requests: u64) -> f64 {
    spent * 1e6 / f64::from(u32::try_from(requests.max(1)).unwrap_or(u32::MAX))
}

/// Every cell of the benchmark, `REPEATS` rounds each, the targets in a
/// different order every round; returns the Markdown table of medians.
fn matrix(ns: &NetNs, targets: &[(&str, &str, Option<u32>)]) -> anyhow::Result<String> {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| body | conns | req/s portcullis · nginx · haproxy · direct | CPU µs/req portcullis · nginx · haproxy | p99 ms portcullis · nginx · haproxy | pc/nginx req/s | pc/nginx CPU/req | pc/haproxy CPU/req | pc/direct req/s |"
    );
    let _ = writeln!(
        table,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (body, path) in [("128 B", "/small"), ("16 KiB", "/16k")] {
        for conns in [50, 1000] {
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
            for round in 0..REPEATS {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                order.rotate_left(round % targets.len());
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let (name, addr, pid) = targets[i];
                    let url = format!("http://{addr}{path}");
                    // A short warm-up fills pools and caches.
                    let _ = wrk_short(ns, &url, conns);
                    let before = pid.map(portcullis_harness::cpu_seconds).transpose()?;
                    let mut run = wrk(ns, &url, conns)?;
                    if let (Some(pid), Some(before)) = (pid, before) {
                        run.cpu_us =
                            per_request_us(portcullis_harness::cpu_seconds(pid)? - before, run.requests);
                    }
                    println!(
                        "xtask: {name:<10} {body:>6} c={conns:<4} round {round}: {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  {:.1} µs CPU/req  errors {}",
                        run.rps, run.p50_ms, run.p99_ms, run.cpu_us, run.errors
                    );
                    runs[i].push(run);
                }
            }
            let m: Vec<Run> = runs.iter().map(|r| median_run(r)).collect();
            let (pc, ng, hp, di) = (m[0], m[1], m[2], m[3]);
            let _ = writeln!(
                table,
                "| {body} | {conns} | {:.0} · {:.0} · {:.0} · {:.0} | {:.1} · {:.1} · {:.1} | {:.2} · {:.2} · {:.2} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
                pc.rps,
                ng.rps,
                hp.rps,
                di.rps,
                pc.cpu_us,
                ng.cpu_us,
                hp.cpu_us,
                pc.p99_ms,
                ng.p99_ms,
                hp.p99_ms,
                pc.rps / ng.rps,
                pc.cpu_us / ng.cpu_us,
                pc.cpu_us / hp.cpu_us,
                pc.rps / di.rps
            );
        }
    }
    Ok(table)
}

/// Each cell once more per proxy of `targets` under `perf record`: where
/// its CPU per request went, a row each, and each one's top user-space symbols.
fn profiles(ns: &NetNs, dir: &TempDir, targets: &[(&str, &str, Option<u32>)]) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    let mut tops = String::new();
    for (body, path) in [("128 B", "/small"), ("16 KiB", "/16k")] {
        for conns in [50, 1000] {
            for &(name, addr, pid) in targets {
                let Some(pid) = pid else { continue };
                let url = format!("http://{addr}{path}");
                let _ = wrk_short(ns, &url, conns);
                let file = dir.0.join(format!("{name}.perf"));
                let before = portcullis_harness::cpu_seconds(pid)?;
                let recorder = profile::start(&portcullis_harness::process_tree(pid)?, 4, &file)?;
                let run = wrk(ns, &url, conns)?;
                let cpu_us = per_request_us(portcullis_harness::cpu_seconds(pid)? - before, run.requests);
                let found = profile::finish(recorder, &file)?;
                let cell = format!("{body}, {conns} conns");
                let top: Vec<String> = found
                    .top
                    .iter()
                    .map(|(s, sym)| format!("{s:.1} % {sym}"))
                    .collect();
                let _ = writeln!(tops, "- {name}, {cell}: {}", top.join("; "));
                println!("xtask: profiled {name} {cell}: {cpu_us:.1} µs CPU/req");
                rows.push((cell, name, cpu_us, found));
            }
        }
    }
    let mut out = String::from(
        "Where each proxy's CPU per request went (perf record, cpu-clock at 2 kHz, one more 5 s run per cell; µs per request):\n\n",
    );
    out.push_str(&profile::table(&rows));
    out.push_str("\nTop user-space symbols (share of all samples):\n");
    out.push_str(&tops);
    Ok(out)
}

/// h2load's figures for `url` over `H2_CONNS` connections of `H2_STREAMS`
/// streams each; p50/p99 from its per-request log.
fn h2load(ns: &NetNs, dir: &TempDir, url: &str) -> anyhow::Result<Run> {
    let log = dir.0.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let (conns, streams) = (H2_CONNS.to_string(), H2_STREAMS.to_string());
    let out = ns
        .command("h2load")
        .args([
            "-c",
            &conns,
            "-m",
            &streams,
            "-t",
            "2",
            "-D",
            H2_SECONDS,
            "--warm-up-time=1",
        ])
        .arg(format!("--log-file={}", log.display()))
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("h2load {url}: {}{text}", String::from_utf8_lossy(&out.stderr));
    }
    let mut run = Run::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["finished", "in", _, rps, "req/s,", ..] => run.rps = rps.parse().unwrap_or(0.0),
            [
                "requests:",
                n,
                "total,",
                _,
                "started,",
                _,
                "done,",
                _,
                "succeeded,",
                failed,
                "failed,",
                errored,
                "errored,",
                ..,
            ] => {
                run.requests = n.parse().unwrap_or(0);
                run.errors = failed.parse::<u64>().unwrap_or(0) + errored.parse::<u64>().unwrap_or(0);
            }
            _ => {}
        }
    }
    let mut times: Vec<f64> = std::fs::read_to_string(&log)
        .with_context(|| format!("h2load's log {}", log.display()))?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect();
    if run.rps == 0.0 || times.is_empty() {
        bail!("h2load printed no req/s or logged no request for {url}: {text}");
    }
    times.sort_by(f64::total_cmp);
    let at = |percent: usize| times[(times.len() - 1) * percent / 100];
    run.p50_ms = at(50);
    run.p99_ms = at(99);
    Ok(run)
}

/// The HTTP/2 row: h2load over TLS against Portcullis and nginx (`http2`),
/// both to the same upstream over HTTP/1.1, `REPEATS` rounds in alternating order.
fn http2_rows(ns: &NetNs, dir: &TempDir, targets: &[(&str, &str, u32); 2]) -> anyhow::Result<String> {
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..REPEATS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, addr, pid) = targets[i];
            let url = format!("https://{addr}/small");
            let before = portcullis_harness::cpu_seconds(pid)?;
            let mut run = h2load(ns, dir, &url)?;
            let spent = portcullis_harness::cpu_seconds(pid)? - before;
            // The warm-up's requests are not counted by h2load but cost CPU: charge
            // the whole run's CPU to the counted ones, alike for both.
            run.cpu_us = spent * 1e6 / f64::from(u32::try_from(run.requests.max(1)).unwrap_or(u32::MAX));
            println!(
                "xtask: {name:<10} HTTP/2 round {round}: {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  {:.1} µs CPU/req  errors {}",
                run.rps, run.p50_ms, run.p99_ms, run.cpu_us, run.errors
            );
            runs[i].push(run);
        }
    }
    let (pc, ng) = (median_run(&runs[0]), median_run(&runs[1]));
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| HTTP/2 over TLS (h2load, {H2_CONNS} conns × {H2_STREAMS} streams, 128 B) | req/s portcullis · nginx | CPU µs/req portcullis · nginx | p99 ms portcullis · nginx | pc/nginx req/s | pc/nginx CPU/req | errors |"
    );
    let _ = writeln!(table, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let _ = writeln!(
        table,
        "| to an HTTP/1.1 upstream | {:.0} · {:.0} | {:.1} · {:.1} | {:.2} · {:.2} | {:.2}× | {:.2}× | {} · {} |",
        pc.rps,
        ng.rps,
        pc.cpu_us,
        ng.cpu_us,
        pc.p99_ms,
        ng.p99_ms,
        pc.rps / ng.rps,
        pc.cpu_us / ng.cpu_us,
        pc.errors,
        ng.errors
    );
    Ok(table)
}

fn wrk_short(ns: &NetNs, url: &str, conns: usize) -> anyhow::Result<()> {
    let script = format!("ulimit -n $(ulimit -Hn); exec wrk -t2 -c{conns} -d1s {url}");
    ns.command("sh").args(["-c", &script]).output()?;
    Ok(())
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// Opens `n` keep-alive connections, sends one request on each, and reads the
/// gateway's RSS while they sit idle. Returns (before, with connections).
fn idle_rss(ns: &NetNs, sh_pid: u32, addr: SocketAddr, n: usize) -> anyhow::Result<(f64, f64)> {
    use std::io::{Read as _, Write as _};
    // `sh -c 'exec portcullis'` keeps the pid.
    let before = rss_mib(sh_pid)?;
    let conns = ns.run(move || -> anyhow::Result<Vec<TcpStream>> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = TcpStream::connect(addr)?;
            s.write_all(b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            conns.push(s);
        }
        let mut buf = [0u8; 1024];
        for s in &mut conns {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let got = s.read(&mut buf)?;
            if !buf[..got].starts_with(b"HTTP/1.1 200") {
                bail!("idle connection got {:?}", String::from_utf8_lossy(&buf[..got]));
            }
        }
        Ok(conns)
    })??;
    // Idle: a worker sweeps every 2 s, so at least one sweep after the last answer.
    std::thread::sleep(Duration::from_secs(3));
    let with = rss_mib(sh_pid)?;
    drop(conns);
    Ok((before, with))
}

/// Raises this process's open-file limit (soft and hard, where it may; else
/// the soft limit to the hard one) towards `want`; the proxies it starts
/// inherit it. The limit set.
fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let limit = hard.max(want);
    if setrlimit(Resource::RLIMIT_NOFILE, limit, limit).is_ok() {
        return Ok(limit);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open-file limit")?;
    Ok(hard)
}

/// The same small-body workload on the gateway without and with a policy chain:
/// client-id enforcement, rate limiting counted through Redis, header injection.
#[expect(clippy::too_many_lines, reason = "mostly the configuration, written out")]
fn policy_runs(ns: &NetNs, dir: &TempDir, bin: &Path) -> anyhow::Result<(Run, Run)> {
    use std::os::unix::fs::PermissionsExt as _;
    let workers = workers();
    let redis_conf = dir.write(
        "redis.conf",
        &format!(
            "port 6390\nbind 127.0.0.1\nsave \"\"\nappendonly no\nprotected-mode no\ndir {}\nuser default off\nuser gateway on >bench-pw ~portcullis:* &* +@all\n",
            dir.0.display()
        ),
    )?;
    let log = dir.0.join("redis.log");
    let mut redis = spawn(
        ns,
        "redis-server",
        "redis-server",
        &[&redis_conf.to_string_lossy()],
        &log,
    )?;
    wait_port(ns, "127.0.0.1:6390".parse()?, &mut redis, &log)?;
    let conf = dir.0.join("portcullis-policies");
    std::fs::create_dir_all(&conf)?;
    let pw = conf.join("redis.password");
    std::fs::write(&pw, "bench-pw")?;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(
        conf.join("bench.yaml"),
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: proxy
spec:
  sharedStorage:
    redis:
      address: 127.0.0.1:6390
      username: gateway
      password: ${{file:redis.password}}
  proxy:
    workers: {workers}
    admin: 127.0.0.1:9903
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: bench
spec:
  address: http://127.0.0.1:8083/
  services:
    up:
      address: http://{UPSTREAM}/
  policies:
    - policyRef:
        name: client-id-enforcement-flex
    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: 1000000000
            timePeriodInMilliseconds: 60000
        keySelector: \"#[attributes.headers['authorization']]\"
    - policyRef:
        name: header-injection-flex
      config:
        inboundHeaders:
          - key: x-gateway
            value: portcullis
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Contract
metadata:
  name: bench-client
spec:
  clientId: bench
  clientSecretHash: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
  apis: [bench]
"
        ),
    )?;
    let log = dir.0.join("portcullis-policies.log");
    let mut gateway = spawn(
        ns,
        "portcullis (policies)",
        &bin.to_string_lossy(),
        &["run", "--config", &conf.to_string_lossy()],
        &log,
    )?;
    wait_port(ns, "127.0.0.1:8083".parse()?, &mut gateway, &log)?;
    // bench:password
    let auth = "Authorization: Basic YmVuY2g6cGFzc3dvcmQ=";
    let _ = wrk_with(ns, "http://127.0.0.1:8083/small", 50, Some(auth))?;
    let plain = wrk(ns, "http://127.0.0.1:8080/small", 50)?;
    let with = wrk_with(ns, "http://127.0.0.1:8083/small", 50, Some(auth))?;
    if with.errors > 0 {
        bail!(
            "the policy run had {} non-2xx responses: the chain refused the benchmark's requests",
            with.errors
        );
    }
    println!(
        "xtask: policies: {:.0} req/s (p99 {:.2} ms) against {:.0} req/s (p99 {:.2} ms) without",
        with.rps, with.p99_ms, plain.rps, plain.p99_ms
    );
    drop((gateway, redis));
    Ok((plain, with))
}
