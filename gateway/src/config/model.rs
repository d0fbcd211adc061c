//! The validated configuration: what the rest of the gateway reads. The
//! conversion from raw resources is in the `build` module.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ConfigError;
use super::secret::Secret;
use crate::http::HeadLimits;

/// API versions accepted in `apiVersion`.
pub const API_VERSIONS: [&str; 2] = ["gateway.mulesoft.com/v1alpha1", "portcullis.dev/v1alpha1"];

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listeners with their routes, in address order.
    pub listeners: Vec<ListenerConfig>,
    /// Upstream services; routes refer to them by index.
    pub services: Vec<ServiceConfig>,
    /// Proxy-wide settings.
    pub proxy: ProxySettings,
    /// Logging, shared storage, Gatekeeper.
    pub gateway: GatewaySettings,
    /// Client applications and the APIs they may call.
    pub contracts: Vec<ContractConfig>,
    /// Problems that do not stop the configuration from loading.
    pub warnings: Vec<ConfigError>,
    /// The directory relative file references resolve against.
    pub dir: PathBuf,
    /// This replica's control plane, in connected mode.
    pub registration: Option<RegistrationConfig>,
}

impl Config {
    /// How many routes (API instance bindings) its listeners hold.
    pub fn route_count(&self) -> usize {
        self.listeners.iter().map(|l| l.routes.len()).sum()
    }

    /// Nothing to serve: what runs while the configuration source cannot be read and no cache can stand in.
    pub fn empty(dir: &Path) -> Self {
        Self {
            listeners: Vec::new(),
            services: Vec::new(),
            proxy: ProxySettings::default(),
            gateway: GatewaySettings::default(),
            contracts: Vec::new(),
            warnings: Vec::new(),
            dir: dir.to_path_buf(),
            registration: None,
        }
    }
}

/// A replica's registration with its control plane (connected mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// The replica's name.
    pub replica: String,
    /// Its gateway cluster.
    pub cluster: String,
    /// `https://HOST:PORT` of the control plane.
    pub control_plane: String,
    /// The replica's certificate file.
    pub certificate: PathBuf,
    /// The replica's key file (checked 0600).
    pub key: PathBuf,
    /// The control plane's CA file.
    pub ca_bundle: PathBuf,
    /// Where the resource is.
    pub origin: Origin,
}

/// Gatekeeper level (see docs/architecture.md, the Gatekeeper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateLevel {
    /// 503 until every policy is applied; stays 503 while the control plane is unreachable.
    Strict,
    /// 503 until every policy is applied; opens on cached policies when the control plane is unreachable.
    #[default]
    Flexible,
    /// Never 503.
    Disabled,
}

impl GateLevel {
    /// Lowercase name, as configured and reported.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Flexible => "flexible",
            Self::Disabled => "disabled",
        }
    }
}

/// Gateway-wide settings beyond the proxy's.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    /// Runtime log level (`error` … `trace`).
    pub log_level: String,
    /// One access line per request.
    pub access_logs: bool,
    /// Where logs go besides stderr.
    pub log_outputs: Vec<crate::telemetry::logs::Output>,
    /// Distributed tracing, if configured.
    pub tracing: Option<crate::telemetry::trace::Settings>,
    /// Redis shared storage, if configured.
    pub redis: Option<RedisConfig>,
    /// Gatekeeper level.
    pub gate_level: GateLevel,
    /// Whether a policy edit closes the route until it is applied.
    pub block_edit: bool,
    /// Whether XDP drops SYNs to gated listeners instead of answering them (503 or reset).
    pub nic_drop: bool,
    /// Name of this gateway cluster (the Configuration's `metadata.name`): shared-storage keys are namespaced by it.
    pub cluster: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            access_logs: true,
            log_outputs: Vec::new(),
            tracing: None,
            redis: None,
            gate_level: GateLevel::Flexible,
            block_edit: true,
            nic_drop: false,
            cluster: "default".into(),
        }
    }
}

/// Redis connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `host:port`.
    pub address: String,
    /// ACL user.
    pub username: Option<String>,
    /// Password, resolved from its secret reference.
    pub password: Option<Secret>,
    /// Database number.
    pub db: u32,
    /// TLS, with an optional CA bundle.
    pub tls: Option<Option<Pem>>,
}

