//! The last-known-good cache: the configuration (resources, policies and
//! contracts) last applied with every gate open, kept on local disk encrypted
//! and authenticated, so that a gateway that cannot read its configuration
//! source can still apply it (`flexible` and `disabled` levels).
//!
//! The file is AES-256-GCM under a key from a file or the systemd credential
//! [`KEY_CREDENTIAL`], never the key that protects configuration secrets. It is
//! written 0600 through a temporary file and a rename, so a crash leaves the
//! old cache or the new one. A cache that does not decrypt (altered, truncated,
//! another key) or was written for another source is refused and treated as
//! absent.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::secret::{SecretError, SecretKey};

/// Credential the cache key is read from when no key file is given.
pub const KEY_CREDENTIAL: &str = "portcullis-cache-key";
/// File name of the cache inside the state directory.
pub const FILE_NAME: &str = "last-known-good.cache";
/// First bytes of a cache file, version 1.
const MAGIC: &[u8] = b"PCLKG1\n";
/// Additional data bound into the ciphertext.
const AAD: &[u8] = b"portcullis-last-known-good-v1";

/// Why the cache cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The file cannot be read or written.
    #[error("last-known-good cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key cannot be read.
    #[error("last-known-good cache key: {0}")]
    Key(#[source] SecretError),
    /// The file does not decrypt with the key: altered, truncated, or written with another key.
    #[error(
        "last-known-good cache {path} refused: it does not decrypt with the cache key (altered, truncated, or written with another key); treating it as absent"
    )]
    Refused { path: PathBuf },
    /// The file decrypts but was written for another configuration source.
    #[error(
        "last-known-good cache {path} refused: it was written for {written_for}, not {source_dir}; treating it as absent"
    )]
    OtherSource {
        path: PathBuf,
        written_for: String,
        source_dir: String,
    },
}

/// What the cache holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was written, seconds since the Unix epoch.
    pub written_unix: u64,
    /// The configuration source it was read from.
    pub source: String,
    /// `(file name, contents)` of every resource file, as applied.
    pub files: Vec<(String, String)>,
}

impl Snapshot {
    /// A snapshot of `files` read from `source`, stamped now.
    pub fn new(source: &Path, files: Vec<(String, String)>) -> Self {
        Self {
            written_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source: source.display().to_string(),
            files,
        }
    }
}

/// First bytes of a cluster's shared copy, version 1.
const SHARED_MAGIC: &[u8] = b"PCSLK1\n";

/// What a cluster's shared copy holds: the control plane's snapshot the
/// writing replica applied with every gate open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedCopy {
    /// The snapshot's version.
    pub version: u64,
    /// Its files, as the control plane published them.
    pub files: Vec<(String, String)>,
}

/// The cache file and its key.
#[derive(Debug)]
pub struct Cache {
    path: PathBuf,
    key: SecretKey,
}

impl Cache {
    /// The cache in `state_dir`, keyed by `key_file`, or by the systemd
    /// credential when no file is given; `Ok(None)` when there is no key at all.
    pub fn open(state_dir: &Path, key_file: Option<&Path>) -> Result<Option<Self>, CacheError> {
        let key_path = match key_file {
            Some(path) => path.to_owned(),
            None => match crate::config::secret::credential_path(KEY_CREDENTIAL) {
                Ok(path) if path.exists() => path,
                _ => return Ok(None),
            },
        };
        let key = SecretKey::from_file(&key_path).map_err(CacheError::Key)?;
        Ok(Some(Self {
            path: state_dir.join(FILE_NAME),
            key,
        }))
    }

