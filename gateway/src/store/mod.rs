//! Shared storage: Redis, shared by every replica of one gateway cluster;
//! and, in [`cache`], the local last-known-good configuration.
//!
//! The data path never waits on Redis. Cluster-wide counters are kept in
//! memory and reconciled by one store thread every [`SYNC_EVERY`]: it adds
//! each counter's local increments to Redis with one atomic Lua script per
//! counter and reads back the cluster total. If Redis is unreachable,
//! counting goes on locally (each replica enforces the limit on its own
//! share), a warning is logged, and the increments are flushed once Redis is
//! back. Keys are namespaced `portcullis:<cluster>:`, the cluster being the
//! Configuration's `metadata.name`, so several gateway clusters can share one
//! Redis without sharing limits.

pub mod cache;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::config::RedisConfig;

/// How often local counts are reconciled with Redis.
pub const SYNC_EVERY: Duration = Duration::from_millis(10);
/// Prefix of every key this gateway writes.
pub const KEY_PREFIX: &str = "portcullis";

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The connection settings are not usable.
    #[error("Redis at {address}: {reason}")]
    Settings { address: String, reason: String },
}

/// One counter shared across the cluster.
#[derive(Debug, Default)]
pub struct Slot {
    /// Cluster total as Redis last reported it.
    pub global: u64,
    /// Increments made here and not yet added in Redis.
    pub pending: u64,
    /// When the key expires (its window's end).
    pub ttl: Duration,
    /// Last time a request touched it.
    pub used: Option<Instant>,
}

/// A set of counters one policy keeps; the store thread reconciles it.
#[derive(Debug, Default)]
pub struct Counters {
    /// Redis key → slot.
    pub slots: Mutex<HashMap<String, Slot>>,
}

/// Whether the last attempt to reach Redis succeeded (false until the first does).
static HEALTHY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether Redis answered the store thread's last reconciliation.
pub fn healthy() -> bool {
    HEALTHY.load(std::sync::atomic::Ordering::Relaxed)
}

fn registry() -> &'static Mutex<Vec<Weak<Counters>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<Counters>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

/// New counters that the store thread will reconcile for as long as they live.
pub fn counters() -> Arc<Counters> {
    let counters = Arc::new(Counters::default());
    if let Ok(mut list) = registry().lock() {
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&counters));
    }
    counters
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The connection URL (never logged: it holds the password).
fn url(cfg: &RedisConfig) -> Result<String, StoreError> {
    let err = |reason: &str| StoreError::Settings {
        address: cfg.address.clone(),
        reason: reason.to_string(),
    };
    let password = match &cfg.password {
        Some(p) => Some(
            std::str::from_utf8(p.expose())
                .map_err(|_| err("the password is not UTF-8"))?
                .trim_end_matches(['\n', '\r']),
        ),
        None => None,
    };
    let auth = match (cfg.username.as_deref(), password) {
        (Some(u), Some(p)) => format!("{}:{}@", percent(u), percent(p)),
        (None, Some(p)) => format!(":{}@", percent(p)),
        (Some(u), None) => format!("{}@", percent(u)),
        (None, None) => String::new(),
    };
    let scheme = if cfg.tls.is_some() { "rediss" } else { "redis" };
    Ok(format!("{scheme}://{auth}{}/{}", cfg.address, cfg.db))
}

const SCRIPT: &str = "local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(v) == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v";

/// A Redis client for `cfg` (TLS with its CA bundle when configured).
pub fn client(cfg: &RedisConfig) -> Result<redis::Client, StoreError> {
    let settings = |reason: String| StoreError::Settings {
        address: cfg.address.clone(),
        reason,
    };
    match &cfg.tls {
        None => redis::Client::open(url(cfg)?).map_err(|e| settings(e.to_string())),
        Some(ca) => {
            // rustls needs a process-wide provider; the gateway uses ring everywhere.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let root_cert = match ca {
                Some(crate::config::Pem::File(path)) => Some(
                    std::fs::read(path)
                        .map_err(|e| settings(format!("cannot read {}: {e}", path.display())))?,
                ),
                Some(crate::config::Pem::Inline(text)) => Some(text.clone().into_bytes()),
                None => None,
            };
            redis::Client::build_with_tls(
                url(cfg)?,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert,
                },
            )
            .map_err(|e| settings(e.to_string()))
        }
    }
}

