//! `ip-allowlist` and `ip-blocklist`: the client address against CIDR lists (v4 and v6).

use ipnet::IpNet;
use serde::Deserialize;

use super::{Denial, Policy, PolicyError, RequestView, Verdict, parse};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    ips: Vec<String>,
    #[serde(default)]
    ip_expression: Option<String>,
}

/// Allows only (or refuses) clients whose address is in the list.
#[derive(Debug)]
pub struct IpFilter {
    allow: bool,
    nets: Vec<IpNet>,
}

impl IpFilter {
    pub(super) fn from_config(config: serde_yaml_ng::Value, allow: bool) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        if c.ip_expression.is_some() {
            return Err(PolicyError::Config(
                "ipExpression is not supported: the client address is the connection's".into(),
            ));
        }
        if c.ips.is_empty() {
            return Err(PolicyError::Config("ips is empty".into()));
        }
        let nets = c
            .ips
            .iter()
            .map(|text| {
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| PolicyError::Config(format!("`{text}` is not an IP address or CIDR")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allow, nets })
    }
}

impl Policy for IpFilter {
    fn name(&self) -> &'static str {
        if self.allow {
            "ip-allowlist"
        } else {
            "ip-blocklist"
        }
    }

    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let client = match request.client {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(request.client, std::net::IpAddr::V4),
            std::net::IpAddr::V4(v4) => std::net::IpAddr::V4(v4),
        };
        let listed = self.nets.iter().any(|n| n.contains(&client));
        if listed == self.allow {
            Verdict::Continue
        } else {
            Verdict::Deny(Denial::Forbidden(if self.allow {
                "not in ip-allowlist"
            } else {
                "in ip-blocklist"
            }))
        }
    }
}
