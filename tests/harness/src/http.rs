//! HTTP pieces of the harness: a scriptable upstream (plain, TLS, mTLS), a
//! throwaway PKI, the `portcullis run` process, and raw clients.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

use crate::{NetNs, portcullis_bin};

/// A certificate authority in a directory, issuing leaf certificates as files.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A certificate and key written to files (key mode 0600).
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate chain (PEM).
    pub crt: PathBuf,
    /// Private key (PEM, mode 0600).
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name`, writing into `dir`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca = dir.join(format!("{name}-ca.pem"));
        fs::write(&ca, cert.pem())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca,
        })
    }

    /// Issues a certificate for `names`, for servers or (`client`) clients.
    pub fn issue(&self, file: &str, names: &[&str], client: bool) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or(file));
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let issued = Issued {
            crt: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        fs::write(&issued.crt, cert.pem())?;
        fs::write(&issued.key, key.serialize_pem())?;
        fs::set_permissions(&issued.key, fs::Permissions::from_mode(0o600))?;
        Ok(issued)
    }
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    Ok(rustls_pki_types::CertificateDer::pem_file_iter(path)?.collect::<Result<_, _>>()?)
}

fn load_key(path: &Path) -> anyhow::Result<rustls_pki_types::PrivateKeyDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    Ok(rustls_pki_types::PrivateKeyDer::from_pem_file(path)?)
}

/// A rustls server config for a test upstream, optionally requiring client certificates from `client_ca`.
pub fn upstream_tls(leaf: &Issued, client_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(
        load_certs(&leaf.crt)?,
        load_key(&leaf.key)?,
    )?))
}

/// Counters an upstream keeps.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// The last request head received.
    pub last_head: Mutex<String>,
    /// Size of the last body received by `/sink`.
    pub last_body: AtomicU64,
    /// Connections the upstream has closed.
    pub closed: AtomicU64,
    /// A header (lowercase name) every request is expected to carry: what a policy chain injects.
    pub expect_header: Mutex<Option<String>>,
    /// Requests that arrived without [`UpstreamStats::expect_header`]: requests that bypassed the policies.
    pub unmarked: AtomicU64,
}

/// A scriptable HTTP/1.1 upstream in a namespace, one thread per connection.
///
/// Paths: `/hello`, `/headers` (echoes the request head), `/sink` (reads the
/// body, answers its size), `/bytes/N` (N bytes, content-length),
/// `/chunked/N`, `/close/N` (N bytes then close), `/slow/MS`, `/die` (promises
/// a long body, sends part, closes), `/status/CODE`, `/early` (a 103 before the
/// 200), `/hangup` (answers keep-alive, then closes); anything else is `/hello`.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it has seen.
    pub stats: Arc<UpstreamStats>,
    stop: Arc<AtomicBool>,
    /// The listening socket again, shut down on drop to wake the accept loop
    /// in whatever namespace it listens.
    waker: Option<TcpListener>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// Body bytes of pattern `i % 251`, so truncation or reordering shows.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| u8::try_from((offset + i) % 251).unwrap_or(0))
        .collect()
}

impl Upstream {
    /// Starts a plain upstream on `addr` inside `ns`.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_tls(ns, addr, None)
    }

    /// Starts an upstream, TLS when `tls` is given.
    pub fn start_tls(
        ns: &NetNs,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        Self::serve(listener, tls)
    }

    /// Serves on a listener already bound (in whatever namespace or machine).
    pub fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let waker = listener.try_clone().ok();
        let stats = Arc::new(UpstreamStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                // Head and body go out in separate writes; without this, Nagle
                // holds the body for the proxy's delayed ACK (40 ms).
                let _ = conn.set_nodelay(true);
                s.connections.fetch_add(1, Ordering::SeqCst);
                let (s, tls) = (s.clone(), tls.clone());
                thread::spawn(move || {
                    let stream = match tls {
                        Some(cfg) => match rustls::ServerConnection::new(cfg) {
                            Ok(c) => Stream::Tls(Box::new(rustls::StreamOwned::new(c, conn))),
                            Err(_) => return,
                        },
                        None => Stream::Plain(conn),
                    };
                    let _ = serve_upstream(stream, &s);
                    s.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self {
            addr,
            stats,
            stop,
            waker,
        })
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::SeqCst)
    }

    /// Counts from now on every request that arrives without header `name`.
    pub fn expect_header(&self, name: &str) {
        if let Ok(mut expected) = self.stats.expect_header.lock() {
            *expected = Some(name.to_ascii_lowercase());
        }
    }

    /// Requests that arrived without the expected header.
    pub fn unmarked(&self) -> u64 {
        self.stats.unmarked.load(Ordering::SeqCst)
    }

    /// The last request head seen.
    pub fn last_head(&self) -> String {
        self.stats.last_head.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A shut-down listener fails its blocked accept (EINVAL) and the loop
        // sees `stop`: a connect from here would reach this namespace, not the
        // listener's.
        if let Some(waker) = &self.waker {
            let _ = socket2::SockRef::from(waker).shutdown(Shutdown::Read);
        }
    }
}

fn serve_upstream(stream: Stream, stats: &UpstreamStats) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let lower = head.to_ascii_lowercase();
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let length: Option<u64> = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok());
        let chunked = lower
            .lines()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        stats
            .last_head
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone_from(&head);
        if let Ok(expected) = stats.expect_header.lock()
            && let Some(name) = expected.as_deref()
            && !lower
                .lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))
        {
            stats.unmarked.fetch_add(1, Ordering::SeqCst);
        }
        let body = read_body(&mut reader, length, chunked)?;
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let out = reader.get_mut();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (verb, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let arg = arg.split('?').next().unwrap_or("");
        let n: u64 = arg.parse().unwrap_or(0);
        match verb {
            "headers" => respond(out, 200, head.as_bytes())?,
            "sink" => {
                stats.last_body.store(body, Ordering::SeqCst);
                respond(out, 200, format!("{body}\n").as_bytes())?;
            }
            "bytes" => {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\ncontent-length: {n}\r\ncontent-type: application/octet-stream\r\n\r\n"
                )?;
                if !head.starts_with("HEAD ") {
                    stream_pattern(out, n, false)?;
                }
            }
            "chunked" => {
                write!(out, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")?;
                stream_pattern(out, n, true)?;
                out.write_all(b"0\r\nx-trailer: t\r\n\r\n")?;
            }
            "close" => {
                write!(out, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")?;
                stream_pattern(out, n, false)?;
                out.flush()?;
                return Ok(());
            }
            "slow" => {
                thread::sleep(Duration::from_millis(n));
                respond(out, 200, b"slow hello\n")?;
            }
            "tagged" => {
                out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx-upstream-secret: s3\r\nx-keep: 1\r\n\r\ntagged\n")?;
            }
            "early" => {
                out.write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")?;
                respond(out, 200, b"after hints\n")?;
            }
            "hangup" => {
                // Answers as if keeping the connection, then closes it: a pooled
                // connection that is dead by the time it is reused.
                respond(out, 200, b"bye\n")?;
                out.flush()?;
                return Ok(());
            }
            "die" => {
                write!(out, "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")?;
                out.write_all(&pattern(0, 1000))?;
                out.flush()?;
                return Ok(());
            }
            "status" => respond(out, u16::try_from(n).unwrap_or(500), b"status\n")?,
            _ => respond(out, 200, b"hello from the upstream\n")?,
        }
        out.flush()?;
    }
}

fn read_body<R: BufRead>(r: &mut R, length: Option<u64>, chunked: bool) -> anyhow::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    if chunked {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)?;
            if size == 0 {
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    if t == "\r\n" || t.is_empty() {
                        return Ok(total);
                    }
                }
            }
            let mut left = size;
            while left > 0 {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                r.read_exact(&mut buf[..take])?;
                left -= take as u64;
            }
            total += size;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    }
    let mut left = length.unwrap_or(0);
    while left > 0 {
        let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = r.read(&mut buf[..take])?;
        if n == 0 {
            bail!("client closed mid-body");
        }
        left -= n as u64;
        total += n as u64;
    }
    Ok(total)
}

fn stream_pattern(out: &mut impl Write, n: u64, chunked: bool) -> std::io::Result<()> {
    let block = pattern(0, 251 * 256);
    let mut sent = 0u64;
    while sent < n {
        let take = usize::try_from(n - sent).unwrap_or(usize::MAX).min(block.len());
        if chunked {
            write!(out, "{take:x}\r\n")?;
        }
        out.write_all(&block[..take])?;
        if chunked {
            out.write_all(b"\r\n")?;
        }
        sent += take as u64;
    }
    Ok(())
}

fn respond(out: &mut impl Write, status: u16, body: &[u8]) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status} Upstream\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)
}

/// A `portcullis run` process in a namespace; killed on drop.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Child,
    /// Its stderr (logs, access log included).
    pub log: PathBuf,
    /// The admin address.
    pub admin: SocketAddr,
    ns: PathBuf,
}

impl GatewayProcess {
    /// Starts `portcullis run --config dir` and waits until `/readyz` answers 200.
    pub fn start(ns: &NetNs, dir: &Path, admin: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(ns, &portcullis_bin(), dir, admin)
    }

    /// Like [`GatewayProcess::start`], with a given binary.
    pub fn start_with(ns: &NetNs, bin: &Path, dir: &Path, admin: SocketAddr) -> anyhow::Result<Self> {
        Self::start_env(ns, bin, dir, admin, &[])
    }

    /// Like [`GatewayProcess::start_with`], with extra environment variables.
    pub fn start_env(
        ns: &NetNs,
        bin: &Path,
        dir: &Path,
        admin: SocketAddr,
        envs: &[(&str, &Path)],
    ) -> anyhow::Result<Self> {
        Self::start_log(ns, bin, dir, admin, envs, &dir.join("gateway.log"))
    }

    /// Like [`GatewayProcess::start_env`], logging to `log` instead of the configuration directory.
    pub fn start_log(
        ns: &NetNs,
        bin: &Path,
        dir: &Path,
        admin: SocketAddr,
        envs: &[(&str, &Path)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let log = log.to_path_buf();
        let file = fs::File::create(&log)?;
        // Never the machine's /var/lib/portcullis: each gateway keeps its state next to its log.
        let state = log.with_extension("state");
        let child = ns
            .command(bin)
            .args(["run", "--config"])
            .arg(dir)
            .env("RUST_LOG", "info")
            .env("PORTCULLIS_STATE_DIR", &state)
            .envs(envs.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("spawning portcullis run")?;
        let mut gw = Self {
            child,
            log,
            admin,
            ns: ns.path(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = gw.child.try_wait()? {
                bail!("portcullis run exited with {status}: {}", gw.log_text());
            }
            if let Ok(resp) = request(
                ns,
                admin,
                b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
            ) && resp.starts_with(b"HTTP/1.1 200")
            {
                return Ok(gw);
            }
            if Instant::now() > deadline {
                bail!("portcullis run not ready after 20 s: {}", gw.log_text());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything it has logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log holds `needle`; on time-out the error says `what` and carries the log.
    pub fn wait_log(&self, needle: &str, what: &str) -> anyhow::Result<()> {
        crate::wait_for(what, || Ok(self.log_text().contains(needle)))
            .with_context(|| format!("{what}: {}", self.log_text()))
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory (VmHWM) and current (VmRSS), KiB, of the gateway
    /// (the child of nsenter).
    pub fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        // nsenter execs the program, so the child pid is the gateway itself.
        let pid = self.child.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing"))?;
            Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// Asks the gateway to reload its configuration (SIGHUP).
    pub fn reload(&self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }

    /// Asks the gateway to stop (SIGTERM): it drains, then exits.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("still running after {limit:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The namespace path it runs in.
    pub fn ns_path(&self) -> &Path {
        &self.ns
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to `addr` from inside `ns`.
pub fn connect(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

/// Sends `raw` on a new connection and reads until the peer closes.
pub fn request(ns: &NetNs, addr: SocketAddr, raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut s = connect(ns, addr)?;
    s.write_all(raw)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Sends `raw` and reads whatever arrives until `wait` passes or the peer closes;
/// the bool says whether the peer closed.
pub fn request_open(
    ns: &NetNs,
    addr: SocketAddr,
    raw: &[u8],
    wait: Duration,
) -> anyhow::Result<(Vec<u8>, bool)> {
    let mut s = connect(ns, addr)?;
    s.write_all(raw)?;
    s.set_read_timeout(Some(wait))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok((out, true)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let _ = s.shutdown(Shutdown::Both);
                return Ok((out, false));
            }
            Err(_) => return Ok((out, true)),
        }
    }
}

/// Reads one whole content-length-framed response into `buf` and returns its status.
pub fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return status_of(buf)
                    .with_context(|| format!("no status in {:?}", String::from_utf8_lossy(buf)));
            }
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            bail!("closed after {:?}", String::from_utf8_lossy(buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Status code of the first response in `raw`.
pub fn status_of(raw: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(raw.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Runs `curl` inside `ns` with `args`; returns (exit code, stdout, stderr).
pub fn curl(ns: &NetNs, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A `Configuration` resource named `name`: two workers, the admin listener
/// on 127.0.0.1:9901, the Gatekeeper strict; ends in a `---`.
pub fn strict_settings(name: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: {name}
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
  gatekeeper:
    level: strict
---
"
    )
}

/// A Contract for client `mobile` with secret `password` (sha256) on
/// `apis` (`orders` or `orders, inventory`), ending in a `---`.
pub fn mobile_contract(apis: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Contract
metadata:
  name: mobile
spec:
  clientId: mobile
  clientSecretHash: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
  apis: [{apis}]
---
"
    )
}

/// An `ApiInstance` resource (and its `---`): `address` routed to `upstream`,
/// with `extra` appended to its spec (indented two spaces, newline-terminated).
pub fn api_instance(name: &str, address: &str, upstream: &str, extra: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: {name}
spec:
  address: {address}
  services:
    up:
      address: {upstream}
{extra}---
"
    )
}

/// A `tls` PolicyBinding (and its `---`) giving API `target` the
/// certificates `certs` (the first is the default), with `extra` appended to
/// its config (indented four spaces, newline-terminated).
pub fn tls_binding(target: &str, certs: &[&Issued], extra: &str) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: {target}-tls
spec:
  targetRef:
    name: {target}
  policyRef:
    name: tls
  config:
    certificates:
"
    );
    for cert in certs {
        let _ = writeln!(
            out,
            "      - crt: ${{file:{}}}\n        key: ${{file:{}}}",
            cert.crt.display(),
            cert.key.display()
        );
    }
    out.push_str(extra);
    out.push_str("---\n");
    out
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique_name(tag));
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// Writes `name` with `text`.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        fs::write(&path, text)?;
        Ok(path)
    }

    /// Writes `name` with `text`, readable only by its owner (mode 0600), as secrets must be.
    pub fn write_private(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.write(name, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` and returns stdout, failing with its stderr.
