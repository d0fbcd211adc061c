//! Policies: one trait, an ordered chain per API instance, one file per policy.
//!
//! ```text
//! request head routed ──► on_request (each policy, in order)
//!                           Continue ─► next policy … ─► upstream
//!                           Respond  ─► the gateway answers; later policies and the upstream are skipped
//!                           Deny     ─► the gateway answers with the reason's status
//! response head from upstream ──► on_response (each policy, in order): header edits only
//! ```
//!
//! A chain is built from configuration when it is loaded: a policy whose
//! configuration is invalid is reported with a located error and keeps its
//! API instance gated (the Gatekeeper), so a route never runs with
//! a policy missing. Policies never see bodies and never log
//! credentials.
//!
//! No associated per-policy context type: the chain holds policies of
//! different types behind `dyn Policy`, which an associated type would forbid;
//! the per-request state is the exchange's [`RequestView`], handed to both
//! phases (see docs/architecture.md, policy phases).

mod basic_auth;
mod client_id;
mod cors;
mod expr;
mod headers;
mod ip_filter;
mod jwks;
mod jwt;
mod rate_limit;
mod sla;
mod spike;
mod timeout;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{Facts, Rule, any_matches};
use crate::http::Head;

/// What a request phase decides.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with the next policy, then the upstream.
    Continue,
    /// Answer the client with this response instead (a CORS preflight).
    Respond(Response),
    /// Refuse the request for this reason.
    Deny(Denial),
    /// Decide later: the chain awaits this on the connection's task (a delay,
    /// or work moved off the worker), then treats its result as the verdict.
    Later(Deferred),
}

/// A verdict still being worked out.
pub struct Deferred(pub std::pin::Pin<Box<dyn std::future::Future<Output = Verdict>>>);

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Deferred")
    }
}

impl PartialEq for Deferred {
    fn eq(&self, _: &Self) -> bool {
        false
    }
}

impl Eq for Deferred {}

/// A response a policy answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body (small, text).
    pub body: String,
}

/// Why a policy refused a request; decides the status, the headers it
/// carries and the reason the access log and metrics record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// 401: no or bad credentials; `challenge` goes in `WWW-Authenticate`.
    Unauthorized { challenge: String },
    /// 403: the client may not call this API (IP filtering, contracts, CORS).
    Forbidden(&'static str),
    /// 429: over a limit; `headers` say when to retry and the limit's state.
    RateLimited { headers: Vec<(String, String)> },
    /// 503: the policy cannot decide now (its store or verifier is unavailable).
    Unavailable { retry_after: u32 },
}

impl Denial {
    /// A 401 asking for credentials with `challenge`.
    pub fn unauthorized(challenge: impl Into<String>) -> Self {
        Self::Unauthorized {
            challenge: challenge.into(),
        }
    }

    /// Status sent to the client.
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthorized { .. } => 401,
            Self::Forbidden(_) => 403,
            Self::RateLimited { .. } => 429,
            Self::Unavailable { .. } => 503,
        }
    }

    /// Short reason for the access log's `error` field and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized { .. } => "unauthorized",
            Self::Forbidden(why) => why,
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable { .. } => "policy_unavailable",
        }
    }

    /// Headers the refusal carries.
    pub fn headers(&self) -> Vec<(String, String)> {
        match self {
            Self::Unauthorized { challenge } => vec![("www-authenticate".into(), challenge.clone())],
            Self::Forbidden(_) => Vec::new(),
            Self::RateLimited { headers } => headers.clone(),
            Self::Unavailable { retry_after } => vec![("retry-after".into(), retry_after.to_string())],
        }
    }
}

/// Header changes a phase asks for, applied when the head is written on.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Header names (lowercase) or patterns to drop.
    pub remove: Vec<headers::NameMatch>,
    /// Headers to add.
    pub add: Vec<(String, String)>,
}

impl HeaderEdits {
    /// Whether a header of this name is to be dropped.
    pub fn removes(&self, name: &[u8]) -> bool {
        !self.remove.is_empty()
            && std::str::from_utf8(name).is_ok_and(|n| self.remove.iter().any(|m| m.matches(n)))
    }
}

/// What a request phase sees.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// The client's address (the TCP peer).
    pub client: IpAddr,
    /// The request head.
    pub head: &'a Head,
    /// Its path below the API instance's base path (what policy rules match).
    pub api_path: &'a str,
    /// Its host, lowercase and without port.
    pub host: &'a str,
    /// Edits for the head sent upstream.
    pub edits: HeaderEdits,
    /// Headers to add to the response the client gets (e.g. rate-limit state).
    pub response_add: Vec<(String, String)>,
    /// The authenticated client application, once a policy has established it.
    pub client_id: Option<String>,
}

