//! Resources exactly as written in YAML, before validation.
//!
//! The shapes follow the local-mode resources of the gateway in the source
//! documents (`apiVersion`/`kind`/`metadata`/`spec`), with Portcullis
//! extensions marked as such. Unknown fields are errors everywhere.

use std::collections::BTreeMap;

use indexmap::IndexMap;
use serde::Deserialize;

/// The envelope every resource shares; `spec` is read again by kind.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: serde::de::IgnoredAny,
}

/// A resource of one kind with its typed spec.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Typed<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// Resource identity.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `kind: ApiInstance`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiInstanceSpec {
    /// `http(s)://host:port/base-path` the API is served on.
    pub address: String,
    /// Portcullis extension: host names this API answers for (exact or `*.suffix`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Upstream services keyed by name, in file order; an entry without `address` names a `Service` resource.
    #[serde(default)]
    pub services: IndexMap<String, InlineService>,
    /// Policies, applied in order before any bound with a PolicyBinding.
    #[serde(default)]
    pub policies: Vec<InlinePolicy>,
    /// Portcullis extension: per-API limits.
    #[serde(default)]
    pub limits: Option<ApiLimits>,
    /// Portcullis extension: how WebSocket connections are carried.
    #[serde(default)]
    pub websocket: Option<WebSocketSpec>,
    /// Portcullis extension: `external` or `internal` (default: by listen address).
    #[serde(default)]
    pub network: Option<String>,
    /// Portcullis extension: HTTP/2 on this API's listener.
    #[serde(default)]
    pub http2: Option<ListenerHttp2Spec>,
    /// Portcullis extension: PROXY protocol on this API's listener.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolSpec>,
    /// Portcullis extension: the per-source SYN limit XDP applies on this API's listener.
    #[serde(default)]
    pub syn_limit: Option<SynLimitSpec>,
}

/// A listener's SYN limits at the NIC: per source, and its budget before SYN cookies.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SynLimitSpec {
    pub per_source_rate: Option<u32>,
    pub burst: Option<u32>,
    pub budget: Option<u32>,
}

/// PROXY protocol (v1 and v2) from L4 load balancers.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocolSpec {
    pub enabled: Option<bool>,
    /// Portcullis extension: the only sources whose PROXY header is believed.
    pub trusted_sources: Option<Vec<String>>,
}

/// HTTP/2 on a listener.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerHttp2Spec {
    /// Cleartext HTTP/2 with prior knowledge (h2c) on an http:// listener.
    pub cleartext: Option<bool>,
}

/// A policy written inside an ApiInstance.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InlinePolicy {
    pub policy_ref: PolicyRef,
    #[serde(default)]
    pub config: serde_yaml_ng::Value,
    /// The requests it applies to (absent: all).
    #[serde(default)]
    pub rules: Option<Vec<RuleSpec>>,
}

/// One request-matching rule: every field it sets must match.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// The path below the base path: a regular expression matching all of it.
    #[serde(default)]
    pub path: Option<String>,
    /// Portcullis extension: a path prefix of whole segments.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The method: a regular expression (`GET|POST`).
    #[serde(default)]
    pub methods: Option<String>,
    /// The host without port: a regular expression.
    #[serde(default)]
    pub host: Option<String>,
    /// Header name → a regular expression one of its values must match.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
}

/// Per-API limits.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiLimits {
    pub max_body_bytes: Option<u64>,
}

/// Per-API WebSocket settings.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebSocketSpec {
    pub enabled: Option<bool>,
    pub idle_timeout: Option<String>,
    pub max_duration: Option<String>,
    pub max_connections: Option<u32>,
    pub close_on_reload: Option<bool>,
}

/// A service written inside an ApiInstance.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InlineService {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub routes: Vec<ServiceRoute>,
}

/// A route entry of an inline service.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRoute {
    #[serde(default)]
    pub config: Option<RouteConfig>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// Route configuration of an inline service.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub destination_path: Option<String>,
}

