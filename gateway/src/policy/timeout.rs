//! `response-timeout`: 504 when the upstream is slower than the API allows.

use std::time::Duration;

use serde::Deserialize;

use super::{Policy, PolicyError, parse};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    /// Seconds, as the source gateway writes it.
    timeout: f64,
}

/// Bounds the wait for the upstream's response head and each later read.
#[derive(Debug)]
pub struct ResponseTimeout(Duration);

impl ResponseTimeout {
    pub(super) fn from_config(config: serde_yaml_ng::Value) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        if !(c.timeout > 0.0 && c.timeout <= 86_400.0) {
            return Err(PolicyError::Config(format!(
                "timeout {} is not between 0 and 86400 seconds",
                c.timeout
            )));
        }
        Ok(Self(Duration::from_secs_f64(c.timeout)))
    }
}

impl Policy for ResponseTimeout {
    fn response_timeout(&self) -> Option<Duration> {
        Some(self.0)
    }
}
