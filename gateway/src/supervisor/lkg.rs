//! The last-known-good configuration: written when everything applied is
//! open, served when the configuration source cannot be read at start.

use std::path::Path;

use super::RunOptions;
use super::source::{Files, load};
use crate::config::{self, GateLevel};
use crate::runtime::Generation;
use crate::store::cache::{Cache, Snapshot};

/// The cache of `options`, or `None` (logged) when it is off.
pub(super) fn open(options: &RunOptions) -> Option<Cache> {
    match Cache::open(&options.state_dir, options.cache_key.as_deref()) {
        Ok(Some(cache)) => Some(cache),
        Ok(None) => {
            tracing::info!(
                "no cache key (--cache-key or the credential `portcullis-cache-key`): the last-known-good cache is off"
            );
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "the last-known-good cache is off");
            None
        }
    }
}

/// What to serve when the source cannot be read at start: the cache, gated
/// under `strict`; or nothing at all until the source is back.
pub(super) fn serve_from(dir: &Path, cache: Option<&Cache>) -> Generation {
    if let Some(generation) = cached(dir, cache) {
        return generation;
    }
    tracing::warn!("nothing to serve until the configuration source can be read");
    match Generation::build(config::Config::empty(dir), None) {
        Ok(g) => g,
        Err(e) => unreachable!("a configuration without listeners or services has nothing to fail: {e}"),
    }
}

/// The last-known-good configuration, gated under `strict`, if there is a usable one.
pub(super) fn cached(dir: &Path, cache: Option<&Cache>) -> Option<Generation> {
    let snapshot = match cache.map(|c| c.load(dir)) {
        Some(Ok(Some(snapshot))) => Some(snapshot),
        Some(Ok(None)) => {
            tracing::warn!("no last-known-good cache has been written yet");
            None
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "last-known-good cache not used");
            None
        }
        None => None,
    };
    if let Some(snapshot) = snapshot {
        let written = snapshot.written_unix;
        match load(dir, snapshot.files, None) {
            Ok(generation) => {
                let level = generation.config.gateway.gate_level;
                tracing::warn!(
                    written_unix = written,
                    level = level.label(),
                    "applying the last-known-good cache"
                );
                if level != GateLevel::Strict {
                    return Some(generation);
                }
                let mut gates = generation.gates.clone();
                gates.close_unreachable();
                return Some(generation.with_gates(gates));
            }
            Err(errors) => tracing::error!(
                errors = %errors,
                "the cached configuration no longer loads; treating the cache as absent"
            ),
        }
    }
    None
}

/// Why `generation` may not become the last-known-good one (a gate closed,
/// a policy failed); `None` when everything in it is applied and open.
pub(super) fn not_good(generation: &Generation) -> Option<String> {
    if let Some((api, _)) = generation.gates.sorted().into_iter().find(|(_, g)| !g.is_open()) {
        return Some(format!("the gate of `{api}` is closed in this configuration"));
    }
    (!generation.policy_errors.is_empty()).then(|| "a policy failed in this configuration".to_owned())
}

/// Writes the cache when everything in `generation` is applied and open.
pub(super) fn remember(cache: Option<&Cache>, dir: &Path, files: Files, generation: &Generation) {
    let Some(cache) = cache else { return };
    if let Some(why) = not_good(generation) {
        tracing::info!("last-known-good cache kept: {why}");
        return;
    }
    if let Err(e) = cache.store(&Snapshot::new(dir, files)) {
        tracing::error!(error = %e, "writing the last-known-good cache failed; the previous one stays");
    }
}