/// Runs one Redis command off the data path, bounded to a second.
fn one_shot<T: redis::FromRedisValue>(client: &redis::Client, cmd: &redis::Cmd) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    runtime.block_on(async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        cmd.query_async(&mut conn).await.map_err(|e| e.to_string())
    })
}

/// The shared-storage key of a cluster's last-known-good copy.
pub fn shared_key(cluster: &str) -> String {
    format!("{KEY_PREFIX}:{cluster}:last-known-good")
}

/// Reads the value at `key`; `Ok(None)` when there is none.
pub fn get(client: &redis::Client, key: &str) -> Result<Option<Vec<u8>>, String> {
    one_shot(client, redis::cmd("GET").arg(key))
}

/// Writes `value` at `key`.
pub fn set(client: &redis::Client, key: &str, value: &[u8]) -> Result<(), String> {
    one_shot::<()>(client, redis::cmd("SET").arg(key).arg(value))
}

/// Starts the store thread for `cfg`: it reconciles every registered counter set.
pub fn start(cfg: &RedisConfig) -> Result<(), StoreError> {
    let client = client(cfg)?;
    let address = cfg.address.clone();
    std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                tracing::error!("cannot start the store runtime; counting stays local");
                return;
            };
            runtime.block_on(sync_forever(client, address));
        })
        .map_err(|e| StoreError::Settings {
            address: cfg.address.clone(),
            reason: e.to_string(),
        })?;
    Ok(())
}

async fn sync_forever(client: redis::Client, address: String) {
    let script = redis::Script::new(SCRIPT);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    let mut conn = None;
    let mut last_warning: Option<Instant> = None;
    let mut warn = |what: &str, e: &dyn std::fmt::Display| {
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            tracing::warn!(redis = %address, error = %e, "{what}; rate limits are counted locally until Redis answers");
            last_warning = Some(Instant::now());
        }
    };
    loop {
        tokio::time::sleep(SYNC_EVERY).await;
        if conn.is_none() {
            match client.get_multiplexed_async_connection_with_config(&config).await {
                Ok(c) => {
                    tracing::info!(redis = %address, "shared storage connected");
                    conn = Some(c);
                }
                Err(e) => {
                    HEALTHY.store(false, std::sync::atomic::Ordering::Relaxed);
                    warn("cannot reach Redis", &e);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sets: Vec<Arc<Counters>> = registry()
            .lock()
            .map(|l| l.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        let mut failed = None;
        'sets: for counters in sets {
            let work: Vec<(String, u64, u64)> = match counters.slots.lock() {
                Ok(mut slots) => {
                    let now = Instant::now();
                    slots.retain(|_, s| {
                        s.used
                            .is_some_and(|u| now.duration_since(u) < s.ttl + Duration::from_secs(1))
                    });
                    slots
                        .iter()
                        .map(|(k, s)| {
                            (
                                k.clone(),
                                s.pending,
                                u64::try_from(s.ttl.as_millis()).unwrap_or(u64::MAX).max(1),
                            )
                        })
                        .collect()
                }
                Err(_) => continue,
            };
            for (key, pending, ttl_ms) in work {
                match script
                    .key(&key)
                    .arg(pending)
                    .arg(ttl_ms)
                    .invoke_async::<u64>(c)
                    .await
                {
                    Ok(total) => {
                        if let Ok(mut slots) = counters.slots.lock()
                            && let Some(slot) = slots.get_mut(&key)
                        {
                            slot.global = total;
                            slot.pending = slot.pending.saturating_sub(pending);
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break 'sets;
                    }
                }
            }
        }
        if let Some(e) = failed {
            HEALTHY.store(false, std::sync::atomic::Ordering::Relaxed);
            warn("Redis failed", &e);
            conn = None;
        } else {
            HEALTHY.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_escape_credentials() {
        let cfg = RedisConfig {
            address: "10.0.0.1:6379".into(),
            username: Some("gw".into()),
            password: None,
            db: 3,
            tls: None,
        };
        assert_eq!(url(&cfg).unwrap(), "redis://gw@10.0.0.1:6379/3");
        let tls = RedisConfig {
            tls: Some(None),
            ..cfg
        };
        assert_eq!(url(&tls).unwrap(), "rediss://gw@10.0.0.1:6379/3");
        assert_eq!(percent("p@ss:w/rd"), "p%40ss%3Aw%2Frd");
    }
}
