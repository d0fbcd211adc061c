//! Validated configuration and the conversion from raw resources.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::locate::LineIndex;
use super::raw;
use super::secret::{self, Resolver, Secret, SecretError, SecretSource};
use super::{ConfigError, ConfigErrors};
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
        }
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    /// Runtime log level (`error` … `trace`).
    pub log_level: String,
    /// One access line per request.
    pub access_logs: bool,
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
    /// Routes, most specific first.
    pub routes: Vec<RouteConfig>,
}

/// A (host, base path) → API instance → service match.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// API instance name.
    pub api: String,
    /// Host patterns (exact or `*.suffix`); empty matches every host.
    pub hosts: Vec<String>,
    /// Base path, always starting with `/` and without a trailing `/` (except `/`).
    pub base_path: String,
    /// Index into [`Config::services`].
    pub service: usize,
    /// Path prefix the base path is replaced with upstream.
    pub upstream_path: String,
    /// Largest request body accepted.
    pub max_body: u64,
    /// Policies in the order they run: inline ones, then bound ones by `order`.
    pub policies: Vec<PolicySpec>,
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
    /// Outbound TLS, if the service is `https`.
    pub tls: Option<OutboundTls>,
    /// Host header policy.
    pub host_header: HostHeader,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for the response head, and between response reads.
    pub response_timeout: Duration,
    /// Extra attempts on another endpoint, where safe.
    pub retries: u32,
    /// How long an endpoint that refused a connection is skipped.
    pub eject_for: Duration,
    /// Outside the private network (its client certificate must never face internal peers).
    pub external: bool,
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
    /// `http` or `https`.
    pub tls: bool,
    /// Host as written (brackets removed for IPv6).
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// Path, `/` when absent.
    pub path: String,
}

/// Parses an `http://` or `https://` address.
pub fn parse_url(text: &str) -> Result<Url, String> {
    let (tls, rest) = if let Some(rest) = text.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = text.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(format!("`{text}` must start with http:// or https://"));
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
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

fn normalize_base(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    }
}

/// A document being read: file, its index, and the document number in it.
struct Doc<'a> {
    file: &'a str,
    index: &'a LineIndex,
    n: usize,
}

impl Doc<'_> {
    fn at(&self, field: &str) -> Origin {
        let (line, column) = self.index.position(self.n, field);
        Origin {
            file: self.file.to_string(),
            line,
            column,
            field: field.to_string(),
        }
    }
}

struct Collector {
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    resolver: Resolver,
}

impl Collector {
    fn push(&mut self, origin: &Origin, message: impl Into<String>) {
        self.errors.push(origin.error(message));
    }
}

/// A non-TLS policy bound to an ApiInstance: order, position among bindings,
/// the policy, and where its target is named.
type BoundPolicy = (Option<u32>, usize, PolicySpec, Origin);

/// Index of a Service resource that failed validation.
const BROKEN: usize = usize::MAX;

/// A listener being assembled: https?, its routes with where each was defined, its TLS context.
type ListenerDraft = (
    bool,
    Vec<(RouteConfig, Origin)>,
    Option<InboundTls>,
    Option<(bool, Origin)>,
);

struct ApiDoc<'a> {
    doc: Doc<'a>,
    name: String,
    spec: raw::ApiInstanceSpec,
}

struct ServiceDoc<'a> {
    doc: Doc<'a>,
    spec: raw::ServiceSpec,
}

struct BindingDoc<'a> {
    doc: Doc<'a>,
    spec: raw::PolicyBindingSpec,
}

/// Turns a serde_yaml_ng error into a located error.
fn serde_error(file: &str, e: &serde_yaml_ng::Error) -> ConfigError {
    let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
    let mut message = e.to_string();
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    let (field, message) = match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
        _ => (String::new(), message),
    };
    ConfigError {
        file: file.to_string(),
        line,
        column,
        field,
        message,
    }
}

fn typed<S: for<'de> Deserialize<'de>>(
    file: &str,
    de: serde_yaml_ng::Deserializer<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<raw::Typed<S>> {
    match raw::Typed::<S>::deserialize(de) {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(serde_error(file, &e));
            None
        }
    }
}

