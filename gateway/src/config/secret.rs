//! Secrets in configuration: where they may come from, and the encrypted format.
//!
//! A field that holds a secret (a private key, a password, a client secret)
//! accepts only a reference: `${file:/path}`, `${credential:NAME}` (a systemd
//! credential, so `LoadCredentialEncrypted=` works), or `${encrypted:v1:...}`
//! made by `portcullis secret encrypt`. Plain text is refused unless written
//! as `{value: ..., dangerous_plaintext: true}` for development, and
//! `${env:...}` is refused outright: environments leak into process listings,
//! crash dumps and child processes. Files holding secrets must not be group
//! or world readable. Resolved values never appear in `Debug` output.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Prefix of the encrypted format, version 1: AES-256-GCM, 96-bit random nonce.
pub const ENCRYPTED_V1: &str = "${encrypted:v1:";
/// Additional data bound into every v1 ciphertext.
const AAD_V1: &[u8] = b"portcullis-secret-v1";
/// Credential name the decryption key is read from when no key file is configured.
pub const KEY_CREDENTIAL: &str = "portcullis-secret-key";

/// A resolved secret; its bytes are wiped on drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a secret field's value comes from, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file readable only by its owner.
    File(PathBuf),
    /// A file in `$CREDENTIALS_DIRECTORY`.
    Credential(String),
    /// `${encrypted:v1:...}`.
    Encrypted(String),
    /// Plain text, accepted only with `dangerous_plaintext: true`.
    DangerousPlaintext,
}

/// Why a secret reference is refused or cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// Plain text where a secret is expected.
    #[error(
        "a secret is never written in plain text: use ${{file:/path}}, ${{credential:NAME}} or a value from `portcullis secret encrypt` (for development only: {{value: ..., dangerous_plaintext: true}})"
    )]
    Plaintext,
    /// `${env:...}` where a secret is expected.
    #[error(
        "environment variables are for non-secret settings only; use ${{file:...}}, ${{credential:...}} or ${{encrypted:...}}"
    )]
    Environment,
    /// A reference that is not one of the known forms (only its scheme is kept).
    #[error("`{0}...}}` is not ${{file:...}}, ${{credential:...}} or ${{encrypted:v1:...}}")]
    Unknown(String),
    /// The file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    /// The file is readable by group or others.
    #[error("{path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    Loose { path: String, mode: u32 },
    /// `${credential:...}` without `$CREDENTIALS_DIRECTORY`.
    #[error(
        "credential `{0}` was asked for but $CREDENTIALS_DIRECTORY is not set; run under systemd with LoadCredential= or LoadCredentialEncrypted="
    )]
    NoCredentials(String),
    /// No key to decrypt `${encrypted:...}` with.
    #[error(
        "no key to decrypt ${{encrypted:...}} values: set spec.secrets.keyFile in the Configuration, or provide the systemd credential `portcullis-secret-key`"
    )]
    NoKey,
    /// The key file does not hold a 256-bit key.
    #[error("{0} does not hold a 256-bit key (base64 of 32 bytes, as `portcullis secret keygen` writes)")]
    BadKey(String),
    /// Decryption failed: wrong key, or the value was altered.
    #[error("cannot decrypt: the value was altered or was encrypted with another key")]
    Decrypt,
    /// The encrypted value is not well-formed.
    #[error("malformed ${{encrypted:v1:...}} value")]
    Malformed,
}

/// Parses a secret field written as a string.
pub fn parse(text: &str, base: &Path) -> Result<SecretSource, SecretError> {
    let t = text.trim();
    if let Some(path) = t.strip_prefix("${file:").and_then(|r| r.strip_suffix('}')) {
        let path = Path::new(path.trim());
        return Ok(SecretSource::File(if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        }));
    }
    if let Some(name) = t.strip_prefix("${credential:").and_then(|r| r.strip_suffix('}')) {
        let name = name.trim();
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(SecretError::Unknown("${credential:".into()));
        }
        return Ok(SecretSource::Credential(name.to_string()));
    }
    if t.starts_with(ENCRYPTED_V1) && t.ends_with('}') {
        return Ok(SecretSource::Encrypted(t.to_string()));
    }
    if t.starts_with("${env:") {
        return Err(SecretError::Environment);
    }
    if t.starts_with("${") {
        let scheme = t.find(':').map_or(t, |i| &t[..=i]);
        return Err(SecretError::Unknown(scheme.to_string()));
    }
    Err(SecretError::Plaintext)
}

/// Reads a file that holds a secret, refusing loose permissions.
pub fn read_private(path: &Path) -> Result<Secret, SecretError> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| SecretError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Loose { path: shown, mode });
    }
    let bytes = fs::read(path).map_err(|e| SecretError::Read {
        path: shown,
        reason: e.to_string(),
    })?;
    Ok(Secret(Zeroizing::new(bytes)))
}

/// Path of a systemd credential.
pub fn credential_path(name: &str) -> Result<PathBuf, SecretError> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
        .ok_or_else(|| SecretError::NoCredentials(name.to_string()))?;
    Ok(PathBuf::from(dir).join(name))
}

