//! Connected mode: the control plane Portcullis ships (`portcullis
//! control-plane`) and the gateway's side of it. The control plane runs its own
//! CA, registers replicas with one-time tokens that also pin the CA, and
//! publishes each gateway cluster's desired state as numbered snapshots that
//! replicas long-poll for over mTLS. The protocol, files and failure modes are
//! in docs/control-plane.md.

pub mod ca;
pub mod client;
pub mod protocol;
pub mod server;
mod state;

use std::io;
use std::path::{Path, PathBuf};

/// Why a control-plane or registration step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A private file cannot be read, or is readable by group or others.
    #[error(transparent)]
    Private(#[from] crate::config::secret::SecretError),
    /// A file to be created exists already.
    #[error("{} exists already; remove it or write elsewhere", .path.display())]
    Exists { path: PathBuf },
    /// A key, certificate or signing request could not be made or read.
    #[error("{0}")]
    Pki(String),
    /// A registration token is malformed, unknown, used or expired.
    #[error("registration token refused: {0}")]
    Token(String),
    /// The control plane could not be reached.
    #[error("control plane {url} unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: io::Error,
    },
    /// The control plane answered with a refusal.
    #[error("control plane {url} refused: {status} {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    /// The control plane's answer is not what the protocol says.
    #[error("control plane {url}: {reason}")]
    Protocol { url: String, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads `path`, refusing it if group or others can read it (the
/// configuration's own check for secret files).
pub fn read_private(path: &Path) -> Result<Vec<u8>, ControlError> {
    Ok(crate::config::secret::read_private(path)?.expose().to_vec())
}

/// Writes a new file with mode 0600; never overwrites.
pub fn create_private(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ControlError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io_error(path)(e)
            }
        })?;
    file.write_all(bytes).map_err(io_error(path))
}

/// Replaces `path` atomically (a 0600 temporary file renamed over it).
pub fn replace_private(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    create_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
