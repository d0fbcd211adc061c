//! `portcullis control-plane serve`: registration, renewal and snapshots over
//! HTTP/1.1 + TLS, one thread per connection, each request authenticated by
//! the replica's client certificate (registration by its one-time token).
//!
//! Desired state lives in `<dir>/clusters/<cluster>/*.yaml`, the same
//! resources local mode reads. The directory is read every
//! [`SCAN_EVERY`]; a cluster whose files changed and still validate (the same
//! loader, the same located errors) is published as the next numbered
//! snapshot. Files that do not validate are logged and the previous snapshot
//! stays published.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::ca::{self, Ca};
use super::protocol::{Issued, Refusal, RegisterRequest, RenewRequest, Snapshot, Token};
use super::state::{Replica, Store, TokenRecord};
use super::{ControlError, hex, now_unix};
use crate::config::{self, ConfigErrors, MemSource, Source as _};
use crate::http::{self, HeadLimits};

/// How often the clusters' directories are read for changes.
pub const SCAN_EVERY: Duration = Duration::from_millis(50);
/// Longest a snapshot request waits for a newer version before answering 204.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// What `control-plane serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The control plane's directory (`control-plane init`).
    pub dir: PathBuf,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Lifetime of the certificates it issues.
    pub cert_lifetime: Duration,
}

/// The snapshots published now, by cluster.
#[derive(Debug, Default)]
struct Published {
    by_cluster: Mutex<HashMap<String, Arc<Snapshot>>>,
    changed: Condvar,
}

struct Plane {
    ca: Ca,
    store: Store,
    published: Published,
    lifetime: Duration,
}

/// Creates the control plane's CA and server certificate in `dir`.
pub fn init(dir: &Path, sans: &[String]) -> Result<String, ControlError> {
    Ca::init(dir, sans)?;
    std::fs::create_dir_all(dir.join("clusters")).map_err(super::io_error(dir))?;
    Ok(hex(&Ca::open(dir)?.fingerprint()))
}

/// A new one-time registration token for `cluster`, valid for `ttl`.
pub fn create_token(dir: &Path, cluster: &str, ttl: Duration) -> Result<String, ControlError> {
    let ca = Ca::open(dir)?;
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| ControlError::Pki("no randomness for a token".into()))?;
    let token = Token {
        ca_fingerprint: ca.fingerprint(),
        secret: hex(&secret),
    };
    let record = TokenRecord {
        secret_sha256: token.secret_hash(),
        cluster: cluster.to_owned(),
        expires_unix: now_unix() + ttl.as_secs(),
        used: false,
    };
    Store::new(dir).edit(|state| {
        state.tokens.push(record);
        Ok(())
    })?;
    tracing::info!(target: "audit", cluster, ttl_s = ttl.as_secs(), "registration token created");
    Ok(token.encode())
}

/// Revokes `replica`: its certificates are refused from its next request on.
pub fn revoke(dir: &Path, replica: &str) -> Result<(), ControlError> {
    Store::new(dir).edit(|state| match state.replicas.get_mut(replica) {
        Some(r) => {
            r.revoked = true;
            Ok(())
        }
        None => Err(ControlError::Pki(format!(
            "no replica named `{replica}` is registered"
        ))),
    })?;
    tracing::info!(target: "audit", replica, "replica revoked");
    Ok(())
}

/// Serves until the process ends.
pub fn serve(options: &ServeOptions) -> Result<(), ControlError> {
    let ca = Ca::open(&options.dir)?;
    let tls = ca.server_config()?;
    let plane = Arc::new(Plane {
        ca,
        store: Store::new(&options.dir),
        published: Published::default(),
        lifetime: options.cert_lifetime,
    });
    plane.scan(&options.dir.join("clusters"));
    let listener = TcpListener::bind(options.listen).map_err(|source| ControlError::Unreachable {
        url: options.listen.to_string(),
        source,
    })?;
    tracing::info!(listen = %options.listen, dir = %options.dir.display(), "control plane serving");
    let scanner = plane.clone();
    let clusters = options.dir.join("clusters");
    std::thread::Builder::new()
        .name("cp-scan".into())
        .spawn(move || {
            loop {
                std::thread::sleep(SCAN_EVERY);
                scanner.scan(&clusters);
            }
        })
        .map_err(super::io_error(&options.dir))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (plane, tls) = (plane.clone(), tls.clone());
        let _ = std::thread::Builder::new()
            .name("cp-conn".into())
            .spawn(move || plane.connection(stream, &tls));
    }
    Ok(())
}

