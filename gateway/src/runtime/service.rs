//! Upstream services at run time: endpoint choice, health (active checks
//! and outlier ejection) and the circuit breaker, shared by every worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use crate::config::{Balance, ServiceConfig};

/// Endpoint state shared by all workers.
#[derive(Debug, Default)]
struct EndpointState {
    in_flight: AtomicU32,
    /// Milliseconds since [`Upstream::epoch`] before which the endpoint is skipped.
    ejected_until: AtomicU64,
    /// Ejections so far; the next one lasts this many more base times.
    ejections: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_connect_failures: AtomicU32,
    /// The active health check's verdict: `true` once it found the endpoint unhealthy.
    checked_down: AtomicBool,
}

/// What one exchange with an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// No connection could be made (refused, timed out, TLS failed).
    ConnectFailed,
}

impl Outcome {
    /// The reason label of an ejection it caused.
    pub fn label(self) -> &'static str {
        match self {
            Self::Status(_) => "consecutive_5xx",
            Self::ConnectFailed => "connect_failures",
        }
    }
}

/// An endpoint's health as `status` and `/metrics` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Takes requests.
    Healthy,
    /// Its active health check fails.
    Unhealthy,
    /// Ejected by outlier detection for a while.
    Ejected,
}

impl Health {
    /// Lowercase name.
    pub fn label(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Ejected => "ejected",
        }
    }
}

/// Which circuit-breaker limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `maxConnections`.
    Connections,
    /// `maxPendingRequests`.
    PendingRequests,
}

impl Limit {
    /// The setting's name.
    pub fn field(self) -> &'static str {
        match self {
            Self::Connections => "maxConnections",
            Self::PendingRequests => "maxPendingRequests",
        }
    }
}

/// A service at run time.
#[derive(Debug)]
pub struct Upstream {
    /// Its configuration.
    pub cfg: ServiceConfig,
    /// TLS client config, for `https` services.
    pub tls: Option<Arc<ClientConfig>>,
    /// Server name verified for each endpoint.
    pub server_names: Vec<ServerName<'static>>,
    /// Hash of the TLS files it was built from; a reload rebuilds it when they change.
    pub tls_fingerprint: u64,
    /// Unique for the process's lifetime: pooled connections are keyed by it.
    pub id: u64,
    /// Whether its health checks run (they start once, with the first generation that has it).
    pub(crate) checks_started: AtomicBool,
    endpoints: Vec<EndpointState>,
    next: AtomicUsize,
    pending: AtomicU32,
    connections: AtomicU32,
    epoch: Instant,
}

impl Upstream {
    /// Run-time state for `cfg`.
    pub fn new(
        cfg: ServiceConfig,
        tls: Option<Arc<ClientConfig>>,
        server_names: Vec<ServerName<'static>>,
        tls_fingerprint: u64,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let endpoints = cfg.endpoints.iter().map(|_| EndpointState::default()).collect();
        Self {
            cfg,
            tls,
            server_names,
            tls_fingerprint,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            checks_started: AtomicBool::new(false),
            endpoints,
            next: AtomicUsize::new(0),
            pending: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn ejected(&self, i: usize, now: u64) -> bool {
        self.endpoints[i].ejected_until.load(Ordering::Relaxed) > now
    }

    /// Endpoint `i`'s health now.
    pub fn health(&self, i: usize) -> Health {
        if self.ejected(i, self.now_ms()) {
            Health::Ejected
        } else if self.endpoints[i].checked_down.load(Ordering::Relaxed) {
            Health::Unhealthy
        } else {
            Health::Healthy
        }
    }

    /// Picks an endpoint not in `tried`, skipping unhealthy and ejected ones
    /// unless none is left (then every endpoint is a candidate again: a
    /// guess beats refusing every request).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        let candidates = || (0..n).filter(|i| !tried.contains(i));
        let healthy: Vec<usize> = candidates()
            .filter(|&i| self.health(i) == Health::Healthy)
            .collect();
        let pool: Vec<usize> = if healthy.is_empty() {
            candidates().collect()
        } else {
            healthy
        };
        if pool.is_empty() {
            return None;
        }
        Some(match self.cfg.balance {
            Balance::RoundRobin => pool[self.next.fetch_add(1, Ordering::Relaxed) % pool.len()],
            Balance::LeastRequests => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                // Ties rotate so equal endpoints share the load.
                (0..pool.len())
                    .map(|k| pool[(start + k) % pool.len()])
                    .min_by_key(|&i| self.endpoints[i].in_flight.load(Ordering::Relaxed))
                    .unwrap_or(pool[0])
            }
        })
    }

