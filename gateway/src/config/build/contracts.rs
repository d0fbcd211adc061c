//! Contracts, and the certificate separation rule between networks.

use std::collections::HashMap;
use std::path::Path;

use super::{Collector, Doc, secret_value, side};
use crate::config::{ClientSecret, Config, ContractConfig, Origin, Pem, raw};

/// Certificates exposed to the internet are never used internally, and vice versa.
pub(super) fn separate_certificates(out: &Config, c: &mut Collector) {
    struct Use<'a> {
        crt: Vec<u8>,
        key: &'a [u8],
        external: bool,
        origin: &'a Origin,
        what: String,
    }
    let crt_bytes = |pem: &Pem| match pem {
        Pem::File(path) => std::fs::read(path).unwrap_or_default(),
        Pem::Inline(text) => text.as_bytes().to_vec(),
    };
    let mut uses: Vec<Use> = Vec::new();
    for l in &out.listeners {
        for pair in l.tls.iter().flat_map(|t| &t.certs) {
            let what = format!("{} listener {}", side(l.external), l.addr);
            uses.push(Use {
                crt: crt_bytes(&pair.crt),
                key: pair.key.expose(),
                external: l.external,
                origin: &pair.origin,
                what,
            });
        }
    }
    for s in &out.services {
        if let Some(pair) = s.tls.as_ref().and_then(|t| t.client.as_ref()) {
            let what = format!("{} service {}", side(s.external), s.name);
            uses.push(Use {
                crt: crt_bytes(&pair.crt),
                key: pair.key.expose(),
                external: s.external,
                origin: &pair.origin,
                what,
            });
        }
    }
    for (i, a) in uses.iter().enumerate() {
        for b in &uses[..i] {
            if a.external == b.external {
                continue;
            }
            let same = if !a.crt.is_empty() && a.crt == b.crt {
                "certificate"
            } else if a.key == b.key {
                "private key"
            } else {
                continue;
            };
            c.push(
                a.origin,
                format!(
                    "the same {same} serves the {} and the {} ({}:{}); certificates facing the internet are never used internally: issue separate ones",
                    a.what, b.what, b.origin.file, b.origin.line
                ),
            );
        }
    }
}

pub(super) fn contracts_into(
    contracts: &[(Doc, String, raw::ContractSpec)],
    api_names: &HashMap<&str, Origin>,
    base: &Path,
    out: &mut Config,
    c: &mut Collector,
) {
    let mut client_ids: HashMap<&str, Origin> = HashMap::new();
    for (doc, name, spec) in contracts {
        let id_at = doc.at("spec.clientId");
        if spec.client_id.trim().is_empty() {
            c.push(&id_at, "clientId must not be empty");
        } else if let Some(prev) = client_ids.insert(&spec.client_id, id_at.clone()) {
            c.push(
                &id_at,
                format!(
                    "client id is already used by the Contract at {}:{}",
                    prev.file, prev.line
                ),
            );
        }
        let secret = match (&spec.client_secret, &spec.client_secret_hash) {
            (Some(_), Some(_)) => {
                c.push(
                    &doc.at("spec.clientSecretHash"),
                    "give clientSecret or clientSecretHash, not both",
                );
                None
            }
            (Some(field), None) => secret_value(doc, "spec.clientSecret", field, base, c).map(|s| {
                let digest = ring::digest::digest(&ring::digest::SHA256, s.expose());
                let hex = digest
                    .as_ref()
                    .iter()
                    .fold(String::with_capacity(64), |mut hex, b| {
                        use std::fmt::Write as _;
                        let _ = write!(hex, "{b:02x}");
                        hex
                    });
                ClientSecret::Sha256(format!("sha256:{hex}"))
            }),
            (None, Some(hash)) => {
                if valid_hash(hash) {
                    Some(ClientSecret::Hash(hash.clone()))
                } else {
                    c.push(
                        &doc.at("spec.clientSecretHash"),
                        "not a recognised hash: expected $argon2id$..., $2b$... (bcrypt) or sha256:<64 hex digits>",
                    );
                    None
                }
            }
            (None, None) => None,
        };
        if spec.apis.is_empty() {
            c.push(
                &doc.at("spec.apis"),
                "a contract that names no ApiInstance grants nothing; list the APIs it may call",
            );
        }
        for (i, api) in spec.apis.iter().enumerate() {
            if !api_names.contains_key(api.as_str()) {
                c.push(
                    &doc.at(&format!("spec.apis[{i}]")),
                    format!("no ApiInstance named `{api}`"),
                );
            }
        }
        out.contracts.push(ContractConfig {
            name: name.clone(),
            client_name: spec.client_name.clone(),
            client_id: spec.client_id.clone(),
            secret,
            sla_tier: spec.sla_tier.clone(),
            apis: spec.apis.clone(),
        });
    }
}

pub(super) fn valid_hash(hash: &str) -> bool {
    if let Some(hex) = hash.strip_prefix("sha256:") {
        return hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    hash.starts_with("$argon2id$")
        || hash.starts_with("$argon2i$")
        || (hash.len() == 60 && ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)))
}