/// One configured step of an API instance.
pub trait Policy: Send + Sync + fmt::Debug {
    /// Runs when a routed request head has been read, before any upstream is
    /// chosen. `Continue` hands on to the next policy; `Respond` and `Deny`
    /// end the exchange with that answer and skip the rest of the chain.
    fn on_request(&self, _request: &mut RequestView<'_>) -> Verdict {
        Verdict::Continue
    }

    /// Runs when the upstream's response head arrives, before it is sent to
    /// the client, with what the request phase left in `request`; only
    /// header edits are possible here.
    fn on_response(&self, _request: &RequestView<'_>, _response: &Head, _edits: &mut HeaderEdits) {}

    /// Whether the policy cannot run before contracts are loaded (the
    /// Gatekeeper keeps such a route closed until they are).
    fn needs_contracts(&self) -> bool {
        false
    }

    /// A response timeout tighter than the service's, if the policy sets one.
    fn response_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether the policy can decide right now (a JWKS policy before its first
    /// keys arrive cannot): while any policy of a chain is not ready, the
    /// Gatekeeper answers 503 for the API instance.
    fn ready(&self) -> bool {
        true
    }

    /// Source addresses the NIC can judge for this policy: `(allow, nets)`
    /// when the policy looks only at the connection's address.
    fn nic_acl(&self) -> Option<(bool, &[ipnet::IpNet])> {
        None
    }
}

/// What the NIC can enforce of a chain's IP lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NicAcl {
    /// The only sources allowed (empty: no allow list at the NIC).
    pub allow: Vec<ipnet::IpNet>,
    /// Sources refused.
    pub deny: Vec<ipnet::IpNet>,
}

/// The policies of one API instance, in order, each with the rules that say
/// which requests it applies to (no rules: every request).
#[derive(Debug, Default, Clone)]
pub struct Chain {
    steps: Vec<(Arc<dyn Policy>, Vec<Rule>)>,
}

impl RequestView<'_> {
    /// What policy rules look at.
    fn facts(&self) -> Facts<'_> {
        Facts {
            head: self.head,
            path: self.api_path,
            host: self.host,
        }
    }
}

impl Chain {
    /// A chain with no policies.
    pub const EMPTY: Self = Self { steps: Vec::new() };

    /// A chain of `policies`, run in this order on every request.
    pub fn new(policies: Vec<Arc<dyn Policy>>) -> Self {
        Self::scoped(policies.into_iter().map(|p| (p, Vec::new())).collect())
    }

    /// A chain of policies run in this order, each on the requests its rules take.
    pub fn scoped(steps: Vec<(Arc<dyn Policy>, Vec<Rule>)>) -> Self {
        Self { steps }
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The policies that apply to `request`.
    fn applying<'s>(&'s self, request: &RequestView<'_>) -> impl Iterator<Item = &'s Arc<dyn Policy>> {
        let facts = request.facts();
        self.steps
            .iter()
            .filter(move |(_, rules)| any_matches(rules, &facts))
            .map(|(p, _)| p)
    }

    /// Runs every request phase that applies until one does not continue.
    pub async fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        for (policy, rules) in &self.steps {
            if !any_matches(rules, &request.facts()) {
                continue;
            }
            let mut verdict = policy.on_request(request);
            while let Verdict::Later(deferred) = verdict {
                verdict = deferred.0.await;
            }
            if verdict != Verdict::Continue {
                return verdict;
            }
        }
        Verdict::Continue
    }

    /// Runs every response phase that applies.
    pub fn on_response(&self, request: &RequestView<'_>, response: &Head) -> HeaderEdits {
        let mut edits = HeaderEdits::default();
        for policy in self.applying(request) {
            policy.on_response(request, response, &mut edits);
        }
        edits
    }

    /// Whether any policy of the chain needs contracts.
    pub fn needs_contracts(&self) -> bool {
        self.steps.iter().any(|(p, _)| p.needs_contracts())
    }

