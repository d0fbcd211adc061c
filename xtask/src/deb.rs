//! `cargo xtask deb`: the Debian package, built by cargo-deb from the
//! `[package.metadata.deb]` of gateway/Cargo.toml, then checked by lintian.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cargo, root, run, setup};

const CARGO_DEB_VERSION: &str = "3.8.0";

/// The packages one `deb` run made.
#[derive(Debug)]
pub struct Built {
    /// `target/debian/portcullis_<version>-1_amd64.deb`.
    pub deb: PathBuf,
    /// Its debug symbols, `portcullis-dbgsym_<version>-1_amd64.ddeb`.
    pub dbgsym: PathBuf,
}

/// Builds the release binary and the package; `version` overrides the
/// package version (the upgrade test builds two).
pub fn build(version: Option<&str>) -> anyhow::Result<Built> {
    setup::apt_install(&["lintian", "dpkg-dev", "binutils"])?;
    cargo_deb()?;
    let object = setup::build_ebpf()?;
    run(cargo()
        .args(["build", "--release", "-p", "portcullis"])
        .env("PORTCULLIS_XDP_OBJ", &object))?;
    extras(&root().join("target/release/portcullis"))?;
    let out = root().join("target/debian");
    let mut cmd = cargo();
    cmd.args(["deb", "-p", "portcullis", "--no-build", "--dbgsym", "--output"])
        .arg(&out);
    if let Some(version) = version {
        cmd.args(["--deb-version", version]);
    }
    println!("xtask: $ {}", crate::show(&cmd));
    let made = cmd.output().context("starting cargo deb")?;
    eprint!("{}", String::from_utf8_lossy(&made.stderr));
    if !made.status.success() {
        bail!("cargo deb failed with {}", made.status);
    }
    // cargo deb prints the path of each package it wrote, one a line.
    let printed = String::from_utf8_lossy(&made.stdout);
    let path = |suffix: &str| {
        printed
            .lines()
            .map(PathBuf::from)
            .find(|p| p.to_string_lossy().ends_with(suffix) && p.exists())
            .with_context(|| format!("cargo deb printed no *{suffix} it wrote: {printed}"))
    };
    let built = Built {
        deb: path(".deb")?,
        dbgsym: path(".ddeb")?,
    };
    lintian(&built.deb)?;
    println!(
        "xtask: {} ({} KiB), debug symbols in {} ({} KiB)",
        built.deb.display(),
        kib(&built.deb)?,
        built.dbgsym.display(),
        kib(&built.dbgsym)?
    );
    Ok(built)
}

fn kib(file: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len()
        / 1024)
}

/// Installs cargo-deb if it is missing or another version.
fn cargo_deb() -> anyhow::Result<()> {
    let version = Command::new("cargo").args(["deb", "--version"]).output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)) {
        return Ok(());
    }
    println!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (a few minutes, once)");
    run(Command::new("cargo").args(["install", "cargo-deb", "--locked", "--version", CARGO_DEB_VERSION]))
}

/// The man pages (gzipped, as Debian ships them) and shell completions,
/// generated from the binary's own CLI into target/release/debian-extra/.
fn extras(binary: &Path) -> anyhow::Result<()> {
    let dir = root().join("target/release/debian-extra");
    let (man, completions) = (dir.join("man"), dir.join("completions"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&completions)?;
    run(Command::new(binary).arg("manpages").arg(&man))?;
    run(Command::new("gzip").args(["-9", "-n"]).args(pages(&man)?))?;
    for (shell, file) in [
        ("bash", "portcullis.bash"),
        ("zsh", "_portcullis"),
        ("fish", "portcullis.fish"),
    ] {
        let out = Command::new(binary).args(["completions", shell]).output()?;
        if !out.status.success() {
            bail!(
                "`portcullis completions {shell}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(completions.join(file), out.stdout)?;
    }
    Ok(())
}

fn pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    Ok(pages)
}

/// lintian, failing on any error or warning it does not have an override for.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--display-info"])
        .arg(deb)
        .output()
        .context("starting lintian")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "lintian found problems in {} (above); fix them or add a justified override to images/lintian-overrides",
            deb.display()
        );
    }
    println!("xtask: lintian: {} is clean", deb.display());
    Ok(())
}
