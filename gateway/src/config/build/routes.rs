//! An ApiInstance's routes to its upstreams: each `spec.services` entry's
//! `routes` in file order (an entry without routes takes every request), then
//! its `route` and `route-weighted` bindings by `order`. The first route whose
//! rules take a request decides where it goes.

use std::collections::HashMap;

use super::bindings::BoundRoute;
use super::services::{Named, Slot, service};
use super::{ApiDoc, Collector, Doc, normalize_base};
use crate::config::{Config, Destination, Origin, Pattern, Rule, UpstreamRoute, catches_all, parse_url, raw};

/// Rules as written at `field` (`…rules`), compiled; `None` if any is broken (reported).
pub(super) fn rules(doc: &Doc, field: &str, specs: &[raw::RuleSpec], c: &mut Collector) -> Option<Vec<Rule>> {
    let before = c.errors.len();
    let mut out = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let at = |name: &str| doc.at(&format!("{field}[{i}].{name}"));
        let pattern = |value: &Option<String>, name: &str, c: &mut Collector| {
            let p = Pattern::new(value.as_deref()?);
            p.map_err(|e| c.push(&at(name), e)).ok()
        };
        let mut rule = Rule {
            path: pattern(&spec.path, "path", c),
            methods: pattern(&spec.methods, "methods", c),
            host: pattern(&spec.host, "host", c),
            path_prefix: spec.path_prefix.clone(),
            headers: Vec::with_capacity(spec.headers.len()),
        };
        if let Some(prefix) = &spec.path_prefix
            && !prefix.starts_with('/')
        {
            c.push(&at("pathPrefix"), format!("`{prefix}` must start with /"));
        }
        for (name, value) in &spec.headers {
            let at = at(&format!("headers.{name}"));
            if name.is_empty() || !name.bytes().all(crate::http::is_tchar) {
                c.push(&at, format!("`{name}` is not a header name"));
                continue;
            }
            match Pattern::new(value) {
                Ok(p) => rule.headers.push((name.to_ascii_lowercase(), p)),
                Err(e) => c.push(&at, e),
            }
        }
        out.push(rule);
    }
    (c.errors.len() == before).then_some(out)
}

/// A service `spec.services` names, and the path its requests go to by default.
struct Upstream {
    /// Its index in [`Config::services`], or `None` if broken (already reported).
    service: Option<usize>,
    default_path: String,
}

