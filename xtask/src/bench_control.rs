//! `cargo xtask bench control`: the time from an edit on the control plane
//! (a file renamed into its cluster directory) to the new policy being
//! enforced by each of two replicas, each in a namespace of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use portcullis_harness::http::{GatewayProcess, TempDir, Upstream, api_instance};
use portcullis_harness::{NetNs, Veth};

use crate::{cargo, root, run as sh, setup};

/// Edits measured.
const EDITS: usize = 50;

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An ApiInstance `name` at `address` to the upstream on :9000 whose every
/// response a policy tags with `header: value` (what the demo and this
/// benchmark push to show which policy is in force).
pub(crate) fn tagged_api(name: &str, address: &str, header: &str, value: &str) -> String {
    api_instance(
        name,
        address,
        "http://127.0.0.1:9000/",
        &format!(
            "  policies:
    - policyRef:
        name: header-injection-flex
      config:
        outboundHeaders:
          - key: {header}
            value: \"{value}\"
"
        ),
    )
}

fn api(version: usize) -> String {
    tagged_api(
        "orders",
        "http://127.0.0.1:8080/orders",
        "x-version",
        &version.to_string(),
    )
}

fn publish(cluster: &Path, version: usize) -> anyhow::Result<()> {
    let tmp = cluster.join(".orders.yaml.tmp");
    std::fs::write(&tmp, api(version))?;
    std::fs::rename(tmp, cluster.join("orders.yaml"))?;
    Ok(())
}

/// The `x-version` a replica answers with now (inside its namespace).
fn version_now() -> Option<usize> {
    use std::io::{Read as _, Write as _};
    let addr: SocketAddr = "127.0.0.1:8080".parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET /orders/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .find_map(|l| l.strip_prefix("x-version: "))
        .and_then(|v| v.trim().parse().ok())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A registered replica `i` running in `ns`, with its upstream.
fn start_replica(
    ns: &NetNs,
    bin: &Path,
    cp: &Path,
    i: usize,
) -> anyhow::Result<(Upstream, TempDir, GatewayProcess)> {
    let upstream = Upstream::start(ns, "127.0.0.1:9000".parse()?)?;
    let dir = TempDir::new("bcr")?;
    dir.write(
        "settings.yaml",
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\nmetadata:\n  name: prod\nspec:\n  proxy:\n    workers: 1\n    admin: 127.0.0.1:9901\n",
    )?;
    let token = std::process::Command::new(bin)
        .args(["control-plane", "token", "create", "--cluster", "prod", "--dir"])
        .arg(cp)
        .output()?;
    let url = format!("https://10.72.{}.1:7443", i + 1);
    let reg = ns
        .command(bin)
        .args([
            "register",
            "--control-plane",
            &url,
            "--name",
            &format!("replica-{i}"),
            "--token",
        ])
        .arg(String::from_utf8_lossy(&token.stdout).trim())
        .arg("--out")
        .arg(&dir.0)
        .output()?;
    ensure!(
        reg.status.success(),
        "register: {}",
        String::from_utf8_lossy(&reg.stderr)
    );
    let gw = GatewayProcess::start_log(
        ns,
        bin,
        &dir.0,
        "127.0.0.1:9901".parse()?,
        &[],
        &dir.0.with_extension("log"),
    )?;
    Ok((upstream, dir, gw))
}

/// Runs the benchmark and prints its table.
pub fn control() -> anyhow::Result<()> {
    crate::require_root("cargo xtask bench control")?;
    setup::test_packages()?;
    let object = setup::build_ebpf()?;
    sh(cargo()
        .args(["build", "--release", "-p", "portcullis"])
        .env("PORTCULLIS_XDP_OBJ", &object))?;
    let bin = root().join("target/release/portcullis");
    let infra = NetNs::new("bci")?;
    let replicas_ns = [NetNs::new("bca")?, NetNs::new("bcb")?];
    let _veths = [
        Veth::join(&infra, &["10.72.1.1/24"], &replicas_ns[0], &["10.72.1.2/24"])?,
        Veth::join(&infra, &["10.72.2.1/24"], &replicas_ns[1], &["10.72.2.2/24"])?,
    ];
    let home = TempDir::new("bctl")?;
    let cp = home.0.join("cp");
    let out = std::process::Command::new(&bin)
        .args([
            "control-plane",
            "init",
            "--san",
            "10.72.1.1",
            "--san",
            "10.72.2.1",
            "--dir",
        ])
        .arg(&cp)
        .output()?;
    ensure!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cluster = cp.join("clusters/prod");
    std::fs::create_dir_all(&cluster)?;
    publish(&cluster, 0)?;
    let log = std::fs::File::create(home.0.join("cp.log"))?;
    let _cp = Proc(
        infra
            .command(&bin)
            .args(["control-plane", "serve", "--listen", "0.0.0.0:7443", "--dir"])
            .arg(&cp)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut keep = Vec::new();
    for (i, ns) in replicas_ns.iter().enumerate() {
        keep.push(start_replica(ns, &bin, &cp, i)?);
    }
    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for version in 1..=EDITS {
        let started = Instant::now();
        publish(&cluster, version)?;
        let waiters: Vec<_> = replicas_ns
            .iter()
            .map(|ns| {
                ns.spawn(move || {
                    let deadline = started + Duration::from_secs(10);
                    while Instant::now() < deadline {
                        if version_now() == Some(version) {
                            return Some(started.elapsed());
                        }
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    None
                })
            })
            .collect();
        for (i, w) in waiters.into_iter().enumerate() {
            let took = w
                .join()
                .map_err(|_| anyhow::anyhow!("a waiter panicked"))??
                .with_context(|| format!("replica {i} did not enforce edit {version} within 10 s"))?;
            samples[i].push(took);
        }
        // Edits apart by a varying time, so they do not fall in step with the
        // control plane's reads of its files.
        let jitter = u64::try_from(version.wrapping_mul(7919) % 50).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(30 + jitter));
    }
    println!(
        "\nedit on the control plane → enforced by the replica ({EDITS} edits; the control plane reads its files every 50 ms)"
    );
    println!("| replica | p50 ms | p99 ms | max ms |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, s) in samples.iter_mut().enumerate() {
        s.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| replica-{i} | {:.1} | {:.1} | {:.1} |",
            ms(percentile(s, 0.5)),
            ms(percentile(s, 0.99)),
            ms(*s.last().unwrap_or(&Duration::ZERO))
        );
    }
    drop(keep);
    Ok(())
}
