//! `rate-limiting-sla-based`: each client application is limited by its contract's SLA tier.
//!
//! Clients are identified and authenticated exactly as by
//! `client-id-enforcement` (401 / 403 likewise); the tier's windows then count
//! per client id, locally or cluster-wide like `rate-limiting`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use super::client_id::ClientIdEnforcement;
use super::rate_limit::{RateLimit, Window};
use super::{Context, Denial, Policy, PolicyError, RequestView, Verdict, parse};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Tier {
    name: String,
    rate_limits: Vec<Window>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    credentials_origin_has_http_basic_authentication_header: Option<String>,
    #[serde(default)]
    client_id_expression: Option<String>,
    #[serde(default)]
    client_secret_expression: Option<String>,
    #[serde(default = "super::yes")]
    expose_headers: bool,
    #[serde(default = "super::yes")]
    clusterizable: bool,
    /// Portcullis extension: the tiers and their windows (the source gateway keeps them in its control plane).
    tiers: Vec<Tier>,
}

/// Limits each client by its SLA tier.
#[derive(Debug)]
pub struct SlaRateLimit {
    auth: ClientIdEnforcement,
    tier_of: HashMap<String, String>,
    limiters: HashMap<String, RateLimit>,
}

impl SlaRateLimit {
    pub(super) fn from_config(config: serde_yaml_ng::Value, ctx: Context<'_>) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        let mut auth = serde_yaml_ng::Mapping::new();
        let origin = c
            .credentials_origin_has_http_basic_authentication_header
            .clone()
            .or_else(|| {
                c.client_id_expression
                    .is_some()
                    .then(|| "customExpression".to_string())
            });
        if let Some(o) = origin {
            auth.insert(
                "credentialsOriginHasHttpBasicAuthenticationHeader".into(),
                o.into(),
            );
        }
        if let Some(e) = &c.client_id_expression {
            auth.insert("clientIdExpression".into(), e.clone().into());
        }
        if let Some(e) = &c.client_secret_expression {
            auth.insert("clientSecretExpression".into(), e.clone().into());
        }
        let auth = ClientIdEnforcement::from_config(serde_yaml_ng::Value::Mapping(auth), ctx)?;
        if c.tiers.is_empty() {
            return Err(PolicyError::Config(
                "tiers is empty: name the SLA tiers and their rateLimits".into(),
            ));
        }
        let shared = Context {
            shared_storage: ctx.shared_storage && c.clusterizable,
            ..ctx
        };
        let mut limiters = HashMap::new();
        for tier in c.tiers {
            if tier.rate_limits.is_empty()
                || tier
                    .rate_limits
                    .iter()
                    .any(|w| w.maximum_requests == 0 || w.time_period_in_milliseconds == 0)
            {
                return Err(PolicyError::Config(format!(
                    "tier `{}` needs rateLimits with positive maximumRequests and timePeriodInMilliseconds",
                    tier.name
                )));
            }
            let windows = tier
                .rate_limits
                .iter()
                .map(|w| {
                    (
                        w.maximum_requests,
                        Duration::from_millis(w.time_period_in_milliseconds),
                    )
                })
                .collect();
            let limiter = RateLimit::for_tier(windows, &tier.name, shared, c.expose_headers);
            if limiters.insert(tier.name.clone(), limiter).is_some() {
                return Err(PolicyError::Config(format!(
                    "tier `{}` is defined twice",
                    tier.name
                )));
            }
        }
        let mut tier_of = HashMap::new();
        for contract in ctx
            .contracts
            .iter()
            .filter(|k| k.apis.iter().any(|a| a == ctx.api))
        {
            match &contract.sla_tier {
                Some(t) if limiters.contains_key(t) => {
                    tier_of.insert(contract.client_id.clone(), t.clone());
                }
                Some(t) => {
                    return Err(PolicyError::Config(format!(
                        "contract `{}` is on tier `{t}`, which tiers does not define",
                        contract.name
                    )));
                }
                None => {
                    return Err(PolicyError::Config(format!(
                        "contract `{}` has no slaTier; every contract of this API needs one",
                        contract.name
                    )));
                }
            }
        }
        Ok(Self {
            auth,
            tier_of,
            limiters,
        })
    }
}

impl Policy for SlaRateLimit {
    fn needs_contracts(&self) -> bool {
        true
    }

    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let verdict = self.auth.on_request(request);
        if verdict != Verdict::Continue {
            return verdict;
        }
        let Some(id) = self.auth.credentials(request).0 else {
            return verdict;
        };
        let Some(limiter) = self.tier_of.get(&id).and_then(|t| self.limiters.get(t)) else {
            return Verdict::Deny(Denial::Forbidden("no SLA tier"));
        };
        limiter.check(request, &id)
    }
}