/// The routes of `api`, with `bound` (its route bindings, and whether one was
/// broken) after its services' own. `None` when something is broken; every
/// problem is reported.
pub(super) fn api_routes(
    api: &ApiDoc<'_>,
    (mut bound, broken): (Vec<BoundRoute>, bool),
    named: &Named,
    out: &mut Config,
    c: &mut Collector,
) -> Option<Vec<UpstreamRoute>> {
    let before = c.errors.len();
    let mut upstreams: HashMap<&str, Upstream> = HashMap::new();
    let mut routes: Vec<(Option<UpstreamRoute>, Origin)> = Vec::new();
    for (key, inline) in &api.spec.services {
        let field = format!("spec.services.{key}");
        let upstream = upstream(api, key, &field, inline, named, out, c);
        if inline.routes.is_empty() && bound.is_empty() && !broken {
            let route = upstream
                .service
                .map(|s| UpstreamRoute::to(s, upstream.default_path.clone()));
            routes.push((route, api.doc.at(&field)));
        }
        for (i, r) in inline.routes.iter().enumerate() {
            let field = format!("{field}.routes[{i}]");
            let rules = rules(&api.doc, &format!("{field}.rules"), &r.rules, c);
            let written = r.config.as_ref().and_then(|c| c.destination_path.as_deref());
            let path = destination_path(&api.doc, &format!("{field}.config.destinationPath"), written, c);
            let route = match (upstream.service, rules, path) {
                (Some(service), Some(rules), Ok(path)) => Some(UpstreamRoute {
                    rules,
                    destinations: vec![Destination {
                        service,
                        path: path.unwrap_or_else(|| upstream.default_path.clone()),
                        weight: 100,
                    }],
                }),
                _ => None,
            };
            routes.push((route, api.doc.at(&field)));
        }
        upstreams.insert(key, upstream);
    }
    bound.sort_by_key(|b| (b.order.unwrap_or(u32::MAX), b.seq));
    for b in bound {
        let destinations: Option<Vec<Destination>> = b
            .destinations
            .into_iter()
            .map(|d| {
                let (service, default_path) = if let Some(u) = upstreams.get(d.name.as_str()) {
                    (u.service, u.default_path.clone())
                } else {
                    let hint = "nor is it a service in the ApiInstance's spec.services";
                    (named_service(&d.name, &d.at, hint, named, c), "/".to_string())
                };
                Some(Destination {
                    service: service?,
                    path: d.path.unwrap_or(default_path),
                    weight: d.weight,
                })
            })
            .collect();
        routes.push((
            destinations.map(|destinations| UpstreamRoute {
                rules: b.rules,
                destinations,
            }),
            b.origin,
        ));
    }
    if routes.is_empty() && !broken {
        c.push(
            &api.doc.at("spec.services"),
            "an ApiInstance needs an upstream: a service in spec.services, or a `route` PolicyBinding",
        );
    }
    for (i, (_, at)) in routes.iter().enumerate() {
        if let Some((_, first)) = routes[..i]
            .iter()
            .find(|(r, _)| r.as_ref().is_some_and(|r| catches_all(&r.rules)))
        {
            c.push(
                at,
                format!(
                    "this route can never match: the route at {}:{} takes every request first; give that one rules or put it last",
                    first.file, first.line
                ),
            );
            break;
        }
    }
    if c.errors.len() != before {
        return None;
    }
    routes.into_iter().map(|(r, _)| r).collect()
}

/// The service one `spec.services` entry names or defines.
fn upstream(
    api: &ApiDoc<'_>,
    key: &str,
    field: &str,
    inline: &raw::InlineService,
    named: &Named,
    out: &mut Config,
    c: &mut Collector,
) -> Upstream {
    let Some(address) = &inline.address else {
        return Upstream {
            service: named_service(
                key,
                &api.doc.at(field),
                "define it, or give this entry an address",
                named,
                c,
            ),
            default_path: "/".into(),
        };
    };
    let spec = raw::ServiceSpec {
        address: Some(address.clone()),
        ..raw::ServiceSpec::default()
    };
    let name = format!("{}/{key}", api.name);
    let service = service(&name, &api.doc, field, &spec, &out.proxy, c).map(|svc| {
        out.services.push(svc);
        out.services.len() - 1
    });
    Upstream {
        service,
        default_path: normalize_base(&parse_url(address).map(|u| u.path).unwrap_or_default()),
    }
}

/// The Service resource called `name`, reporting at `at` (with `hint`) when there is none.
fn named_service(name: &str, at: &Origin, hint: &str, named: &Named, c: &mut Collector) -> Option<usize> {
    match named.get(name) {
        Some(Slot::Built(i)) => Some(*i),
        Some(Slot::Broken) => None,
        None => {
            c.push(at, format!("no Service named `{name}`; {hint}"));
            None
        }
    }
}

/// A written `destinationPath`, normalized (`Ok(None)` when absent); `Err` once reported.
pub(super) fn destination_path(
    doc: &Doc,
    field: &str,
    written: Option<&str>,
    c: &mut Collector,
) -> Result<Option<String>, ()> {
    match written {
        None => Ok(None),
        Some(p) if p.starts_with('/') => Ok(Some(normalize_base(p))),
        Some(p) => {
            c.push(&doc.at(field), format!("destinationPath `{p}` must start with /"));
            Err(())
        }
    }
}
