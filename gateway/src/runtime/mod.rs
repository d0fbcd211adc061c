//! The configuration in force: generations, built once and swapped whole.
//!
//! A [`Generation`] is one complete, validated configuration as the data path
//! uses it: listeners with their TLS contexts and routers, services with their
//! endpoint state, policy chains and gates. A reload builds a whole new one and
//! publishes it with one pointer swap ([`Shared::publish`]); each request takes
//! the generation current when its head arrives and keeps it to the end, so no
//! request ever sees half a change.

pub mod health;
pub mod memory;
pub mod route;
pub mod service;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::ServerConfig;

use crate::config::{Config, ConfigError, ConfigErrors, ProxySettings};
use crate::gatekeeper::{self, Gates};
use crate::telemetry::Metrics;
use route::Router;
use service::Upstream;

/// A listener at run time.
#[derive(Debug)]
pub struct ListenerRt {
    /// Where it listens.
    pub addr: SocketAddr,
    /// TLS server config, if the listener is `https`.
    pub tls: Option<Arc<ServerConfig>>,
    /// Whether it also takes cleartext HTTP/2 with prior knowledge.
    pub h2c: bool,
    /// The sources allowed to connect, each opening with a PROXY header; `None`: no PROXY protocol.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
    /// The SYN limits the configuration sets for it at the NIC.
    pub syn_limit: Option<crate::config::SynLimitConfig>,
    /// Its routes.
    pub router: Router,
}

/// One complete, validated configuration as the data path uses it.
#[derive(Debug)]
pub struct Generation {
    /// Listeners by address.
    pub listeners: HashMap<SocketAddr, Arc<ListenerRt>>,
    /// Services, indexed as routes refer to them.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Proxy settings.
    pub settings: ProxySettings,
    /// Policy chains by API instance name.
    pub chains: HashMap<String, Arc<crate::policy::Chain>>,
    /// The configuration it was built from.
    pub config: Arc<Config>,
    /// Every API instance's gate.
    pub gates: Gates,
    /// Policies that failed to build, located; their API instances are gated.
    pub policy_errors: Vec<ConfigError>,
}

impl Generation {
    /// Builds a generation from a validated config, loading all TLS material
    /// and building every policy chain. A policy that fails does not fail the
    /// build: its API instance's gate stays closed (see [`gatekeeper`]).
    /// Services whose configuration and TLS files are unchanged from `previous`
    /// are carried over, with their health state and pooled connections.
    pub fn build(config: Config, previous: Option<&Generation>) -> Result<Self, ConfigErrors> {
        let mut errors: Vec<ConfigError> = Vec::new();
        let mut listeners = HashMap::new();
        for l in &config.listeners {
            let tls = match &l.tls {
                Some(t) => match crate::tls::server_config(t) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        errors.extend(e);
                        None
                    }
                },
                None => None,
            };
            let rt = ListenerRt {
                addr: l.addr,
                tls,
                h2c: l.h2c,
                proxy_protocol: l.proxy_protocol.clone(),
                syn_limit: l.syn_limit,
                router: Router::new(l.routes.clone()),
            };
            listeners.insert(l.addr, Arc::new(rt));
        }
        let mut upstreams = Vec::new();
        for s in &config.services {
            let fingerprint = s.tls.as_ref().map(crate::tls::fingerprint).unwrap_or_default();
            let reuse = previous.and_then(|p| {
                p.upstreams
                    .iter()
                    .find(|u| u.cfg == *s && u.tls_fingerprint == fingerprint)
                    .cloned()
            });
            if let Some(u) = reuse {
                upstreams.push(u);
                continue;
            }
            let (tls, names) = match &s.tls {
                Some(t) => {
                    let client = match crate::tls::client_config(t) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            errors.extend(e);
                            None
                        }
                    };
                    let mut names = Vec::new();
                    for ep in &s.endpoints {
                        match crate::tls::upstream_name(t.sni.as_deref(), &ep.host) {
                            Ok(n) => names.push(n),
                            Err(e) => errors.push(t.origin.error(e)),
                        }
                    }
                    (client, names)
                }
                None => (None, Vec::new()),
            };
            upstreams.push(Arc::new(Upstream::new(s.clone(), tls, names, fingerprint)));
        }
        let (chains, mut gates, policy_errors) = build_chains(&config);
        if let Some(previous) = previous {
            gates.carry_since(&previous.gates);
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Self {
            listeners,
            upstreams,
            settings: config.proxy.clone(),
            chains,
            config: Arc::new(config),
            gates,
            policy_errors,
        })
    }

    /// Like [`Generation::build`], but a policy that fails is an error too:
    /// what `portcullis check` and CI want to know before deploying.
    pub fn build_checked(config: Config) -> Result<Self, ConfigErrors> {
        let generation = Self::build(config, None)?;
        if generation.policy_errors.is_empty() {
            Ok(generation)
        } else {
            let mut errors = generation.policy_errors;
            errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            Err(ConfigErrors(errors))
        }
    }

    /// The same generation with other gates: how a gate closes while an edit is applied.
    #[must_use]
    pub fn with_gates(&self, gates: Gates) -> Self {
        Self {
            listeners: self.listeners.clone(),
            upstreams: self.upstreams.clone(),
            settings: self.settings.clone(),
            chains: self.chains.clone(),
            config: self.config.clone(),
            gates,
            policy_errors: self.policy_errors.clone(),
        }
    }

    /// Whether every API instance on the listener at `addr` is gated, so the
    /// NIC may answer for the whole listener.
    pub fn listener_gated(&self, addr: &SocketAddr) -> bool {
        self.config
            .listeners
            .iter()
            .find(|l| l.addr == *addr)
            .is_none_or(|l| self.gates.all_closed(l.routes.iter().map(|r| r.api.as_str())))
    }
}