    /// The chain's IP lists that the NIC can enforce as well: only those of
    /// policies without rules, since the NIC sees no request. Several allow
    /// lists must all pass in the chain, which one list at the NIC cannot
    /// say: then none is pushed and the proxy alone enforces them.
    pub fn nic_acl(&self) -> NicAcl {
        let mut acl = NicAcl::default();
        let mut allow_lists = 0;
        let unscoped = self.steps.iter().filter(|(_, rules)| rules.is_empty());
        for (allow, nets) in unscoped.filter_map(|(p, _)| p.nic_acl()) {
            if allow {
                allow_lists += 1;
                acl.allow = nets.to_vec();
            } else {
                acl.deny.extend_from_slice(nets);
            }
        }
        if allow_lists > 1 {
            acl.allow.clear();
        }
        acl
    }

    /// Whether every policy can decide right now.
    pub fn ready(&self) -> bool {
        self.steps.iter().all(|(p, _)| p.ready())
    }

    /// The tightest response timeout any policy that applies to `request` sets.
    pub fn response_timeout(&self, request: &RequestView<'_>) -> Option<std::time::Duration> {
        self.applying(request).filter_map(|p| p.response_timeout()).min()
    }
}

/// Why a policy could not be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// No policy of that name in this build.
    #[error("policy `{name}` is not available in this build; available: {available}")]
    Unknown { name: String, available: String },
    /// The configuration does not fit the policy.
    #[error("{0}")]
    Config(String),
}

/// Policy names this build knows, with the source gateway's `-flex` spellings.
pub const AVAILABLE: [&str; 12] = [
    "header-injection",
    "header-removal",
    "ip-allowlist",
    "ip-blocklist",
    "cors",
    "response-timeout",
    "client-id-enforcement",
    "rate-limiting",
    "jwt-validation",
    "rate-limiting-sla-based",
    "spike-control",
    "http-basic-authentication",
];

/// What a policy may need besides its own configuration.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The API instance it is applied to.
    pub api: &'a str,
    /// Every contract in the configuration.
    pub contracts: &'a [crate::config::ContractConfig],
    /// Whether Redis shared storage is configured.
    pub shared_storage: bool,
    /// Directory relative file names resolve against (the configuration's).
    pub base: &'a std::path::Path,
    /// Gateway cluster name: shared-storage keys are namespaced by it.
    pub cluster: &'a str,
}

/// Builds the policy `name` from its configuration.
pub fn build(
    name: &str,
    config: &serde_yaml_ng::Value,
    ctx: Context<'_>,
) -> Result<Arc<dyn Policy>, PolicyError> {
    let base = name.strip_suffix("-flex").unwrap_or(name);
    let config = if config.is_null() {
        serde_yaml_ng::Value::Mapping(serde_yaml_ng::Mapping::new())
    } else {
        config.clone()
    };
    match base {
        "header-injection" => Ok(Arc::new(headers::Injection::from_config(config)?)),
        "header-removal" => Ok(Arc::new(headers::Removal::from_config(config)?)),
        "ip-allowlist" => Ok(Arc::new(ip_filter::IpFilter::from_config(config, true)?)),
        "ip-blocklist" => Ok(Arc::new(ip_filter::IpFilter::from_config(config, false)?)),
        "cors" => Ok(Arc::new(cors::Cors::from_config(config)?)),
        "response-timeout" => Ok(Arc::new(timeout::ResponseTimeout::from_config(config)?)),
        "client-id-enforcement" => Ok(Arc::new(client_id::ClientIdEnforcement::from_config(
            config, ctx,
        )?)),
        "rate-limiting" => Ok(Arc::new(rate_limit::RateLimit::from_config(config, ctx)?)),
        "jwt-validation" => Ok(Arc::new(jwt::JwtValidation::from_config(config, ctx)?)),
        "rate-limiting-sla-based" => Ok(Arc::new(sla::SlaRateLimit::from_config(config, ctx)?)),
        "spike-control" => Ok(Arc::new(spike::SpikeControl::from_config(config)?)),
        "http-basic-authentication" => Ok(Arc::new(basic_auth::BasicAuth::from_config(config, ctx.base)?)),
        _ => Err(PolicyError::Unknown {
            name: name.to_string(),
            available: AVAILABLE.join(", "),
        }),
    }
}

/// `true`: the default of the source gateway's flags that are on unless turned off.
fn yes() -> bool {
    true
}

/// Deserializes a policy's configuration, naming the field at fault.
fn parse<T: for<'de> serde::Deserialize<'de>>(config: serde_yaml_ng::Value) -> Result<T, PolicyError> {
    serde_yaml_ng::from_value(config).map_err(|e| PolicyError::Config(e.to_string()))
}
