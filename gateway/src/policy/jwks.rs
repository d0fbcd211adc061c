//! Signing keys for `jwt-validation` from a JWKS URL.
//!
//! Keys are cached per URL for the whole process, so a reload keeps them. They
//! are fetched once when the policy is first built (bounded by the connection
//! timeout, at most [`FIRST_FETCH_LIMIT`]), then refreshed on a thread of their
//! own when their time to live ends, or when a token names a key id the set
//! does not have (a rotation), at most every [`RETRY_EVERY`]. The request path
//! never waits on the network: it uses the keys in hand. A refresh that fails
//! keeps the old keys and logs a warning; until a first fetch succeeds, the
//! policy is not ready and the Gatekeeper answers 503 for its API instance,
//! so no token is ever let through unchecked.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};

/// Longest the first fetch may hold up building the policy.
pub const FIRST_FETCH_LIMIT: Duration = Duration::from_secs(2);
/// Shortest time between two refreshes asked for by unknown key ids or missing keys.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// Largest JWKS document accepted.
const MAX_DOCUMENT: usize = 1 << 20;

/// Which keys of a set fit the configured `signingMethod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `kty: RSA`.
    Rsa,
    /// `kty: EC`.
    Ec,
    /// `kty: OKP` (Ed25519).
    Ed,
}

impl Family {
    fn fits(self, params: &AlgorithmParameters) -> bool {
        matches!(
            (self, params),
            (Self::Rsa, AlgorithmParameters::RSA(_))
                | (Self::Ec, AlgorithmParameters::EllipticCurve(_))
                | (Self::Ed, AlgorithmParameters::OctetKeyPair(_))
        )
    }
}

/// Where the set is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("jwksUrl `{url}`: expected an http:// or https:// URL"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p
                    .parse()
                    .map_err(|_| format!("jwksUrl `{url}`: bad port `{p}`"))?;
                (h, port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("jwksUrl `{url}`: no host"));
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            path: if path.is_empty() { "/".into() } else { path.into() },
        })
    }
}

/// Keys in hand.
struct Keys {
    keys: Vec<(Option<String>, Arc<DecodingKey>)>,
    fetched: Instant,
}

/// What a token's key id finds.
pub enum Lookup {
    /// Keys to try, the one named by the key id first.
    Keys(Vec<Arc<DecodingKey>>),
    /// No key has been fetched yet.
    NotLoaded,
    /// The set has no key with this id.
    UnknownKid,
}

/// One URL's keys, shared by every policy that names it.
pub struct Jwks {
    url: String,
    target: Target,
    family: Family,
    timeout: Duration,
    ttl: Duration,
    keys: RwLock<Option<Keys>>,
    refreshing: AtomicBool,
    last_try: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

type Cache = Mutex<HashMap<(String, Family), Arc<Jwks>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

/// The keys served at `url` for `family`: the process-wide cache's, or a new
/// entry fetched once now (a failure is logged; requests get 503 until a
/// fetch succeeds).
pub fn shared(url: &str, family: Family, timeout: Duration, ttl: Duration) -> Result<Arc<Jwks>, String> {
    let target = Target::parse(url)?;
    let key = (url.to_owned(), family);
    if let Some(found) = cache().lock().map_err(|_| "JWKS cache poisoned")?.get(&key) {
        return Ok(found.clone());
    }
    let jwks = Arc::new(Jwks {
        url: url.to_owned(),
        target,
        family,
        timeout,
        ttl,
        keys: RwLock::new(None),
        refreshing: AtomicBool::new(false),
        last_try: Mutex::new(Some(Instant::now())),
    });
    if let Err(e) = jwks.refresh(timeout.min(FIRST_FETCH_LIMIT)) {
        tracing::warn!(url, error = %e, "JWKS not fetched; requests get 503 until it is");
    }
    cache()
        .lock()
        .map_err(|_| "JWKS cache poisoned")?
        .entry(key)
        .or_insert(jwks.clone());
    Ok(jwks)
}

impl Jwks {
    /// The keys to try for a token with key id `kid`; asks for a refresh in the
    /// background when the keys are missing, stale or lack `kid`.
    pub fn lookup(self: &Arc<Self>, kid: Option<&str>) -> Lookup {
        let (found, stale) = {
            let Ok(guard) = self.keys.read() else {
                return Lookup::NotLoaded;
            };
            match guard.as_ref() {
                None => (Lookup::NotLoaded, true),
                Some(keys) => {
                    let stale = keys.fetched.elapsed() > self.ttl;
                    let found = match kid {
                        Some(kid) => keys
                            .keys
                            .iter()
                            .find(|(k, _)| k.as_deref() == Some(kid))
                            .map_or(Lookup::UnknownKid, |(_, key)| Lookup::Keys(vec![key.clone()])),
                        None => Lookup::Keys(keys.keys.iter().map(|(_, key)| key.clone()).collect()),
                    };
                    (found, stale)
                }
            }
        };
        let wanted = !matches!(found, Lookup::Keys(_));
        if stale || wanted {
            self.refresh_in_background(wanted);
        }
        found
    }

