//! `jwt-validation`: a signed token is required; its signature, time claims,
//! audience, issuer and custom claims are checked before the upstream is asked.
//!
//! The algorithm family comes from the configuration (`signingMethod`), never
//! from the token: a token whose header names another algorithm (`none`, or
//! HS256 made with an RSA public key as the secret) is refused.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::expr::Expr;
use super::{Denial, Policy, PolicyError, RequestView, Verdict, parse};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CustomClaim {
    key: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the source gateway's configuration has these flags"
)]
struct Config {
    #[serde(default = "bearer")]
    jwt_origin: String,
    #[serde(default)]
    jwt_expression: Option<String>,
    signing_method: String,
    #[serde(default = "bits256")]
    signing_key_length: u16,
    #[serde(default = "text")]
    jwt_key_origin: String,
    /// PEM public key (rsa, es, eddsa).
    #[serde(default)]
    text_key: Option<String>,
    /// Portcullis extension: a file holding the PEM public key, or the HMAC secret (mode 0600).
    #[serde(default)]
    key_file: Option<String>,
    /// Where the JWKS is served (`jwtKeyOrigin: jwks`).
    #[serde(default)]
    jwks_url: Option<String>,
    /// Minutes the fetched keys are used before a refresh.
    #[serde(default = "sixty")]
    jwks_service_time_to_live: u64,
    /// Milliseconds allowed for connecting to the JWKS service and for each read.
    #[serde(default = "ten_thousand")]
    jwks_service_connection_timeout: u64,
    #[serde(default)]
    validate_aud_claim: bool,
    #[serde(default)]
    supported_audiences: Option<String>,
    #[serde(default = "super::yes")]
    mandatory_exp_claim: bool,
    #[serde(default)]
    mandatory_nbf_claim: bool,
    /// Portcullis extension: accepted `iss` values, comma-separated.
    #[serde(default)]
    supported_issuers: Option<String>,
    #[serde(default)]
    validate_custom_claim: bool,
    #[serde(default)]
    mandatory_custom_claims: Vec<CustomClaim>,
    #[serde(default = "super::yes")]
    skip_client_id_validation: bool,
    /// The claim naming the client application: `#[vars.claimSet.NAME]`.
    #[serde(default)]
    client_id_expression: Option<String>,
}

fn bearer() -> String {
    "httpBearerAuthenticationHeader".into()
}

fn bits256() -> u16 {
    256
}

fn text() -> String {
    "text".into()
}

fn sixty() -> u64 {
    60
}

fn ten_thousand() -> u64 {
    10_000
}

/// Where the signature keys come from.
enum Keys {
    /// One key from the configuration.
    Fixed(DecodingKey),
    /// A JWKS URL's keys, chosen by the token's `kid`.
    Jwks(std::sync::Arc<super::jwks::Jwks>),
}

/// Validates JWTs on every request.
pub struct JwtValidation {
    header: Option<String>,
    keys: Keys,
    validation: Validation,
    claims: Vec<(String, String)>,
    /// The client-id claim, and the client ids with a contract for this API.
    clients: Option<(String, std::collections::HashSet<String>)>,
}

impl std::fmt::Debug for JwtValidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidation")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

