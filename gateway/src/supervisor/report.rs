//! The gate report: every API instance's gate as `portcullis run` last put it
//! in force, written to the state directory for `portcullis status`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::runtime::Generation;

/// Writes so far: one temporary file per write, as the supervisor and the refresher may write at once.
static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// File in the state directory where the gates in force are reported.
pub const GATES_FILE: &str = "gates.json";

/// What one proxy reported of its gates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateReport {
    /// The reporting proxy's process id.
    pub pid: u32,
    /// When the report was written (Unix seconds).
    pub written_unix: u64,
    /// The Gatekeeper level in force.
    pub level: String,
    /// Every API instance's gate, by name.
    pub apis: Vec<ApiGate>,
    /// The control plane this replica follows (connected mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlStatus>,
    /// Every upstream endpoint's health.
    #[serde(default)]
    pub endpoints: Vec<EndpointHealth>,
}

/// One upstream endpoint's health in a [`GateReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointHealth {
    /// Service name.
    pub service: String,
    /// The endpoint's address.
    pub endpoint: String,
    /// `healthy`, `unhealthy` (its health check fails) or `ejected` (outlier detection).
    pub health: String,
    /// Whether an active health check watches it.
    pub checked: bool,
}

/// A replica's link to its control plane, as `portcullis status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStatus {
    /// `https://HOST:PORT`.
    pub url: String,
    /// This replica's name.
    pub replica: String,
    /// Its gateway cluster.
    pub cluster: String,
    /// Whether the last exchange succeeded.
    pub connected: bool,
    /// The newest snapshot applied (0: none yet).
    pub snapshot_version: u64,
    /// When that snapshot was published (Unix seconds).
    pub snapshot_published_unix: u64,
    /// When the replica's certificate expires (Unix seconds).
    pub certificate_expires_unix: u64,
}

/// One API instance's gate in a [`GateReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiGate {
    /// API instance name.
    pub api: String,
    /// The listener it is served on.
    pub listener: Option<String>,
    /// `open`, `blocked` or `applying`.
    pub state: String,
    /// Why it is not open.
    pub reason: Option<String>,
    /// What an operator needs to fix.
    pub detail: String,
    /// Since when it is in this state (Unix seconds).
    pub since_unix: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl GateReport {
    /// The gates of `generation`, as this process reports them now.
    pub fn of(generation: &Generation) -> Self {
        let listener_of = |api: &str| {
            generation
                .config
                .listeners
                .iter()
                .find(|l| l.routes.iter().any(|r| r.api == api))
                .map(|l| l.addr.to_string())
        };
        let apis = generation
            .gates
            .sorted()
            .into_iter()
            .map(|(api, gate)| ApiGate {
                api: api.to_owned(),
                listener: listener_of(api),
                state: gate.state.label().to_owned(),
                reason: gate.reason.map(|r| r.label().to_owned()),
                detail: gate.detail.clone(),
                since_unix: unix(gate.since),
            })
            .collect();
        Self {
            pid: std::process::id(),
            written_unix: unix(SystemTime::now()),
            level: generation.config.gateway.gate_level.label().to_owned(),
            apis,
            control_plane: None,
            endpoints: Self::endpoints_of(generation),
        }
    }

    /// Every upstream endpoint's health in `generation`.
    pub fn endpoints_of(generation: &Generation) -> Vec<EndpointHealth> {
        generation
            .upstreams
            .iter()
            .flat_map(|u| {
                u.cfg.endpoints.iter().enumerate().map(|(i, ep)| EndpointHealth {
                    service: u.cfg.name.clone(),
                    endpoint: ep.addr.to_string(),
                    health: u.health(i).label().to_owned(),
                    checked: u.cfg.health.is_some(),
                })
            })
            .collect()
    }

    /// Writes the report to `path` through a rename (mode 0640).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{n}"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        let text = serde_json::to_vec(self).map_err(io::Error::other)?;
        io::Write::write_all(&mut file, &text)?;
        std::fs::rename(tmp, path)
    }

    /// The report in `state_dir`, if one was written and can be read.
    pub fn read(state_dir: &Path) -> Option<(PathBuf, Self)> {
        let path = state_dir.join(GATES_FILE);
        let text = std::fs::read_to_string(&path).ok()?;
        let report = serde_json::from_str(&text).ok()?;
        Some((path, report))
    }

    /// Whether the process that wrote the report still runs.
    pub fn proxy_running(&self) -> bool {
        i32::try_from(self.pid)
            .is_ok_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_report_reads_back_the_same() {
        let dir = std::env::temp_dir().join(format!("portcullis-report-{}", std::process::id()));
        let report = GateReport {
            pid: std::process::id(),
            written_unix: 7,
            level: "strict".into(),
            apis: vec![ApiGate {
                api: "orders".into(),
                listener: Some("127.0.0.1:8080".into()),
                state: "blocked".into(),
                reason: Some("policy_failed".into()),
                detail: "rate-limiting: bad".into(),
                since_unix: 3,
            }],
            control_plane: Some(ControlStatus {
                url: "https://cp:7443".into(),
                replica: "gw-a".into(),
                cluster: "prod".into(),
                connected: true,
                snapshot_version: 4,
                snapshot_published_unix: 5,
                certificate_expires_unix: 6,
            }),
            endpoints: vec![EndpointHealth {
                service: "orders".into(),
                endpoint: "127.0.0.1:9000".into(),
                health: "ejected".into(),
                checked: true,
            }],
        };
        report.write(&dir.join(GATES_FILE)).expect("written");
        let (path, back) = GateReport::read(&dir).expect("read back");
        assert_eq!(back, report);
        assert!(back.proxy_running(), "this process wrote it");
        std::fs::remove_file(path).expect("removed");
        std::fs::remove_dir(&dir).expect("removed");
    }
}
