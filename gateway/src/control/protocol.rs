//! The messages of the control-plane protocol (JSON over HTTP/1.1 + TLS) and
//! the registration token.

use serde::{Deserialize, Serialize};

use super::{ControlError, hex};

/// `POST /v1/register`, without a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The one-time registration token.
    pub token: String,
    /// The replica's name.
    pub replica: String,
    /// A PEM certificate signing request for the replica's key.
    pub csr: String,
}

/// `POST /v1/renew`, with the current client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// A PEM certificate signing request for the replica's new key.
    pub csr: String,
}

/// The answer to a registration or renewal: the replica's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The gateway cluster the replica belongs to.
    pub cluster: String,
    /// The replica's certificate (PEM).
    pub certificate: String,
    /// The control plane's CA certificate (PEM).
    pub ca: String,
    /// When the certificate expires (Unix seconds).
    pub expires_unix: u64,
}

/// A cluster's desired state as one numbered, immutable snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The gateway cluster.
    pub cluster: String,
    /// Increases with every published change.
    pub version: u64,
    /// When it was published (Unix seconds).
    pub published_unix: u64,
    /// `(file name, YAML)` of every resource file, as local mode reads them.
    pub files: Vec<(String, String)>,
}

/// A refusal's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What was refused and why.
    pub error: String,
}

/// Prefix of every registration token.
const TOKEN_PREFIX: &str = "pct1";

/// A registration token: the CA's SHA-256 fingerprint (so a registering
/// gateway authenticates the control plane on first contact) and a secret the
/// control plane knows only by its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// SHA-256 of the CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
    /// The secret part.
    pub secret: String,
}

impl Token {
    /// The token as written: `pct1.<fingerprint hex>.<secret>`.
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}.{}.{}", hex(&self.ca_fingerprint), self.secret)
    }

    /// Parses a written token.
    pub fn parse(text: &str) -> Result<Self, ControlError> {
        let bad = || ControlError::Token("expected pct1.<64 hex digits>.<secret>".into());
        let mut parts = text.trim().split('.');
        let (Some(TOKEN_PREFIX), Some(fp), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        // Hex digits only before slicing by byte: a multi-byte character would split.
        if fp.len() != 64
            || !fp.bytes().all(|b| b.is_ascii_hexdigit())
            || secret.len() < 32
            || !secret.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(bad());
        }
        let mut ca_fingerprint = [0u8; 32];
        for (i, byte) in ca_fingerprint.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&fp[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self {
            ca_fingerprint,
            secret: secret.to_owned(),
        })
    }

    /// SHA-256 of the secret, as the control plane stores it.
    pub fn secret_hash(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes()).as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_malformed_ones_are_refused() {
        let token = Token {
            ca_fingerprint: [0xab; 32],
            secret: "A".repeat(43),
        };
        assert_eq!(Token::parse(&token.encode()).expect("valid"), token);
        for bad in [
            "",
            "pct1",
            &format!("pct2.{}.{}", "ab".repeat(32), "A".repeat(43)),
            &format!("pct1.{}.{}", "ab".repeat(31), "A".repeat(43)),
            &format!("pct1.{}.{}", "zz".repeat(32), "A".repeat(43)),
            &format!("pct1.{}.short", "ab".repeat(32)),
            &format!("pct1.{}.{}.x", "ab".repeat(32), "A".repeat(43)),
            // 64 bytes, but a three-byte character across a digit pair: refused, never a panic.
            &format!("pct1.a€{}.{}", "ab".repeat(30), "A".repeat(43)),
        ] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
    }
}
