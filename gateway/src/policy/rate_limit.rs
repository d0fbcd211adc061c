//! `rate-limiting`: fixed windows per key, exact across this gateway's workers.
//!
//! Every configured window must have room for a request to pass; a refused
//! request gets `429` with `Retry-After` and (unless `exposeHeaders: false`)
//! the `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers.
//! Without shared storage (or with `clusterizable: false`) counting is local
//! to this process, exact across its workers. With Redis configured and
//! `clusterizable: true` (the default), windows are aligned on the wall clock
//! and counted across every replica through the store (see `crate::store`):
//! decisions stay local and never wait on Redis; a replica may let through
//! the few requests other replicas made within the last sync interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::expr::Expr;
use super::{Denial, Policy, PolicyError, RequestView, Verdict, parse};

/// One configured limit: so many requests per period.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Window {
    pub maximum_requests: u64,
    pub time_period_in_milliseconds: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    rate_limits: Vec<Window>,
    #[serde(default)]
    key_selector: Option<String>,
    #[serde(default = "super::yes")]
    expose_headers: bool,
    #[serde(default = "super::yes")]
    clusterizable: bool,
    /// Portcullis extension: what a cluster-wide limit does while Redis is unreachable.
    #[serde(default)]
    redis_fail_mode: Option<String>,
}

/// What a cluster-wide limit does while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailMode {
    /// Each replica counts on its own (the default).
    Local,
    /// Requests pass uncounted.
    Open,
    /// Requests are refused with 503.
    Closed,
}

/// What requests are counted together.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// All requests of the API.
    Api,
    /// Per client address.
    ClientAddress,
    /// Per value of a request header.
    Header(String),
    /// Per request path.
    Path,
    /// Per method.
    Method,
    /// Per client application (set by client-id enforcement earlier in the chain).
    ClientId,
}

fn key(selector: Option<&str>) -> Result<Key, PolicyError> {
    let Some(selector) = selector.map(str::trim) else {
        return Ok(Key::Api);
    };
    let refusal = || {
        format!(
            "keySelector `{selector}`: supported are #[attributes.remoteAddress], #[attributes.requestPath], #[attributes.method], #[attributes.headers['NAME']] and #[authentication.clientId]"
        )
    };
    match Expr::parse_for(selector, |e| !matches!(e, Expr::Query(_)), refusal)? {
        Expr::RemoteAddress => Ok(Key::ClientAddress),
        Expr::RequestPath => Ok(Key::Path),
        Expr::Method => Ok(Key::Method),
        Expr::ClientId => Ok(Key::ClientId),
        Expr::Header(name) => Ok(Key::Header(name)),
        Expr::Query(_) => unreachable!("parse_for refused a query parameter"),
    }
}

#[derive(Debug)]
struct Counter {
    window_start: Instant,
    count: u64,
}

/// Counts requests per key in fixed windows.
#[derive(Debug)]
pub struct RateLimit {
    windows: Vec<(u64, Duration)>,
    key: Key,
    expose: bool,
    /// (key value, window index) → counter; shared by every worker of this process.
    counters: Mutex<HashMap<(String, usize), Counter>>,
    /// Cluster-wide counters and this policy's key prefix, when counting through Redis.
    cluster: Option<(Arc<crate::store::Counters>, String)>,
    fail_mode: FailMode,
}

/// Keys kept before expired windows are swept.
const SWEEP_AT: usize = 100_000;

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A decision: `Ok((remaining, reset))`, or `Err((limit, retry_after))`.
type Decision = Result<(u64, Duration), (u64, Duration)>;

