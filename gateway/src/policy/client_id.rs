//! `client-id-enforcement`: only client applications with a contract for this API pass.
//!
//! Credentials come from the `Authorization: Basic` header, or from the
//! headers / query parameters named by `clientIdExpression` and
//! `clientSecretExpression` (`#[attributes.headers['client_id']]`,
//! `#[attributes.queryParams['client_id']]`). Missing or wrong credentials get
//! 401 with `WWW-Authenticate`; a valid client without a contract for this
//! API gets 403. Secrets are compared as SHA-256 digests in constant time.

use std::collections::HashMap;

use base64::Engine as _;
use serde::Deserialize;

use super::expr::Expr;
use super::{Context, Denial, Policy, PolicyError, RequestView, Verdict, parse};
use crate::config::ClientSecret;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default = "basic")]
    credentials_origin_has_http_basic_authentication_header: String,
    #[serde(default)]
    client_id_expression: Option<String>,
    #[serde(default)]
    client_secret_expression: Option<String>,
}

fn basic() -> String {
    "httpBasicAuthenticationHeader".into()
}

/// Where a credential is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Header(String),
    Query(String),
}

fn source(expr: &str) -> Result<Source, PolicyError> {
    let refusal = || {
        format!(
            "`{expr}`: only #[attributes.headers['NAME']] and #[attributes.queryParams['NAME']] are supported"
        )
    };
    match Expr::parse_for(expr, |e| matches!(e, Expr::Header(_) | Expr::Query(_)), refusal)? {
        Expr::Header(name) => Ok(Source::Header(name)),
        Expr::Query(name) => Ok(Source::Query(name)),
        _ => unreachable!("parse_for admitted only a header or a query parameter"),
    }
}

/// A contract as this policy needs it.
#[derive(Debug)]
struct Client {
    digest: Option<[u8; 32]>,
    /// An argon2 or bcrypt hash, checked off the workers.
    slow_hash: Option<String>,
    allowed: bool,
}

/// Requires the credentials of a client application with a contract.
#[derive(Debug)]
pub struct ClientIdEnforcement {
    from: Option<(Source, Option<Source>)>,
    clients: HashMap<String, Client>,
    slow: super::basic_auth::SlowCheck,
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl ClientIdEnforcement {
    pub(super) fn from_config(config: serde_yaml_ng::Value, ctx: Context<'_>) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        let from = match c.credentials_origin_has_http_basic_authentication_header.as_str() {
            "httpBasicAuthenticationHeader" => None,
            "customExpression" => {
                let id = c
                    .client_id_expression
                    .as_deref()
                    .ok_or_else(|| PolicyError::Config("customExpression needs clientIdExpression".into()))?;
                Some((
                    source(id)?,
                    c.client_secret_expression.as_deref().map(source).transpose()?,
                ))
            }
            other => {
                return Err(PolicyError::Config(format!(
                    "credentialsOriginHasHttpBasicAuthenticationHeader `{other}` is not httpBasicAuthenticationHeader or customExpression"
                )));
            }
        };
        let mut clients = HashMap::new();
        for contract in ctx.contracts {
            let (digest, slow_hash) = match &contract.secret {
                Some(ClientSecret::Sha256(h) | ClientSecret::Hash(h)) if h.starts_with("sha256:") => {
                    (hex32(h), None)
                }
                Some(ClientSecret::Hash(h)) => (None, Some(h.clone())),
                _ => (None, None),
            };
            clients.insert(
                contract.client_id.clone(),
                Client {
                    digest,
                    slow_hash,
                    allowed: contract.apis.iter().any(|a| a == ctx.api),
                },
            );
        }
        Ok(Self {
            from,
            clients,
            slow: super::basic_auth::SlowCheck::new(),
        })
    }

    pub(super) fn credentials(&self, request: &RequestView<'_>) -> (Option<String>, Option<String>) {
        let head = request.head;
        let text = |name: &str| {
            head.header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_string)
        };
        let query = |name: &str| {
            let target = head.target();
            let query = target.split_once('?').map_or("", |(_, q)| q);
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then(|| v.to_string())
            })
        };
        let read = |s: &Source| match s {
            Source::Header(n) => text(n),
            Source::Query(n) => query(n),
        };
        if let Some((id, secret)) = &self.from {
            (read(id), secret.as_ref().and_then(read))
        } else {
            {
                let Some(auth) = text("authorization") else {
                    return (None, None);
                };
                let Some(b64) = auth
                    .strip_prefix("Basic ")
                    .or_else(|| auth.strip_prefix("basic "))
                else {
                    return (None, None);
                };
                let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
                    return (None, None);
                };
                let Ok(pair) = String::from_utf8(raw) else {
                    return (None, None);
                };
                match pair.split_once(':') {
                    Some((id, secret)) => (Some(id.to_string()), Some(secret.to_string())),
                    None => (Some(pair), None),
                }
            }
        }
    }
}

fn unauthorized() -> Verdict {
    Verdict::Deny(Denial::unauthorized("Basic realm=\"portcullis\""))
}

/// Compares two digests without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Policy for ClientIdEnforcement {
    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let (Some(id), secret) = self.credentials(request) else {
            return unauthorized();
        };
        let Some(client) = self.clients.get(&id) else {
            return unauthorized();
        };
        if let Some(expected) = &client.digest {
            let Some(secret) = secret.as_ref() else {
                return unauthorized();
            };
            let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
            let mut got = [0u8; 32];
            got.copy_from_slice(digest.as_ref());
            if !same(expected, &got) {
                return unauthorized();
            }
        }
        let outcome = if client.allowed {
            Verdict::Continue
        } else {
            Verdict::Deny(Denial::Forbidden("no contract for this API"))
        };
        if let Some(hash) = &client.slow_hash {
            let Some(secret) = secret else {
                return unauthorized();
            };
            request.client_id = Some(id.clone());
            return self.slow.check(id, secret.into_bytes(), hash.clone(), outcome);
        }
        if client.allowed {
            request.client_id = Some(id);
        }
        outcome
    }

    fn needs_contracts(&self) -> bool {
        true
    }
}
