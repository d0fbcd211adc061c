//! The appliance image, booted under qemu: the units start under systemd,
//! XDP attaches to the virtio NIC, a request from the host through a
//! forwarded port is proxied to an upstream inside the VM (gated until its
//! policies are applied), the package upgrades and rolls back under load
//! with no request reaching the upstream untagged, and purges cleanly.
//!
//! `cargo xtask test` builds what it needs and names it: PORTCULLIS_IMAGE
//! (the qcow2, with PORTCULLIS_DEB installed) and PORTCULLIS_DEB_NEXT (a
//! newer package of the same binary).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use portcullis_tests::http::{TempDir, read_response};
use portcullis_tests::load::{MOBILE, TAG, Tally, hammer, no_leak, say, tagged_config};
use portcullis_tests::vm::{GUEST_HTTP, Vm};

fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(name)
        .map(PathBuf::from)
        .with_context(|| format!("{name} is not set: run this test through `cargo xtask test`"))?;
    ensure!(path.exists(), "{name}={} does not exist", path.display());
    Ok(path)
}

/// The seed drive: the tagged API on the VM's port, and the upstream that
/// counts untagged requests as a site service.
fn seed(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("conf.d"))?;
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::create_dir_all(dir.join("units"))?;
    std::fs::write(
        dir.join("conf.d/orders.yaml"),
        tagged_config(&format!("0.0.0.0:{GUEST_HTTP}"), 0),
    )?;
    std::fs::copy(env!("CARGO_BIN_EXE_vm-upstream"), dir.join("bin/vm-upstream"))?;
    std::fs::write(
        dir.join("units/vm-upstream.service"),
        format!(
            "[Unit]\nDescription=The test's upstream\n\n[Service]\n\
             ExecStart=/usr/local/bin/vm-upstream 127.0.0.1:9000 {TAG} /run/vm-upstream.counts\n\n\
             [Install]\nWantedBy=multi-user.target\n"
        ),
    )?;
    Ok(())
}

/// One request; its status and body, or `None` when nothing HTTP came back.
fn get(addr: SocketAddr, auth: Option<&str>) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let auth = auth
        .map(|a| format!("Authorization: Basic {a}\r\n"))
        .unwrap_or_default();
    let request = format!("GET /orders/hello HTTP/1.1\r\nHost: api\r\n{auth}Connection: close\r\n\r\n");
    std::io::Write::write_all(&mut conn, request.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let status = read_response(&mut conn, &mut buf).ok()?;
    Some((status, String::from_utf8_lossy(&buf).into_owned()))
}

/// The upstream's counts in the VM: (requests, untagged).
fn upstream_counts(vm: &Vm) -> anyhow::Result<(u64, u64)> {
    let text = vm.sh("cat /run/vm-upstream.counts")?;
    let mut numbers = text.split_whitespace().map(str::parse::<u64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(requests)), Some(Ok(untagged))) => Ok((requests, untagged)),
        _ => bail!("the upstream's counts are unreadable: {text:?}"),
    }
}

/// Installs `deb` in the VM while clients hammer the API; what they saw.
fn swap_under_load(vm: &Vm, deb: &Path, what: &str) -> anyhow::Result<(Arc<Tally>, Arc<Tally>, Duration)> {
    let name = deb.file_name().context("a package file name")?.to_string_lossy();
    vm.copy_in(deb, &format!("/root/{name}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (anonymous, authenticated) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let mut clients = Vec::new();
    for auth in [None, None, Some(MOBILE)] {
        let (stop, tally, addr) = (
            stop.clone(),
            if auth.is_some() {
                authenticated.clone()
            } else {
                anonymous.clone()
            },
            vm.http,
        );
        clients.push(std::thread::spawn(move || hammer(addr, auth, &stop, &tally)));
    }
    std::thread::sleep(Duration::from_secs(2));
    let swap = Instant::now();
    let result = vm.sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades /root/{name} 2>&1"
    ));
    let took = swap.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let output = result?;
    say(&format!(
        "{what}: apt-get install of {name} took {:.1} s",
        took.as_secs_f64()
    ));
    say(&format!("  {}", anonymous.line("unauthenticated clients")));
    say(&format!("  {}", authenticated.line("authenticated client")));
    ensure!(
        output.contains("Setting up portcullis"),
        "{what}: apt-get did not set up the package: {output}"
    );
    Ok((anonymous, authenticated, took))
}