impl RateLimit {
    pub(super) fn from_config(
        config: serde_yaml_ng::Value,
        ctx: super::Context<'_>,
    ) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        if c.rate_limits.is_empty() {
            return Err(PolicyError::Config("rateLimits is empty".into()));
        }
        let mut windows = Vec::new();
        for w in &c.rate_limits {
            if w.maximum_requests == 0 || w.time_period_in_milliseconds == 0 {
                return Err(PolicyError::Config(
                    "maximumRequests and timePeriodInMilliseconds must be positive".into(),
                ));
            }
            windows.push((
                w.maximum_requests,
                Duration::from_millis(w.time_period_in_milliseconds),
            ));
        }
        let key = key(c.key_selector.as_deref())?;
        let fail_mode = match c.redis_fail_mode.as_deref() {
            None | Some("local") => FailMode::Local,
            Some("open") => FailMode::Open,
            Some("closed") => FailMode::Closed,
            Some(other) => {
                return Err(PolicyError::Config(format!(
                    "redisFailMode `{other}` is not local, open or closed"
                )));
            }
        };
        let cluster = (c.clusterizable && ctx.shared_storage).then(|| {
            let shape: Vec<String> = windows
                .iter()
                .map(|(m, p)| format!("{m}/{}", p.as_millis()))
                .collect();
            let prefix = format!(
                "{}:{}:rl:{}:{}:{key:?}",
                crate::store::KEY_PREFIX,
                ctx.cluster,
                ctx.api,
                shape.join(",")
            );
            (crate::store::counters(), prefix)
        });
        Ok(Self {
            windows,
            key,
            expose: c.expose_headers,
            counters: Mutex::new(HashMap::new()),
            cluster,
            fail_mode,
        })
    }

    fn key_of(&self, request: &RequestView<'_>) -> String {
        match &self.key {
            Key::Api => String::new(),
            Key::ClientAddress => request.client.to_string(),
            Key::Path => request.head.path().to_string(),
            Key::Method => request.head.method().to_string(),
            Key::ClientId => request.client_id.clone().unwrap_or_default(),
            Key::Header(name) => request
                .head
                .header(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default(),
        }
    }

    /// This process's decision: windows start at a key's first request.
    fn local(&self, key: &str) -> Decision {
        let now = Instant::now();
        let Ok(mut counters) = self.counters.lock() else {
            return Ok((u64::MAX, Duration::ZERO));
        };
        if counters.len() > SWEEP_AT {
            let longest = self.windows.iter().map(|(_, d)| *d).max().unwrap_or_default();
            counters.retain(|_, c| now.duration_since(c.window_start) < longest);
        }
        // Check every window first, then count: a refused request uses none of them.
        let mut refused: Option<(u64, Duration)> = None;
        let mut remaining = u64::MAX;
        let mut reset = Duration::ZERO;
        for (i, (max, period)) in self.windows.iter().enumerate() {
            let counter = counters.entry((key.to_string(), i)).or_insert(Counter {
                window_start: now,
                count: 0,
            });
            if now.duration_since(counter.window_start) >= *period {
                *counter = Counter {
                    window_start: now,
                    count: 0,
                };
            }
            let left = period.saturating_sub(now.duration_since(counter.window_start));
            if counter.count >= *max {
                refused = Some(refused.map_or((*max, left), |(m, l)| (m, l.max(left))));
            } else if max - counter.count - 1 < remaining {
                remaining = max - counter.count - 1;
                reset = left;
            }
        }
        if let Some(r) = refused {
            return Err(r);
        }
        for i in 0..self.windows.len() {
            if let Some(counter) = counters.get_mut(&(key.to_string(), i)) {
                counter.count += 1;
            }
        }
        Ok((remaining, reset))
    }

    /// The cluster's decision: windows aligned on the wall clock, counted through the store.
    fn cluster(&self, counters: &crate::store::Counters, prefix: &str, key: &str) -> Decision {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let Ok(mut slots) = counters.slots.lock() else {
            return Ok((u64::MAX, Duration::ZERO));
        };
        let mut names = Vec::with_capacity(self.windows.len());
        let mut remaining = u64::MAX;
        let mut reset = Duration::ZERO;
        let mut refused: Option<(u64, Duration)> = None;
        for (i, (max, period)) in self.windows.iter().enumerate() {
            let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
            let left = Duration::from_millis(period_ms - now_ms % period_ms);
            let name = format!("{prefix}:{i}:{}:{key}", now_ms / period_ms);
            let slot = slots.entry(name.clone()).or_default();
            slot.ttl = *period;
            slot.used = Some(Instant::now());
            let count = slot.global + slot.pending;
            if count >= *max {
                refused = Some(refused.map_or((*max, left), |(m, l)| (m, l.max(left))));
            } else if max - count - 1 < remaining {
                remaining = max - count - 1;
                reset = left;
            }
            names.push(name);
        }
        if let Some(r) = refused {
            return Err(r);
        }
        for name in names {
            if let Some(slot) = slots.get_mut(&name) {
                slot.pending += 1;
            }
        }
        Ok((remaining, reset))
    }
}

impl Policy for RateLimit {
    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let key = self.key_of(request);
        self.check(request, &key)
    }
}

impl RateLimit {
    /// A limiter with these windows for one SLA tier, keyed by client id.
    pub(super) fn for_tier(
        windows: Vec<(u64, Duration)>,
        tier: &str,
        ctx: super::Context<'_>,
        expose: bool,
    ) -> Self {
        let cluster = ctx.shared_storage.then(|| {
            let prefix = format!(
                "{}:{}:sla:{}:{tier}",
                crate::store::KEY_PREFIX,
                ctx.cluster,
                ctx.api
            );
            (crate::store::counters(), prefix)
        });
        Self {
            windows,
            key: Key::Api,
            expose,
            counters: Mutex::new(HashMap::new()),
            cluster,
            fail_mode: FailMode::Local,
        }
    }

    /// Counts a request under `key` and decides.
    pub(super) fn check(&self, request: &mut RequestView<'_>, key: &str) -> Verdict {
        let decision = match &self.cluster {
            Some(_) if !crate::store::healthy() && self.fail_mode == FailMode::Open => {
                return Verdict::Continue;
            }
            Some(_) if !crate::store::healthy() && self.fail_mode == FailMode::Closed => {
                return Verdict::Deny(Denial::Unavailable { retry_after: 5 });
            }
            Some((counters, prefix)) => self.cluster(counters, prefix, key),
            None => self.local(key),
        };
        match decision {
            Ok((remaining, reset)) => {
                if self.expose {
                    let (max, _) = self.windows[0];
                    request
                        .response_add
                        .push(("ratelimit-limit".into(), max.to_string()));
                    request
                        .response_add
                        .push(("ratelimit-remaining".into(), remaining.to_string()));
                    request
                        .response_add
                        .push(("ratelimit-reset".into(), whole_seconds(reset).to_string()));
                }
                Verdict::Continue
            }
            Err((max, left)) => {
                let secs = whole_seconds(left);
                let mut headers = vec![("retry-after".to_string(), secs.to_string())];
                if self.expose {
                    headers.push(("ratelimit-limit".into(), max.to_string()));
                    headers.push(("ratelimit-remaining".into(), "0".into()));
                    headers.push(("ratelimit-reset".into(), secs.to_string()));
                }
                Verdict::Deny(Denial::RateLimited { headers })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(key(None).unwrap(), Key::Api);
        assert_eq!(
            key(Some("#[attributes.headers['X-Client']]")).unwrap(),
            Key::Header("x-client".into())
        );
        assert_eq!(
            key(Some("#[attributes.remoteAddress]")).unwrap(),
            Key::ClientAddress
        );
        assert!(key(Some("#[attributes.queryParams['a']]")).is_err());
    }
}
