//! The gateway's side: `portcullis register`, and the connection a
//! registered replica keeps to its control plane (long-polled snapshots,
//! jittered reconnects, never on the data path).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls_pki_types::ServerName;

use super::ca;
use super::protocol::{Issued, Refusal, RegisterRequest, Snapshot, Token};
use super::{ControlError, create_private, read_private};
use crate::config::{RegistrationConfig, parse_url};

/// Names of the files `portcullis register` writes into its output directory.
pub const REGISTRATION_FILE: &str = "registration.yaml";
const KEY_FILE: &str = "replica.key";
const CERT_FILE: &str = "replica.crt";
const CA_FILE: &str = "ca.crt";

/// How long connecting and each exchange may take (a snapshot wait is longer).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a control plane is reached.
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    addr: SocketAddr,
    name: ServerName<'static>,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, ControlError> {
        let protocol = |reason: String| ControlError::Protocol {
            url: url.to_owned(),
            reason,
        };
        let parsed = parse_url(url).map_err(protocol)?;
        if !parsed.tls {
            return Err(protocol("the control plane is reached over https:// only".into()));
        }
        let addr = (parsed.host.as_str(), parsed.port)
            .to_socket_addrs()
            .map_err(|source| ControlError::Unreachable {
                url: url.to_owned(),
                source,
            })?
            .next()
            .ok_or_else(|| protocol("the host resolves to no address".into()))?;
        let name = ServerName::try_from(parsed.host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| protocol(format!("server name: {e}")))?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            addr,
            name,
        })
    }

    /// One request over a new TLS connection: the status and body of the answer.
    fn exchange(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        request: &str,
        body: &[u8],
        wait: Duration,
    ) -> Result<(u16, Vec<u8>), ControlError> {
        let unreachable = |source| ControlError::Unreachable {
            url: self.url.clone(),
            source,
        };
        let tcp = TcpStream::connect_timeout(&self.addr, EXCHANGE_TIMEOUT).map_err(unreachable)?;
        tcp.set_read_timeout(Some(wait)).map_err(unreachable)?;
        tcp.set_write_timeout(Some(EXCHANGE_TIMEOUT))
            .map_err(unreachable)?;
        let conn = rustls::ClientConnection::new(tls.clone(), self.name.clone()).map_err(|e| {
            ControlError::Protocol {
                url: self.url.clone(),
                reason: e.to_string(),
            }
        })?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        let head = format!(
            "{request} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(unreachable)?;
        stream.write_all(body).map_err(unreachable)?;
        stream.flush().map_err(unreachable)?;
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) => {}
            // A peer that closes without close_notify still answered.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
            Err(e) => return Err(unreachable(e)),
        }
        let protocol = |reason: &str| ControlError::Protocol {
            url: self.url.clone(),
            reason: reason.to_owned(),
        };
        let end = crate::http::head_end(&answer).ok_or_else(|| protocol("no complete response"))?;
        let head = crate::http::parse_response(&answer[..end], 64).map_err(|e| protocol(&e.to_string()))?;
        Ok((head.status, answer[end..].to_vec()))
    }

    fn refused(&self, status: u16, body: &[u8]) -> ControlError {
        let reason = serde_json::from_slice::<Refusal>(body)
            .map_or_else(|_| String::from_utf8_lossy(body).into_owned(), |r| r.error);
        ControlError::Refused {
            url: self.url.clone(),
            status,
            reason,
        }
    }
}

/// A new key pair and a CSR for `replica` (the key never leaves this host).
fn key_and_csr(replica: &str) -> Result<(KeyPair, String), ControlError> {
    let key = KeyPair::generate().map_err(|e| ControlError::Pki(format!("key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, replica);
    params.distinguished_name = name;
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| ControlError::Pki(format!("signing request: {e}")))?;
    Ok((key, csr))
}

/// What `portcullis register` wrote.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The registration file.
    pub file: PathBuf,
    /// The cluster the control plane put the replica in.
    pub cluster: String,
    /// When its certificate expires (Unix seconds).
    pub expires_unix: u64,
}

/// Registers `replica` with the control plane at `url` using `token`, and
/// writes the registration file, key, certificate and CA bundle to `out`
/// (all 0600, refusing to overwrite).
pub fn register(url: &str, token: &str, replica: &str, out: &Path) -> Result<Registered, ControlError> {
    let token = Token::parse(token)?;
    let endpoint = Endpoint::parse(url)?;
    let files = [REGISTRATION_FILE, KEY_FILE, CERT_FILE, CA_FILE].map(|f| out.join(f));
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        return Err(ControlError::Exists {
            path: existing.clone(),
        });
    }
    let (key, csr) = key_and_csr(replica)?;
    let request = serde_json::to_vec(&RegisterRequest {
        token: token.encode(),
        replica: replica.to_owned(),
        csr,
    })
    .map_err(|e| ControlError::Pki(e.to_string()))?;
    let tls = ca::pinned_client(token.ca_fingerprint)?;
    let (status, body) = endpoint.exchange(&tls, "POST /v1/register", &request, EXCHANGE_TIMEOUT)?;
    if status != 200 {
        return Err(endpoint.refused(status, &body));
    }
    let issued: Issued = serde_json::from_slice(&body).map_err(|e| ControlError::Protocol {
        url: endpoint.url.clone(),
        reason: format!("registration answer: {e}"),
    })?;
    std::fs::create_dir_all(out).map_err(super::io_error(out))?;
    create_private(&files[1], key.serialize_pem().as_bytes())?;
    create_private(&files[2], issued.certificate.as_bytes())?;
    create_private(&files[3], issued.ca.as_bytes())?;
    let registration = registration_text(
        replica,
        &issued.cluster,
        &endpoint.url,
        CERT_FILE,
        KEY_FILE,
        CA_FILE,
    );
    create_private(&files[0], registration.as_bytes())?;
    Ok(Registered {
        file: files[0].clone(),
        cluster: issued.cluster,
        expires_unix: issued.expires_unix,
    })
}