fn csv(text: Option<&String>) -> Vec<String> {
    text.map(|t| {
        t.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

impl JwtValidation {
    #[expect(
        clippy::too_many_lines,
        reason = "one check per configuration field, in field order"
    )]
    pub(super) fn from_config(
        config: serde_yaml_ng::Value,
        ctx: super::Context<'_>,
    ) -> Result<Self, PolicyError> {
        let base: &Path = ctx.base;
        let c: Config = parse(config)?;
        let bad = |m: String| PolicyError::Config(m);
        let header = match c.jwt_origin.as_str() {
            "httpBearerAuthenticationHeader" => None,
            "customExpression" => Some(Expr::header(
                "jwtExpression",
                c.jwt_expression.as_deref().unwrap_or(""),
            )?),
            other => {
                return Err(bad(format!(
                    "jwtOrigin `{other}` is not httpBearerAuthenticationHeader or customExpression"
                )));
            }
        };
        if c.jwt_key_origin != "text" && c.jwt_key_origin != "jwks" {
            return Err(bad(format!(
                "jwtKeyOrigin `{}` is not text or jwks",
                c.jwt_key_origin
            )));
        }
        let clients = if c.skip_client_id_validation {
            None
        } else {
            let expr = c
                .client_id_expression
                .as_deref()
                .unwrap_or("#[vars.claimSet.client_id]");
            let claim = expr
                .trim()
                .strip_prefix("#[vars.claimSet.")
                .and_then(|r| r.strip_suffix(']'))
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                .ok_or_else(|| {
                    bad(format!(
                        "clientIdExpression `{expr}`: only #[vars.claimSet.NAME] is supported"
                    ))
                })?;
            let ids = ctx
                .contracts
                .iter()
                .filter(|k| k.apis.iter().any(|a| a == ctx.api))
                .map(|k| k.client_id.clone())
                .collect();
            Some((claim.to_string(), ids))
        };
        let alg = match (c.signing_method.as_str(), c.signing_key_length) {
            ("rsa", 256) => Algorithm::RS256,
            ("rsa", 384) => Algorithm::RS384,
            ("rsa", 512) => Algorithm::RS512,
            ("es", 256) => Algorithm::ES256,
            ("es", 384) => Algorithm::ES384,
            ("eddsa", _) => Algorithm::EdDSA,
            ("hmac", 256) => Algorithm::HS256,
            ("hmac", 384) => Algorithm::HS384,
            ("hmac", 512) => Algorithm::HS512,
            (m, l) => {
                return Err(bad(format!(
                    "signingMethod `{m}` with signingKeyLength {l} is not supported"
                )));
            }
        };
        let keys = if c.jwt_key_origin == "jwks" {
            let family = match c.signing_method.as_str() {
                "rsa" => super::jwks::Family::Rsa,
                "es" => super::jwks::Family::Ec,
                "eddsa" => super::jwks::Family::Ed,
                _ => {
                    return Err(bad(
                        "jwtKeyOrigin jwks serves public keys: use signingMethod rsa, es or eddsa".into(),
                    ));
                }
            };
            if c.text_key.is_some() || c.key_file.is_some() {
                return Err(bad(
                    "jwtKeyOrigin jwks takes its keys from jwksUrl, not textKey or keyFile".into(),
                ));
            }
            let url = c
                .jwks_url
                .as_deref()
                .ok_or_else(|| bad("jwtKeyOrigin jwks needs jwksUrl".into()))?;
            if c.jwks_service_time_to_live == 0 || c.jwks_service_connection_timeout == 0 {
                return Err(bad(
                    "jwksServiceTimeToLive and jwksServiceConnectionTimeout must be above 0".into(),
                ));
            }
            let jwks = super::jwks::shared(
                url,
                family,
                std::time::Duration::from_millis(c.jwks_service_connection_timeout),
                std::time::Duration::from_secs(c.jwks_service_time_to_live * 60),
            )
            .map_err(bad)?;
            Keys::Jwks(jwks)
        } else {
            if c.jwks_url.is_some() {
                return Err(bad("jwksUrl needs jwtKeyOrigin: jwks".into()));
            }
            Keys::Fixed(fixed_key(&c, alg, base)?)
        };
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = Vec::new();
        if c.mandatory_exp_claim {
            required.push("exp");
        }
        if c.mandatory_nbf_claim {
            required.push("nbf");
        }
        let audiences = csv(c.supported_audiences.as_ref());
        if c.validate_aud_claim {
            if audiences.is_empty() {
                return Err(bad("validateAudClaim needs supportedAudiences".into()));
            }
            validation.set_audience(&audiences);
            required.push("aud");
        } else {
            validation.validate_aud = false;
        }
        let issuers = csv(c.supported_issuers.as_ref());
        if !issuers.is_empty() {
            validation.set_issuer(&issuers);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let claims = if c.validate_custom_claim {
            c.mandatory_custom_claims
                .into_iter()
                .map(|c| (c.key, c.value))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            header,
            keys,
            validation,
            claims,
            clients,
        })
    }
}

/// The key written in the configuration (`textKey`) or a file (`keyFile`).
fn fixed_key(c: &Config, alg: Algorithm, base: &Path) -> Result<DecodingKey, PolicyError> {
    let bad = |m: String| PolicyError::Config(m);
    let material: Vec<u8> = match (&c.text_key, &c.key_file) {
        (Some(_), Some(_)) => return Err(bad("give textKey or keyFile, not both".into())),
        (Some(_), None) if alg == Algorithm::HS256 || alg == Algorithm::HS384 || alg == Algorithm::HS512 => {
            return Err(bad(
                "an HMAC secret is never written inline; put it in a file (mode 0600) and use keyFile".into(),
            ));
        }
        (Some(t), None) => t.as_bytes().to_vec(),
        (None, Some(f)) => {
            let path = Path::new(f);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                base.join(path)
            };
            crate::config::secret::read_private(&path)
                .map_err(|e| bad(e.to_string()))?
                .expose()
                .to_vec()
        }
        (None, None) => return Err(bad("textKey or keyFile is required".into())),
    };
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => DecodingKey::from_rsa_pem(&material),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&material),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(&material),
        _ => Ok(DecodingKey::from_secret(material.trim_ascii_end())),
    }
    .map_err(|e| {
        bad(format!(
            "the key does not fit signingMethod {}: {e}",
            c.signing_method
        ))
    })?;
    Ok(key)
}

