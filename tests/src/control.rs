//! The control plane as a real process for the connected-mode tests and the
//! soak: `portcullis control-plane serve` in a namespace, the files it
//! publishes, the tokens it issues, and `portcullis register`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::http::{GatewayProcess, TempDir, run_ok};
use crate::{NetNs, portcullis_bin, wait_for};

/// Where the control plane listens.
pub const CP: &str = "127.0.0.1:7443";
/// Its URL, as replicas are given it.
pub const CP_URL: &str = "https://127.0.0.1:7443";
/// Where a replica's admin endpoints listen in its namespace.
pub const ADMIN: &str = "127.0.0.1:9901";

/// A control plane in a namespace; stopped on drop.
#[derive(Debug)]
pub struct ControlPlane {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
    ns: PathBuf,
    lifetime: String,
}

/// `portcullis ARGS`.
pub fn portcullis(args: &[&str]) -> Command {
    let mut cmd = Command::new(portcullis_bin());
    cmd.args(args);
    cmd
}

impl ControlPlane {
    /// A new control plane directory (CA created) with `cluster`'s files.
    pub fn init(dir: &Path) -> anyhow::Result<()> {
        run_ok(portcullis(&["control-plane", "init", "--dir"]).arg(dir))?;
        Ok(())
    }

    /// Starts it in `ns` on `dir`, issuing certificates that live an hour.
    pub fn start(ns: &NetNs, dir: &Path) -> anyhow::Result<Self> {
        Self::start_for(ns, dir, "1h")
    }

    /// Like [`ControlPlane::start`], issuing certificates that live `lifetime`.
    pub fn start_for(ns: &NetNs, dir: &Path, lifetime: &str) -> anyhow::Result<Self> {
        let log = dir.join("control-plane.log");
        let mut cp = Self {
            child: None,
            dir: dir.to_path_buf(),
            log,
            ns: ns.path(),
            lifetime: lifetime.to_owned(),
        };
        cp.restart(ns)?;
        Ok(cp)
    }

    /// Starts it again (after [`ControlPlane::kill`]), appending to its log.
    pub fn restart(&mut self, ns: &NetNs) -> anyhow::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = ns
            .command(portcullis_bin())
            .args([
                "control-plane",
                "serve",
                "--listen",
                "0.0.0.0:7443",
                "--cert-lifetime",
                &self.lifetime,
                "--dir",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("spawning the control plane")?;
        self.child = Some(child);
        let addr: SocketAddr = CP.parse()?;
        wait_for("the control plane listening", || {
            ns.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        })
        .with_context(|| self.log_text())
    }

    /// Kills it (SIGKILL), as an outage would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A one-time registration token for `cluster`, valid for `ttl`.
    pub fn token(&self, cluster: &str, ttl: &str) -> anyhow::Result<String> {
        let out = run_ok(
            portcullis(&[
                "control-plane",
                "token",
                "create",
                "--cluster",
                cluster,
                "--ttl",
                ttl,
                "--dir",
            ])
            .arg(&self.dir),
        )?;
        Ok(out.trim().to_owned())
    }

    /// Writes `file` of `cluster`, as a deploy would.
    pub fn publish(&self, cluster: &str, file: &str, text: &str) -> anyhow::Result<()> {
        let dir = self.dir.join("clusters").join(cluster);
        std::fs::create_dir_all(&dir)?;
        // Written aside and renamed, as a deploy would: the scan never sees half a file.
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, dir.join(file))?;
        Ok(())
    }

    /// What it logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
        let _ = &self.ns;
    }
}

/// `portcullis register` inside `ns`; its stdout, or its stderr as the error.
pub fn register(ns: &NetNs, token: &str, name: &str, out: &Path) -> anyhow::Result<String> {
    register_at(ns, CP_URL, token, name, out)
}

/// Like [`register`], with the control plane at `url`.
pub fn register_at(ns: &NetNs, url: &str, token: &str, name: &str, out: &Path) -> anyhow::Result<String> {
    let output = ns
        .command(portcullis_bin())
        .args([
            "register",
            "--control-plane",
            url,
            "--token",
            token,
            "--name",
            name,
            "--out",
        ])
        .arg(out)
        .output()?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A registered replica: its configuration directory and the key of its
/// last-known-good cache. Each [`Replica::start`] is a new gateway process.
#[derive(Debug)]
pub struct Replica {
    /// The configuration directory (registration files, settings).
    pub dir: TempDir,
    /// The cache key file.
    pub key: PathBuf,
}

impl Drop for Replica {
    /// Removes what its gateways wrote next to the directory: the log, the
    /// state directory, and the cache key made by [`Replica::with_new_key`].
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.0.with_extension("log"));
        let _ = std::fs::remove_dir_all(self.dir.0.with_extension("state"));
        let _ = std::fs::remove_file(self.dir.0.with_extension("cache-key"));
    }
}

impl Replica {
    /// A replica on `dir` with a new cache key next to it.
    pub fn with_new_key(dir: TempDir) -> anyhow::Result<Self> {
        let key = dir.0.with_extension("cache-key");
        let _ = std::fs::remove_file(&key);
        run_ok(portcullis(&["secret", "keygen", "--out"]).arg(&key))?;
        Ok(Self { dir, key })
    }

    /// Starts the gateway in `ns`, its admin on [`ADMIN`], logging next to its directory.
    pub fn start(&self, ns: &NetNs) -> anyhow::Result<GatewayProcess> {
        GatewayProcess::start_log(
            ns,
            &portcullis_bin(),
            &self.dir.0,
            ADMIN.parse()?,
            &[("PORTCULLIS_CACHE_KEY", &self.key)],
            &self.dir.0.with_extension("log"),
        )
    }
}
