//! What the control plane remembers across restarts (`state.json`, mode
//! 0600): token hashes, the replicas it issued certificates to, and each
//! cluster's last published snapshot version. Each change is a read, an edit
//! and an atomic replace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{ControlError, now_unix, read_private, replace_private};

const STATE_FILE: &str = "state.json";

/// A registration token, known by its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub secret_sha256: String,
    pub cluster: String,
    pub expires_unix: u64,
    pub used: bool,
}

/// A registered replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub cluster: String,
    /// Serials of its certificates still valid (the newest last).
    pub serials: Vec<String>,
    pub expires_unix: u64,
    pub revoked: bool,
}

/// The whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub tokens: Vec<TokenRecord>,
    pub replicas: BTreeMap<String, Replica>,
    /// Per cluster: the last version published and a hash of its files.
    pub versions: BTreeMap<String, (u64, String)>,
}

/// The state file of one control-plane directory; edits are serialised in process.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(STATE_FILE),
            lock: Mutex::new(()),
        }
    }

    /// The state as written now (empty before the first write).
    pub fn read(&self) -> Result<State, ControlError> {
        if !self.path.exists() {
            return Ok(State::default());
        }
        let bytes = read_private(&self.path)?;
        serde_json::from_slice(&bytes).map_err(|e| ControlError::Pki(format!("{}: {e}", self.path.display())))
    }

    /// Applies `edit` and writes the result; what `edit` returns.
    pub fn edit<T>(
        &self,
        edit: impl FnOnce(&mut State) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| ControlError::Pki("state lock poisoned".into()))?;
        let mut state = self.read()?;
        state.tokens.retain(|t| !t.used && t.expires_unix > now_unix());
        let out = edit(&mut state)?;
        let text = serde_json::to_vec_pretty(&state).map_err(|e| ControlError::Pki(e.to_string()))?;
        replace_private(&self.path, &text)?;
        Ok(out)
    }
}
