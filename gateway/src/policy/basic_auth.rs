//! `http-basic-authentication`: users and password hashes from a file.
//!
//! The file (mode 0600) holds one `user:hash` per line; hashes are argon2
//! (`$argon2id$...`), bcrypt (`$2b$...`) or `sha256:<hex>`. Argon2 and bcrypt
//! are verified off the worker threads (at most two at a time per policy) and
//! a success is remembered for five minutes, so neither a login burst nor an
//! attacker's guesses can stall the data path. Plain-text passwords in the
//! configuration, as the source gateway's `username`/`password` fields
//! would have them, are refused.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use super::{Deferred, Denial, Policy, PolicyError, RequestView, Verdict, parse};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// Portcullis extension: the credentials file.
    #[serde(default)]
    credentials_file: Option<String>,
}

/// How long a verified (user, password) pair is trusted without hashing again.
const REMEMBER: Duration = Duration::from_mins(5);
/// Password hashes verified at once per policy.
const VERIFIERS: usize = 2;

/// (user, SHA-256 of the password) → when a slow hash last accepted it.
type Verified = HashMap<(String, [u8; 32]), Instant>;

/// Verifies argon2/bcrypt hashes off the workers, a few at a time, remembering successes.
#[derive(Debug)]
pub(super) struct SlowCheck {
    verified: Arc<Mutex<Verified>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl SlowCheck {
    pub(super) fn new() -> Self {
        Self {
            verified: Arc::new(Mutex::new(HashMap::new())),
            permits: Arc::new(tokio::sync::Semaphore::new(VERIFIERS)),
        }
    }

    /// `ok` if `password` matches `hash` for `user`, else 401: at once when remembered, later otherwise.
    pub(super) fn check(&self, user: String, password: Vec<u8>, hash: String, ok: Verdict) -> Verdict {
        let key = (user, digest(&password));
        if self
            .verified
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
            .is_some_and(|t| t.elapsed() < REMEMBER)
        {
            return ok;
        }
        let (verified, permits) = (self.verified.clone(), self.permits.clone());
        Verdict::Later(Deferred(Box::pin(async move {
            let Ok(Ok(_permit)) = tokio::time::timeout(Duration::from_secs(2), permits.acquire_owned()).await
            else {
                return Verdict::Deny(Denial::Unavailable { retry_after: 1 });
            };
            let good = tokio::task::spawn_blocking(move || verify_slow(&password, &hash))
                .await
                .unwrap_or(false);
            if !good {
                return unauthorized();
            }
            if let Ok(mut m) = verified.lock() {
                if m.len() > 100_000 {
                    m.retain(|_, t| t.elapsed() < REMEMBER);
                }
                m.insert(key, Instant::now());
            }
            ok
        })))
    }
}

/// Requires `Authorization: Basic` credentials that match the file.
#[derive(Debug)]
pub struct BasicAuth {
    users: HashMap<String, String>,
    slow: SlowCheck,
}

fn digest(text: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, text);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn unauthorized() -> Verdict {
    Verdict::Deny(Denial::unauthorized(
        "Basic realm=\"portcullis\", charset=\"UTF-8\"",
    ))
}

fn hex(text: &str) -> Option<Vec<u8>> {
    text.len().is_multiple_of(2).then_some(())?;
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks a password against an argon2 or bcrypt hash (slow; off the workers).
fn verify_slow(password: &[u8], hash: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::{PasswordHash, PasswordVerifier};
        return PasswordHash::new(hash)
            .is_ok_and(|h| argon2::Argon2::default().verify_password(password, &h).is_ok());
    }
    bcrypt::verify(password, hash).unwrap_or(false)
}

impl BasicAuth {
    pub(super) fn from_config(config: serde_yaml_ng::Value, base: &Path) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        if c.username.is_some() || c.password.is_some() {
            return Err(PolicyError::Config(
                "username/password in the configuration would be a plain-text secret; list users and password hashes in a file (mode 0600) and give credentialsFile".into(),
            ));
        }
        let file = c
            .credentials_file
            .ok_or_else(|| PolicyError::Config("credentialsFile is required".into()))?;
        let path = Path::new(&file);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        };
        let text =
            crate::config::secret::read_private(&path).map_err(|e| PolicyError::Config(e.to_string()))?;
        let text = std::str::from_utf8(text.expose())
            .map_err(|_| PolicyError::Config(format!("{} is not UTF-8", path.display())))?;
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(PolicyError::Config(format!(
                    "{}:{}: expected user:hash",
                    path.display(),
                    n + 1
                )));
            };
            let known = hash.starts_with("$argon2")
                || ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
                || hash
                    .strip_prefix("sha256:")
                    .and_then(hex)
                    .is_some_and(|h| h.len() == 32);
            if !known {
                return Err(PolicyError::Config(format!(
                    "{}:{}: the hash for `{user}` is not argon2, bcrypt or sha256:<hex>",
                    path.display(),
                    n + 1
                )));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        if users.is_empty() {
            return Err(PolicyError::Config(format!("{} lists no users", path.display())));
        }
        Ok(Self {
            users,
            slow: SlowCheck::new(),
        })
    }
}

impl Policy for BasicAuth {
    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let Some(b64) = request
            .head
            .header("authorization")
            .and_then(|v| v.strip_prefix(b"Basic "))
        else {
            return unauthorized();
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim_ascii()) else {
            return unauthorized();
        };
        let Some(colon) = raw.iter().position(|b| *b == b':') else {
            return unauthorized();
        };
        let (user, password) = (
            String::from_utf8_lossy(&raw[..colon]).into_owned(),
            raw[colon + 1..].to_vec(),
        );
        let Some(hash) = self.users.get(&user).cloned() else {
            return unauthorized();
        };
        if let Some(expected) = hash.strip_prefix("sha256:").and_then(hex) {
            return if same(&digest(&password), &expected) {
                Verdict::Continue
            } else {
                unauthorized()
            };
        }
        self.slow.check(user, password, hash, Verdict::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_and_bcrypt_hashes_verify() {
        use argon2::PasswordHasher;
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(1024, 1, 1, None).unwrap(),
        );
        let hash: argon2::PasswordHash = argon
            .hash_password_with_salt(b"s3cret", b"0123456789abcdef")
            .unwrap();
        let hash = hash.to_string();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_slow(b"s3cret", &hash));
        assert!(!verify_slow(b"wrong", &hash));
        let bc = bcrypt::hash("s3cret", 4).unwrap();
        assert!(verify_slow(b"s3cret", &bc));
        assert!(!verify_slow(b"wrong", &bc));
    }
}
