//! From raw resources to a validated [`Config`], in named passes:
//!
//! ```text
//! documents ─► settings ─► services ─► bindings ─► listeners ─► contracts ─► Config
//!  (by kind)   (Configuration) (named)   (TLS, policies,  (ApiInstances → routes
//!                                         routes)          to their upstreams)
//! ```
//!
//! Each pass reports every problem it finds, located, and goes on; the
//! configuration is refused at the end if any pass found one.

mod bindings;
mod contracts;
mod documents;
mod health;
mod listeners;
mod routes;
mod services;
mod settings;
mod tls;

use services::{network, side};
use settings::from_config;
use tls::{inbound_tls, outbound_tls, pem, secret_value};

use std::path::Path;

use serde::Deserialize;

use super::locate::LineIndex;
use super::model::{API_VERSIONS, Config, Origin};
use super::raw;
use super::secret::Resolver;
use super::{ConfigError, ConfigErrors};

/// A document being read: file, its index, and the document number in it.
struct Doc<'a> {
    file: &'a str,
    index: &'a LineIndex,
    n: usize,
}

impl Doc<'_> {
    fn at(&self, field: &str) -> Origin {
        let (line, column) = self.index.position(self.n, field);
        Origin {
            file: self.file.to_string(),
            line,
            column,
            field: field.to_string(),
        }
    }
}

struct Collector {
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    resolver: Resolver,
}

impl Collector {
    fn push(&mut self, origin: &Origin, message: impl Into<String>) {
        self.errors.push(origin.error(message));
    }
}

struct ApiDoc<'a> {
    doc: Doc<'a>,
    name: String,
    spec: raw::ApiInstanceSpec,
}

struct ServiceDoc<'a> {
    doc: Doc<'a>,
    spec: raw::ServiceSpec,
}

struct BindingDoc<'a> {
    doc: Doc<'a>,
    spec: raw::PolicyBindingSpec,
}

/// Turns a serde_yaml_ng error into a located error.
fn serde_error(file: &str, e: &serde_yaml_ng::Error) -> ConfigError {
    let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
    let mut message = e.to_string();
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    let (field, message) = match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
        _ => (String::new(), message),
    };
    ConfigError {
        file: file.to_string(),
        line,
        column,
        field,
        message,
    }
}

fn typed<S: for<'de> Deserialize<'de>>(
    file: &str,
    de: serde_yaml_ng::Deserializer<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<raw::Typed<S>> {
    match raw::Typed::<S>::deserialize(de) {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(serde_error(file, &e));
            None
        }
    }
}

/// Namespaces other than `default` are refused: there is one namespace here.
fn check_namespace(doc: &Doc, field: &str, namespace: Option<&String>, c: &mut Collector) {
    if let Some(ns) = namespace.filter(|ns| ns.as_str() != "default") {
        c.push(
            &doc.at(field),
            format!("namespace `{ns}`: namespaces are not supported; every resource lives in `default`"),
        );
    }
}

fn check_envelope(doc: &Doc, api_version: &str, meta: &raw::Metadata, c: &mut Collector) {
    check_namespace(doc, "metadata.namespace", meta.namespace.as_ref(), c);
    if !API_VERSIONS.contains(&api_version) {
        c.push(
            &doc.at("apiVersion"),
            format!(
                "unsupported apiVersion `{api_version}`; expected one of {}",
                API_VERSIONS.join(", ")
            ),
        );
    }
    let valid = !meta.name.is_empty()
        && meta.name.len() <= 253
        && meta
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !meta.name.starts_with('-');
    if !valid {
        c.push(
            &doc.at("metadata.name"),
            format!(
                "`{}` is not a valid name (lowercase letters, digits, '-' and '.')",
                meta.name
            ),
        );
    }
}

fn check_host_pattern(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a host name or *.suffix pattern"))
    }
}

fn normalize_base(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    }
}

impl Collector {
    fn new() -> Self {
        Self {
            errors: Vec::new(),
            warnings: Vec::new(),
            resolver: Resolver::new(None),
        }
    }

    /// The configuration, or every error found, in file order.
    fn finish(mut self, mut out: Config) -> Result<Config, ConfigErrors> {
        out.warnings = std::mem::take(&mut self.warnings);
        if self.errors.is_empty() {
            Ok(out)
        } else {
            self.errors
                .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            Err(ConfigErrors(self.errors))
        }
    }
}

/// Builds the validated configuration from `(file, text)` pairs.
pub(super) fn build(files: &[(String, String)], base: &Path) -> Result<Config, ConfigErrors> {
    let mut c = Collector::new();
    let indexes: Vec<LineIndex> = files.iter().map(|(_, text)| LineIndex::build(text)).collect();
    let docs = documents::read(files, &indexes, &mut c);
    let mut out = settings::configure(&docs, base, &mut c);
    out.registration = settings::registration(&docs, base, &mut c);
    let services = services::named(&docs.services, &mut out, &mut c);
    let mut bound = bindings::sort(&docs.bindings, &services, base, &mut out, &mut c);
    let drafts = listeners::draft(&docs.apis, &mut bound, &services, &mut out, &mut c);
    bindings::report_unbound(&docs.bindings, &bound, &drafts.api_names, &mut c);
    listeners::finish(drafts.listeners, &bound.broken_tls, &mut out, &mut c);
    // A registered replica may start with nothing local: its APIs come from the control plane.
    if out.listeners.is_empty() && out.registration.is_none() && c.errors.is_empty() {
        c.errors.push(ConfigError {
            file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
            line: 1,
            column: 1,
            field: String::new(),
            message: "no ApiInstance: the gateway would have nothing to serve".into(),
        });
    }
    contracts::separate_certificates(&out, &mut c);
    contracts::contracts_into(&docs.contracts, &drafts.api_names, base, &mut out, &mut c);
    services::warn_unused(&docs.services, &services, &out, &mut c);
    c.finish(out)
}