/// How a contract's client secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSecret {
    /// A hash as configured (`$argon2id$…`, `$2b$…`, `sha256:<hex>`).
    Hash(String),
    /// SHA-256 of a secret read from a reference, as `sha256:<hex>`.
    Sha256(String),
}

/// A client application's access to API instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractConfig {
    /// Resource name.
    pub name: String,
    /// Client application name.
    pub client_name: Option<String>,
    /// Client id.
    pub client_id: String,
    /// Hashed client secret, if any.
    pub secret: Option<ClientSecret>,
    /// SLA tier name.
    pub sla_tier: Option<String>,
    /// ApiInstances it may call.
    pub apis: Vec<String>,
}

/// Where a value was written, for errors found after validation (TLS files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File.
    pub file: String,
    /// Line.
    pub line: usize,
    /// Column.
    pub column: usize,
    /// Dotted field path.
    pub field: String,
}

impl Origin {
    /// An error at this origin.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            field: self.field.clone(),
            message: message.into(),
        }
    }
}

/// An address the gateway accepts connections on.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Socket address.
    pub addr: SocketAddr,
    /// Reachable from the internet (its certificates must never be used internally).
    pub external: bool,
    /// Inbound TLS, if the listener is `https`.
    pub tls: Option<InboundTls>,
    /// Whether a cleartext listener also takes HTTP/2 with prior knowledge (h2c).
    pub h2c: bool,
    /// PROXY protocol: every connection must open with a PROXY header, and
    /// only these sources may connect at all.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
    /// The SYN limits XDP applies; `None` leaves whatever the maps hold (the
    /// defaults, or `portcullis listener syn-limit` and `syn-budget`).
    pub syn_limit: Option<SynLimitConfig>,
    /// Routes, most specific first.
    pub routes: Vec<RouteConfig>,
}

/// A (host, base path) → API instance match, with the API's routes to its services.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// API instance name.
    pub api: String,
    /// Host patterns (exact or `*.suffix`); empty matches every host.
    pub hosts: Vec<String>,
    /// Base path, always starting with `/` and without a trailing `/` (except `/`).
    pub base_path: String,
    /// Where its requests go: the first route whose rules take a request.
    pub upstreams: Vec<super::UpstreamRoute>,
    /// Largest request body accepted.
    pub max_body: u64,
    /// Policies in the order they run: inline ones, then bound ones by `order`.
    pub policies: Vec<PolicySpec>,
    /// How WebSocket upgrades on this API are carried.
    pub websocket: WebSocketConfig,
}

/// How an API carries WebSocket connections: after the upstream's `101`
/// the connection is a byte tunnel, bounded by these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocketConfig {
    /// Whether an `Upgrade: websocket` handshake is passed on (otherwise the
    /// upgrade is dropped and the request forwarded as plain HTTP).
    pub enabled: bool,
    /// A tunnel with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// A tunnel is closed after this long, however busy.
    pub max_duration: Duration,
    /// Open tunnels allowed on this API across all workers; `None` is no limit.
    pub max_connections: Option<u32>,
    /// Whether a reload closes this API's open tunnels, so clients reconnect
    /// under the new policies.
    pub close_on_reload: bool,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            idle_timeout: Duration::from_mins(5),
            max_duration: Duration::from_hours(24),
            max_connections: None,
            close_on_reload: false,
        }
    }
}

/// A configured policy, validated by building it once at load.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    /// Policy name as written.
    pub name: String,
    /// Its configuration.
    pub config: serde_yaml_ng::Value,
    /// Where its configuration is written.
    pub origin: Origin,
    /// Where its name is written.
    pub name_at: Origin,
    /// The requests it applies to (empty: all).
    pub rules: Vec<super::Rule>,
}

/// Load-balancing choice among a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each endpoint in turn.
    RoundRobin,
    /// The endpoint with the fewest requests in flight.
    LeastRequests,
}

/// What `Host` the upstream receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostHeader {
    /// The client's `Host`.
    Preserve,
    /// The endpoint's `host:port` as written in the service address.
    Upstream,
    /// A fixed value.
    Fixed(String),
}