/// An answer: status and JSON body.
type Answer = (u16, Vec<u8>);

fn json<T: serde::Serialize>(status: u16, body: &T) -> Answer {
    (status, serde_json::to_vec(body).unwrap_or_default())
}

fn refuse(status: u16, error: impl Into<String>) -> Answer {
    json(status, &Refusal { error: error.into() })
}

/// Most certificates of one replica valid at once (renewals whose answers were lost).
const MAX_SERIALS: usize = 8;

/// Drops the serials issued before `presented` from a replica's record
/// (they are superseded), keeping room for one more within [`MAX_SERIALS`].
fn keep_from(serials: &mut Vec<String>, presented: &str) {
    if let Some(at) = serials.iter().position(|s| ca::same_serial(s, presented)) {
        serials.drain(..at);
    }
    let excess = serials.len().saturating_sub(MAX_SERIALS - 1);
    // The one presented stays, whatever was issued after it.
    if excess > 0 {
        serials.drain(1..=excess);
    }
}

/// Hash of a cluster's files, to tell a change from a rescan.
fn files_hash(files: &[(String, String)]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, text) in files {
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(text.as_bytes());
        ctx.update(&[0]);
    }
    hex(ctx.finish().as_ref())
}

impl Plane {
    /// Publishes every cluster whose files changed and validate.
    fn scan(&self, clusters: &Path) {
        let Ok(entries) = std::fs::read_dir(clusters) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(cluster) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if path.is_dir() {
                self.scan_cluster(&cluster, &path);
            }
        }
    }

    fn scan_cluster(&self, cluster: &str, dir: &Path) {
        let files = match config::DirSource(dir.to_path_buf()).files() {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(cluster, error = %e, "cluster files unreadable; the published snapshot stays");
                return;
            }
        };
        let hash = files_hash(&files);
        let current = self
            .published
            .by_cluster
            .lock()
            .ok()
            .and_then(|m| m.get(cluster).cloned());
        if current.as_ref().is_some_and(|s| files_hash(&s.files) == hash) {
            return;
        }
        if let Err(errors) = config::load(&MemSource {
            files: files.clone(),
            base: dir.to_path_buf(),
        }) {
            log_invalid(cluster, &errors);
            return;
        }
        let published = self.store.edit(|state| {
            let entry = state
                .versions
                .entry(cluster.to_owned())
                .or_insert((0, String::new()));
            if entry.1 != hash {
                *entry = (entry.0 + 1, hash.clone());
            }
            Ok(entry.0)
        });
        let version = match published {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(cluster, error = %e, "snapshot not published: the state file cannot be written");
                return;
            }
        };
        let snapshot = Arc::new(Snapshot {
            cluster: cluster.to_owned(),
            version,
            published_unix: now_unix(),
            files,
        });
        if let Ok(mut by_cluster) = self.published.by_cluster.lock() {
            by_cluster.insert(cluster.to_owned(), snapshot);
        }
        self.published.changed.notify_all();
        tracing::info!(target: "audit", cluster, version, "snapshot published");
    }

    fn connection(&self, tcp: TcpStream, tls: &Arc<rustls::ServerConfig>) {
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
        let Ok(conn) = rustls::ServerConnection::new(tls.clone()) else {
            return;
        };
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        let Some((head, body)) = read_request(&mut stream) else {
            return;
        };
        let peer = stream
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| ca::identity(c));
        let (status, body) = match (head.method(), head.path()) {
            ("POST", "/v1/register") => self.register(&body),
            ("POST", "/v1/renew") => self.with_replica(peer.as_ref(), |name, serial, replica| {
                self.renew(name, serial, replica, &body)
            }),
            ("GET", "/v1/snapshot") => {
                let param = |key: &str| {
                    head.target()
                        .split_once('?')
                        .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix(key)))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                let after = param("after=").unwrap_or(0);
                let wait = param("wait=").map_or(LONG_POLL, |s| Duration::from_secs(s).min(LONG_POLL));
                self.with_replica(peer.as_ref(), |name, _, replica| {
                    self.snapshot(name, replica, after, wait)
                })
            }
            _ => refuse(404, "no such endpoint"),
        };
        let content_type = if status == 204 {
            "text/plain"
        } else {
            "application/json"
        };
        let response = http::simple_response(status, &[], content_type, &body, head.version, false);
        let _ = stream.write_all(&response);
        let _ = stream.flush();
        stream.conn.send_close_notify();
        let _ = stream.flush();
    }

    /// Runs `f` for the registered, unrevoked replica of the client
    /// certificate, with the serial it presented.
    fn with_replica(
        &self,
        peer: Option<&(String, String)>,
        f: impl FnOnce(&str, &str, &Replica) -> Answer,
    ) -> Answer {
        let Some((name, serial)) = peer else {
            return refuse(
                401,
                "a client certificate issued by this control plane is required",
            );
        };
        let state = match self.store.read() {
            Ok(s) => s,
            Err(e) => return refuse(503, e.to_string()),
        };
        match state.replicas.get(name) {
            Some(r) if r.revoked => {
                tracing::info!(target: "audit", replica = %name, "refused: revoked");
                refuse(
                    403,
                    format!("replica `{name}` is revoked; register it again with a new token"),
                )
            }
            Some(r) if r.serials.iter().any(|s| ca::same_serial(s, serial)) => f(name, serial, r),
            _ => refuse(
                403,
                format!("certificate {serial} of `{name}` is not one this control plane issued"),
            ),
        }
    }

    fn register(&self, body: &[u8]) -> Answer {
        let Ok(request) = serde_json::from_slice::<RegisterRequest>(body) else {
            return refuse(400, "expected {\"token\", \"replica\", \"csr\"}");
        };
        let name = request.replica.as_str();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return refuse(400, "a replica name is 1-64 letters, digits, '-', '_' or '.'");
        }
        let Ok(token) = Token::parse(&request.token) else {
            return refuse(401, "malformed registration token");
        };
        let hash = token.secret_hash();
        let outcome = self.store.edit(|state| {
            let Some(record) = state.tokens.iter_mut().find(|t| t.secret_sha256 == hash) else {
                return Err(ControlError::Token("unknown, already used or expired".into()));
            };
            record.used = true;
            let cluster = record.cluster.clone();
            let cert = self.ca.issue(&request.csr, name, self.lifetime)?;
            state.replicas.insert(
                name.to_owned(),
                Replica {
                    cluster: cluster.clone(),
                    serials: vec![cert.serial.clone()],
                    expires_unix: cert.expires_unix,
                    revoked: false,
                },
            );
            Ok((cluster, cert))
        });
        match outcome {
            Ok((cluster, cert)) => {
                tracing::info!(target: "audit", replica = name, cluster, serial = cert.serial, expires_unix = cert.expires_unix, "replica registered");
                self.issued(cluster, cert)
            }
            Err(ControlError::Token(why)) => {
                tracing::info!(target: "audit", replica = name, "registration refused: token {why}");
                refuse(401, format!("registration token {why}"))
            }
            Err(e) => refuse(400, e.to_string()),
        }
    }

    /// The answer carrying a certificate issued to a replica of `cluster`.
    fn issued(&self, cluster: String, cert: ca::IssuedCert) -> Answer {
        json(
            200,
            &Issued {
                cluster,
                certificate: cert.pem,
                ca: self.ca.cert_pem().to_owned(),
                expires_unix: cert.expires_unix,
            },
        )
    }

    fn renew(&self, name: &str, serial: &str, replica: &Replica, body: &[u8]) -> Answer {
        let Ok(request) = serde_json::from_slice::<RenewRequest>(body) else {
            return refuse(400, "expected {\"csr\"}");
        };
        let cluster = replica.cluster.clone();
        let outcome = self.store.edit(|state| {
            let cert = self.ca.issue(&request.csr, name, self.lifetime)?;
            if let Some(r) = state.replicas.get_mut(name) {
                // The certificate the replica renews with stays valid, with
                // every one issued since (an answer it never received).
                keep_from(&mut r.serials, serial);
                r.serials.push(cert.serial.clone());
                r.expires_unix = cert.expires_unix;
            }
            Ok(cert)
        });
        match outcome {
            Ok(cert) => {
                tracing::info!(target: "audit", replica = name, cluster, serial = cert.serial, expires_unix = cert.expires_unix, "replica renewed");
                self.issued(cluster, cert)
            }
            Err(e) => refuse(400, e.to_string()),
        }
    }

    /// The cluster's snapshot once its version is above `after` (204 after
    /// `wait`, at most [`LONG_POLL`]).
    fn snapshot(&self, name: &str, replica: &Replica, after: u64, wait: Duration) -> Answer {
        let deadline = Instant::now() + wait;
        let Ok(mut by_cluster) = self.published.by_cluster.lock() else {
            return refuse(503, "control plane state poisoned");
        };
        loop {
            if let Some(s) = by_cluster.get(&replica.cluster).filter(|s| s.version > after) {
                tracing::info!(target: "audit", replica = name, cluster = %s.cluster, version = s.version, "snapshot served");
                return json(200, s.as_ref());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (204, Vec::new());
            }
            // Re-checked every second: a revocation also ends a waiting request.
            let wait = left.min(Duration::from_secs(1));
            by_cluster = match self.published.changed.wait_timeout(by_cluster, wait) {
                Ok((guard, _)) => guard,
                Err(_) => return refuse(503, "control plane state poisoned"),
            };
            if self
                .store
                .read()
                .is_ok_and(|s| s.replicas.get(name).is_none_or(|r| r.revoked))
            {
                tracing::info!(target: "audit", replica = %name, "refused: revoked");
                return refuse(403, format!("replica `{name}` is revoked"));
            }
        }
    }
}