/// Builds the validated configuration from `(file, text)` pairs.
#[expect(
    clippy::too_many_lines,
    reason = "one pass over every kind, in the order resources refer to each other"
)]
pub(super) fn build(files: &[(String, String)], base: &Path) -> Result<Config, ConfigErrors> {
    let mut c = Collector {
        errors: Vec::new(),
        warnings: Vec::new(),
        resolver: Resolver::new(None),
    };
    let indexes: Vec<LineIndex> = files.iter().map(|(_, text)| LineIndex::build(text)).collect();
    let mut apis = Vec::new();
    let mut services = Vec::new();
    let mut bindings = Vec::new();
    let mut configuration: Option<(Doc, raw::ConfigurationSpec)> = None;
    let mut contracts = Vec::new();
    let mut cluster_name = String::from("default");

    for ((file, text), index) in files.iter().zip(&indexes) {
        // `None` marks a document to skip: empty (a trailing `---`) or already reported.
        // After a syntax error the document stream cannot be trusted (it may
        // repeat the error forever): report the first error and skip the file.
        let documents = index.documents().max(1);
        let mut kinds: Vec<Option<String>> = Vec::new();
        for de in serde_yaml_ng::Deserializer::from_str(text).take(documents) {
            match Option::<raw::Envelope>::deserialize(de) {
                Ok(env) => kinds.push(env.map(|e| e.kind)),
                Err(e) => {
                    c.errors.push(serde_error(file, &e));
                    if !index.syntax_ok() {
                        break;
                    }
                    kinds.push(None);
                }
            }
        }
        if !index.syntax_ok() {
            if !c.errors.iter().any(|e| &e.file == file) {
                c.errors.push(ConfigError {
                    file: file.clone(),
                    line: 1,
                    column: 1,
                    field: String::new(),
                    message: "not valid YAML".into(),
                });
            }
            continue;
        }
        for (n, de) in serde_yaml_ng::Deserializer::from_str(text)
            .take(documents)
            .enumerate()
        {
            let Some(Some(kind)) = kinds.get(n) else { continue };
            let doc = Doc { file, index, n };
            match kind.as_str() {
                "ApiInstance" => {
                    if let Some(t) = typed::<raw::ApiInstanceSpec>(file, de, &mut c.errors) {
                        check_envelope(&doc, &t.api_version, &t.metadata, &mut c);
                        apis.push(ApiDoc { doc, name: t.metadata.name, spec: t.spec });
                    }
                }
                "Service" => {
                    if let Some(t) = typed::<raw::ServiceSpec>(file, de, &mut c.errors) {
                        check_envelope(&doc, &t.api_version, &t.metadata, &mut c);
                        services.push((t.metadata.name, ServiceDoc { doc, spec: t.spec }));
                    }
                }
                "PolicyBinding" => {
                    if let Some(t) = typed::<raw::PolicyBindingSpec>(file, de, &mut c.errors) {
                        check_envelope(&doc, &t.api_version, &t.metadata, &mut c);
                        bindings.push(BindingDoc { doc, spec: t.spec });
                    }
                }
                "Configuration" => {
                    if let Some(t) = typed::<raw::ConfigurationSpec>(file, de, &mut c.errors) {
                        check_envelope(&doc, &t.api_version, &t.metadata, &mut c);
                        if let Some((first, _)) = &configuration {
                            let at = first.at("metadata");
                            c.push(&doc.at("kind"), format!("a second Configuration; the first is at {}:{}", at.file, at.line));
                        } else {
                            cluster_name.clone_from(&t.metadata.name);
                            configuration = Some((doc, t.spec));
                        }
                    }
                }
                "Contract" => {
                    if let Some(t) = typed::<raw::ContractSpec>(file, de, &mut c.errors) {
                        check_envelope(&doc, &t.api_version, &t.metadata, &mut c);
                        contracts.push((doc, t.metadata.name, t.spec));
                    }
                }
                other => c.push(
                    &doc.at("kind"),
                    format!(
                        "unknown kind `{other}`; expected ApiInstance, Service, PolicyBinding, Configuration or Contract"
                    ),
                ),
            }
        }
    }

    let (proxy, gateway) = match &configuration {
        Some((doc, spec)) => {
            if let Some(key_file) = spec.secrets.as_ref().and_then(|s| s.key_file.as_ref()) {
                let path = Path::new(key_file);
                c.resolver = Resolver::new(Some(if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    base.join(path)
                }));
            }
            (
                proxy_settings(doc, spec, &mut c),
                gateway_settings(doc, spec, base, &mut c),
            )
        }
        None => (ProxySettings::default(), GatewaySettings::default()),
    };
    let mut gateway = gateway;
    gateway.cluster = cluster_name;
    let mut out = Config {
        listeners: Vec::new(),
        services: Vec::new(),
        proxy,
        gateway,
        contracts: Vec::new(),
        warnings: Vec::new(),
        dir: base.to_path_buf(),
    };

    // Named Service resources first, so ApiInstances can refer to them.
    let mut service_index: HashMap<String, usize> = HashMap::new();
    let mut service_docs: HashMap<String, &Doc> = HashMap::new();
    for (name, sd) in &services {
        if let Some(prev) = service_docs.get(name) {
            c.push(
                &sd.doc.at("metadata.name"),
                format!(
                    "Service `{name}` is defined twice (also {}:{})",
                    prev.file,
                    prev.at("metadata.name").line
                ),
            );
            continue;
        }
        if let Some(svc) = service(name, &sd.doc, "spec", &sd.spec, &out.proxy, &mut c) {
            service_index.insert(name.clone(), out.services.len());
            out.services.push(svc);
        } else {
            // Known but invalid (already reported): references to it stay quiet.
            service_index.insert(name.clone(), BROKEN);
        }
        service_docs.insert(name.clone(), &sd.doc);
    }

    // TLS bindings; the targets of broken ones are remembered so that the
    // missing context is not reported a second time.
    let mut broken_tls: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut bound: HashMap<&str, Vec<BoundPolicy>> = HashMap::new();
    let mut bound_seq = 0usize;
    let mut inbound: HashMap<String, InboundTls> = HashMap::new();
    for b in &bindings {
        let target_kind = b.spec.target_ref.kind.as_deref();
        check_namespace(
            &b.doc,
            "spec.targetRef.namespace",
            b.spec.target_ref.namespace.as_ref(),
            &mut c,
        );
        check_namespace(
            &b.doc,
            "spec.policyRef.namespace",
            b.spec.policy_ref.namespace.as_ref(),
            &mut c,
        );
        if b.spec.order.is_some() && matches!(b.spec.policy_ref.name.as_str(), "tls" | "tls-outbound") {
            c.push(
                &b.doc.at("spec.order"),
                "TLS policies have no order: they apply to the connection, not to requests",
            );
        }
        match b.spec.policy_ref.name.as_str() {
            "tls" => {
                if !matches!(target_kind, None | Some("ApiInstance")) {
                    c.push(
                        &b.doc.at("spec.targetRef.kind"),
                        "the inbound `tls` policy binds to an ApiInstance",
                    );
                    continue;
                }
                match inbound_tls(&b.doc, &b.spec.config, base, &mut c) {
                    Some(tls) => {
                        if inbound.insert(b.spec.target_ref.name.clone(), tls).is_some() {
                            c.push(
                                &b.doc.at("spec.targetRef.name"),
                                format!(
                                    "ApiInstance `{}` already has a tls binding",
                                    b.spec.target_ref.name
                                ),
                            );
                        }
                    }
                    None => {
                        broken_tls.insert(b.spec.target_ref.name.clone());
                    }
                }
            }
            "tls-outbound" => {
                if target_kind != Some("Service") {
                    c.push(
                        &b.doc.at("spec.targetRef"),
                        "the `tls-outbound` policy binds to a Service (targetRef.kind: Service)",
                    );
                    continue;
                }
                let Some(&si) = service_index
                    .get(&b.spec.target_ref.name)
                    .filter(|i| **i != BROKEN)
                else {
                    if service_index.contains_key(&b.spec.target_ref.name) {
                        continue;
                    }
                    c.push(
                        &b.doc.at("spec.targetRef.name"),
                        format!("no Service named `{}`", b.spec.target_ref.name),
                    );
                    continue;
                };
                if let Some(tls) = outbound_tls(&b.doc, &b.spec.config, base, &mut c) {
                    out.services[si].tls = Some(tls);
                }
            }
            other => {
                if !matches!(target_kind, None | Some("ApiInstance")) {
                    c.push(
                        &b.doc.at("spec.targetRef.kind"),
                        format!("policy `{other}` binds to an ApiInstance"),
                    );
                    continue;
                }
                bound.entry(b.spec.target_ref.name.as_str()).or_default().push((
                    b.spec.order,
                    bound_seq,
                    PolicySpec {
                        name: other.to_string(),
                        config: b.spec.config.clone(),
                        origin: b.doc.at("spec.config"),
                        name_at: b.doc.at("spec.policyRef.name"),
                    },
                    b.doc.at("spec.targetRef.name"),
                ));
                bound_seq += 1;
            }
        }
    }

    // ApiInstances → listeners and routes.
    let mut listeners: BTreeMap<SocketAddr, ListenerDraft> = BTreeMap::new();
    let mut api_names: HashMap<&str, Origin> = HashMap::new();
    for api in &apis {
        let name_at = api.doc.at("metadata.name");
        if let Some(prev) = api_names.insert(&api.name, name_at.clone()) {
            c.push(
                &name_at,
                format!(
                    "ApiInstance `{}` is defined twice (also {}:{})",
                    api.name, prev.file, prev.line
                ),
            );
            continue;
        }
        let addr_at = api.doc.at("spec.address");
        let url = match parse_url(&api.spec.address) {
            Ok(u) => u,
            Err(e) => {
                c.push(&addr_at, e);
                continue;
            }
        };
        let Ok(ip) = url.host.parse::<IpAddr>() else {
            c.push(
                &addr_at,
                format!(
                    "listen host `{}` must be an IP address (0.0.0.0 or [::] for all)",
                    url.host
                ),
            );
            continue;
        };
        let listen = SocketAddr::new(ip, url.port);
        for (i, host) in api.spec.hosts.iter().enumerate() {
            if let Err(e) = check_host_pattern(host) {
                c.push(&api.doc.at(&format!("spec.hosts[{i}]")), e);
            }
        }
        let mut policies = Vec::new();
        for (i, p) in api.spec.policies.iter().enumerate() {
            let field = format!("spec.policies[{i}]");
            check_namespace(
                &api.doc,
                &format!("{field}.policyRef.namespace"),
                p.policy_ref.namespace.as_ref(),
                &mut c,
            );
            if p.rules.is_some() {
                c.push(
                    &api.doc.at(&format!("{field}.rules")),
                    "policy rules are not supported; apply the policy to an ApiInstance of its own path",
                );
                continue;
            }
            policies.push(PolicySpec {
                name: p.policy_ref.name.clone(),
                config: p.config.clone(),
                origin: api.doc.at(&format!("{field}.config")),
                name_at: api.doc.at(&format!("{field}.policyRef.name")),
            });
        }
        let mut bound_here = bound.remove(api.name.as_str()).unwrap_or_default();
        bound_here.sort_by_key(|(order, n, _, _)| (order.unwrap_or(u32::MAX), *n));
        policies.extend(bound_here.into_iter().map(|(_, _, spec, _)| spec));
        let Some(service) = api_service(api, &mut out, &service_index, &mut c) else {
            continue;
        };
        let max_body = api
            .spec
            .limits
            .as_ref()
            .and_then(|l| l.max_body_bytes)
            .unwrap_or(out.proxy.max_body);
        let route = RouteConfig {
            api: api.name.clone(),
            hosts: api.spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            base_path: normalize_base(&url.path),
            service: service.0,
            upstream_path: service.1,
            max_body,
            policies,
        };
        let entry = listeners
            .entry(listen)
            .or_insert_with(|| (url.tls, Vec::new(), None, None));
        let external = network(
            &api.doc,
            "spec.network",
            api.spec.network.as_deref(),
            &[ip],
            &mut c,
        );
        match &entry.3 {
            Some((other, at)) if *other != external => c.push(
                &api.doc.at("spec.network"),
                format!(
                    "{listen} is {} here but {} at {}:{}; one port is one network",
                    side(external),
                    side(*other),
                    at.file,
                    at.line
                ),
            ),
            Some(_) => {}
            None => entry.3 = Some((external, api.doc.at("spec.address"))),
        }
        if entry.0 != url.tls {
            c.push(
                &addr_at,
                format!("{listen} is used with both http and https; one port has one scheme"),
            );
            continue;
        }
        if let Some(tls) = inbound.remove(&api.name) {
            if !url.tls {
                c.push(
                    &tls.origin,
                    format!(
                        "ApiInstance `{}` has a tls binding but an http:// address; use https://",
                        api.name
                    ),
                );
            } else if entry.2.is_some() {
                c.push(
                    &tls.origin,
                    format!("{listen} already has a TLS context from another ApiInstance; TLS is per port"),
                );
            } else {
                entry.2 = Some(tls);
            }
        }
        if let Some((_, prev)) = entry
            .1
            .iter()
            .find(|(r, _)| r.base_path == route.base_path && r.hosts == route.hosts)
        {
            c.push(
                &addr_at,
                format!(
                    "route {listen}{} is already served by the ApiInstance at {}:{}",
                    route.base_path, prev.file, prev.line
                ),
            );
            continue;
        }
        entry.1.push((route, name_at));
    }
    for b in &bindings {
        if b.spec.policy_ref.name == "tls"
            && inbound.contains_key(&b.spec.target_ref.name)
            && !api_names.contains_key(b.spec.target_ref.name.as_str())
        {
            c.push(
                &b.doc.at("spec.targetRef.name"),
                format!("no ApiInstance named `{}`", b.spec.target_ref.name),
            );
        }
    }
    for (api, specs) in &bound {
        for (_, _, _, target) in specs {
            c.push(target, format!("no ApiInstance named `{api}`"));
        }
    }
    for (addr, (tls, routes, ctx, net)) in listeners {
        if tls && ctx.is_none() && routes.iter().any(|(r, _)| broken_tls.contains(&r.api)) {
            continue;
        }
        if tls && ctx.is_none() {
            let (_, at) = &routes[0];
            c.push(
                at,
                format!("{addr} is https but no `tls` PolicyBinding targets an ApiInstance on it"),
            );
            continue;
        }
        let mut routes: Vec<RouteConfig> = routes.into_iter().map(|(r, _)| r).collect();
        // Host-specific routes before catch-alls, then longest base path first.
        routes.sort_by(|a, b| {
            a.hosts
                .is_empty()
                .cmp(&b.hosts.is_empty())
                .then(b.base_path.len().cmp(&a.base_path.len()))
        });
        out.listeners.push(ListenerConfig {
            addr,
            external: net.is_some_and(|(e, _)| e),
            tls: ctx,
            routes,
        });
    }
    if out.listeners.is_empty() && c.errors.is_empty() {
        c.errors.push(ConfigError {
            file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
            line: 1,
            column: 1,
            field: String::new(),
            message: "no ApiInstance: the gateway would have nothing to serve".into(),
        });
    }
    separate_certificates(&out, &mut c);
    contracts_into(&contracts, &api_names, base, &mut out, &mut c);
    let used: std::collections::HashSet<usize> = out
        .listeners
        .iter()
        .flat_map(|l| l.routes.iter().map(|r| r.service))
        .collect();
    for (name, sd) in &services {
        if service_index
            .get(name)
            .is_some_and(|i| *i != BROKEN && !used.contains(i))
        {
            c.warnings.push(
                sd.doc
                    .at("metadata.name")
                    .error(format!("Service `{name}` is not used by any ApiInstance")),
            );
        }
    }
    out.warnings = std::mem::take(&mut c.warnings);
    if c.errors.is_empty() {
        Ok(out)
    } else {
        c.errors
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        Err(ConfigErrors(c.errors))
    }
}