/// Every API instance's policy chain and gate, and the policies that failed.
fn build_chains(
    config: &Config,
) -> (
    HashMap<String, Arc<crate::policy::Chain>>,
    Gates,
    Vec<ConfigError>,
) {
    let mut chains = HashMap::new();
    let mut gates = Gates::new(config.gateway.gate_level);
    let mut policy_errors = Vec::new();
    for route in config.listeners.iter().flat_map(|l| &l.routes) {
        let mut policies = Vec::new();
        let mut failures = Vec::new();
        for spec in &route.policies {
            let ctx = crate::policy::Context {
                api: &route.api,
                contracts: &config.contracts,
                shared_storage: config.gateway.redis.is_some(),
                base: &config.dir,
                cluster: &config.gateway.cluster,
            };
            match crate::policy::build(&spec.name, &spec.config, ctx) {
                Ok(p) => policies.push((p, spec.rules.clone())),
                Err(e) => {
                    failures.push(format!("{}: {e}", spec.name));
                    let at = match e {
                        crate::policy::PolicyError::Config(_) => &spec.origin,
                        _ => &spec.name_at,
                    };
                    policy_errors.push(at.error(e.to_string()));
                }
            }
        }
        let chain = crate::policy::Chain::scoped(policies);
        let built = gatekeeper::Built {
            failures: &failures,
            needs_contracts: chain.needs_contracts(),
            has_contracts: config.contracts.iter().any(|c| c.apis.contains(&route.api)),
        };
        gates.insert(&route.api, gatekeeper::decide(config.gateway.gate_level, built));
        chains.insert(route.api.clone(), Arc::new(chain));
    }
    (chains, gates, policy_errors)
}

/// Sockets a worker starts accepting on after a reload added their listener.
pub type NewListener = (SocketAddr, std::net::TcpListener);

/// State shared by every worker.
#[derive(Debug)]
pub struct Shared {
    current: RwLock<Arc<Generation>>,
    version: AtomicU64,
    /// Settings fixed at start (worker count, admin address, connection limit).
    pub startup: ProxySettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Workers that have started accepting.
    pub ready_workers: AtomicUsize,
    /// Client connections each worker holds at most: `maxConnections`, or
    /// less when the descriptor limit cannot hold that many (see
    /// [`Shared::fit_descriptors`]).
    pub max_connections: usize,
    /// Set once start is complete (the NIC synced, the source watched): `/readyz` waits for it.
    pub started: std::sync::atomic::AtomicBool,
    /// Set when the gateway stops: no new requests on kept-alive connections.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes connections idling between requests when a drain starts.
    pub drain: tokio::sync::Notify,
    /// One channel per worker for listeners added by a reload.
    pub new_listeners: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<NewListener>>>,
    /// WebSocket tunnels open per API instance.
    pub tunnels: Tunnels,
    /// What the cgroup's memory lets the workers take on (see [`memory`]).
    pub memory: memory::MemoryGuard,
}

/// WebSocket tunnels open per API instance, across workers and generations.
#[derive(Debug, Default)]
pub struct Tunnels(Mutex<HashMap<String, u32>>);