/// `kind: Service`.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// `http(s)://host:port[/path]` of a single endpoint.
    #[serde(default)]
    pub address: Option<String>,
    /// Portcullis extension: several endpoints of the same service.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Portcullis extension: `roundRobin` (default) or `leastRequests`.
    #[serde(default)]
    pub load_balancing: Option<String>,
    /// Portcullis extension: `preserve` (default), `upstream`, or a literal host.
    #[serde(default)]
    pub host_header: Option<String>,
    /// Portcullis extension: timeouts overriding the proxy defaults.
    #[serde(default)]
    pub timeouts: Option<ServiceTimeouts>,
    /// Portcullis extension: extra attempts on another endpoint when safe.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Portcullis extension: how long an endpoint that refused a connection is skipped
    /// (`outlierDetection.baseEjectionTime` by its older name).
    #[serde(default)]
    pub eject_for: Option<String>,
    /// Portcullis extension: active HTTP health checks of every endpoint.
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    /// Portcullis extension: endpoints ejected for consecutive failures.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Portcullis extension: limits beyond which requests to the service get 503.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Portcullis extension: `external` or `internal` (default: by endpoint addresses).
    #[serde(default)]
    pub network: Option<String>,
    /// Portcullis extension: a PROXY protocol header (`v1` or `v2`) on each upstream connection.
    #[serde(default)]
    pub proxy_protocol: Option<String>,
}

/// Active health checks of a service's endpoints.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckSpec {
    pub path: String,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    /// Status codes (`200`) and ranges (`"200-399"`) that count as healthy.
    pub expected_statuses: Option<Vec<serde_yaml_ng::Value>>,
}

/// Passive outlier detection.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    #[serde(rename = "consecutive5xx")]
    pub consecutive_5xx: Option<u32>,
    pub consecutive_connect_failures: Option<u32>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
}

/// A service's circuit breaker.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
}

/// Service timeouts.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceTimeouts {
    pub connect: Option<String>,
    pub response: Option<String>,
}

/// `kind: PolicyBinding`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyBindingSpec {
    pub target_ref: TargetRef,
    pub policy_ref: PolicyRef,
    #[serde(default)]
    pub config: serde_yaml_ng::Value,
    #[serde(default)]
    pub order: Option<u32>,
    /// The requests it applies to (absent: all); a `route` binding's are its route's.
    #[serde(default)]
    pub rules: Option<Vec<RuleSpec>>,
}

/// Config of the `route` policy: where the requests its rules take go.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePolicyConfig {
    #[serde(default)]
    pub destination_path: Option<String>,
    pub destination_ref: DestinationRef,
}

/// Config of the `route-weighted` policy: a split of the requests its rules take.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedRouteConfig {
    pub routes: Vec<WeightedDestination>,
}

/// One share of a weighted route.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedDestination {
    /// 1 to 100; the share is this over the sum of the route's weights.
    pub weight: u32,
    #[serde(default)]
    pub destination_path: Option<String>,
    pub destination_ref: DestinationRef,
}

/// A Service resource, or an inline service of the bound ApiInstance, by name.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRef {
    pub name: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// What a binding applies to.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Which policy a binding applies.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Config of the inbound `tls` policy.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundTlsConfig {
    #[serde(default)]
    pub certificate: Option<CertificateRef>,
    /// Portcullis extension: several certificates chosen by SNI.
    #[serde(default)]
    pub certificates: Vec<CertificateRef>,
    #[serde(default)]
    pub require_client_certificate: bool,
    #[serde(default, rename = "trustedCA")]
    pub trusted_ca: Option<String>,
    #[serde(default)]
    pub minversion: Option<String>,
    #[serde(default)]
    pub maxversion: Option<String>,
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
}

/// Config of the `tls-outbound` policy.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTlsConfig {
    #[serde(default)]
    pub certificate: Option<CertificateRef>,
    #[serde(default, rename = "trustedCA")]
    pub trusted_ca: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub skip_validation: bool,
    #[serde(default)]
    pub minversion: Option<String>,
    #[serde(default)]
    pub maxversion: Option<String>,
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
}

/// A certificate chain and its key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRef {
    pub crt: String,
    pub key: SecretField,
}

/// A field holding a secret: a reference, or (development only) marked plain text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SecretField {
    /// `${file:...}`, `${credential:...}` or `${encrypted:v1:...}`.
    Ref(String),
    /// `{value: ..., dangerous_plaintext: true}`.
    Inline(InlineSecret),
}