/// Certificates exposed to the internet are never used internally, and vice versa.
fn separate_certificates(out: &Config, c: &mut Collector) {
    struct Use<'a> {
        crt: Vec<u8>,
        key: &'a [u8],
        external: bool,
        origin: &'a Origin,
        what: String,
    }
    let crt_bytes = |pem: &Pem| match pem {
        Pem::File(path) => std::fs::read(path).unwrap_or_default(),
        Pem::Inline(text) => text.as_bytes().to_vec(),
    };
    let mut uses: Vec<Use> = Vec::new();
    for l in &out.listeners {
        for pair in l.tls.iter().flat_map(|t| &t.certs) {
            let what = format!("{} listener {}", side(l.external), l.addr);
            uses.push(Use {
                crt: crt_bytes(&pair.crt),
                key: pair.key.expose(),
                external: l.external,
                origin: &pair.origin,
                what,
            });
        }
    }
    for s in &out.services {
        if let Some(pair) = s.tls.as_ref().and_then(|t| t.client.as_ref()) {
            let what = format!("{} service {}", side(s.external), s.name);
            uses.push(Use {
                crt: crt_bytes(&pair.crt),
                key: pair.key.expose(),
                external: s.external,
                origin: &pair.origin,
                what,
            });
        }
    }
    for (i, a) in uses.iter().enumerate() {
        for b in &uses[..i] {
            if a.external == b.external {
                continue;
            }
            let same = if !a.crt.is_empty() && a.crt == b.crt {
                "certificate"
            } else if a.key == b.key {
                "private key"
            } else {
                continue;
            };
            c.push(
                a.origin,
                format!(
                    "the same {same} serves the {} and the {} ({}:{}); certificates facing the internet are never used internally: issue separate ones",
                    a.what, b.what, b.origin.file, b.origin.line
                ),
            );
        }
    }
}