pub fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `redis-server` in a namespace with an ACL user, no persistence; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    conf: PathBuf,
    ns: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Starts Redis on `addr` in `ns`, with user `user` / `password` and the default user disabled.
    pub fn start(
        ns: &NetNs,
        dir: &Path,
        addr: SocketAddr,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(ns, dir, addr, user, password, None)
    }

    /// Like [`RedisServer::start`], accepting only TLS with this certificate.
    pub fn start_tls(
        ns: &NetNs,
        dir: &Path,
        addr: SocketAddr,
        user: &str,
        password: &str,
        cert: &Issued,
    ) -> anyhow::Result<Self> {
        Self::start_with(ns, dir, addr, user, password, Some(cert))
    }

    fn start_with(
        ns: &NetNs,
        dir: &Path,
        addr: SocketAddr,
        user: &str,
        password: &str,
        tls: Option<&Issued>,
    ) -> anyhow::Result<Self> {
        let conf = dir.join(format!("redis-{}.conf", addr.port()));
        let ports = match tls {
            None => format!("port {}\n", addr.port()),
            Some(cert) => format!(
                "port 0\ntls-port {}\ntls-cert-file {}\ntls-key-file {}\ntls-auth-clients no\n",
                addr.port(),
                cert.crt.display(),
                cert.key.display()
            ),
        };
        fs::write(
            &conf,
            format!(
                "{ports}bind {}\nsave \"\"\nappendonly no\ndaemonize no\nprotected-mode no\ndir {}\nuser default off\nuser {user} on >{password} ~portcullis:* &* +@all\n",
                addr.ip(),
                dir.display()
            ),
        )?;
        let mut server = Self {
            child: None,
            conf,
            ns: ns.path(),
            addr,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.display()))
            .arg("--")
            .arg("redis-server")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (installed by cargo xtask test)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ns = fs::File::open(&self.ns)?;
        let addr = self.addr;
        let ready = thread::spawn(move || -> anyhow::Result<()> {
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&ns),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )?;
            while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
                if Instant::now() > deadline {
                    bail!("redis-server not listening on {addr} after 10 s");
                }
                thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        ready
            .join()
            .map_err(|_| anyhow::anyhow!("readiness thread panicked"))?
    }

    /// Kills the server (data is lost, as with a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after [`RedisServer::kill`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
