//! The cluster's last-known-good copy in Redis (connected mode): every
//! replica that applied a snapshot with every gate open stores it there,
//! sealed with AES-256-GCM under the cache key (which Redis never sees) and
//! bound to the cluster; a replica that starts while the control plane is
//! down and has no local cache applies it. A value that does not open
//! (altered, another key, another cluster) or is older than the newest
//! snapshot this replica has applied is refused with a log line and treated
//! as absent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{self, GateLevel};
use crate::runtime::Generation;
use crate::store::cache::{Cache, SharedCopy};

/// Where the newest applied snapshot version is remembered (the rollback floor).
const FLOOR_FILE: &str = "control-plane.version";

/// One cluster's copy in shared storage.
#[derive(Debug)]
pub struct ClusterCopy {
    client: redis::Client,
    key: String,
    cluster: String,
    floor: PathBuf,
    cache: Arc<Cache>,
}

impl ClusterCopy {
    /// The copy for a replica configured with `config`; `None` without a
    /// registration, shared storage or a cache key.
    pub fn open(config: &config::Config, cache: Option<&Arc<Cache>>, state_dir: &Path) -> Option<Self> {
        let registration = config.registration.as_ref()?;
        let redis = config.gateway.redis.as_ref()?;
        let Some(cache) = cache else {
            tracing::info!("no cache key: the cluster's last-known-good copy in Redis is off");
            return None;
        };
        let client = match crate::store::client(redis) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the cluster's last-known-good copy in Redis is off");
                return None;
            }
        };
        Some(Self {
            client,
            key: crate::store::shared_key(&registration.cluster),
            cluster: registration.cluster.clone(),
            floor: state_dir.join(FLOOR_FILE),
            cache: cache.clone(),
        })
    }

    fn floor(&self) -> u64 {
        std::fs::read_to_string(&self.floor)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The copy in Redis, if one opens and is not older than what this replica applied.
    pub fn fetch(&self) -> Option<SharedCopy> {
        let bytes = match crate::store::get(&self.client, &self.key) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                tracing::warn!(key = %self.key, "no last-known-good copy of the cluster in Redis yet");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's last-known-good copy cannot be read from Redis");
                return None;
            }
        };
        let Some(copy) = self.cache.open_shared(&self.cluster, &bytes) else {
            tracing::error!(key = %self.key, "the cluster's copy in Redis refused: it does not open with the cache key (altered, another key or another cluster); treating it as absent");
            return None;
        };
        let floor = self.floor();
        if copy.version < floor {
            tracing::error!(key = %self.key, version = copy.version, applied = floor, "the cluster's copy in Redis refused: older than a snapshot this replica applied (a rollback); treating it as absent");
            return None;
        }
        Some(copy)
    }

    /// Remembers `copy` as applied and stores it in Redis, off the supervisor's
    /// thread, unless Redis already holds a newer one.
    pub fn publish(&self, copy: &SharedCopy) {
        if copy.version > self.floor() {
            let _ = std::fs::write(&self.floor, copy.version.to_string());
        }
        let version = copy.version;
        let sealed = match self.cache.seal_shared(&self.cluster, copy) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "the cluster's copy not sealed");
                return;
            }
        };
        let (client, key, cluster, cache) = (
            self.client.clone(),
            self.key.clone(),
            self.cluster.clone(),
            self.cache.clone(),
        );
        let _ = std::thread::Builder::new()
            .name("cluster-copy".into())
            .spawn(move || {
                let newer = crate::store::get(&client, &key)
                    .ok()
                    .flatten()
                    .and_then(|b| cache.open_shared(&cluster, &b))
                    .is_some_and(|held| held.version > version);
                if newer {
                    return;
                }
                match crate::store::set(&client, &key, &sealed) {
                    Ok(()) => {
                        tracing::info!(version, key, "the cluster's last-known-good copy stored in Redis");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the cluster's last-known-good copy not stored in Redis");
                    }
                }
            });
    }

    /// The generation a start serves from `copy` with the local `files`:
    /// gated under `strict`, as a local cache would be.
    pub fn generation(
        &self,
        dir: &Path,
        files: super::source::Files,
        copy: SharedCopy,
    ) -> Option<Generation> {
        let mut all = files;
        all.extend(
            copy.files
                .into_iter()
                .map(|(name, text)| (format!("control-plane:{}/{name}", self.cluster), text)),
        );
        match super::source::load(dir, all, None) {
            Ok(generation) => {
                tracing::warn!(
                    version = copy.version,
                    "applying the cluster's last-known-good copy from Redis"
                );
                if generation.config.gateway.gate_level != GateLevel::Strict {
                    return Some(generation);
                }
                let mut gates = generation.gates.clone();
                gates.close_unreachable();
                Some(generation.with_gates(gates))
            }
            Err(errors) => {
                tracing::error!(errors = %errors, "the cluster's copy in Redis no longer loads; treating it as absent");
                None
            }
        }
    }
}