fn contracts_into(
    contracts: &[(Doc, String, raw::ContractSpec)],
    api_names: &HashMap<&str, Origin>,
    base: &Path,
    out: &mut Config,
    c: &mut Collector,
) {
    let mut client_ids: HashMap<&str, Origin> = HashMap::new();
    for (doc, name, spec) in contracts {
        let id_at = doc.at("spec.clientId");
        if spec.client_id.trim().is_empty() {
            c.push(&id_at, "clientId must not be empty");
        } else if let Some(prev) = client_ids.insert(&spec.client_id, id_at.clone()) {
            c.push(
                &id_at,
                format!(
                    "client id is already used by the Contract at {}:{}",
                    prev.file, prev.line
                ),
            );
        }
        let secret = match (&spec.client_secret, &spec.client_secret_hash) {
            (Some(_), Some(_)) => {
                c.push(
                    &doc.at("spec.clientSecretHash"),
                    "give clientSecret or clientSecretHash, not both",
                );
                None
            }
            (Some(field), None) => secret_value(doc, "spec.clientSecret", field, base, c).map(|s| {
                let digest = ring::digest::digest(&ring::digest::SHA256, s.expose());
                let hex = digest
                    .as_ref()
                    .iter()
                    .fold(String::with_capacity(64), |mut hex, b| {
                        use std::fmt::Write as _;
                        let _ = write!(hex, "{b:02x}");
                        hex
                    });
                ClientSecret::Sha256(format!("sha256:{hex}"))
            }),
            (None, Some(hash)) => {
                if valid_hash(hash) {
                    Some(ClientSecret::Hash(hash.clone()))
                } else {
                    c.push(
                        &doc.at("spec.clientSecretHash"),
                        "not a recognised hash: expected $argon2id$..., $2b$... (bcrypt) or sha256:<64 hex digits>",
                    );
                    None
                }
            }
            (None, None) => None,
        };
        if spec.apis.is_empty() {
            c.push(
                &doc.at("spec.apis"),
                "a contract that names no ApiInstance grants nothing; list the APIs it may call",
            );
        }
        for (i, api) in spec.apis.iter().enumerate() {
            if !api_names.contains_key(api.as_str()) {
                c.push(
                    &doc.at(&format!("spec.apis[{i}]")),
                    format!("no ApiInstance named `{api}`"),
                );
            }
        }
        out.contracts.push(ContractConfig {
            name: name.clone(),
            client_name: spec.client_name.clone(),
            client_id: spec.client_id.clone(),
            secret,
            sla_tier: spec.sla_tier.clone(),
            apis: spec.apis.clone(),
        });
    }
}

