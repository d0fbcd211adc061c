//! Load for the leak tests: clients that hammer a tagged API and tally what
//! they get back, and the configuration whose policy chain tags what it lets
//! through (an upstream counts what arrives untagged).

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::http::{api_instance, mobile_contract, read_response};

/// The header the policy chain injects into every request it lets through.
pub const TAG: &str = "x-policies-applied";
/// `Authorization: Basic` of the contract `mobile:password` in [`tagged_config`].
pub const MOBILE: &str = "bW9iaWxlOnBhc3N3b3Jk";

/// What a group of clients got back, by status.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests sent.
    pub sent: AtomicU64,
    /// 200s.
    pub ok: AtomicU64,
    /// 401s.
    pub unauthorized: AtomicU64,
    /// 503s.
    pub unavailable: AtomicU64,
    /// Any other status.
    pub other: AtomicU64,
    /// No answer: refused, reset or timed out.
    pub failed: AtomicU64,
    /// When the first and the last 503 came.
    pub gated: Mutex<Option<(Instant, Instant)>>,
}

impl Tally {
    /// Counts one answer (`None`: no answer).
    pub fn count(&self, status: Option<u16>) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let slot = match status {
            Some(200) => &self.ok,
            Some(401) => &self.unauthorized,
            Some(503) => &self.unavailable,
            Some(_) => &self.other,
            None => &self.failed,
        };
        slot.fetch_add(1, Ordering::Relaxed);
        if status == Some(503) {
            let now = Instant::now();
            if let Ok(mut gated) = self.gated.lock() {
                let first = gated.map_or(now, |(first, _)| first);
                *gated = Some((first, now));
            }
        }
    }

    /// From the first 503 to the last.
    pub fn gated_for(&self) -> Duration {
        self.gated
            .lock()
            .ok()
            .and_then(|g| g.map(|(first, last)| last - first))
            .unwrap_or_default()
    }

    /// One line of totals, named.
    pub fn line(&self, name: &str) -> String {
        format!(
            "{name}: sent {}, 200 {}, 401 {}, 503 {} (over {:.1} s), other {}, failed {}",
            n(&self.sent),
            n(&self.ok),
            n(&self.unauthorized),
            n(&self.unavailable),
            self.gated_for().as_secs_f64(),
            n(&self.other),
            n(&self.failed)
        )
    }
}

/// Writes past the test harness's output capture: the totals show in every run.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A counter's value.
pub fn n(slot: &AtomicU64) -> u64 {
    slot.load(Ordering::Relaxed)
}

/// A connection to `addr`, or `None` once the failure is counted in
/// `tally` and `pause` has passed (the gateway may be restarting).
pub fn connect_counted(addr: SocketAddr, tally: &Tally, pause: Duration) -> Option<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    if conn.is_err() {
        tally.count(None);
        std::thread::sleep(pause);
    }
    conn.ok()
}

/// `GET /orders/hello` in a loop, a few per connection, until `stop`.
pub fn hammer(addr: SocketAddr, auth: Option<&'static str>, stop: &AtomicBool, tally: &Tally) {
    let request = format!(
        "GET /orders/hello HTTP/1.1\r\nHost: api\r\n{}\r\n",
        auth.map(|a| format!("Authorization: Basic {a}\r\n"))
            .unwrap_or_default()
    );
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(mut conn) = connect_counted(addr, tally, Duration::from_millis(5)) else {
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        for _ in 0..4 {
            if conn.write_all(request.as_bytes()).is_err() {
                tally.count(None);
                break;
            }
            let status = read_response(&mut conn, &mut buf).ok();
            let failed = status.is_none();
            tally.count(status);
            let closing = String::from_utf8_lossy(&buf)
                .to_ascii_lowercase()
                .contains("connection: close");
            if failed || closing {
                break;
            }
        }
    }
}

/// The API `orders` on `addr` behind client-id enforcement (contract
/// `mobile`) and a header injection of [`TAG`] = `edit-N`, upstream
/// 127.0.0.1:9000, with the admin endpoints on 127.0.0.1:9901.
pub fn tagged_config(addr: &str, edit: usize) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: leak
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
---
{}{}",
        api_instance(
            "orders",
            &format!("http://{addr}/orders"),
            "http://127.0.0.1:9000/",
            &format!(
                "  policies:
    - policyRef:
        name: client-id-enforcement-flex
    - policyRef:
        name: header-injection-flex
      config:
        inboundHeaders:
          - key: {TAG}
            value: \"edit-{edit}\"
"
            )
        ),
        mobile_contract("orders")
    )
}

/// Fails unless nothing reached the upstream untagged, no unauthenticated
/// request got through, and the API served both kinds of client meanwhile.
pub fn no_leak(untagged: u64, anonymous: &Tally, authenticated: &Tally, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        untagged == 0,
        "{what}: {untagged} requests reached the upstream without their policies"
    );
    anyhow::ensure!(
        n(&anonymous.ok) == 0,
        "{what}: an unauthenticated request was let through"
    );
    anyhow::ensure!(
        n(&anonymous.unauthorized) > 0 && n(&authenticated.ok) > 0,
        "{what}: the route must have been open around the events"
    );
    Ok(())
}