fn refuse(why: &str) -> Verdict {
    Verdict::Deny(Denial::unauthorized(format!(
        "Bearer error=\"invalid_token\", error_description=\"{why}\""
    )))
}

impl Policy for JwtValidation {
    fn needs_contracts(&self) -> bool {
        self.clients.is_some()
    }

    fn ready(&self) -> bool {
        match &self.keys {
            Keys::Fixed(_) => true,
            Keys::Jwks(jwks) => jwks.loaded(),
        }
    }

    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let head = request.head;
        let raw = match &self.header {
            Some(name) => head.header(name),
            None => head
                .header("authorization")
                .and_then(|v| v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer "))),
        };
        let Some(token) = raw.and_then(|t| std::str::from_utf8(t).ok()).map(str::trim) else {
            return Verdict::Deny(Denial::unauthorized("Bearer"));
        };
        let decode = |key: &DecodingKey| {
            jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(token, key, &self.validation)
        };
        let outcome = match &self.keys {
            Keys::Fixed(key) => decode(key),
            Keys::Jwks(jwks) => {
                let Ok(header) = jsonwebtoken::decode_header(token) else {
                    return refuse("invalid token");
                };
                let keys = match jwks.lookup(header.kid.as_deref()) {
                    super::jwks::Lookup::Keys(keys) => keys,
                    super::jwks::Lookup::UnknownKid => return refuse("unknown key id"),
                    super::jwks::Lookup::NotLoaded => {
                        return Verdict::Deny(Denial::Unavailable { retry_after: 5 });
                    }
                };
                let mut outcome = Err(jsonwebtoken::errors::ErrorKind::InvalidSignature.into());
                for key in &keys {
                    outcome = decode(key);
                    if outcome.is_ok() {
                        break;
                    }
                }
                outcome
            }
        };
        let claims = match outcome {
            Ok(data) => data.claims,
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not yet valid",
                    ErrorKind::InvalidAudience => "audience not accepted",
                    ErrorKind::InvalidIssuer => "issuer not accepted",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                    ErrorKind::InvalidAlgorithm => "algorithm not accepted",
                    _ => "invalid token",
                };
                return refuse(why);
            }
        };
        for (key, want) in &self.claims {
            let ok = match claims.get(key) {
                Some(serde_json::Value::String(s)) => s == want,
                Some(other) => serde_json::from_str::<serde_json::Value>(want).is_ok_and(|w| w == *other),
                None => false,
            };
            if !ok {
                return refuse("a custom claim does not match");
            }
        }
        if let Some((claim, ids)) = &self.clients {
            let Some(id) = claims.get(claim).and_then(serde_json::Value::as_str) else {
                return refuse("the client id claim is missing");
            };
            if !ids.contains(id) {
                return Verdict::Deny(Denial::Forbidden("no contract for this API"));
            }
            request.client_id = Some(id.to_string());
        }
        Verdict::Continue
    }
}