fn valid_hash(hash: &str) -> bool {
    if let Some(hex) = hash.strip_prefix("sha256:") {
        return hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    hash.starts_with("$argon2id$")
        || hash.starts_with("$argon2i$")
        || (hash.len() == 60 && ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)))
}

fn gateway_settings(
    doc: &Doc,
    spec: &raw::ConfigurationSpec,
    base: &Path,
    c: &mut Collector,
) -> GatewaySettings {
    let mut g = GatewaySettings::default();
    if let Some(logging) = &spec.logging {
        if logging.outputs.is_some() {
            c.push(
                &doc.at("spec.logging.outputs"),
                "Fluent Bit outputs are not supported: logs go to stderr (journald under systemd); remove `outputs`",
            );
        }
        if let Some(level) = logging.runtime_logs.as_ref().and_then(|r| r.log_level.as_ref()) {
            if ["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                g.log_level.clone_from(level);
            } else {
                c.push(
                    &doc.at("spec.logging.runtimeLogs.logLevel"),
                    format!("`{level}` is not error, warn, info, debug or trace"),
                );
            }
        }
        g.access_logs = logging.access_logs.unwrap_or(true);
    }
    if let Some(redis) = spec.shared_storage.as_ref().and_then(|s| s.redis.as_ref()) {
        let at = doc.at("spec.sharedStorage.redis.address");
        let valid = redis
            .address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !valid {
            c.push(&at, format!("`{}` is not host:port", redis.address));
        }
        let password = redis
            .password
            .as_ref()
            .and_then(|p| secret_value(doc, "spec.sharedStorage.redis.password", p, base, c));
        let tls = redis.tls.as_ref().map(|t| {
            t.trusted_ca.as_ref().and_then(|ca| {
                pem(ca, base)
                    .map_err(|e| c.push(&doc.at("spec.sharedStorage.redis.tls.trustedCA"), e))
                    .ok()
            })
        });
        g.redis = Some(RedisConfig {
            address: redis.address.clone(),
            username: redis.username.clone(),
            password,
            db: redis.db.unwrap_or(0),
            tls,
        });
    }
    if let Some(gk) = &spec.gatekeeper {
        let at = doc.at("spec.gatekeeper.level");
        match &gk.level {
            None => {}
            Some(serde_yaml_ng::Value::String(level)) => match level.as_str() {
                "strict" => g.gate_level = GateLevel::Strict,
                "flexible" => g.gate_level = GateLevel::Flexible,
                "disabled" => g.gate_level = GateLevel::Disabled,
                other => c.push(&at, format!("`{other}` is not strict, flexible or disabled")),
            },
            Some(serde_yaml_ng::Value::Bool(on)) => {
                g.gate_level = if *on {
                    GateLevel::Strict
                } else {
                    GateLevel::Disabled
                };
                let spelled = if *on { "strict" } else { "disabled" };
                c.warnings
                    .push(at.error(format!("`{on}` is a legacy spelling; write `{spelled}`")));
            }
            Some(_) => c.push(&at, "expected strict, flexible or disabled"),
        }
        g.block_edit = gk.block_edit.unwrap_or(true);
        match gk.nic_action.as_deref() {
            None | Some("answer") => {}
            Some("drop") => g.nic_drop = true,
            Some(other) => c.push(
                &doc.at("spec.gatekeeper.nicAction"),
                format!("`{other}` is not answer or drop"),
            ),
        }
    }
    g
}

/// Namespaces other than `default` are refused: there is one namespace here.
fn check_namespace(doc: &Doc, field: &str, namespace: Option<&String>, c: &mut Collector) {
    if let Some(ns) = namespace.filter(|ns| ns.as_str() != "default") {
        c.push(
            &doc.at(field),
            format!("namespace `{ns}`: namespaces are not supported; every resource lives in `default`"),
        );
    }
}

fn check_envelope(doc: &Doc, api_version: &str, meta: &raw::Metadata, c: &mut Collector) {
    check_namespace(doc, "metadata.namespace", meta.namespace.as_ref(), c);
    if !API_VERSIONS.contains(&api_version) {
        c.push(
            &doc.at("apiVersion"),
            format!(
                "unsupported apiVersion `{api_version}`; expected one of {}",
                API_VERSIONS.join(", ")
            ),
        );
    }
    let valid = !meta.name.is_empty()
        && meta.name.len() <= 253
        && meta
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !meta.name.starts_with('-');
    if !valid {
        c.push(
            &doc.at("metadata.name"),
            format!(
                "`{}` is not a valid name (lowercase letters, digits, '-' and '.')",
                meta.name
            ),
        );
    }
}

fn check_host_pattern(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a host name or *.suffix pattern"))
    }
}