    /// Counts `outcome` for endpoint `i`; the ejection's length if it ejected the endpoint.
    pub fn observe(&self, i: usize, outcome: Outcome) -> Option<Duration> {
        let ep = &self.endpoints[i];
        let od = &self.cfg.outlier;
        let (counter, threshold) = match outcome {
            Outcome::Status(s) if s < 500 => {
                ep.consecutive_5xx.store(0, Ordering::Relaxed);
                ep.consecutive_connect_failures.store(0, Ordering::Relaxed);
                // Healthy for the longest ejection since the last one: start again from the base time.
                let quiet = u64::try_from(od.max_ejection.as_millis()).unwrap_or(u64::MAX / 4);
                if ep.ejections.load(Ordering::Relaxed) > 0
                    && ep.ejected_until.load(Ordering::Relaxed) + quiet <= self.now_ms()
                {
                    ep.ejections.store(0, Ordering::Relaxed);
                }
                return None;
            }
            Outcome::Status(_) => (&ep.consecutive_5xx, od.consecutive_5xx),
            Outcome::ConnectFailed => (&ep.consecutive_connect_failures, od.consecutive_connect_failures),
        };
        if threshold == 0 || counter.fetch_add(1, Ordering::Relaxed) + 1 < threshold {
            return None;
        }
        counter.store(0, Ordering::Relaxed);
        self.eject(i)
    }

    /// Ejects endpoint `i` for its next ejection time, unless the service's
    /// share of ejected endpoints is already reached.
    fn eject(&self, i: usize) -> Option<Duration> {
        let now = self.now_ms();
        let n = self.endpoints.len();
        let allowed = (n * self.cfg.outlier.max_ejection_percent as usize / 100).max(1);
        let others = (0..n).filter(|&j| j != i && self.ejected(j, now)).count();
        if others >= allowed {
            return None;
        }
        let ep = &self.endpoints[i];
        let times = ep.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = self
            .cfg
            .outlier
            .base_ejection
            .saturating_mul(times)
            .min(self.cfg.outlier.max_ejection);
        let until = now + u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 4);
        ep.ejected_until.store(until, Ordering::Relaxed);
        Some(length)
    }

    /// Records the active check's verdict on endpoint `i`; whether it changed.
    pub fn set_checked(&self, i: usize, healthy: bool) -> bool {
        self.endpoints[i].checked_down.swap(!healthy, Ordering::Relaxed) == healthy
    }

    /// Counts a request in flight on endpoint `i` until the guard drops.
    pub fn begin(self: &Arc<Self>, i: usize) -> InFlight {
        self.endpoints[i].in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            upstream: self.clone(),
            endpoint: i,
        }
    }

    /// Admits one more request to the service, unless `maxPendingRequests` are already in.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Limit> {
        Slot::take(
            self,
            &self.pending,
            self.cfg.breaker.max_pending_requests,
            Limit::PendingRequests,
        )
    }

    /// Admits one more connection carrying a request, unless `maxConnections` already do.
    pub fn open_connection(self: &Arc<Self>) -> Result<Slot, Limit> {
        Slot::take(
            self,
            &self.connections,
            self.cfg.breaker.max_connections,
            Limit::Connections,
        )
    }
}

/// A request or connection the circuit breaker counts until it drops.
#[derive(Debug)]
pub struct Slot {
    upstream: Arc<Upstream>,
    limit: Limit,
}