/// An upstream service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Name (a `Service` resource, or `api/service` for inline services).
    pub name: String,
    /// Endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Load balancing.
    pub balance: Balance,
    /// Outbound TLS, if the service is `https` or `h2`.
    pub tls: Option<OutboundTls>,
    /// Whether requests go to it over HTTP/2 (`h2c://` or `h2://`) instead of HTTP/1.1.
    pub http2: bool,
    /// The PROXY protocol version (1 or 2) each upstream connection opens with,
    /// naming its client; such connections carry one client's requests only.
    pub proxy_protocol: Option<u8>,
    /// Host header policy.
    pub host_header: HostHeader,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for the response head, and between response reads.
    pub response_timeout: Duration,
    /// Extra attempts on another endpoint, where safe.
    pub retries: u32,
    /// Active health checks of its endpoints, if configured.
    pub health: Option<HealthCheck>,
    /// When failing endpoints are ejected, and for how long.
    pub outlier: OutlierDetection,
    /// Limits beyond which its requests are answered 503.
    pub breaker: CircuitBreaker,
    /// Outside the private network (its client certificate must never face internal peers).
    pub external: bool,
}

/// Active HTTP health checks: `GET path` on every endpoint each `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The request target checked.
    pub path: String,
    /// Time between checks of one endpoint.
    pub interval: Duration,
    /// Longest a check may take (connect to response head).
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Inclusive status ranges that pass.
    pub expected: Vec<(u16, u16)>,
}

impl HealthCheck {
    /// Whether `status` passes.
    pub fn expects(&self, status: u16) -> bool {
        self.expected.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

/// Passive outlier detection: failures in a row eject an endpoint for a
/// time that grows with each ejection, never more than a share of the
/// endpoints at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    /// 5xx responses in a row that eject (0: never).
    pub consecutive_5xx: u32,
    /// Failed connections in a row that eject (0: never).
    pub consecutive_connect_failures: u32,
    /// The first ejection's length; the n-th lasts n times this.
    pub base_ejection: Duration,
    /// The longest an ejection lasts.
    pub max_ejection: Duration,
    /// The largest share of the endpoints ejected at once, in percent (at least one).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_connect_failures: 1,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_mins(5),
            max_ejection_percent: 50,
        }
    }
}

/// A service's circuit breaker (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Upstream connections carrying requests at once (idle pooled ones not counted).
    pub max_connections: Option<u32>,
    /// Requests waiting for or being answered by the service at once.
    pub max_pending_requests: Option<u32>,
}

/// One upstream endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Resolved address.
    pub addr: SocketAddr,
    /// `host[:port]` as written, for `Host` and SNI.
    pub authority: String,
    /// Host name as written.
    pub host: String,
}

/// A PEM source: a file, or (certificates only) inline text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pem {
    /// Read from this file.
    File(PathBuf),
    /// Inline PEM text.
    Inline(String),
}

/// A certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// Certificate chain.
    pub crt: Pem,
    /// Private key (PEM), resolved from its secret reference.
    pub key: Secret,
    /// Where the pair was configured.
    pub origin: Origin,
}

/// TLS protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2.
    V12,
    /// TLS 1.3.
    V13,
}

/// Inbound TLS of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundTls {
    /// Certificates; the first is the default when SNI matches none.
    pub certs: Vec<CertPair>,
    /// CA bundle that client certificates must chain to.
    pub client_ca: Option<Pem>,
    /// Whether a client certificate is required (else only verified when sent).
    pub require_client_cert: bool,
    /// Lowest version offered.
    pub min: TlsVersion,
    /// Highest version offered.
    pub max: TlsVersion,
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
    /// Where it was configured.
    pub origin: Origin,
}

/// Outbound TLS to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundTls {
    /// CA bundle for the upstream's certificate; the system roots when absent.
    pub ca: Option<Pem>,
    /// Client certificate for mTLS.
    pub client: Option<CertPair>,
    /// Name sent in SNI and verified; the endpoint host when absent.
    pub sni: Option<String>,
    /// Lowest version.
    pub min: TlsVersion,
    /// Highest version.
    pub max: TlsVersion,
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
    /// Where it was configured.
    pub origin: Origin,
}

/// How `X-Forwarded-For` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XffMode {
    /// Append the client address to what the client sent.
    Append,
    /// Replace whatever the client sent with its address.
    Replace,
    /// Leave the header as the client sent it.
    Off,
}

/// Forwarding headers added upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// `X-Forwarded-For`.
    pub xff: XffMode,
    /// Set `X-Forwarded-Proto`.
    pub proto: bool,
    /// Set `X-Forwarded-Host`.
    pub host: bool,
    /// Add `Via`.
    pub via: bool,
}