/// The service an API routes to: its index and the upstream path prefix.
fn api_service(
    api: &ApiDoc,
    out: &mut Config,
    named: &HashMap<String, usize>,
    c: &mut Collector,
) -> Option<(usize, String)> {
    let services_at = api.doc.at("spec.services");
    let mut entries = api.spec.services.iter();
    let Some((svc_name, inline)) = entries.next() else {
        c.push(&services_at, "an ApiInstance needs one upstream in spec.services");
        return None;
    };
    if entries.next().is_some() {
        c.push(
            &services_at,
            "one upstream service per ApiInstance is supported; split the API into several ApiInstances",
        );
        return None;
    }
    let field = format!("spec.services.{svc_name}");
    let destination = inline
        .routes
        .iter()
        .find_map(|r| r.config.as_ref().and_then(|c| c.destination_path.clone()));
    for (i, r) in inline.routes.iter().enumerate() {
        if !r.rules.is_empty() {
            c.push(
                &api.doc.at(&format!("{field}.routes[{i}].rules")),
                "route rules are not supported; use one ApiInstance per path",
            );
        }
    }
    if let Some(d) = &destination
        && !d.starts_with('/')
    {
        c.push(
            &api.doc.at(&format!("{field}.routes")),
            format!("destinationPath `{d}` must start with /"),
        );
    }
    match &inline.address {
        Some(address) => {
            let spec = raw::ServiceSpec {
                address: Some(address.clone()),
                ..raw::ServiceSpec::default()
            };
            let name = format!("{}/{svc_name}", api.name);
            let svc = service(&name, &api.doc, &field, &spec, &out.proxy, c)?;
            let path = destination.unwrap_or_else(|| parse_url(address).map(|u| u.path).unwrap_or_default());
            out.services.push(svc);
            Some((out.services.len() - 1, normalize_base(&path)))
        }
        None => {
            if let Some(&i) = named.get(svc_name) {
                (i != BROKEN).then(|| (i, normalize_base(&destination.unwrap_or_else(|| "/".into()))))
            } else {
                c.push(
                    &api.doc.at(&field),
                    format!("no Service named `{svc_name}`; define it, or give this entry an address"),
                );
                None
            }
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one check per Service field, in field order"
)]
fn service(
    name: &str,
    doc: &Doc,
    prefix: &str,
    spec: &raw::ServiceSpec,
    proxy: &ProxySettings,
    c: &mut Collector,
) -> Option<ServiceConfig> {
    let before = c.errors.len();
    let mut addresses: Vec<(String, String)> = Vec::new();
    if let Some(a) = &spec.address {
        addresses.push((a.clone(), format!("{prefix}.address")));
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        addresses.push((e.clone(), format!("{prefix}.endpoints[{i}]")));
    }
    if addresses.is_empty() {
        c.push(
            &doc.at(prefix),
            format!("Service `{name}` needs an address or endpoints"),
        );
        return None;
    }
    let mut endpoints = Vec::new();
    let mut scheme = None;
    for (text, field) in &addresses {
        let at = doc.at(field);
        let url = match parse_url(text) {
            Ok(u) => u,
            Err(e) => {
                c.push(&at, e);
                continue;
            }
        };
        if *scheme.get_or_insert(url.tls) != url.tls {
            c.push(&at, "all endpoints of a service use the same scheme");
        }
        match (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map(|mut a| a.next())
        {
            Ok(Some(addr)) => {
                let default_port = if url.tls { 443 } else { 80 };
                let host_part = if url.host.contains(':') {
                    format!("[{}]", url.host)
                } else {
                    url.host.clone()
                };
                let authority = if url.port == default_port {
                    host_part
                } else {
                    format!("{host_part}:{}", url.port)
                };
                endpoints.push(EndpointConfig {
                    addr,
                    authority,
                    host: url.host.clone(),
                });
            }
            _ => c.push(&at, format!("cannot resolve upstream host `{}`", url.host)),
        }
    }
    let balance = match spec.load_balancing.as_deref() {
        None | Some("roundRobin") => Balance::RoundRobin,
        Some("leastRequests") => Balance::LeastRequests,
        Some(other) => {
            c.push(
                &doc.at(&format!("{prefix}.loadBalancing")),
                format!("`{other}` is not roundRobin or leastRequests"),
            );
            Balance::RoundRobin
        }
    };
    let host_header = match spec.host_header.as_deref() {
        None | Some("preserve") => HostHeader::Preserve,
        Some("upstream") => HostHeader::Upstream,
        Some(fixed) => match check_host_pattern(fixed.split(':').next().unwrap_or("")) {
            Ok(()) if !fixed.starts_with("*.") => HostHeader::Fixed(fixed.to_string()),
            _ => {
                c.push(
                    &doc.at(&format!("{prefix}.hostHeader")),
                    format!("`{fixed}` is not preserve, upstream or a host name"),
                );
                HostHeader::Preserve
            }
        },
    };
    let ips: Vec<IpAddr> = endpoints.iter().map(|e: &EndpointConfig| e.addr.ip()).collect();
    let external = network(
        doc,
        &format!("{prefix}.network"),
        spec.network.as_deref(),
        &ips,
        c,
    );
    let mut duration = |value: Option<&String>, field: &str, default: Duration| match value {
        Some(v) => parse_duration(v).unwrap_or_else(|e| {
            c.push(&doc.at(&format!("{prefix}.{field}")), e);
            default
        }),
        None => default,
    };
    let timeouts = spec.timeouts.as_ref();
    let connect_timeout = duration(
        timeouts.and_then(|t| t.connect.as_ref()),
        "timeouts.connect",
        proxy.timeouts.upstream_connect,
    );
    let response_timeout = duration(
        timeouts.and_then(|t| t.response.as_ref()),
        "timeouts.response",
        proxy.timeouts.upstream_response,
    );
    let eject_for = duration(spec.eject_for.as_ref(), "ejectFor", Duration::from_secs(10));
    let tls = if scheme == Some(true) {
        Some(OutboundTls {
            ca: None,
            client: None,
            sni: None,
            min: TlsVersion::V12,
            max: TlsVersion::V13,
            alpn: vec!["http/1.1".into()],
            origin: doc.at(prefix),
        })
    } else {
        None
    };
    if c.errors.len() > before {
        return None;
    }
    Some(ServiceConfig {
        name: name.to_string(),
        endpoints,
        balance,
        tls,
        host_header,
        connect_timeout,
        response_timeout,
        retries: spec.retries.unwrap_or(1),
        eject_for,
        external,
    })
}

fn side(external: bool) -> &'static str {
    if external { "external" } else { "internal" }
}

/// Whether an address is outside private networks (loopback, RFC 1918, link-local, ULA count as internal).
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_private() || v4.is_link_local()),
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// `external`/`internal` as written, or by address: any public (or any-address) one makes it external.
fn network(doc: &Doc, field: &str, written: Option<&str>, ips: &[IpAddr], c: &mut Collector) -> bool {
    match written {
        Some("external") => true,
        Some("internal") => false,
        Some(other) => {
            c.push(&doc.at(field), format!("`{other}` is not external or internal"));
            false
        }
        None => ips.iter().any(|ip| ip.is_unspecified() || is_public(*ip)),
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one check per Configuration field, in field order"
)]
fn proxy_settings(doc: &Doc, spec: &raw::ConfigurationSpec, c: &mut Collector) -> ProxySettings {
    let mut s = ProxySettings::default();
    let Some(p) = &spec.proxy else { return s };
    if let Some(w) = p.workers {
        if w == 0 || w > 1024 {
            c.push(
                &doc.at("spec.proxy.workers"),
                "workers must be 1-1024 (leave it out for one per CPU)",
            );
        } else {
            s.workers = w;
        }
    }
    if let Some(a) = &p.admin {
        if a == "off" {
            s.admin = None;
        } else {
            match a.parse::<SocketAddr>() {
                Ok(addr) => s.admin = Some(addr),
                Err(_) => c.push(
                    &doc.at("spec.proxy.admin"),
                    format!("`{a}` is not ip:port or `off`"),
                ),
            }
        }
    }
    if let Some(l) = &p.limits {
        let mut positive = |v: Option<usize>, field: &str, slot: &mut usize| {
            if let Some(v) = v {
                if v == 0 {
                    c.push(&doc.at(field), "must be greater than zero");
                } else {
                    *slot = v;
                }
            }
        };
        positive(
            l.request_line_bytes,
            "spec.proxy.limits.requestLineBytes",
            &mut s.limits.request_line,
        );
        positive(
            l.header_bytes,
            "spec.proxy.limits.headerBytes",
            &mut s.limits.header_bytes,
        );
        positive(l.headers, "spec.proxy.limits.headers", &mut s.limits.headers);
        positive(
            l.max_connections,
            "spec.proxy.limits.maxConnections",
            &mut s.max_connections,
        );
        if let Some(b) = l.max_body_bytes {
            s.max_body = b;
        }
        if s.limits.request_line > s.limits.header_bytes {
            c.push(
                &doc.at("spec.proxy.limits.requestLineBytes"),
                "the request line limit exceeds the header bytes limit",
            );
        }
    }
    if let Some(t) = &p.timeouts {
        let mut set = |v: &Option<String>, field: &str, slot: &mut Duration| {
            if let Some(v) = v {
                match parse_duration(v) {
                    Ok(d) => *slot = d,
                    Err(e) => c.push(&doc.at(field), e),
                }
            }
        };
        set(
            &t.request_headers,
            "spec.proxy.timeouts.requestHeaders",
            &mut s.timeouts.request_headers,
        );
        set(&t.idle, "spec.proxy.timeouts.idle", &mut s.timeouts.idle);
        set(
            &t.upstream_connect,
            "spec.proxy.timeouts.upstreamConnect",
            &mut s.timeouts.upstream_connect,
        );
        set(
            &t.upstream_response,
            "spec.proxy.timeouts.upstreamResponse",
            &mut s.timeouts.upstream_response,
        );
    }
    if let Some(f) = &p.forwarded {
        match f.x_forwarded_for.as_deref() {
            None | Some("append") => {}
            Some("replace") => s.forwarded.xff = XffMode::Replace,
            Some("off") => s.forwarded.xff = XffMode::Off,
            Some(other) => c.push(
                &doc.at("spec.proxy.forwarded.xForwardedFor"),
                format!("`{other}` is not append, replace or off"),
            ),
        }
        s.forwarded.proto = f.x_forwarded_proto.unwrap_or(true);
        s.forwarded.host = f.x_forwarded_host.unwrap_or(true);
        s.forwarded.via = f.via.unwrap_or(true);
    }
    s
}