/// The MainPID of portcullis.service, once it is active again.
fn gateway_pid(vm: &Vm) -> anyhow::Result<u32> {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let out =
            vm.sh("systemctl show -p MainPID --value portcullis; systemctl is-active portcullis || true")?;
        let mut lines = out.lines();
        if let (Some(pid), Some("active")) = (lines.next(), lines.next()) {
            let pid: u32 = pid.trim().parse()?;
            if pid != 0 {
                return Ok(pid);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "portcullis.service is not active: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Polls the forwarded port until an authenticated request gets the
/// upstream's 200; the time from qemu's start, as the host sees it.
fn boot_to_serving(vm: &Vm) -> anyhow::Result<Duration> {
    let mut first_answer = None;
    let serving = loop {
        match get(vm.http, Some(MOBILE)) {
            Some((200, body)) => {
                ensure!(body.contains("hello"), "the upstream's answer is missing: {body}");
                break vm.started.elapsed();
            }
            Some((status, _)) => {
                first_answer.get_or_insert((status, vm.started.elapsed()));
            }
            None => {}
        }
        ensure!(
            vm.started.elapsed() < Duration::from_secs(400),
            "nothing served within 400 s: {}",
            vm.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    say(&format!(
        "boot to serving: {:.1} s (first answer before it: {first_answer:?})",
        serving.as_secs_f64()
    ));
    if let Some((status, _)) = first_answer {
        ensure!(
            status == 503,
            "before the policies were applied the answer was {status}, not 503"
        );
    }
    Ok(serving)
}

/// Both units active under systemd, XDP on the virtio NIC, the live exposure.
fn under_systemd(vm: &Vm) -> anyhow::Result<()> {
    let states = vm.sh("systemctl is-active portcullis-xdp portcullis || true")?;
    if !states.lines().all(|l| l == "active") {
        let journal = vm.sh("journalctl -b -u portcullis-xdp -u portcullis --no-pager -o cat | tail -40")?;
        anyhow::bail!("units: {states}\n{journal}");
    }
    let attach = vm.sh("journalctl -b -u portcullis-xdp --no-pager -o cat")?;
    let mode = attach
        .lines()
        .find(|l| l.contains("attached instance"))
        .with_context(|| format!("portcullis-xdp logged no attach: {attach}"))?;
    say(&format!("XDP: {mode}"));
    ensure!(mode.contains("eth0"), "XDP is not on eth0: {mode}");
    let report = vm.sh("portcullis status")?;
    ensure!(
        report.contains("attached to: eth0"),
        "portcullis status: {report}"
    );
    let security = vm.sh("systemd-analyze security portcullis.service | tail -1")?;
    say(&format!("live unit: {}", security.trim()));
    let exposure = portcullis_tests::exposure(&security, "portcullis.service")
        .with_context(|| format!("no exposure in {security:?}"))?;
    ensure!(exposure <= 2.0, "exposure {exposure} > 2.0");
    Ok(())
}

/// Upgrades to `next`, then rolls back to `current`, each under load: the
/// version and the gateway's pid change and no request arrives untagged.
fn upgrade_and_roll_back(vm: &Vm, current: &Path, next: &Path) -> anyhow::Result<()> {
    let version = |vm: &Vm| vm.sh("dpkg-query -W -f='${Version}' portcullis");
    let installed = version(vm)?;
    let mut before = (installed.clone(), gateway_pid(vm)?);
    for (package, what) in [(next, "upgrade"), (current, "rollback")] {
        let (anonymous, authenticated, _) = swap_under_load(vm, package, what)?;
        let after = (version(vm)?, gateway_pid(vm)?);
        say(&format!(
            "  {} (pid {}) -> {} (pid {})",
            before.0, before.1, after.0, after.1
        ));
        ensure!(after.0 != before.0, "{what}: the version stayed {}", after.0);
        ensure!(after.1 != before.1, "{what}: the gateway was not restarted");
        let (requests, untagged) = upstream_counts(vm)?;
        say(&format!(
            "  upstream: {requests} requests, {untagged} without the policy tag (leaks)"
        ));
        no_leak(untagged, &anonymous, &authenticated, what)?;
        before = after;
    }
    ensure!(
        version(vm)? == installed,
        "the rollback did not restore {installed}"
    );
    Ok(())
}

/// Purge: units, state, the key, the package's configuration and the pins
/// are gone (the operator's own conf.d files stay, as Debian's purge does).
fn purge(vm: &Vm) -> anyhow::Result<()> {
    vm.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q portcullis >/dev/null 2>&1")?;
    let left = vm.sh(
        "for p in /sys/fs/bpf/portcullis /var/lib/portcullis /etc/portcullis/conf.d/example.yaml \
         /etc/portcullis/xdp.env /etc/credstore/portcullis-cache-key /lib/systemd/system/portcullis.service \
         /usr/bin/portcullis; do [ -e $p ] && echo $p; done; true",
    )?;
    ensure!(left.trim().is_empty(), "purge left: {left}");
    ensure!(
        get(vm.http, None).is_none(),
        "something still answers on the gateway's port after purge"
    );
    say("purge: no unit, state, key, configuration, pin or XDP program left");
    Ok(())
}

#[test]
fn the_image_boots_serves_upgrades_rolls_back_and_purges() -> anyhow::Result<()> {
    let image = env_path("PORTCULLIS_IMAGE")?;
    let current = env_path("PORTCULLIS_DEB")?;
    let next = env_path("PORTCULLIS_DEB_NEXT")?;
    let seed_dir = TempDir::new("seed")?;
    seed(&seed_dir.0)?;
    let mut vm = Vm::boot(&image, &seed_dir.0)?;
    say(&format!("image: {} ({})", image.display(), vm.accel));
    boot_to_serving(&vm)?;
    vm.wait_ssh(Duration::from_mins(1))?;
    under_systemd(&vm)?;
    // Policies in force: no credentials is a 401, nothing untagged arrived.
    let anonymous = get(vm.http, None).map(|(s, _)| s);
    ensure!(
        anonymous == Some(401),
        "an unauthenticated request got {anonymous:?}"
    );
    ensure!(
        upstream_counts(&vm)?.1 == 0,
        "an untagged request reached the upstream"
    );
    upgrade_and_roll_back(&vm, &current, &next)?;
    purge(&vm)
}