/// Proxy timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Time a client has to send a complete request head.
    pub request_headers: Duration,
    /// Time a keep-alive connection may sit idle, and the limit on each body read/write.
    pub idle: Duration,
    /// Default upstream connect timeout.
    pub upstream_connect: Duration,
    /// Default upstream response timeout.
    pub upstream_response: Duration,
}

/// Proxy-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// Worker threads (one io_uring each).
    pub workers: usize,
    /// Admin listener (health, readiness, metrics); loopback by default.
    pub admin: Option<SocketAddr>,
    /// Request head limits.
    pub limits: HeadLimits,
    /// Default largest request body.
    pub max_body: u64,
    /// Most client connections open at once per worker.
    pub max_connections: usize,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Forwarding headers.
    pub forwarded: Forwarded,
    /// HTTP/2 connection limits.
    pub http2: Http2Settings,
    /// PROXY protocol on every listener that does not say otherwise: the trusted sources.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
}

/// Limits of one HTTP/2 client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// Streams a client may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Receive window of one stream, in bytes.
    pub stream_window: u32,
    /// Receive window of the whole connection, in bytes.
    pub connection_window: u32,
    /// Control frames (SETTINGS, PING, PRIORITY, RST_STREAM, small WINDOW_UPDATE,
    /// empty DATA) a client may send per second, with twice that as a burst,
    /// before it is sent `GOAWAY ENHANCE_YOUR_CALM` and closed.
    pub control_frames_per_second: u32,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            stream_window: 256 * 1024,
            connection_window: 1024 * 1024,
            control_frames_per_second: 1000,
        }
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            limits: HeadLimits::default(),
            max_body: 16 * 1024 * 1024,
            max_connections: 65_536,
            timeouts: Timeouts {
                request_headers: Duration::from_secs(10),
                idle: Duration::from_mins(1),
                upstream_connect: Duration::from_secs(5),
                upstream_response: Duration::from_secs(30),
            },
            forwarded: Forwarded {
                xff: XffMode::Append,
                proto: true,
                host: true,
                via: true,
            },
            http2: Http2Settings::default(),
            proxy_protocol: None,
        }
    }
}

/// An address prefix written as a CIDR (`192.0.2.0/24`, `2001:db8::/32`) or a
/// single address (`192.0.2.7`, a /32 or /128).
pub fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Parses `250ms`, `10s`, `2m` or `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 250ms, 10s, 2m or 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return Err(format!("`{text}` is not a duration like 250ms, 10s, 2m or 1h")),
    };
    if d.is_zero() {
        return Err("a timeout of zero would fail every request; give a positive duration".into());
    }
    Ok(d)
}

/// A parsed `scheme://host:port/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https` or `h2`.
    pub tls: bool,
    /// `h2c` (cleartext HTTP/2 with prior knowledge) or `h2` (HTTP/2 over TLS).
    pub http2: bool,
    /// Host as written (brackets removed for IPv6).
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// Path, `/` when absent.
    pub path: String,
}

