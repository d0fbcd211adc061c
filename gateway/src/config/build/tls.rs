//! TLS contexts from their bindings' configuration: certificate pairs, CA
//! bundles, versions and ALPN, every file checked when it is named.

use std::path::{Path, PathBuf};

use super::{Collector, Doc, check_host_pattern, from_config};
use crate::config::{
    CertPair, InboundTls, OutboundTls, Pem, TlsVersion, raw, secret, secret::Secret, secret::SecretError,
    secret::SecretSource,
};

/// Resolves `${file:path}` (relative to the config directory).
pub(super) fn file_ref(text: &str, base: &Path) -> Option<PathBuf> {
    let inner = text.trim().strip_prefix("${file:")?.strip_suffix('}')?;
    let path = Path::new(inner.trim());
    Some(if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    })
}

pub(super) fn pem(text: &str, base: &Path) -> Result<Pem, String> {
    if let Some(path) = file_ref(text, base) {
        return Ok(Pem::File(path));
    }
    if text.trim_start().starts_with("-----BEGIN") {
        return Ok(Pem::Inline(text.to_string()));
    }
    Err("expected ${file:/path/to/file.pem} or inline PEM text".into())
}

pub(super) fn cert_pair(
    doc: &Doc,
    field: &str,
    r: &raw::CertificateRef,
    base: &Path,
    c: &mut Collector,
) -> Option<CertPair> {
    let crt = pem(&r.crt, base)
        .map_err(|e| c.push(&doc.at(&format!("{field}.crt")), e))
        .ok();
    let key = secret_value(doc, &format!("{field}.key"), &r.key, base, c);
    Some(CertPair {
        crt: crt?,
        key: key?,
        origin: doc.at(field),
    })
}

/// Resolves a secret field, reporting why it cannot be used.
pub(super) fn secret_value(
    doc: &Doc,
    field: &str,
    value: &raw::SecretField,
    base: &Path,
    c: &mut Collector,
) -> Option<Secret> {
    let at = doc.at(field);
    let (source, plain) = match value {
        raw::SecretField::Ref(text) => match secret::parse(text, base) {
            Ok(source) => (source, None),
            Err(e) => {
                c.push(&at, e.to_string());
                return None;
            }
        },
        raw::SecretField::Inline(inline) if inline.dangerous_plaintext => {
            c.warnings.push(at.error(
                "plain-text secret accepted because dangerous_plaintext is true: for development only",
            ));
            (SecretSource::DangerousPlaintext, Some(inline.value.as_str()))
        }
        raw::SecretField::Inline(_) => {
            c.push(&at, SecretError::Plaintext.to_string());
            return None;
        }
    };
    match c.resolver.resolve(&source, plain) {
        Ok(secret) => Some(secret),
        Err(e) => {
            c.push(&at, e.to_string());
            None
        }
    }
}

/// `minversion` and `maxversion` of a TLS policy, defaulting to 1.2 and 1.3.
pub(super) fn versions(
    doc: &Doc,
    min: Option<&String>,
    max: Option<&String>,
    c: &mut Collector,
) -> (TlsVersion, TlsVersion) {
    let min = version(doc, "spec.config.minversion", min, TlsVersion::V12, c);
    let max = version(doc, "spec.config.maxversion", max, TlsVersion::V13, c);
    if min > max {
        c.push(
            &doc.at("spec.config.minversion"),
            "minversion is above maxversion",
        );
    }
    (min, max)
}

/// `trustedCA` of a TLS policy.
pub(super) fn trusted_ca(doc: &Doc, text: Option<&String>, base: &Path, c: &mut Collector) -> Option<Pem> {
    text.and_then(|t| {
        pem(t, base)
            .map_err(|e| c.push(&doc.at("spec.config.trustedCA"), e))
            .ok()
    })
}

pub(super) fn version(
    doc: &Doc,
    field: &str,
    v: Option<&String>,
    default: TlsVersion,
    c: &mut Collector,
) -> TlsVersion {
    match v.map(String::as_str) {
        None => default,
        Some("1.2") => TlsVersion::V12,
        Some("1.3") => TlsVersion::V13,
        Some(other) => {
            c.push(
                &doc.at(field),
                format!("TLS version `{other}` is not supported; use \"1.2\" or \"1.3\""),
            );
            default
        }
    }
}

