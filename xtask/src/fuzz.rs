//! `cargo xtask fuzz TARGET`: the libFuzzer targets in `fuzz/`, built by
//! `cargo fuzz` with the pinned nightly (the eBPF build's) and AddressSanitizer.
//! Each run works on a corpus of its own under `target/fuzz/`, seeded from
//! the one kept in `fuzz/corpus/TARGET`; a crash leaves its input in
//! `fuzz/artifacts/TARGET/` and fails the run.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{root, run, setup};

/// Every target, in the order `cargo xtask test` runs them.
pub const TARGETS: [&str; 9] = [
    "http_request",
    "http_chunked",
    "http_response",
    "h2_request",
    "h2_frames",
    "config",
    "jwt",
    "control",
    "xdp",
];

/// The cargo-fuzz release the targets are built with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// How the targets are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// `cargo fuzz`'s release build (one codegen unit, full optimisation): for long runs.
    Release,
    /// The fuzz workspace's dev profile (optimised at level 1, built in
    /// parallel): about half the build time of `Release` at two thirds of its
    /// speed, which is what a bounded run in `cargo xtask test` wants.
    Quick,
}

impl Build {
    fn flag(self) -> &'static str {
        match self {
            Self::Release => "--release",
            Self::Quick => "--dev",
        }
    }
}

/// How long one target runs, or for how many executions.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// Seconds.
    Seconds(u64),
    /// Executions.
    Runs(u64),
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// Installs cargo-fuzz if missing, builds every target, and returns the toolchain.
fn build(object: &std::path::Path, how: Build) -> anyhow::Result<String> {
    let channel = setup::ebpf_toolchain()?;
    let ready = setup::clean(Command::new("cargo"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if ready {
        println!("xtask: cargo-fuzz {CARGO_FUZZ_VERSION} is installed");
    } else {
        run(setup::clean(Command::new("cargo")).args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }
    run(setup::clean(Command::new("rustup"))
        .args(["run", &channel, "cargo", "fuzz", "build", how.flag()])
        .current_dir(fuzz_dir())
        .env("PORTCULLIS_XDP_OBJ", object))?;
    Ok(channel)
}

/// Runs `target` within `budget`; the executions libFuzzer reports.
fn run_target(
    (channel, how): (&str, Build),
    object: &std::path::Path,
    target: &str,
    budget: Budget,
) -> anyhow::Result<u64> {
    let work = root().join("target/fuzz/corpus").join(target);
    std::fs::create_dir_all(&work)?;
    let seeds = fuzz_dir().join("corpus").join(target);
    let limit = match budget {
        Budget::Seconds(s) => format!("-max_total_time={s}"),
        Budget::Runs(n) => format!("-runs={n}"),
    };
    let mut cmd = setup::clean(Command::new("rustup"));
    cmd.args(["run", channel, "cargo", "fuzz", "run", how.flag(), target])
        .arg(&work)
        .arg(&seeds)
        .args(["--", &limit, "-print_final_stats=1"])
        .current_dir(fuzz_dir())
        .env("PORTCULLIS_XDP_OBJ", object)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    println!("xtask: $ {}", crate::show(&cmd));
    let mut child = cmd.spawn().context("starting cargo fuzz")?;
    let stderr = child.stderr.take().context("piped stderr")?;
    let log_path = root().join("target/fuzz").join(format!("{target}.log"));
    let mut log = Vec::new();
    let mut runs = 0;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if let Some(n) = line.strip_prefix("Done ").and_then(|r| r.split(' ').next()) {
            runs = n.parse().unwrap_or(0);
        }
        if line.contains("panicked") || line.contains("ERROR") || line.contains("Test unit written") {
            println!("  {line}");
        }
        log.push(line);
    }
    let status = child.wait()?;
    if target == "xdp" {
        remove_xdp_pins();
    }
    std::fs::write(&log_path, log.join("\n"))?;
    if !status.success() {
        let tail = log
            .iter()
            .rev()
            .take(40)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "fuzz target {target} failed ({status}); its log is {}:\n{tail}",
            log_path.display()
        );
    }
    Ok(runs)
}

/// The pins the xdp target's program left (`fuzzxdp<pid>`), a crash included.
fn remove_xdp_pins() {
    let pins = PathBuf::from("/sys/fs/bpf/portcullis");
    for entry in std::fs::read_dir(&pins).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("fuzzxdp") {
            for pin in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                let _ = std::fs::remove_file(pin.path());
            }
            let _ = std::fs::remove_dir(entry.path());
            let _ = std::fs::remove_file(PathBuf::from("/run/portcullis").join(format!("{name}.lock")));
        }
    }
}

/// Runs each of `targets` within `budget` and prints the executions of each.
pub fn fuzz(targets: &[&str], budget: Budget, how: Build) -> anyhow::Result<()> {
    crate::require_root("cargo xtask fuzz (the xdp target loads the program)")?;
    for t in targets {
        if !TARGETS.contains(t) {
            bail!("no fuzz target `{t}`; the targets are {}", TARGETS.join(", "));
        }
    }
    let object = setup::build_ebpf()?;
    let channel = build(&object, how)?;
    let mut done = Vec::new();
    for target in targets {
        let runs = run_target((&channel, how), &object, target, budget)?;
        done.push((*target, runs));
    }
    println!("xtask: fuzz targets, executions without a crash:");
    for (target, runs) in done {
        println!("  {target:<14} {runs:>12}");
    }
    Ok(())
}
