//! `cargo xtask`: the project's own set-up, build, test, demo and benchmark
//! commands. Each installs what it needs on a fresh Debian machine, idempotently,
//! and says what it is doing.

mod bench;
mod bench_control;
mod deb;
mod demo;
mod fuzz;
mod image;
mod profile;
mod sanitize;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the eBPF toolchain if missing and build the XDP object.
    BuildEbpf,
    /// Install what the tests need, then run every test: fmt, clippy, unit,
    /// eBPF (BPF_PROG_TEST_RUN) and integration.
    Test {
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
        /// Skip the fmt and clippy checks.
        #[arg(long)]
        no_lint: bool,
    },
    /// Run the gateway in its own namespaces and show allowed and dropped traffic.
    Demo {
        /// Exit after showing, instead of staying up until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Build the Debian package into target/debian/ (and its -dbgsym), lintian-checked.
    Deb {
        /// The package version, if not the crate's.
        #[arg(long)]
        deb_version: Option<String>,
    },
    /// Build the VM image (qcow2) into target/image/ around the Debian package.
    Image {
        /// An already built package to install, instead of building one.
        #[arg(long)]
        deb: Option<PathBuf>,
    },
    /// Run a benchmark and print its table.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        which: Bench,
    },
    /// Run a libFuzzer target (or `all`) for a time or a number of executions.
    Fuzz {
        /// One of the targets in fuzz/, or `all`.
        target: String,
        /// Seconds to run each target.
        #[arg(long, default_value_t = 600, conflicts_with = "runs")]
        seconds: u64,
        /// Executions to run each target, instead of a time.
        #[arg(long)]
        runs: Option<u64>,
    },
    /// Run the code with `unsafe` under AddressSanitizer: unit, data-path and
    /// XDP tests, and a sanitized gateway through the integration tests.
    Sanitize,
    /// Run the soak: mixed load under reloads, Redis, control-plane and
    /// upstream faults and restarts; fails on a crash, a leak or an unpoliced request.
    Soak {
        /// How long, in minutes (`cargo xtask test` runs 2).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// ns per packet of the ACL program (BPF_PROG_TEST_RUN) at 1k, 100k, 1M prefixes.
    Xdp,
    /// wrk against Portcullis, nginx, haproxy and the upstream directly.
    Proxy,
    /// 503 rate answered by XDP vs the proxy, and policy edit → enforced latency.
    Gate,
    /// Control-plane edit → enforced by each of two replicas (p50/p99).
    Control,
    /// Legitimate req/s under a spoofed SYN flood: XDP cookies vs the kernel's plus nftables.
    Flood,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::BuildEbpf => setup::build_ebpf().map(drop),
        Task::Test { filter, no_lint } => test(filter.as_deref(), no_lint),
        Task::Demo { once } => demo::run(once),
        Task::Deb { deb_version } => deb::build(deb_version.as_deref()).map(drop),
        Task::Image { deb } => image::build(deb).map(drop),
        Task::Bench { which: Bench::Xdp } => bench_xdp(),
        Task::Bench { which: Bench::Gate } => bench_gate(&[]),
        Task::Bench { which: Bench::Flood } => bench_gate(&["flood"]),
        Task::Bench { which: Bench::Proxy } => bench::proxy(),
        Task::Bench {
            which: Bench::Control,
        } => bench_control::control(),
        Task::Fuzz {
            target,
            seconds,
            runs,
        } => {
            let targets: Vec<&str> = if target == "all" {
                fuzz::TARGETS.to_vec()
            } else {
                vec![target.as_str()]
            };
            let budget = runs.map_or(fuzz::Budget::Seconds(seconds), fuzz::Budget::Runs);
            fuzz::fuzz(&targets, budget, fuzz::Build::Release)
        }
        Task::Soak { minutes } => soak(minutes),
        Task::Sanitize => sanitize::sanitize(),
    }
}

/// `cargo xtask soak`: the soak test for `minutes`, its totals printed.
fn soak(minutes: f64) -> anyhow::Result<()> {
    require_root("cargo xtask soak")?;
    setup::test_packages()?;
    let object = setup::build_ebpf()?;
    let env = [("PORTCULLIS_XDP_OBJ", object.as_os_str())];
    run(cargo().args(["build", "--workspace", "--bins"]).envs(env))?;
    run(cargo()
        .args([
            "test",
            "-p",
            "portcullis-tests",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ])
        .envs(env)
        .env("PORTCULLIS_BIN", root().join("target/debug/portcullis"))
        .env("PORTCULLIS_SOAK_MINUTES", minutes.to_string()))
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, echoing it, and fails if it fails.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    println!("xtask: $ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", show(cmd));
    }
    Ok(())
}

pub(crate) fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `cargo` for the host workspace, with the stable toolchain whatever
/// toolchain invoked xtask.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

pub(crate) fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (network namespaces, XDP attach, bpffs): run it with sudo or as root");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SMOKE_SECONDS: u64 = 10;

