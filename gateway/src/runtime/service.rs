//! Upstream services at run time: endpoint choice and passive health, shared by every worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use crate::config::{Balance, ServiceConfig};

/// Endpoint state shared by all workers.
#[derive(Debug, Default)]
struct EndpointState {
    in_flight: AtomicU32,
    /// Milliseconds since [`Upstream::epoch`] before which the endpoint is skipped.
    ejected_until: AtomicU64,
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
    endpoints: Vec<EndpointState>,
    next: AtomicUsize,
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
            endpoints,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Picks an endpoint not in `tried`, skipping ejected ones unless every one is ejected.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let now = self.now_ms();
        let n = self.endpoints.len();
        let candidates = || (0..n).filter(|i| !tried.contains(i));
        let healthy: Vec<usize> = candidates()
            .filter(|&i| self.endpoints[i].ejected_until.load(Ordering::Relaxed) <= now)
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

    /// Skips endpoint `i` for the service's ejection time.
    pub fn eject(&self, i: usize) {
        let until = self.now_ms() + u64::try_from(self.cfg.eject_for.as_millis()).unwrap_or(u64::MAX / 2);
        self.endpoints[i].ejected_until.store(until, Ordering::Relaxed);
    }

    /// Counts a request in flight on endpoint `i` until the guard drops.
    pub fn begin(self: &Arc<Self>, i: usize) -> InFlight {
        self.endpoints[i].in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            upstream: self.clone(),
            endpoint: i,
        }
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
            eject_for: Duration::from_mins(1),
            external: false,
        };
        Arc::new(Upstream::new(cfg, None, Vec::new(), 0))
    }

    #[test]
    fn round_robin_skips_ejected_and_tried() {
        let u = upstream(3, Balance::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| u.pick(&[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        u.eject(1);
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
}