/// A plain-text secret, accepted only with `dangerous_plaintext: true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineSecret {
    pub value: String,
    #[serde(default)]
    pub dangerous_plaintext: bool,
}

impl std::fmt::Debug for InlineSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineSecret")
            .field("dangerous_plaintext", &self.dangerous_plaintext)
            .finish_non_exhaustive()
    }
}

/// `kind: Contract`: a client application's access to API instances (local mode).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContractSpec {
    pub client_name: Option<String>,
    pub client_id: String,
    /// The secret itself, as a reference; hashed when loaded.
    #[serde(default)]
    pub client_secret: Option<SecretField>,
    /// Or its hash: `$argon2id$...`, `$2b$...` (bcrypt) or `sha256:<hex>`.
    #[serde(default)]
    pub client_secret_hash: Option<String>,
    #[serde(default)]
    pub sla_tier: Option<String>,
    /// ApiInstance names the client may call.
    pub apis: Vec<String>,
}

/// `kind: Registration`: this replica's identity with its control plane
/// (written by `portcullis register`; connected mode).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistrationSpec {
    /// The gateway cluster the control plane put the replica in.
    pub cluster: String,
    /// `https://HOST:PORT` of the control plane.
    pub control_plane: String,
    /// The replica's certificate (PEM file, relative to the directory).
    pub certificate: String,
    /// The replica's private key (PEM file, mode 0600).
    pub key: String,
    /// The control plane's CA (PEM file).
    pub ca_bundle: String,
}

/// `kind: Configuration`: gateway-wide settings.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigurationSpec {
    #[serde(default)]
    pub proxy: Option<ProxySpec>,
    #[serde(default)]
    pub logging: Option<LoggingSpec>,
    #[serde(default)]
    pub shared_storage: Option<SharedStorageSpec>,
    /// Portcullis extension: Gatekeeper level and edit blocking.
    #[serde(default)]
    pub gatekeeper: Option<GatekeeperSpec>,
    /// Portcullis extension: where the key for `${encrypted:...}` values is.
    #[serde(default)]
    pub secrets: Option<SecretsSpec>,
    /// PROXY protocol on every listener (the source gateway's shape, with `trustedSources`).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolSpec>,
    /// Distributed tracing, in the source gateway's shape.
    #[serde(default)]
    pub tracing: Option<TracingSpec>,
}

/// `spec.tracing`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSpec {
    pub provider: TracingProviderSpec,
    #[serde(default)]
    pub sampling: Option<TracingSamplingSpec>,
    #[serde(default)]
    pub labels: Vec<TracingLabelSpec>,
}

/// `spec.tracing.provider`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingProviderSpec {
    /// Only `opentelemetry`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub properties: Option<TracingPropertiesSpec>,
}

/// `spec.tracing.provider.properties`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingPropertiesSpec {
    /// `http://host:port[/path]` of the collector's OTLP/HTTP receiver.
    pub address: Option<String>,
    /// Only `http`.
    pub service_type: Option<String>,
    pub service_name: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub resource_attributes: IndexMap<String, String>,
}

/// `spec.tracing.sampling`, in percent.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSamplingSpec {
    pub client: Option<f64>,
    pub random: Option<f64>,
    pub overall: Option<f64>,
}

/// One of `spec.tracing.labels`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingLabelSpec {
    pub name: String,
    /// `literal`, `requestHeader` or `environment`.
    #[serde(rename = "type")]
    pub kind: String,
    pub key_name: Option<String>,
    pub default_value: Option<String>,
}

/// Logging.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingSpec {
    #[serde(default)]
    pub runtime_logs: Option<RuntimeLogsSpec>,
    /// One line per request: `true`/`false` (Portcullis extension), or the
    /// source gateway's `{outputs: [...]}` naming where they go.
    #[serde(default)]
    pub access_logs: Option<AccessLogsSpec>,
    /// Where logs go besides stderr, in the source gateway's Fluent Bit shape.
    #[serde(default)]
    pub outputs: Option<Vec<LogOutputSpec>>,
}