fn from_config<T: for<'de> Deserialize<'de>>(
    doc: &Doc,
    value: &serde_yaml_ng::Value,
    c: &mut Collector,
) -> Option<T> {
    let value = if value.is_null() {
        serde_yaml_ng::Value::Mapping(serde_yaml_ng::Mapping::new())
    } else {
        value.clone()
    };
    match serde_yaml_ng::from_value::<T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let message = e.to_string();
            let field = message
                .split_once(": ")
                .filter(|(p, _)| !p.contains(' '))
                .map(|(p, _)| format!("spec.config.{p}"));
            let field = field.unwrap_or_else(|| "spec.config".into());
            c.push(&doc.at(&field), message);
            None
        }
    }
}

/// Resolves `${file:path}` (relative to the config directory).
fn file_ref(text: &str, base: &Path) -> Option<PathBuf> {
    let inner = text.trim().strip_prefix("${file:")?.strip_suffix('}')?;
    let path = Path::new(inner.trim());
    Some(if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    })
}

fn pem(text: &str, base: &Path) -> Result<Pem, String> {
    if let Some(path) = file_ref(text, base) {
        return Ok(Pem::File(path));
    }
    if text.trim_start().starts_with("-----BEGIN") {
        return Ok(Pem::Inline(text.to_string()));
    }
    Err("expected ${file:/path/to/file.pem} or inline PEM text".into())
}

fn cert_pair(
    doc: &Doc,
    field: &str,
    r: &raw::CertificateRef,
    base: &Path,
    c: &mut Collector,
) -> Option<CertPair> {
    let crt = pem(&r.crt, base)
        .map_err(|e| c.push(&doc.at(&format!("{field}.crt")), e))
        .ok();
    let key = secret_value(doc, &format!("{field}.key"), &r.key, base, c);
    Some(CertPair {
        crt: crt?,
        key: key?,
        origin: doc.at(field),
    })
}