    /// Where the cache file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the cache with `snapshot`.
    pub fn store(&self, snapshot: &Snapshot) -> Result<(), CacheError> {
        let io = |source| CacheError::Io {
            path: self.path.clone(),
            source,
        };
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(snapshot).map_err(|e| io(e.into()))?);
        let sealed = self.key.seal(&plain, AAD).map_err(CacheError::Key)?;
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(MAGIC).map_err(io)?;
        file.write_all(&sealed).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)
    }

    /// `copy` sealed for the shared storage of `cluster` (bound to the cluster,
    /// so another cluster's value does not open as this one's).
    pub fn seal_shared(&self, cluster: &str, copy: &SharedCopy) -> Result<Vec<u8>, CacheError> {
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(copy).map_err(|e| CacheError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?);
        let aad = format!("portcullis-shared-last-known-good-v1:{cluster}");
        let mut out = SHARED_MAGIC.to_vec();
        out.extend(self.key.seal(&plain, aad.as_bytes()).map_err(CacheError::Key)?);
        Ok(out)
    }

    /// Opens a value read from the shared storage of `cluster`; `None` when it
    /// does not authenticate (altered, another key or another cluster).
    pub fn open_shared(&self, cluster: &str, bytes: &[u8]) -> Option<SharedCopy> {
        let sealed = bytes.strip_prefix(SHARED_MAGIC)?;
        let aad = format!("portcullis-shared-last-known-good-v1:{cluster}");
        let plain = self.key.open(sealed, aad.as_bytes()).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    /// The cached snapshot written for `source`; `Ok(None)` when there is none.
    pub fn load(&self, source: &Path) -> Result<Option<Snapshot>, CacheError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let refused = || CacheError::Refused {
            path: self.path.clone(),
        };
        let sealed = bytes.strip_prefix(MAGIC).ok_or_else(refused)?;
        let plain = self.key.open(sealed, AAD).map_err(|_| refused())?;
        let snapshot: Snapshot = serde_json::from_slice(&plain).map_err(|_| refused())?;
        let source_dir = source.display().to_string();
        if snapshot.source != source_dir {
            return Err(CacheError::OtherSource {
                path: self.path.clone(),
                written_for: snapshot.source,
                source_dir,
            });
        }
        Ok(Some(snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn cache(dir: &Path) -> Cache {
        let key_file = dir.join("key");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .expect("key file");
        writeln!(f, "{}", SecretKey::generate().expect("key")).expect("write key");
        Cache::open(&dir.join("state"), Some(&key_file))
            .expect("open")
            .expect("a key was given")
    }

    fn temp() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pc-cache-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_snapshot_round_trips_private_and_only_for_its_source() {
        let dir = temp();
        let cache = cache(&dir);
        let source = Path::new("/etc/portcullis");
        assert!(cache.load(source).expect("absent is fine").is_none());
        let snapshot = Snapshot::new(source, vec![("a.yaml".into(), "kind: Service\n".into())]);
        cache.store(&snapshot).expect("store");
        let mode = fs::metadata(cache.path()).expect("written").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(cache.load(source).expect("load"), Some(snapshot));
        assert!(matches!(
            cache.load(Path::new("/elsewhere")),
            Err(CacheError::OtherSource { .. })
        ));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_shared_copy_opens_only_for_its_cluster_and_unaltered() {
        let dir = temp();
        let cache = cache(&dir);
        let copy = SharedCopy {
            version: 7,
            files: vec![("orders.yaml".into(), "kind: ApiInstance\n".into())],
        };
        let sealed = cache.seal_shared("prod", &copy).expect("sealed");
        assert!(
            !String::from_utf8_lossy(&sealed).contains("ApiInstance"),
            "nothing in clear"
        );
        assert_eq!(cache.open_shared("prod", &sealed), Some(copy));
        assert_eq!(
            cache.open_shared("staging", &sealed),
            None,
            "bound to its cluster"
        );
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert_eq!(cache.open_shared("prod", &altered), None);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn an_altered_or_foreign_cache_is_refused() {
        let dir = temp();
        let cache = cache(&dir);
        let source = Path::new("/etc/portcullis");
        cache
            .store(&Snapshot::new(source, vec![("a.yaml".into(), "x".into())]))
            .expect("store");
        let mut bytes = fs::read(cache.path()).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(cache.path(), &bytes).expect("tamper");
        assert!(matches!(cache.load(source), Err(CacheError::Refused { .. })));

        let other = temp();
        let foreign = self::cache(&other);
        foreign
            .store(&Snapshot::new(source, vec![("a.yaml".into(), "x".into())]))
            .expect("store");
        fs::copy(foreign.path(), cache.path()).expect("copy");
        assert!(matches!(cache.load(source), Err(CacheError::Refused { .. })));
        let _ = fs::remove_dir_all(dir);
        let _ = fs::remove_dir_all(other);
    }
}