/// `logging.accessLogs`: on/off, or the outputs that carry them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum AccessLogsSpec {
    /// Portcullis extension: on or off.
    Enabled(bool),
    /// The outputs that carry access lines.
    Routed(AccessLogOutputs),
}

/// `logging.accessLogs` with outputs.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogOutputs {
    pub outputs: Vec<String>,
}

/// One log output.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogOutputSpec {
    pub name: String,
    /// `file`, `stdout` or `syslog`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub parameters: serde_yaml_ng::Value,
}

/// Parameters of a `file` output (Fluent Bit's names).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOutputParams {
    /// The directory.
    pub path: Option<String>,
    /// The file name, or an absolute path.
    pub file: Option<String>,
    /// `plain` (default) or `json`.
    pub format: Option<String>,
}

/// Parameters of a `stdout` output.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutOutputParams {
    /// `plain` (default) or `json` / `json_lines`.
    pub format: Option<String>,
}

/// Parameters of a `syslog` output (Fluent Bit's names where they map).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogOutputParams {
    /// Portcullis extension: the Unix datagram socket (default `/dev/log`).
    pub path: Option<String>,
    /// Only `unix`.
    pub mode: Option<String>,
    /// Refused: syslog goes to a local socket.
    pub host: Option<String>,
    /// Refused: syslog goes to a local socket.
    pub port: Option<u16>,
    /// Only `rfc5424`.
    pub syslog_format: Option<String>,
    /// Portcullis extension: `daemon` (default), `user`, `auth`, `local0`..`local7`.
    pub facility: Option<String>,
    /// Portcullis extension: the APP-NAME (default `portcullis`).
    pub app_name: Option<String>,
}

/// Runtime log settings.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeLogsSpec {
    pub log_level: Option<String>,
    /// The outputs that carry runtime lines.
    pub outputs: Option<Vec<String>>,
}

/// Shared storage.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedStorageSpec {
    pub redis: Option<RedisSpec>,
}

/// Redis connection.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisSpec {
    /// `host:port`.
    pub address: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretField>,
    #[serde(default, rename = "DB")]
    pub db: Option<u32>,
    /// Portcullis extension: connect with TLS, verifying against this CA (or the system roots when empty).
    #[serde(default)]
    pub tls: Option<RedisTlsSpec>,
}

/// TLS to Redis.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisTlsSpec {
    #[serde(default, rename = "trustedCA")]
    pub trusted_ca: Option<String>,
}

/// Gatekeeper.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatekeeperSpec {
    /// `strict`, `flexible` or `disabled` (legacy `true`/`false`).
    #[serde(default)]
    pub level: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub block_edit: Option<bool>,
    /// Portcullis extension: what XDP does for a gated listener, `answer` (503 or reset) or `drop`.
    #[serde(default)]
    pub nic_action: Option<String>,
}

/// Secrets.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretsSpec {
    pub key_file: Option<String>,
}

/// Proxy-wide settings.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxySpec {
    pub workers: Option<usize>,
    pub admin: Option<String>,
    pub limits: Option<LimitsSpec>,
    pub timeouts: Option<TimeoutsSpec>,
    pub forwarded: Option<ForwardedSpec>,
    pub http2: Option<Http2Spec>,
}

/// HTTP/2 connection limits.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Http2Spec {
    pub max_concurrent_streams: Option<u32>,
    pub stream_window_bytes: Option<u32>,
    pub connection_window_bytes: Option<u32>,
    pub control_frames_per_second: Option<u32>,
}

/// Request limits.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    pub request_line_bytes: Option<usize>,
    pub header_bytes: Option<usize>,
    pub headers: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub max_connections: Option<usize>,
}

/// Proxy-wide timeouts.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    pub request_headers: Option<String>,
    pub idle: Option<String>,
    pub upstream_connect: Option<String>,
    pub upstream_response: Option<String>,
}

/// Forwarding headers.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForwardedSpec {
    /// `append` (default), `replace` or `off`.
    pub x_forwarded_for: Option<String>,
    pub x_forwarded_proto: Option<bool>,
    pub x_forwarded_host: Option<bool>,
    pub via: Option<bool>,
}