impl Tunnels {
    /// Takes a slot for a new tunnel on `api`, unless `limit` are open already.
    pub fn open<'a>(&'a self, api: &str, limit: Option<u32>) -> Option<TunnelSlot<'a>> {
        let mut open = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(api.to_owned()).or_default();
        if limit.is_some_and(|l| *count >= l) {
            return None;
        }
        *count += 1;
        Some(TunnelSlot {
            tunnels: self,
            api: api.to_owned(),
        })
    }
}

/// One open tunnel's place in its API's count, given back on drop.
#[derive(Debug)]
pub struct TunnelSlot<'a> {
    tunnels: &'a Tunnels,
    api: String,
}

impl Drop for TunnelSlot<'_> {
    fn drop(&mut self) {
        let mut open = self
            .tunnels
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.api) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.api);
            }
        }
    }
}

/// Client connections per worker that `open_files` descriptors hold when
/// each may need an upstream connection too, a reserve kept for listeners,
/// logs, maps, stores and the accept that refuses: so a full gateway closes
/// new connections at accept, never fails an accept or a connect on EMFILE.
pub fn descriptor_fit(open_files: u64, workers: usize) -> usize {
    let reserve = 64 + open_files / 16;
    let workers = u64::try_from(workers.max(1)).unwrap_or(u64::MAX);
    let fit = open_files.saturating_sub(reserve) / (2 * workers);
    usize::try_from(fit).unwrap_or(usize::MAX).max(1)
}

impl Shared {
    /// Shared state starting with `generation`.
    pub fn new(generation: Generation, metrics: Arc<Metrics>) -> Self {
        gauge_gates(&metrics, None, &generation.gates);
        Self {
            startup: generation.settings.clone(),
            max_connections: generation.settings.max_connections,
            current: RwLock::new(Arc::new(generation)),
            version: AtomicU64::new(1),
            metrics,
            ready_workers: AtomicUsize::new(0),
            started: std::sync::atomic::AtomicBool::new(false),
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            drain: tokio::sync::Notify::new(),
            new_listeners: Mutex::new(Vec::new()),
            tunnels: Tunnels::default(),
            memory: memory::MemoryGuard::default(),
        }
    }

    /// Lowers [`Shared::max_connections`] to what `open_files` descriptors
    /// hold (see [`descriptor_fit`]); the limit now in force.
    pub fn fit_descriptors(&mut self, open_files: u64) -> usize {
        self.max_connections = self
            .max_connections
            .min(descriptor_fit(open_files, self.startup.workers));
        self.max_connections
    }

    /// Counts publications: a worker re-reads [`Shared::current`] only when it changes.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The generation in force.
    pub fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    }

    /// Stops taking requests: idle keep-alive connections close now, busy ones after their response.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.notify_waiters();
    }

    /// Puts `generation` in force for every request that starts from now on.
    pub fn publish(&self, generation: Generation) {
        let generation = Arc::new(generation);
        let previous = match self.current.write() {
            Ok(mut g) => std::mem::replace(&mut *g, generation.clone()),
            Err(p) => std::mem::replace(&mut *p.into_inner(), generation.clone()),
        };
        self.version.fetch_add(1, Ordering::Release);
        gauge_gates(&self.metrics, Some(&previous.gates), &generation.gates);
    }
}

/// Sets the `gate_open` gauge of every API instance, dropping those gone since `previous`.
fn gauge_gates(metrics: &Metrics, previous: Option<&Gates>, gates: &Gates) {
    use crate::telemetry::ApiLabels;
    for (api, _) in previous.map(Gates::sorted).unwrap_or_default() {
        if gates.get(api).is_none() {
            metrics.gate_open.remove(&ApiLabels { api: api.to_owned() });
        }
    }
    for (api, gate) in gates.sorted() {
        let labels = ApiLabels { api: api.to_owned() };
        metrics
            .gate_open
            .get_or_create(&labels)
            .set(i64::from(gate.is_open()));
    }
}

#[cfg(test)]
mod tests {
    use super::descriptor_fit;

    #[test]
    fn the_descriptor_limit_caps_connections_with_a_reserve() {
        // 1024 descriptors, 2 workers: 128 kept, 896 for client and upstream pairs.
        assert_eq!(descriptor_fit(1024, 2), 224);
        // The unit's LimitNOFILE leaves the default of 65,536 per worker alone.
        assert!(descriptor_fit(1_048_576, 2) > 65_536);
        assert_eq!(descriptor_fit(10, 4), 1, "never zero");
    }
}