fn log_invalid(cluster: &str, errors: &ConfigErrors) {
    for e in &errors.0 {
        tracing::error!(cluster, error = %e, "configuration error");
    }
    tracing::error!(
        cluster,
        errors = errors.0.len(),
        "snapshot not published: the previous one stays; fix the errors above"
    );
}

/// Reads one request head and its `Content-Length` body.
fn read_request(stream: &mut impl Read) -> Option<(http::Head, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = http::head_end(&buf) {
            let head = http::parse_request(&buf[..end], &HeadLimits::default()).ok()?;
            let mut body = buf[end..].to_vec();
            let want = match head.framing {
                http::Framing::Length(n) => usize::try_from(n).ok().filter(|n| *n <= MAX_BODY)?,
                http::Framing::Empty => 0,
                _ => return None,
            };
            while body.len() < want {
                let n = stream.read(&mut chunk).ok().filter(|n| *n > 0)?;
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(want);
            return Some((head, body));
        }
        if buf.len() > 16 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_renewal_keeps_the_certificate_it_was_made_with_and_those_after_it() {
        let mut serials = owned(&["a1", "b2"]);
        keep_from(&mut serials, "b2");
        assert_eq!(serials, owned(&["b2"]), "the new one in use: the old goes");
        // An answer lost: the replica renews with b2 again, then again.
        let mut serials = owned(&["b2", "c3"]);
        keep_from(&mut serials, "b2");
        assert_eq!(serials, owned(&["b2", "c3"]));
        let mut serials = owned(&["5a", "6b"]);
        keep_from(&mut serials, "005a");
        assert_eq!(
            serials,
            owned(&["5a", "6b"]),
            "a record with its zero byte matches"
        );
        let mut serials: Vec<String> = (0..12).map(|i| format!("{i:02x}")).collect();
        keep_from(&mut serials, "00");
        assert_eq!(serials.len(), MAX_SERIALS - 1);
        assert_eq!(serials[0], "00", "the one presented stays");
        assert_eq!(serials.last().map(String::as_str), Some("0b"), "and the newest");
    }
}