/// The ALPN list of a TLS binding: to clients the gateway speaks h2 and
/// http/1.1 (both offered by default), to upstreams http/1.1.
pub(super) fn alpn(doc: &Doc, v: Option<&Vec<String>>, inbound: bool, c: &mut Collector) -> Vec<String> {
    let served: &[&str] = if inbound {
        &["h2", "http/1.1"]
    } else {
        &["http/1.1"]
    };
    match v {
        None => served.iter().map(|p| (*p).to_owned()).collect(),
        Some(list) => {
            for p in list {
                if !served.contains(&p.as_str()) {
                    c.push(
                        &doc.at("spec.config.alpn"),
                        format!("ALPN `{p}` is not served; use {}", served.join(" or ")),
                    );
                }
            }
            list.clone()
        }
    }
}

pub(super) fn inbound_tls(
    doc: &Doc,
    config: &serde_yaml_ng::Value,
    base: &Path,
    c: &mut Collector,
) -> Option<InboundTls> {
    let cfg: raw::InboundTlsConfig = from_config(doc, config, c)?;
    let mut certs = Vec::new();
    if let Some(r) = &cfg.certificate {
        certs.extend(cert_pair(doc, "spec.config.certificate", r, base, c));
    }
    for (i, r) in cfg.certificates.iter().enumerate() {
        certs.extend(cert_pair(
            doc,
            &format!("spec.config.certificates[{i}]"),
            r,
            base,
            c,
        ));
    }
    let given = cfg.certificate.is_some() || !cfg.certificates.is_empty();
    if !given {
        c.push(
            &doc.at("spec.config"),
            "inbound tls needs certificate (or certificates) with crt and key",
        );
        return None;
    }
    if certs.len() != usize::from(cfg.certificate.is_some()) + cfg.certificates.len() {
        // Each failed pair is already reported.
        return None;
    }
    let client_ca = trusted_ca(doc, cfg.trusted_ca.as_ref(), base, c);
    if cfg.require_client_certificate && client_ca.is_none() {
        c.push(
            &doc.at("spec.config.requireClientCertificate"),
            "requiring client certificates needs trustedCA to verify them against",
        );
    }
    let (min, max) = versions(doc, cfg.minversion.as_ref(), cfg.maxversion.as_ref(), c);
    Some(InboundTls {
        certs,
        client_ca,
        require_client_cert: cfg.require_client_certificate,
        min,
        max,
        alpn: alpn(doc, cfg.alpn.as_ref(), true, c),
        origin: doc.at("spec.policyRef"),
    })
}

pub(super) fn outbound_tls(
    doc: &Doc,
    config: &serde_yaml_ng::Value,
    base: &Path,
    c: &mut Collector,
) -> Option<OutboundTls> {
    let cfg: raw::OutboundTlsConfig = from_config(doc, config, c)?;
    if cfg.skip_validation {
        c.push(
            &doc.at("spec.config.skipValidation"),
            "skipping upstream certificate validation is not offered; give trustedCA instead",
        );
    }
    let client = cfg
        .certificate
        .as_ref()
        .and_then(|r| cert_pair(doc, "spec.config.certificate", r, base, c));
    let ca = trusted_ca(doc, cfg.trusted_ca.as_ref(), base, c);
    let (min, max) = versions(doc, cfg.minversion.as_ref(), cfg.maxversion.as_ref(), c);
    if let Some(sni) = &cfg.sni
        && (check_host_pattern(sni).is_err() || sni.starts_with("*."))
    {
        c.push(&doc.at("spec.config.sni"), format!("`{sni}` is not a host name"));
    }
    Some(OutboundTls {
        ca,
        client,
        sni: cfg.sni,
        min,
        max,
        alpn: alpn(doc, cfg.alpn.as_ref(), false, c),
        origin: doc.at("spec.policyRef"),
    })
}