/// How long each phase of `cargo xtask test` took, printed when it ends
/// (failed or not), so a CI log shows where its minutes went.
struct Phases {
    last: std::time::Instant,
    took: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
            took: Vec::new(),
        }
    }

    /// Ends the phase called `name`.
    fn done(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.took.push((name, now - self.last));
        self.last = now;
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        let total: std::time::Duration = self.took.iter().map(|(_, d)| *d).sum();
        println!("xtask: test phases ({} s in all):", total.as_secs());
        for (name, took) in &self.took {
            println!("  {name:<22} {:>6} s", took.as_secs());
        }
    }
}

fn test(filter: Option<&str>, no_lint: bool) -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    let mut phases = Phases::new();
    setup::test_packages()?;
    phases.done("packages");
    let object = setup::build_ebpf()?;
    phases.done("eBPF build");
    let env = [("PORTCULLIS_XDP_OBJ", object.as_os_str())];
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--check"]))?;
        // The eBPF crate is its own workspace; stable rustfmt checks it.
        run(Command::new("rustfmt").current_dir(root()).args([
            "--edition",
            "2024",
            "--check",
            "ebpf/portcullis-xdp/src/main.rs",
        ]))?;
        // So is the fuzz crate.
        run(Command::new("rustfmt")
            .current_dir(root())
            .args(["--edition", "2024", "--check"])
            .args(fuzz::TARGETS.map(|t| format!("fuzz/fuzz_targets/{t}.rs"))))?;
        run(cargo()
            .args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
            .envs(env))?;
        phases.done("lint");
    }
    run(cargo().args(["build", "--workspace", "--bins"]).envs(env))?;
    phases.done("build");
    // Every parser under libFuzzer for a short while; `cargo xtask fuzz` runs longer.
    if filter.is_none() {
        fuzz::fuzz(
            &fuzz::TARGETS,
            fuzz::Budget::Seconds(FUZZ_SMOKE_SECONDS),
            fuzz::Build::Quick,
        )?;
        phases.done("fuzz (build and runs)");
    }
    let appliance = appliance()?;
    phases.done("package and image");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"]).envs(env);
    cmd.env("PORTCULLIS_BIN", root().join("target/debug/portcullis"));
    cmd.env("PORTCULLIS_IMAGE", &appliance.image.qcow2)
        .env("PORTCULLIS_DEB", &appliance.image.deb)
        .env("PORTCULLIS_DEB_NEXT", &appliance.next);
    if let Some(filter) = filter {
        cmd.args(["--", filter]);
    }
    run(cargo().args(["test", "--workspace", "--no-run"]).envs(env))?;
    phases.done("test build");
    let result = run_counting(&mut cmd);
    phases.done("tests");
    result
}

/// What the appliance tests boot and install.
struct Appliance {
    image: image::Image,
    next: PathBuf,
}

/// Two packages of this tree (the second a newer version, for the upgrade
/// test) kept in target/debian/test/, and the image around the first.
fn appliance() -> anyhow::Result<Appliance> {
    setup::apt_install(image::PACKAGES)?;
    let kept = root().join("target/debian/test");
    std::fs::create_dir_all(&kept)?;
    let keep = |built: deb::Built| -> anyhow::Result<PathBuf> {
        let to = kept.join(built.deb.file_name().context("a package file name")?);
        std::fs::copy(&built.deb, &to)?;
        Ok(to)
    };
    let current = keep(deb::build(None)?)?;
    let next_version = format!("{}-2", env!("CARGO_PKG_VERSION"));
    let next = keep(deb::build(Some(&next_version))?)?;
    let image = image::build(Some(current))?;
    Ok(Appliance { image, next })
}

/// Runs `cargo test`, streaming its output, and closes with one summary line
/// of every test binary's counts added up.
fn run_counting(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    println!("xtask: $ {}", show(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", show(cmd)))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().context("piped stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let Ok(n) = n.parse::<u64>() else { continue };
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("`{}` failed with {status}", show(cmd));
    }
    if ignored > 0 {
        bail!("{ignored} tests were skipped: a skipped test is a failing test here");
    }
    Ok(())
}

/// `cargo xtask bench gate` (no `args`) or `bench flood` (`["flood"]`): one binary.
fn bench_gate(args: &[&str]) -> anyhow::Result<()> {
    require_root("cargo xtask bench gate")?;
    setup::apt_install(&["wrk", "ethtool", "nftables", "iproute2"])?;
    let object = setup::build_ebpf()?;
    run(cargo()
        .args(["build", "--release", "-p", "portcullis"])
        .env("PORTCULLIS_XDP_OBJ", &object))?;
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "portcullis-tests",
            "--bin",
            "gate-bench",
            "--",
        ])
        .args(args)
        .env("PORTCULLIS_XDP_OBJ", object)
        .env("PORTCULLIS_BIN", root().join("target/release/portcullis")))
}

fn bench_xdp() -> anyhow::Result<()> {
    require_root("cargo xtask bench xdp")?;
    let object = setup::build_ebpf()?;
    run(cargo()
        .args(["run", "--release", "-p", "portcullis-tests", "--bin", "xdp-bench"])
        .env("PORTCULLIS_XDP_OBJ", object))
}