/// A decryption key for `${encrypted:...}` values.
pub struct SecretKey(LessSafeKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// Reads a key file (base64 of 32 bytes), refusing loose permissions.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let raw = read_private(path)?;
        let text =
            std::str::from_utf8(raw.expose()).map_err(|_| SecretError::BadKey(path.display().to_string()))?;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| SecretError::BadKey(path.display().to_string()))?,
        );
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| SecretError::BadKey(path.display().to_string()))?;
        Ok(Self(LessSafeKey::new(unbound)))
    }

    /// A new random key, base64-encoded for a key file.
    pub fn generate() -> Result<String, SecretError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| SecretError::NoKey)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()))
    }

    /// Encrypts `plain` into the `${encrypted:v1:...}` form.
    pub fn encrypt(&self, plain: &[u8]) -> Result<String, SecretError> {
        let blob = self.seal(plain, AAD_V1)?;
        Ok(format!(
            "{ENCRYPTED_V1}{}}}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        ))
    }

    /// Decrypts a `${encrypted:v1:...}` value.
    pub fn decrypt(&self, value: &str) -> Result<Secret, SecretError> {
        let body = value
            .trim()
            .strip_prefix(ENCRYPTED_V1)
            .and_then(|r| r.strip_suffix('}'))
            .ok_or(SecretError::Malformed)?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| SecretError::Malformed)?;
        self.open(&blob, AAD_V1).map(Secret)
    }

    /// Encrypts and authenticates `plain` bound to `aad`: random 96-bit nonce, then ciphertext and tag.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; 12];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretError::Malformed)?;
        let mut sealed = Zeroizing::new(plain.to_vec());
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut *sealed)
            .map_err(|_| SecretError::Malformed)?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    /// Opens what [`SecretKey::seal`] made with the same `aad`; fails if anything was altered.
    pub fn open(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        if blob.len() < 12 + 16 {
            return Err(SecretError::Malformed);
        }
        let (nonce, sealed) = blob.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Malformed)?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| SecretError::Decrypt)?;
        Ok(Zeroizing::new(plain.to_vec()))
    }
}

/// Resolves sources to values; holds the decryption key once it is needed.
#[derive(Debug)]
pub struct Resolver {
    key_file: Option<PathBuf>,
    key: Option<Result<SecretKey, SecretError>>,
}

impl Resolver {
    /// A resolver using `key_file` (or the systemd credential) for encrypted values.
    pub fn new(key_file: Option<PathBuf>) -> Self {
        Self { key_file, key: None }
    }

    fn key(&mut self) -> Result<&SecretKey, SecretError> {
        if self.key.is_none() {
            let loaded = match &self.key_file {
                Some(path) => SecretKey::from_file(path),
                None => match credential_path(KEY_CREDENTIAL) {
                    Ok(path) if path.exists() => SecretKey::from_file(&path),
                    _ => Err(SecretError::NoKey),
                },
            };
            self.key = Some(loaded);
        }
        match self.key.as_ref() {
            Some(Ok(key)) => Ok(key),
            Some(Err(e)) => Err(e.clone()),
            None => Err(SecretError::NoKey),
        }
    }

    /// The value behind `source` (`plaintext` is the inline value, when allowed).
    pub fn resolve(&mut self, source: &SecretSource, plaintext: Option<&str>) -> Result<Secret, SecretError> {
        match source {
            SecretSource::File(path) => read_private(path),
            SecretSource::Credential(name) => read_private(&credential_path(name)?),
            SecretSource::Encrypted(value) => self.key()?.decrypt(value),
            SecretSource::DangerousPlaintext => Ok(Secret(Zeroizing::new(
                plaintext.unwrap_or_default().as_bytes().to_vec(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_in(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join(format!("key-{mode:o}"));
        fs::write(&path, SecretKey::generate().unwrap()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn encrypt_round_trip_and_tamper_detection() {
        let dir = std::env::temp_dir().join(format!("pc-secret-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let key = SecretKey::from_file(&key_in(&dir, 0o600)).unwrap();
        let sealed = key.encrypt(b"hunter2").unwrap();
        assert!(sealed.starts_with(ENCRYPTED_V1) && !sealed.contains("hunter2"));
        assert_eq!(key.decrypt(&sealed).unwrap().expose(), b"hunter2");
        let other = SecretKey::from_file(&dir.join("key-600"))
            .map(|_| ())
            .and(SecretKey::from_file(&key_in(&dir, 0o400)));
        assert_eq!(
            other.unwrap().decrypt(&sealed).unwrap_err(),
            SecretError::Decrypt,
            "another key"
        );
        let mut tampered = sealed.clone().into_bytes();
        let i = ENCRYPTED_V1.len() + 20;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            key.decrypt(&String::from_utf8(tampered).unwrap()).unwrap_err(),
            SecretError::Decrypt
        );
        assert_eq!(
            key.decrypt("${encrypted:v1:abc}").unwrap_err(),
            SecretError::Malformed
        );
        assert!(matches!(
            SecretKey::from_file(&key_in(&dir, 0o644)),
            Err(SecretError::Loose { mode: 0o644, .. })
        ));
        assert_eq!(
            format!("{:?}", key.decrypt(&sealed).unwrap()),
            "Secret(<redacted>)"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn references_are_parsed_and_plain_text_refused() {
        let base = Path::new("/etc/portcullis");
        assert_eq!(
            parse("${file:k.pem}", base),
            Ok(SecretSource::File(base.join("k.pem")))
        );
        assert_eq!(
            parse("${credential:redis}", base),
            Ok(SecretSource::Credential("redis".into()))
        );
        assert_eq!(parse("hunter2", base), Err(SecretError::Plaintext));
        assert_eq!(parse("${env:PASSWORD}", base), Err(SecretError::Environment));
        assert!(matches!(parse("${vault:x}", base), Err(SecretError::Unknown(_))));
        assert!(matches!(
            parse("${credential:../x}", base),
            Err(SecretError::Unknown(_))
        ));
    }
}