    /// Whether keys are in hand; asks for them in the background when not.
    pub fn loaded(self: &Arc<Self>) -> bool {
        let loaded = self.keys.read().is_ok_and(|k| k.is_some());
        if !loaded {
            self.refresh_in_background(true);
        }
        loaded
    }

    fn refresh_in_background(self: &Arc<Self>, urgent: bool) {
        if let Ok(mut last) = self.last_try.lock() {
            let recent = last.is_some_and(|t| t.elapsed() < RETRY_EVERY);
            if urgent && recent {
                return;
            }
            if self.refreshing.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        } else {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("jwks-refresh".into())
            .spawn(move || {
                if let Err(e) = me.refresh(me.timeout) {
                    tracing::warn!(url = %me.url, error = %e, "JWKS refresh failed; the keys in hand stay");
                }
                me.refreshing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.refreshing.store(false, Ordering::Release);
        }
    }

    fn refresh(&self, timeout: Duration) -> Result<(), String> {
        let body = get(&self.target, timeout)?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let keys: Vec<(Option<String>, Arc<DecodingKey>)> = set
            .keys
            .iter()
            .filter(|jwk| self.family.fits(&jwk.algorithm))
            .filter_map(|jwk| {
                DecodingKey::from_jwk(jwk)
                    .ok()
                    .map(|key| (jwk.common.key_id.clone(), Arc::new(key)))
            })
            .collect();
        if keys.is_empty() {
            return Err("the set has no key of the configured signingMethod".into());
        }
        tracing::info!(url = %self.url, keys = keys.len(), "JWKS fetched");
        if let Ok(mut guard) = self.keys.write() {
            *guard = Some(Keys {
                keys,
                fetched: Instant::now(),
            });
        }
        Ok(())
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| e.to_string())
        })
        .clone()
}

/// `GET` of the set (HTTP/1.0, so the body ends at close), with `timeout` for
/// connecting and for each read and write.
fn get(target: &Target, timeout: Duration) -> Result<Vec<u8>, String> {
    let addr = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("{}: no address", target.host))?;
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: portcullis\r\n\r\n",
        target.path, target.host
    );
    let raw = if target.tls {
        let name = rustls_pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("{}: {e}", target.host))?;
        let conn = rustls::ClientConnection::new(tls_config()?, name).map_err(|e| e.to_string())?;
        exchange(rustls::StreamOwned::new(conn, tcp), &request)?
    } else {
        exchange(tcp, &request)?
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete response head")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("answered {}", head.lines().next().unwrap_or("")));
    }
    Ok(raw[end + 4..].to_vec())
}

fn exchange(mut stream: impl std::io::Read + std::io::Write, request: &str) -> Result<Vec<u8>, String> {
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&chunk[..n]);
                if raw.len() > MAX_DOCUMENT {
                    return Err(format!("the document is larger than {MAX_DOCUMENT} bytes"));
                }
            }
            // A TLS peer that closes without close_notify: the body ended at close anyway.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        let t = Target::parse("https://idp.example/.well-known/jwks.json").expect("valid");
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "idp.example", 443, "/.well-known/jwks.json")
        );
        let t = Target::parse("http://10.0.0.1:8081").expect("valid");
        assert_eq!((t.tls, t.port, t.path.as_str()), (false, 8081, "/"));
        let t = Target::parse("http://[::1]:9/keys").expect("valid");
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        for bad in ["ftp://x/", "https://", "http://h:port/"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
