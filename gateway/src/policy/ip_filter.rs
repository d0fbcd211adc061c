//! `ip-allowlist` and `ip-blocklist`: the client address against CIDR lists (v4 and v6).
//!
//! The client address is the connection's, or — behind trusted proxies — an
//! entry of `X-Forwarded-For` (`ipExpression`) counted from the right:
//! `trustedHops: 1` takes the last entry, which the nearest proxy appended.
//! Entries further left are written by the client and never trusted.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::expr::Expr;
use super::{Denial, Policy, PolicyError, RequestView, Verdict, parse};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    ips: Vec<String>,
    #[serde(default)]
    ip_expression: Option<String>,
    /// Portcullis extension: proxies in front of the gateway that append to the header.
    #[serde(default)]
    trusted_hops: Option<usize>,
}

/// Allows only (or refuses) clients whose address is in the list.
#[derive(Debug)]
pub struct IpFilter {
    allow: bool,
    nets: Vec<IpNet>,
    /// Header holding forwarded addresses, and how many trusted hops append to it.
    forwarded: Option<(String, usize)>,
}

impl IpFilter {
    pub(super) fn from_config(config: serde_yaml_ng::Value, allow: bool) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        let forwarded = match c.ip_expression.as_deref() {
            None => {
                if c.trusted_hops.is_some() {
                    return Err(PolicyError::Config("trustedHops needs ipExpression".into()));
                }
                None
            }
            Some(expr) => {
                let name = Expr::header("ipExpression", expr)?;
                let hops = c.trusted_hops.unwrap_or(1);
                if hops == 0 {
                    return Err(PolicyError::Config("trustedHops must be at least 1".into()));
                }
                Some((name, hops))
            }
        };
        if c.ips.is_empty() {
            return Err(PolicyError::Config("ips is empty".into()));
        }
        let nets = c
            .ips
            .iter()
            .map(|text| {
                crate::config::parse_net(text)
                    .map(|n| n.trunc())
                    .ok_or_else(|| PolicyError::Config(format!("`{text}` is not an IP address or CIDR")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            allow,
            nets,
            forwarded,
        })
    }

    /// The address judged: the connection's, or the trusted forwarded entry.
    fn client(&self, request: &RequestView<'_>) -> Option<IpAddr> {
        let Some((header, hops)) = &self.forwarded else {
            return Some(request.client);
        };
        let all: Vec<&[u8]> = request
            .head
            .headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(header.as_bytes()))
            .flat_map(|(_, v)| v.split(|b| *b == b','))
            .collect();
        let entry = all.len().checked_sub(*hops).map(|i| all[i])?;
        std::str::from_utf8(entry).ok()?.trim().parse().ok()
    }
}

impl Policy for IpFilter {
    fn nic_acl(&self) -> Option<(bool, &[IpNet])> {
        self.forwarded
            .is_none()
            .then_some((self.allow, self.nets.as_slice()))
    }

    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let Some(client) = self.client(request) else {
            // No trustworthy address: an allowlist cannot admit it, a blocklist cannot refuse it.
            return if self.allow {
                Verdict::Deny(Denial::Forbidden("client address unknown"))
            } else {
                Verdict::Continue
            };
        };
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            IpAddr::V4(v4) => IpAddr::V4(v4),
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