/// Resolves a secret field, reporting why it cannot be used.
fn secret_value(
    doc: &Doc,
    field: &str,
    value: &raw::SecretField,
    base: &Path,
    c: &mut Collector,
) -> Option<Secret> {
    let at = doc.at(field);
    let (source, plain) = match value {
        raw::SecretField::Ref(text) => match secret::parse(text, base) {
            Ok(source) => (source, None),
            Err(e) => {
                c.push(&at, e.to_string());
                return None;
            }
        },
        raw::SecretField::Inline(inline) if inline.dangerous_plaintext => {
            c.warnings.push(at.error(
                "plain-text secret accepted because dangerous_plaintext is true: for development only",
            ));
            (SecretSource::DangerousPlaintext, Some(inline.value.as_str()))
        }
        raw::SecretField::Inline(_) => {
            c.push(&at, SecretError::Plaintext.to_string());
            return None;
        }
    };
    match c.resolver.resolve(&source, plain) {
        Ok(secret) => Some(secret),
        Err(e) => {
            c.push(&at, e.to_string());
            None
        }
    }
}

/// `minversion` and `maxversion` of a TLS policy, defaulting to 1.2 and 1.3.
fn versions(
    doc: &Doc,
    min: Option<&String>,
    max: Option<&String>,
    c: &mut Collector,
) -> (TlsVersion, TlsVersion) {
    let min = version(doc, "spec.config.minversion", min, TlsVersion::V12, c);
    let max = version(doc, "spec.config.maxversion", max, TlsVersion::V13, c);
    if min > max {
        c.push(
            &doc.at("spec.config.minversion"),
            "minversion is above maxversion",
        );
    }
    (min, max)
}

/// `trustedCA` of a TLS policy.
fn trusted_ca(doc: &Doc, text: Option<&String>, base: &Path, c: &mut Collector) -> Option<Pem> {
    text.and_then(|t| {
        pem(t, base)
            .map_err(|e| c.push(&doc.at("spec.config.trustedCA"), e))
            .ok()
    })
}

fn version(doc: &Doc, field: &str, v: Option<&String>, default: TlsVersion, c: &mut Collector) -> TlsVersion {
    match v.map(String::as_str) {
        None => default,
        Some("1.2") => TlsVersion::V12,
        Some("1.3") => TlsVersion::V13,
        Some(other) => {
            c.push(
                &doc.at(field),
                format!("TLS version `{other}` is not supported; use \"1.2\" or \"1.3\""),
            );
            default
        }
    }
}

fn alpn(doc: &Doc, v: Option<&Vec<String>>, c: &mut Collector) -> Vec<String> {
    match v {
        None => vec!["http/1.1".into()],
        Some(list) => {
            for p in list {
                if p != "http/1.1" {
                    c.push(
                        &doc.at("spec.config.alpn"),
                        format!("ALPN `{p}` is not served; this gateway speaks http/1.1"),
                    );
                }
            }
            list.clone()
        }
    }
}

fn inbound_tls(
    doc: &Doc,
    config: &serde_yaml_ng::Value,
    base: &Path,
    c: &mut Collector,
) -> Option<InboundTls> {
    let cfg: raw::InboundTlsConfig = from_config(doc, config, c)?;
    let mut certs = Vec::new();
    if let Some(r) = &cfg.certificate {
        certs.extend(cert_pair(doc, "spec.config.certificate", r, base, c));
    }
    for (i, r) in cfg.certificates.iter().enumerate() {
        certs.extend(cert_pair(
            doc,
            &format!("spec.config.certificates[{i}]"),
            r,
            base,
            c,
        ));
    }
    let given = cfg.certificate.is_some() || !cfg.certificates.is_empty();
    if !given {
        c.push(
            &doc.at("spec.config"),
            "inbound tls needs certificate (or certificates) with crt and key",
        );
        return None;
    }
    if certs.len() != usize::from(cfg.certificate.is_some()) + cfg.certificates.len() {
        // Each failed pair is already reported.
        return None;
    }
    let client_ca = trusted_ca(doc, cfg.trusted_ca.as_ref(), base, c);
    if cfg.require_client_certificate && client_ca.is_none() {
        c.push(
            &doc.at("spec.config.requireClientCertificate"),
            "requiring client certificates needs trustedCA to verify them against",
        );
    }
    let (min, max) = versions(doc, cfg.minversion.as_ref(), cfg.maxversion.as_ref(), c);
    Some(InboundTls {
        certs,
        client_ca,
        require_client_cert: cfg.require_client_certificate,
        min,
        max,
        alpn: alpn(doc, cfg.alpn.as_ref(), c),
        origin: doc.at("spec.policyRef"),
    })
}

fn outbound_tls(
    doc: &Doc,
    config: &serde_yaml_ng::Value,
    base: &Path,
    c: &mut Collector,
) -> Option<OutboundTls> {
    let cfg: raw::OutboundTlsConfig = from_config(doc, config, c)?;
    if cfg.skip_validation {
        c.push(
            &doc.at("spec.config.skipValidation"),
            "skipping upstream certificate validation is not offered; give trustedCA instead",
        );
    }
    let client = cfg
        .certificate
        .as_ref()
        .and_then(|r| cert_pair(doc, "spec.config.certificate", r, base, c));
    let ca = trusted_ca(doc, cfg.trusted_ca.as_ref(), base, c);
    let (min, max) = versions(doc, cfg.minversion.as_ref(), cfg.maxversion.as_ref(), c);
    if let Some(sni) = &cfg.sni
        && (check_host_pattern(sni).is_err() || sni.starts_with("*."))
    {
        c.push(&doc.at("spec.config.sni"), format!("`{sni}` is not a host name"));
    }
    Some(OutboundTls {
        ca,
        client,
        sni: cfg.sni,
        min,
        max,
        alpn: alpn(doc, cfg.alpn.as_ref(), c),
        origin: doc.at("spec.policyRef"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemSource, load};

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
        assert_eq!(
            (route.base_path.as_str(), route.upstream_path.as_str()),
            ("/orders", "/api")
        );
        assert_eq!(
            cfg.services[route.service].endpoints[0].addr,
            "127.0.0.1:9000".parse().unwrap()
        );
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
