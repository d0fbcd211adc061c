//! Installs and checks the pieces the project needs, idempotently.

use std::{
    env,
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Once,
};

use anyhow::{Context as _, bail};

use crate::{root, run};

/// LLVM major version bpf-linker is built against; must match the pinned
/// nightly's LLVM (see ebpf/portcullis-xdp/rust-toolchain.toml).
const LLVM: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and the demo use.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "curl",
    "util-linux",
    "redis-server",
    // ab: an HTTP/1.0 keep-alive client no one here wrote.
    "apache2-utils",
    // systemd-analyze: the unit's exposure score.
    "systemd",
    // The WebSocket tests' echo server and clients.
    "python3-websockets",
    // HTTP/2: h2load (load and conformance client) and hyper-h2, with which
    // the flood tests write the hostile frames.
    "nghttp2-client",
    "python3-h2",
    // The gRPC tests' server and client.
    "python3-grpcio",
    // The PROXY protocol tests' load balancer (send-proxy, send-proxy-v2).
    "haproxy",
    // The SYN cookies' ACK path: the gateway writes an nftables synproxy table.
    "nftables",
];

static APT_UPDATE: Once = Once::new();

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the Debian packages that are missing.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages {}", missing.join(" "));
    let mut update = Ok(());
    APT_UPDATE.call_once(|| update = run(Command::new("apt-get").args(["update", "-q"])));
    update?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Installs what the tests and the demo need.
pub fn test_packages() -> anyhow::Result<()> {
    apt_install(TEST_PACKAGES)
}

fn ebpf_dir() -> PathBuf {
    root().join("ebpf/portcullis-xdp")
}

/// The nightly channel pinned by the eBPF crate's rust-toolchain.toml.
fn ebpf_channel() -> anyhow::Result<String> {
    let path = ebpf_dir().join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|line| {
            let line = line.trim();
            line.strip_prefix("channel")
                .and_then(|rest| rest.split('"').nth(1))
                .map(str::to_owned)
        })
        .with_context(|| format!("{} names no channel", path.display()))
}

fn cargo_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map_or_else(
            || PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"),
            PathBuf::from,
        )
        .join("bin")
}

/// PATH with LLVM's and cargo's bin directories in front.
fn tool_path() -> OsString {
    let mut paths = vec![PathBuf::from(format!("/usr/lib/llvm-{LLVM}/bin")), cargo_bin()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("paths contain no separator")
}

/// A command with the variables an outer cargo sets removed, so an inner
/// build picks its own toolchain and target.
pub(crate) fn clean(mut cmd: Command) -> Command {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PATH", tool_path());
    cmd
}

fn nightly_ready(channel: &str) -> bool {
    clean(Command::new("rustup"))
        .args(["component", "list", "--installed", "--toolchain", channel])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
}

fn bpf_linker_ready() -> bool {
    clean(Command::new("bpf-linker"))
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs what building the XDP object needs, if missing.
pub fn ebpf_toolchain() -> anyhow::Result<String> {
    apt_install(&[&format!("llvm-{LLVM}-dev"), &format!("libpolly-{LLVM}-dev")])?;
    let channel = ebpf_channel()?;
    if nightly_ready(&channel) {
        println!("xtask: {channel} with rust-src is installed");
    } else {
        println!("xtask: installing {channel} with rust-src for the eBPF build");
        run(clean(Command::new("rustup")).args([
            "toolchain",
            "install",
            &channel,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    if bpf_linker_ready() {
        println!("xtask: bpf-linker is installed");
    } else {
        println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM} (a few minutes, once)");
        run(clean(Command::new("cargo")).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM}"),
        ]))?;
    }
    Ok(channel)
}

/// Builds the XDP object and returns its path.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    let channel = ebpf_toolchain()?;
    let target_dir = root().join("target/ebpf");
    let mut cmd = clean(Command::new("rustup"));
    cmd.args(["run", &channel, "cargo", "build", "--release", "--target-dir"])
        .arg(&target_dir)
        .current_dir(ebpf_dir());
    run(&mut cmd)?;
    let object = target_dir.join("bpfel-unknown-none/release/portcullis-xdp");
    if !object.exists() {
        bail!("the eBPF build succeeded but {} is missing", object.display());
    }
    println!("xtask: XDP object at {}", object.display());
    Ok(object)
}