/// Parses an `http://`, `https://`, `h2c://` or `h2://` address.
pub fn parse_url(text: &str) -> Result<Url, String> {
    let schemes = [
        ("http://", false, false),
        ("https://", true, false),
        ("h2c://", false, true),
        ("h2://", true, true),
    ];
    let Some((tls, http2, rest)) = schemes
        .iter()
        .find_map(|(scheme, tls, http2)| text.strip_prefix(scheme).map(|rest| (*tls, *http2, rest)))
    else {
        return Err(format!(
            "`{text}` must start with http://, https://, h2c:// or h2://"
        ));
    };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    if path.contains(['?', '#']) {
        return Err(format!("`{text}` must not carry a query or fragment"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{text}`: unclosed [ in the host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{text}` has no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{text}`: port `{p}` is not 1-65535"))?,
        None if tls => 443,
        None => 80,
    };
    Ok(Url {
        tls,
        http2,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigErrors, MemSource, load};

    fn load_str(text: &str) -> Result<Config, ConfigErrors> {
        load(&MemSource {
            files: vec![("api.yaml".into(), text.into())],
            base: PathBuf::from("/etc/portcullis"),
        })
    }

    const API: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: orders
spec:
  address: http://0.0.0.0:8080/orders/
  services:
    backend:
      address: http://127.0.0.1:9000/api
";

    #[test]
    fn inline_service_becomes_a_route() {
        let cfg = load_str(API).unwrap();
        assert_eq!(cfg.listeners.len(), 1);
        let route = &cfg.listeners[0].routes[0];
        let [upstream] = &route.upstreams[..] else {
            panic!("one route: {:?}", route.upstreams)
        };
        let [to] = &upstream.destinations[..] else {
            panic!("one destination: {upstream:?}")
        };
        assert_eq!((route.base_path.as_str(), to.path.as_str()), ("/orders", "/api"));
        assert_eq!(
            cfg.services[to.service].endpoints[0].addr,
            "127.0.0.1:9000".parse().unwrap()
        );
    }

    /// A destination as (service name, path, weight).
    type Shares = (String, String, u32);

    #[test]
    fn services_routes_come_in_file_order_then_route_bindings_by_order() {
        let cfg = load_str(include_str!("../../tests/config/valid/08-routing.yaml")).unwrap();
        let route = &cfg.listeners[0].routes[0];
        let service = |d: &crate::config::Destination| cfg.services[d.service].name.clone();
        let seen: Vec<(usize, Vec<Shares>)> = route
            .upstreams
            .iter()
            .map(|u| {
                let to = u
                    .destinations
                    .iter()
                    .map(|d| (service(d), d.path.clone(), d.weight));
                (u.rules.len(), to.collect())
            })
            .collect();
        let one = |name: &str, path: &str| vec![(name.to_string(), path.to_string(), 100)];
        assert_eq!(
            seen,
            vec![
                (1, one("shop/catalog", "/v1/items")),
                (1, one("shop/catalog", "/catalog")),
                (2, one("shop/orders", "/")),
                (
                    1,
                    vec![
                        ("shop/orders".into(), "/cart".into(), 90),
                        ("cart-v2".into(), "/".into(), 10)
                    ]
                ),
                (0, one("cart-v2", "/")),
            ]
        );
        let rules = &route.policies[0].rules;
        assert_eq!(
            rules[0].methods.as_ref().map(crate::config::Pattern::source),
            Some("POST|PUT")
        );
        assert_eq!(route.upstreams[1].rules[0].headers[0].0, "x-beta");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = API.replace("http://127.0.0.1:9000/api", "ftp://x");
        let err = load_str(&text).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].line, 9, "{err}");
        assert_eq!(err.0[0].field, "spec.services.backend.address");
        assert!(
            err.0[0]
                .to_string()
                .starts_with("api.yaml:9:7: spec.services.backend.address: `ftp://x` must start"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_located() {
        let text = API.replace("    backend:\n", "    backend:\n      adress: x\n");
        let err = load_str(&text).unwrap_err();
        assert_eq!(err.0[0].line, 9, "{err}");
        assert!(err.0[0].message.contains("unknown field `adress`"), "{err}");
        assert_eq!(err.0[0].field, "spec.services.backend");
    }

    #[test]
    fn every_error_is_reported() {
        let text = format!(
            "{API}---\n{}",
            API.replace("name: orders", "name: Bad_Name")
                .replace(":8080/orders/", ":99999/x")
        );
        let err = load_str(&text).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert_eq!(err.0[0].line, 14, "{err}");
        assert_eq!(err.0[1].line, 16, "{err}");
    }

    #[test]
    fn inline_keys_are_refused() {
        let text = format!(
            "{API}---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: tls
spec:
  targetRef:
    name: orders
  policyRef:
    name: tls
  config:
    certificate:
      crt: ${{file:cert.pem}}
      key: \"-----BEGIN PRIVATE KEY-----\"
"
        );
        let err = load_str(&text).unwrap_err();
        assert!(
            err.0
                .iter()
                .any(|e| e.field == "spec.config.certificate.key" && e.line == 23),
            "{err}"
        );
    }

    #[test]
    fn durations_and_urls() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        let u = parse_url("https://[::1]:8443/a").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "::1", 8443, "/a")
        );
        assert!(parse_url("http://h:0/").is_err());
    }
}

/// A listener's SYN limits at the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynLimitConfig {
    /// SYNs per second per source (/32 or /64); 0: no per-source limit.
    pub rate: u32,
    /// SYNs a source may send at once.
    pub burst: u32,
    /// SYNs per second per CPU the kernel's handshake takes before XDP
    /// answers with SYN cookies (0: never); `None` keeps what the maps hold.
    pub budget: Option<u32>,
}