impl Slot {
    fn take(
        upstream: &Arc<Upstream>,
        count: &AtomicU32,
        max: Option<u32>,
        limit: Limit,
    ) -> Result<Self, Limit> {
        let max = max.unwrap_or(u32::MAX);
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| limit)?;
        Ok(Self {
            upstream: upstream.clone(),
            limit,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let count = match self.limit {
            Limit::Connections => &self.upstream.connections,
            Limit::PendingRequests => &self.upstream.pending,
        };
        count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in flight on an endpoint.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    endpoint: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.endpoints[self.endpoint]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{EndpointConfig, HostHeader};

    fn upstream(n: usize, balance: Balance) -> Arc<Upstream> {
        let endpoints = (0..n)
            .map(|i| EndpointConfig {
                addr: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                authority: "h".into(),
                host: "h".into(),
            })
            .collect();
        let cfg = ServiceConfig {
            name: "s".into(),
            endpoints,
            balance,
            tls: None,
            http2: false,
            proxy_protocol: None,
            host_header: HostHeader::Preserve,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            retries: 1,
            health: None,
            outlier: crate::config::OutlierDetection {
                consecutive_5xx: 2,
                base_ejection: Duration::from_mins(1),
                max_ejection: Duration::from_mins(3),
                ..crate::config::OutlierDetection::default()
            },
            breaker: crate::config::CircuitBreaker {
                max_connections: Some(1),
                max_pending_requests: Some(2),
            },
            external: false,
        };
        Arc::new(Upstream::new(cfg, None, Vec::new(), 0))
    }

    #[test]
    fn round_robin_skips_ejected_and_tried() {
        let u = upstream(3, Balance::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| u.pick(&[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(u.observe(1, Outcome::ConnectFailed), Some(Duration::from_mins(1)));
        assert!((0..6).all(|_| u.pick(&[]).unwrap() != 1));
        assert_eq!(
            u.pick(&[0, 2]),
            Some(1),
            "an ejected endpoint is still tried when nothing else is left"
        );
        assert_eq!(u.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn least_requests_prefers_idle_endpoints() {
        let u = upstream(2, Balance::LeastRequests);
        let _busy = u.begin(0);
        assert!((0..4).all(|_| u.pick(&[]) == Some(1)));
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times_within_the_share() {
        let u = upstream(4, Balance::RoundRobin);
        assert_eq!(
            u.observe(0, Outcome::Status(503)),
            None,
            "one 5xx is not two in a row"
        );
        assert_eq!(u.observe(0, Outcome::Status(200)), None);
        assert_eq!(
            u.observe(0, Outcome::Status(502)),
            None,
            "a success resets the count"
        );
        assert_eq!(u.observe(0, Outcome::Status(500)), Some(Duration::from_mins(1)));
        assert_eq!(u.health(0), Health::Ejected);
        // Half of four endpoints may be out at once.
        assert_eq!(u.observe(1, Outcome::ConnectFailed), Some(Duration::from_mins(1)));
        assert_eq!(u.observe(2, Outcome::ConnectFailed), None, "the share is reached");
        assert_eq!(u.health(2), Health::Healthy);
        // The second ejection of one endpoint lasts twice the base, capped at the maximum.
        u.endpoints[0].ejected_until.store(0, Ordering::Relaxed);
        u.observe(0, Outcome::Status(500));
        assert_eq!(u.observe(0, Outcome::Status(500)), Some(Duration::from_mins(2)));
        u.endpoints[0].ejected_until.store(0, Ordering::Relaxed);
        u.observe(0, Outcome::Status(500));
        assert_eq!(u.observe(0, Outcome::Status(500)), Some(Duration::from_mins(3)));
        assert!(u.set_checked(3, false), "a change");
        assert!(!u.set_checked(3, false), "no change");
        assert_eq!(u.health(3), Health::Unhealthy);
        assert!(
            (0..8).all(|_| u.pick(&[]) == Some(2)),
            "the one endpoint left takes it all"
        );
    }

    #[test]
    fn the_circuit_breaker_counts_requests_and_connections_until_they_end() {
        let u = upstream(1, Balance::RoundRobin);
        let (a, b) = (u.admit().unwrap(), u.admit().unwrap());
        assert_eq!(u.admit().unwrap_err(), Limit::PendingRequests);
        drop(a);
        let _c = u.admit().unwrap();
        drop(b);
        let conn = u.open_connection().unwrap();
        assert_eq!(u.open_connection().unwrap_err(), Limit::Connections);
        drop(conn);
        assert!(u.open_connection().is_ok());
    }
}
