//! `spike-control`: smooths bursts. Requests over the rate wait (up to
//! `delayAttempts` × `delayTimeInMillis`, at most `queuingLimit` of them at a
//! time) for room in a later window; the rest get 429.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{Deferred, Denial, Policy, PolicyError, RequestView, Verdict, parse};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    maximum_requests: u64,
    time_period_in_milliseconds: u64,
    delay_time_in_millis: u64,
    delay_attempts: u32,
    #[serde(default = "five")]
    queuing_limit: u32,
    #[serde(default)]
    expose_headers: bool,
}

fn five() -> u32 {
    5
}

#[derive(Debug)]
struct Window {
    start: Instant,
    count: u64,
    queued: u32,
}

#[derive(Debug)]
struct Shared {
    max: u64,
    period: Duration,
    window: Mutex<Window>,
}

impl Shared {
    /// Takes a slot in the current window if there is one.
    fn admit(&self) -> bool {
        let Ok(mut w) = self.window.lock() else {
            return true;
        };
        let now = Instant::now();
        if now.duration_since(w.start) >= self.period {
            w.start = now;
            w.count = 0;
        }
        if w.count < self.max {
            w.count += 1;
            true
        } else {
            false
        }
    }

    fn queue(&self, limit: u32) -> bool {
        let Ok(mut w) = self.window.lock() else {
            return false;
        };
        if w.queued >= limit {
            return false;
        }
        w.queued += 1;
        true
    }

    fn unqueue(&self) {
        if let Ok(mut w) = self.window.lock() {
            w.queued = w.queued.saturating_sub(1);
        }
    }
}

/// Leaves the queue however the wait ends (including a client that goes away).
struct Queued(Arc<Shared>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.unqueue();
    }
}

/// Smooths request spikes for one API instance.
#[derive(Debug)]
pub struct SpikeControl {
    shared: Arc<Shared>,
    delay: Duration,
    attempts: u32,
    queuing_limit: u32,
    expose: bool,
}

impl SpikeControl {
    pub(super) fn from_config(config: serde_yaml_ng::Value) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        if c.maximum_requests == 0 || c.time_period_in_milliseconds == 0 {
            return Err(PolicyError::Config(
                "maximumRequests and timePeriodInMilliseconds must be positive".into(),
            ));
        }
        if c.delay_time_in_millis > 60_000 || u64::from(c.delay_attempts) * c.delay_time_in_millis > 300_000 {
            return Err(PolicyError::Config(
                "requests would wait more than 5 minutes; lower delayTimeInMillis or delayAttempts".into(),
            ));
        }
        let shared = Arc::new(Shared {
            max: c.maximum_requests,
            period: Duration::from_millis(c.time_period_in_milliseconds),
            window: Mutex::new(Window {
                start: Instant::now(),
                count: 0,
                queued: 0,
            }),
        });
        Ok(Self {
            shared,
            delay: Duration::from_millis(c.delay_time_in_millis),
            attempts: c.delay_attempts,
            queuing_limit: c.queuing_limit,
            expose: c.expose_headers,
        })
    }

    fn refuse(expose: bool, max: u64) -> Verdict {
        let mut headers = vec![("retry-after".to_string(), "1".to_string())];
        if expose {
            headers.push(("x-ratelimit-limit".into(), max.to_string()));
            headers.push(("x-ratelimit-remaining".into(), "0".into()));
        }
        Verdict::Deny(Denial::RateLimited { headers })
    }
}

impl Policy for SpikeControl {
    fn on_request(&self, _request: &mut RequestView<'_>) -> Verdict {
        if self.shared.admit() {
            return Verdict::Continue;
        }
        if self.attempts == 0 || !self.shared.queue(self.queuing_limit) {
            return Self::refuse(self.expose, self.shared.max);
        }
        let queued = Queued(self.shared.clone());
        let (delay, attempts, expose) = (self.delay, self.attempts, self.expose);
        Verdict::Later(Deferred(Box::pin(async move {
            for _ in 0..attempts {
                tokio::time::sleep(delay).await;
                if queued.0.admit() {
                    return Verdict::Continue;
                }
            }
            Self::refuse(expose, queued.0.max)
        })))
    }
}
