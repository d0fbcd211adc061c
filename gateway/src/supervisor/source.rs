//! The configuration source (a directory today): its files, and the
//! generation they make.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::report::ControlStatus;
use crate::config::{self, ConfigErrors, RegistrationConfig, Source as _};
use crate::control::client::Link;
use crate::control::protocol::Snapshot;
use crate::runtime::Generation;

/// What the control plane last sent (connected mode).
#[derive(Debug)]
pub struct Remote {
    latest: Mutex<Option<Snapshot>>,
    arrived: Condvar,
    /// The connection's state.
    pub link: Arc<Link>,
    registration: RegistrationConfig,
}

impl Remote {
    /// Nothing received yet from the control plane of `registration`.
    pub fn new(registration: RegistrationConfig) -> Self {
        Self {
            latest: Mutex::new(None),
            arrived: Condvar::new(),
            link: Arc::default(),
            registration,
        }
    }

    /// The link as `portcullis status` shows it.
    pub fn status(&self) -> ControlStatus {
        use std::sync::atomic::Ordering::Acquire;
        let r = &self.registration;
        ControlStatus {
            url: r.control_plane.clone(),
            replica: r.replica.clone(),
            cluster: r.cluster.clone(),
            connected: self.link.connected.load(Acquire),
            snapshot_version: self.link.version.load(Acquire),
            snapshot_published_unix: self.link.published_unix.load(Acquire),
            certificate_expires_unix: self.link.cert_expires_unix.load(Acquire),
        }
    }

    /// Keeps `snapshot` as the one to apply.
    pub fn deliver(&self, snapshot: Snapshot) {
        if let Ok(mut latest) = self.latest.lock() {
            *latest = Some(snapshot);
        }
        self.arrived.notify_all();
    }

    /// Waits up to `wait` for a first snapshot; whether one is here.
    pub fn wait_first(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let Ok(mut latest) = self.latest.lock() else {
            return false;
        };
        while latest.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            latest = match self.arrived.wait_timeout(latest, left) {
                Ok((guard, _)) => guard,
                Err(_) => return false,
            };
        }
        true
    }

    /// The snapshot to store as the cluster's copy.
    pub fn latest_copy(&self) -> Option<crate::store::cache::SharedCopy> {
        let latest = self.latest.lock().ok()?;
        latest.as_ref().map(|s| crate::store::cache::SharedCopy {
            version: s.version,
            files: s.files.clone(),
        })
    }

    /// Whether a snapshot has arrived.
    pub fn has_snapshot(&self) -> bool {
        self.latest.lock().is_ok_and(|l| l.is_some())
    }

    /// The snapshot's files, named `control-plane:<cluster>/<file>` so errors say where they came from.
    fn files(&self) -> Option<(u64, Files)> {
        let latest = self.latest.lock().ok()?;
        let s = latest.as_ref()?;
        let files = s
            .files
            .iter()
            .map(|(name, text)| (format!("control-plane:{}/{name}", s.cluster), text.clone()))
            .collect();
        Some((s.version, files))
    }
}

/// `(file name, contents)` of every resource file read from the source.
pub type Files = Vec<(String, String)>;

/// Resource files of `dir`, and of the control plane's last snapshot after
/// them; the outer error means the directory itself cannot be read
/// (unreachable), the inner one that what it holds is not usable. Local files
/// and the snapshot's are one configuration: a resource both define is a
/// located error, so neither silently wins.
pub(super) fn read(
    dir: &Path,
    remote: Option<&Remote>,
) -> Result<Result<Files, ConfigErrors>, std::io::Error> {
    std::fs::read_dir(dir)?;
    let mut files = match config::DirSource(dir.to_path_buf()).files() {
        Ok(files) => files,
        Err(e) => return Ok(Err(ConfigErrors(vec![e]))),
    };
    if let Some((_, remote_files)) = remote.and_then(Remote::files) {
        files.extend(remote_files);
    }
    Ok(Ok(files))
}

/// The configuration `files` of `dir` make, its warnings logged.
pub(super) fn parse(dir: &Path, files: Files) -> Result<config::Config, ConfigErrors> {
    let config = config::load(&config::MemSource {
        files,
        base: dir.to_path_buf(),
    })?;
    for w in &config.warnings {
        tracing::warn!(warning = %w, "configuration");
    }
    Ok(config)
}

/// The generation `files` make, carrying services over from `previous`.
pub(super) fn load(
    dir: &Path,
    files: Files,
    previous: Option<&Generation>,
) -> Result<Generation, ConfigErrors> {
    Generation::build(parse(dir, files)?, previous)
}

/// The source's files and the configuration they make; `Ok(None)` when the
/// source cannot be read (logged: what is applied stays in force).
pub(super) fn read_config(
    dir: &Path,
    remote: Option<&Remote>,
) -> Result<Option<(Files, config::Config)>, ConfigErrors> {
    let files = match read(dir, remote) {
        Ok(files) => files?,
        Err(e) => {
            tracing::warn!(config = %dir.display(), error = %e, "configuration source unreachable; what is applied stays in force");
            return Ok(None);
        }
    };
    let config = parse(dir, files.clone())?;
    Ok(Some((files, config)))
}
