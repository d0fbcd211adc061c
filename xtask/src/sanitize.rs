//! `cargo xtask sanitize`: the code with `unsafe` run under AddressSanitizer.
//!
//! The `unsafe` blocks are the mmap of the pinned BPF arrays and the bpf(2)
//! call for arrays of maps (`xdp/mmap.rs`, `xdp/table.rs`) and the borrowed
//! descriptor of an idle upstream connection (`proxy/io`), and the memory
//! guard's `malloc_trim` (`runtime/memory.rs`). What exercises
//! them, built with `-Zsanitizer=address` and a sanitized standard library
//! (the eBPF build's pinned nightly, `-Zbuild-std`), runs here:
//! - the gateway's unit tests and the in-process data path;
//! - the XDP table and verdict tests (they load the program, map its arrays
//!   and swap its tables);
//! - a sanitized `portcullis` binary, through the proxy, HTTP/2, WebSocket and
//!   conformance integration tests, so io_uring's buffers and the proxy's
//!   connections run under it too.
//!
//! ASan's reports go to `target/asan/report.*`; any report fails the command.
//! Miri does not apply: every one of these blocks is a system call (mmap,
//! bpf, poll) that Miri cannot run.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

use crate::{cargo, root, run, setup};

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn asan_dir() -> PathBuf {
    root().join("target/asan")
}

/// A cargo of the pinned nightly building for `TARGET` with ASan, into target/asan.
fn asan_cargo(channel: &str, object: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = setup::clean(Command::new("rustup"));
    cmd.args(["run", channel, "cargo"])
        .args(args)
        .args(["-Zbuild-std", "--target", TARGET, "--target-dir"])
        .arg(asan_dir())
        .current_dir(root())
        .env("RUSTFLAGS", "-Zsanitizer=address")
        .env("RUSTDOCFLAGS", "-Zsanitizer=address")
        .env("PORTCULLIS_XDP_OBJ", object)
        .env("ASAN_OPTIONS", asan_options());
    cmd
}

fn asan_options() -> String {
    format!(
        "detect_leaks=1:abort_on_error=1:log_path={}",
        asan_dir().join("report").display()
    )
}

/// Fails if ASan wrote a report.
fn no_reports() -> anyhow::Result<()> {
    let reports: Vec<PathBuf> = std::fs::read_dir(asan_dir())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("report."))
        })
        .collect();
    if !reports.is_empty() {
        bail!("AddressSanitizer reported (see each file): {reports:?}");
    }
    Ok(())
}

/// Runs every sanitized test; prints where each part stands.
pub fn sanitize() -> anyhow::Result<()> {
    crate::require_root("cargo xtask sanitize (the XDP tests load the program)")?;
    setup::test_packages()?;
    let object = setup::build_ebpf()?;
    let channel = setup::ebpf_toolchain()?;
    std::fs::create_dir_all(asan_dir())?;
    for old in std::fs::read_dir(asan_dir())?.flatten() {
        if old.file_name().to_string_lossy().starts_with("report.") {
            std::fs::remove_file(old.path())?;
        }
    }
    run(&mut asan_cargo(
        &channel,
        &object,
        &["test", "-p", "portcullis", "--lib", "--test", "data_path"],
    ))?;
    run(&mut asan_cargo(
        &channel,
        &object,
        &[
            "test",
            "-p",
            "portcullis-tests",
            "--test",
            "xdp_tables",
            "--test",
            "xdp_verdicts",
        ],
    ))?;
    no_reports()?;
    run(&mut asan_cargo(
        &channel,
        &object,
        &["build", "-p", "portcullis", "--bin", "portcullis"],
    ))?;
    let bin = asan_dir().join(TARGET).join("debug/portcullis");
    run(cargo()
        .args(["test", "-p", "portcullis-tests"])
        .args([
            "--test",
            "proxy",
            "--test",
            "http2",
            "--test",
            "websocket",
            "--test",
            "conformance",
        ])
        .env("PORTCULLIS_XDP_OBJ", &object)
        .env("PORTCULLIS_BIN", &bin)
        .env("PORTCULLIS_SANITIZED", "address")
        .env("ASAN_OPTIONS", asan_options()))?;
    no_reports()?;
    println!(
        "xtask: sanitize: unit, data path, XDP table and verdict tests, and a sanitized gateway through the proxy, HTTP/2, WebSocket and conformance tests: no AddressSanitizer report"
    );
    Ok(())
}
