//! Active health checks: every endpoint of a Service with `healthCheck` is
//! asked `GET path` over HTTP/1.1 (TLS and PROXY protocol as the service
//! speaks them) each interval, on a thread of its own that ends once no
//! generation holds the service any more. `unhealthyThreshold` failures in a
//! row take the endpoint out of balancing; `healthyThreshold` passes bring it
//! back. Outlier detection ([`Upstream::observe`]) works beside it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::Generation;
use super::service::{Health, Upstream};
use crate::config::HealthCheck;
use crate::telemetry::Metrics;

/// Largest response head a check reads.
const MAX_HEAD: usize = 16 * 1024;

/// The PROXY v2 header of a connection the gateway makes for itself (`LOCAL`, no addresses).
const PROXY_V2_LOCAL: [u8; 16] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00, 0x00, 0x00,
];

/// Starts the checks of every service in `generation` that has them and whose checks do not run yet.
pub fn start(generation: &Generation, metrics: &Arc<Metrics>) {
    for upstream in &generation.upstreams {
        let Some(check) = upstream.cfg.health.clone() else {
            continue;
        };
        if upstream.checks_started.swap(true, Ordering::AcqRel) {
            continue;
        }
        for endpoint in 0..upstream.cfg.endpoints.len() {
            let (weak, metrics, check) = (Arc::downgrade(upstream), metrics.clone(), check.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("health-{}", upstream.id))
                .spawn(move || run(&weak, endpoint, &check, &metrics));
            if let Err(e) = spawned {
                tracing::error!(service = %upstream.cfg.name, error = %e, "health check thread not started; the endpoint counts as healthy");
            }
        }
    }
}

/// Checks `endpoint` every interval while a generation still holds its service.
fn run(weak: &Weak<Upstream>, endpoint: usize, check: &HealthCheck, metrics: &Metrics) {
    let (mut passes, mut failures) = (0u32, 0u32);
    while let Some(upstream) = weak.upgrade() {
        let addr = upstream.cfg.endpoints[endpoint].addr;
        let verdict = probe(&upstream, endpoint, check).and_then(|status| {
            if check.expects(status) {
                Ok(status)
            } else {
                Err(format!("answered {status}"))
            }
        });
        metrics.health_check(&upstream.cfg.name, addr, verdict.is_ok());
        let down = upstream.health(endpoint) == Health::Unhealthy;
        match verdict {
            Ok(_) => {
                (passes, failures) = (passes + 1, 0);
                if down && passes >= check.healthy_threshold && upstream.set_checked(endpoint, true) {
                    tracing::info!(service = %upstream.cfg.name, endpoint = %addr, passes, "endpoint healthy again");
                }
            }
            Err(why) => {
                (passes, failures) = (0, failures + 1);
                if !down && failures >= check.unhealthy_threshold && upstream.set_checked(endpoint, false) {
                    tracing::warn!(service = %upstream.cfg.name, endpoint = %addr, failures, reason = %why, "endpoint unhealthy: health check failing");
                }
            }
        }
        drop(upstream);
        std::thread::sleep(check.interval);
    }
}

/// One check: the status the endpoint answered within the timeout, or what went wrong.
fn probe(upstream: &Upstream, endpoint: usize, check: &HealthCheck) -> Result<u16, String> {
    let ep = &upstream.cfg.endpoints[endpoint];
    let deadline = Instant::now() + check.timeout;
    let tcp = TcpStream::connect_timeout(&ep.addr, check.timeout).map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tcp = Deadline { tcp, deadline };
    match upstream.cfg.proxy_protocol {
        Some(1) => tcp.write_all(b"PROXY UNKNOWN\r\n"),
        Some(_) => tcp.write_all(&PROXY_V2_LOCAL),
        None => Ok(()),
    }
    .map_err(|e| format!("PROXY header: {e}"))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: portcullis-health-check\r\naccept: */*\r\nconnection: close\r\n\r\n",
        check.path, ep.authority
    );
    let Some(tls) = &upstream.tls else {
        return exchange(&mut tcp, request.as_bytes());
    };
    let name = upstream.server_names[endpoint].clone();
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(|e| format!("TLS: {e}"))?;
    exchange(&mut rustls::StreamOwned::new(conn, tcp), request.as_bytes())
}

/// Sends `request` on `io` and reads the status of the response head.
fn exchange(io: &mut impl ReadWrite, request: &[u8]) -> Result<u16, String> {
    io.write_all(request).map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let n = io.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a response head".into());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(_)) => return response.code.ok_or_else(|| "no status".into()),
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("invalid response: {e}")),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A stream whose every read and write ends by one deadline.
struct Deadline {
    tcp: TcpStream,
    deadline: Instant,
}

impl Deadline {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "health check timed out"))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.set_read_timeout(Some(self.left()?))?;
        self.tcp.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.set_write_timeout(Some(self.left()?))?;
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Writes every endpoint's health in `generation` as the
/// `portcullis_upstream_endpoint_health` family (1 for its state, 0 for the others).
pub fn write_metrics(generation: &Generation, out: &mut String) {
    use std::fmt::Write as _;
    out.push_str("# HELP portcullis_upstream_endpoint_health Each endpoint's health: 1 for its state (healthy, unhealthy by its health check, ejected by outlier detection)\n");
    out.push_str("# TYPE portcullis_upstream_endpoint_health gauge\n");
    for upstream in &generation.upstreams {
        for (i, ep) in upstream.cfg.endpoints.iter().enumerate() {
            let now = upstream.health(i);
            for state in [Health::Healthy, Health::Unhealthy, Health::Ejected] {
                let _ = writeln!(
                    out,
                    "portcullis_upstream_endpoint_health{{service=\"{}\",endpoint=\"{}\",state=\"{}\"}} {}",
                    upstream.cfg.name,
                    ep.addr,
                    state.label(),
                    u8::from(now == state)
                );
            }
        }
    }
}