/// The registration resource naming these files (relative to its directory).
fn registration_text(replica: &str, cluster: &str, url: &str, cert: &str, key: &str, ca: &str) -> String {
    format!(
        "# Written by `portcullis register`; keep it and the files it names private (0600).
apiVersion: portcullis.dev/v1alpha1
kind: Registration
metadata:
  name: {replica}
spec:
  cluster: {cluster}
  controlPlane: {url}
  certificate: {cert}
  key: {key}
  caBundle: {ca}
"
    )
}

/// What a replica presents to its control plane, renewed in place.
struct Identity {
    /// The registration file.
    file: PathBuf,
    registration: RegistrationConfig,
    tls: Arc<rustls::ClientConfig>,
    /// `(not before, not after)` of the certificate in use.
    validity: (u64, u64),
}

impl Identity {
    fn load(file: &Path, registration: &RegistrationConfig) -> Result<Self, ControlError> {
        let cert =
            std::fs::read(&registration.certificate).map_err(super::io_error(&registration.certificate))?;
        let tls = ca::mtls_client(
            &std::fs::read(&registration.ca_bundle).map_err(super::io_error(&registration.ca_bundle))?,
            &cert,
            &read_private(&registration.key)?,
        )?;
        let validity = ca::validity(&cert).ok_or_else(|| {
            ControlError::Pki(format!(
                "{} holds no readable certificate",
                registration.certificate.display()
            ))
        })?;
        Ok(Self {
            // Renewal writes beside the real file, not beside a link to it.
            file: std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()),
            registration: registration.clone(),
            tls,
            validity,
        })
    }

    /// When to renew: at two thirds of the certificate's lifetime.
    fn renew_at(&self) -> u64 {
        let (from, to) = self.validity;
        from + to.saturating_sub(from) * 2 / 3
    }

    /// A new key and certificate over the current identity, written beside
    /// the registration, which is then rewritten to name them (one atomic
    /// rename switches); the old files go. New connections use the new identity.
    fn renew(&mut self, endpoint: &Endpoint) -> Result<u64, ControlError> {
        let r = &self.registration;
        let (key, csr) = key_and_csr(&r.replica)?;
        let body = serde_json::to_vec(&super::protocol::RenewRequest { csr })
            .map_err(|e| ControlError::Pki(e.to_string()))?;
        let (status, answer) = endpoint.exchange(&self.tls, "POST /v1/renew", &body, EXCHANGE_TIMEOUT)?;
        if status != 200 {
            return Err(endpoint.refused(status, &answer));
        }
        let issued: Issued = serde_json::from_slice(&answer).map_err(|e| ControlError::Protocol {
            url: endpoint.url.clone(),
            reason: format!("renewal answer: {e}"),
        })?;
        let dir = self.file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let dir = dir.as_path();
        let stamp = issued.expires_unix;
        let (cert_name, key_name) = (format!("replica-{stamp}.crt"), format!("replica-{stamp}.key"));
        let (cert_path, key_path) = (dir.join(&cert_name), dir.join(&key_name));
        create_private(&key_path, key.serialize_pem().as_bytes())?;
        create_private(&cert_path, issued.certificate.as_bytes())?;
        let ca_name = r
            .ca_bundle
            .strip_prefix(dir)
            .map_or_else(|_| r.ca_bundle.display().to_string(), |p| p.display().to_string());
        let text = registration_text(
            &r.replica,
            &r.cluster,
            &r.control_plane,
            &cert_name,
            &key_name,
            &ca_name,
        );
        super::replace_private(&self.file, text.as_bytes())?;
        let (old_cert, old_key) = (r.certificate.clone(), r.key.clone());
        let mut renewed = r.clone();
        renewed.certificate = cert_path;
        renewed.key = key_path;
        let file = self.file.clone();
        *self = Self::load(&file, &renewed)?;
        for old in [old_cert, old_key] {
            if old.starts_with(dir) {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(issued.expires_unix)
    }
}

/// The connection state a replica reports (for logs and `status`).
#[derive(Debug, Default)]
pub struct Link {
    /// Whether the last exchange with the control plane succeeded.
    pub connected: AtomicBool,
    /// The newest snapshot version received.
    pub version: AtomicU64,
    /// When that snapshot was published (Unix seconds).
    pub published_unix: AtomicU64,
    /// When the certificate in use expires (Unix seconds).
    pub cert_expires_unix: AtomicU64,
}

/// Long-polls the control plane of `registration` (read from `file`) for
/// snapshots newer than `after`, on a thread of its own, handing each to
/// `deliver`; renews the certificate at two thirds of its lifetime and
/// reconnects with jittered backoff. Runs until the process ends.
pub fn follow(
    file: &Path,
    registration: &RegistrationConfig,
    after: u64,
    link: Arc<Link>,
    deliver: impl Fn(Snapshot) + Send + 'static,
) -> Result<(), ControlError> {
    let endpoint = Endpoint::parse(&registration.control_plane)?;
    let mut identity = Identity::load(file, registration)?;
    let cluster = registration.cluster.clone();
    link.version.store(after, Ordering::Release);
    link.cert_expires_unix
        .store(identity.validity.1, Ordering::Release);
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let mut backoff = Duration::from_millis(100);
            let mut told_expired = false;
            loop {
                let now = super::now_unix();
                if now >= identity.renew_at() && now < identity.validity.1 {
                    match identity.renew(&endpoint) {
                        Ok(expires_unix) => {
                            link.cert_expires_unix.store(expires_unix, Ordering::Release);
                            tracing::info!(expires_unix, "certificate renewed; new connections use it");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "certificate renewal failed; retrying");
                            sleep_jittered(&mut backoff);
                            continue;
                        }
                    }
                }
                let after = link.version.load(Ordering::Acquire);
                // Wake in time to renew.
                let poll = identity.renew_at().saturating_sub(now).clamp(1, super::server::LONG_POLL.as_secs());
                let request = format!("GET /v1/snapshot?after={after}&wait={poll}");
                let wait = Duration::from_secs(poll) + EXCHANGE_TIMEOUT;
                match endpoint.exchange(&identity.tls, &request, &[], wait) {
                    Ok((200, body)) => match serde_json::from_slice::<Snapshot>(&body) {
                        Ok(snapshot) if snapshot.cluster == cluster && snapshot.version > after => {
                            backoff = Duration::from_millis(100);
                            mark(&link, true, &endpoint.url);
                            link.version.store(snapshot.version, Ordering::Release);
                            link.published_unix.store(snapshot.published_unix, Ordering::Release);
                            deliver(snapshot);
                        }
                        Ok(snapshot) => tracing::warn!(
                            cluster = %snapshot.cluster,
                            version = snapshot.version,
                            "a snapshot for another cluster or an older version; ignored"
                        ),
                        Err(e) => tracing::warn!(error = %e, "a snapshot that does not parse; ignored"),
                    },
                    Ok((204, _)) => {
                        backoff = Duration::from_millis(100);
                        mark(&link, true, &endpoint.url);
                    }
                    Ok((status, body)) => {
                        mark(&link, false, &endpoint.url);
                        tracing::error!(error = %endpoint.refused(status, &body), "the control plane refused this replica; what is applied stays in force");
                        sleep_jittered(&mut backoff);
                    }
                    Err(e) => {
                        if super::now_unix() >= identity.validity.1 {
                            if !told_expired {
                                tracing::error!(
                                    expired_unix = identity.validity.1,
                                    certificate = %identity.registration.certificate.display(),
                                    "the replica's certificate expired: what is applied stays in force; register again with a new token (portcullis control-plane token create, then portcullis register)"
                                );
                                told_expired = true;
                            }
                        } else if link.connected.load(Ordering::Acquire) {
                            tracing::warn!(error = %e, "control plane lost; what is applied stays in force, reconnecting");
                        }
                        mark(&link, false, &endpoint.url);
                        sleep_jittered(&mut backoff);
                    }
                }
            }
        })
        .map_err(|source| ControlError::Unreachable {
            url: registration.control_plane.clone(),
            source,
        })?;
    Ok(())
}

fn mark(link: &Link, connected: bool, url: &str) {
    if link.connected.swap(connected, Ordering::AcqRel) != connected && connected {
        tracing::info!(control_plane = url, "connected to the control plane");
    }
}

/// Sleeps `backoff` ± 50 % and doubles it, up to 5 s.
fn sleep_jittered(backoff: &mut Duration) {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let factor = 0.5 + f64::from(byte[0]) / 255.0;
    std::thread::sleep(backoff.mul_f64(factor));
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}
