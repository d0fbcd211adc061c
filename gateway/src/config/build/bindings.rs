//! Pass 4: PolicyBindings sorted out — inbound TLS contexts by ApiInstance,
//! outbound TLS put on their Services, request policies and routes by ApiInstance.

use super::routes::{destination_path, rules};
use super::services::{Named, Slot};
use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::{BindingDoc, Collector, check_namespace, from_config, inbound_tls, outbound_tls};
use crate::config::{Config, InboundTls, Origin, PolicySpec, Rule, raw};

/// A request policy bound to an ApiInstance.
pub(super) struct BoundPolicy {
    /// Its `spec.order`, if it has one.
    pub order: Option<u32>,
    /// Its position among all bindings: the order of bindings without one.
    pub seq: usize,
    pub spec: PolicySpec,
    /// Where its target is named.
    pub target: Origin,
}

/// A `route` or `route-weighted` binding: the requests its rules take, and where they go.
pub(super) struct BoundRoute {
    /// Its `spec.order`, if it has one.
    pub order: Option<u32>,
    /// Its position among all bindings: the order of bindings without one.
    pub seq: usize,
    pub rules: Vec<Rule>,
    pub destinations: Vec<BoundDestination>,
    /// Where the binding's policy is named.
    pub origin: Origin,
    /// Where its target is named.
    pub target: Origin,
}

/// One destination of a route binding, its service still a name.
pub(super) struct BoundDestination {
    /// A service of the target ApiInstance, or a Service resource.
    pub name: String,
    /// Its `destinationPath`, normalized (absent: the service's own path).
    pub path: Option<String>,
    pub weight: u32,
    /// Where the name is written.
    pub at: Origin,
}

/// What the bindings came to.
#[derive(Default)]
pub(super) struct Bindings<'a> {
    /// Inbound TLS contexts by ApiInstance name, until a listener takes them.
    pub inbound: HashMap<String, InboundTls>,
    /// ApiInstances whose tls binding is broken (already reported), so the
    /// missing context is not reported a second time.
    pub broken_tls: HashSet<String>,
    /// Request policies by ApiInstance name, until the ApiInstance takes them.
    pub bound: HashMap<&'a str, Vec<BoundPolicy>>,
    /// Route bindings by ApiInstance name, until the ApiInstance takes them.
    pub routes: HashMap<&'a str, Vec<BoundRoute>>,
    /// ApiInstances with a broken route binding (already reported).
    pub broken_routes: HashSet<&'a str>,
}

/// Sorts out every binding; outbound TLS goes straight onto its Service in `out`.
pub(super) fn sort<'a>(
    bindings: &'a [BindingDoc<'_>],
    named: &Named,
    base: &Path,
    out: &mut Config,
    c: &mut Collector,
) -> Bindings<'a> {
    let mut sorted = Bindings::default();
    for (seq, b) in bindings.iter().enumerate() {
        check_namespace(
            &b.doc,
            "spec.targetRef.namespace",
            b.spec.target_ref.namespace.as_ref(),
            c,
        );
        check_namespace(
            &b.doc,
            "spec.policyRef.namespace",
            b.spec.policy_ref.namespace.as_ref(),
            c,
        );
        if b.spec.order.is_some() && matches!(b.spec.policy_ref.name.as_str(), "tls" | "tls-outbound") {
            c.push(
                &b.doc.at("spec.order"),
                "TLS policies have no order: they apply to the connection, not to requests",
            );
        }
        let connection = matches!(b.spec.policy_ref.name.as_str(), "tls" | "tls-outbound");
        if connection && b.spec.rules.is_some() {
            c.push(
                &b.doc.at("spec.rules"),
                "TLS policies take no rules: they apply to the connection, before any request",
            );
        }
        match b.spec.policy_ref.name.as_str() {
            "tls" => sorted.inbound_tls(b, base, c),
            "tls-outbound" => outbound(b, named, base, out, c),
            "route" | "route-weighted" => sorted.route(b, seq, c),
            other => sorted.request_policy(b, other, seq, c),
        }
    }
    sorted
}

impl<'a> Bindings<'a> {
    fn inbound_tls(&mut self, b: &BindingDoc<'_>, base: &Path, c: &mut Collector) {
        if !matches!(b.spec.target_ref.kind.as_deref(), None | Some("ApiInstance")) {
            c.push(
                &b.doc.at("spec.targetRef.kind"),
                "the inbound `tls` policy binds to an ApiInstance",
            );
            return;
        }
        let target = &b.spec.target_ref.name;
        match inbound_tls(&b.doc, &b.spec.config, base, c) {
            Some(tls) => {
                if self.inbound.insert(target.clone(), tls).is_some() {
                    c.push(
                        &b.doc.at("spec.targetRef.name"),
                        format!("ApiInstance `{target}` already has a tls binding"),
                    );
                }
            }
            None => {
                self.broken_tls.insert(target.clone());
            }
        }
    }

    fn request_policy(&mut self, b: &'a BindingDoc<'_>, name: &str, seq: usize, c: &mut Collector) {
        if !binds_to_api(b, c) {
            return;
        }
        let Some(rules) = binding_rules(b, c) else {
            return;
        };
        self.bound
            .entry(b.spec.target_ref.name.as_str())
            .or_default()
            .push(BoundPolicy {
                order: b.spec.order,
                seq,
                spec: PolicySpec {
                    name: name.to_string(),
                    config: b.spec.config.clone(),
                    origin: b.doc.at("spec.config"),
                    name_at: b.doc.at("spec.policyRef.name"),
                    rules,
                },
                target: b.doc.at("spec.targetRef.name"),
            });
    }

    /// A `route` or `route-weighted` binding, kept for its ApiInstance.
    fn route(&mut self, b: &'a BindingDoc<'_>, seq: usize, c: &mut Collector) {
        if !binds_to_api(b, c) {
            return;
        }
        let rules = binding_rules(b, c);
        let destinations = if b.spec.policy_ref.name == "route" {
            from_config::<raw::RoutePolicyConfig>(&b.doc, &b.spec.config, c).and_then(|cfg| {
                let d = destination(
                    b,
                    "spec.config",
                    cfg.destination_path.as_deref(),
                    &cfg.destination_ref,
                    100,
                    c,
                )?;
                Some(vec![d])
            })
        } else {
            from_config::<raw::WeightedRouteConfig>(&b.doc, &b.spec.config, c)
                .and_then(|cfg| weighted(b, cfg, c))
        };
        let (Some(rules), Some(destinations)) = (rules, destinations) else {
            self.broken_routes.insert(&b.spec.target_ref.name);
            return;
        };
        self.routes
            .entry(b.spec.target_ref.name.as_str())
            .or_default()
            .push(BoundRoute {
                order: b.spec.order,
                seq,
                rules,
                destinations,
                origin: b.doc.at("spec.policyRef.name"),
                target: b.doc.at("spec.targetRef.name"),
            });
    }

    /// The route bindings of `api`, not yet in order, and whether any was broken.
    pub fn take_routes(&mut self, api: &str) -> (Vec<BoundRoute>, bool) {
        let routes = self.routes.remove(api).unwrap_or_default();
        (routes, self.broken_routes.contains(api))
    }

    /// The policies bound to `api`, in their order (bindings without one last, in file order).
    pub fn take(&mut self, api: &str) -> Vec<PolicySpec> {
        let mut bound = self.bound.remove(api).unwrap_or_default();
        bound.sort_by_key(|p| (p.order.unwrap_or(u32::MAX), p.seq));
        bound.into_iter().map(|p| p.spec).collect()
    }
}

/// Whether a request policy's binding targets an ApiInstance; reports it if not.
fn binds_to_api(b: &BindingDoc<'_>, c: &mut Collector) -> bool {
    let ok = matches!(b.spec.target_ref.kind.as_deref(), None | Some("ApiInstance"));
    if !ok {
        c.push(
            &b.doc.at("spec.targetRef.kind"),
            format!("policy `{}` binds to an ApiInstance", b.spec.policy_ref.name),
        );
    }
    ok
}

/// A binding's `spec.rules`, compiled (absent: every request).
fn binding_rules(b: &BindingDoc<'_>, c: &mut Collector) -> Option<Vec<Rule>> {
    rules(
        &b.doc,
        "spec.rules",
        b.spec.rules.as_deref().unwrap_or_default(),
        c,
    )
}

/// A `route-weighted` binding's shares.
fn weighted(
    b: &BindingDoc<'_>,
    cfg: raw::WeightedRouteConfig,
    c: &mut Collector,
) -> Option<Vec<BoundDestination>> {
    if cfg.routes.is_empty() {
        c.push(
            &b.doc.at("spec.config.routes"),
            "a weighted route needs at least one destination",
        );
        return None;
    }
    let before = c.errors.len();
    let mut out = Vec::with_capacity(cfg.routes.len());
    for (i, r) in cfg.routes.into_iter().enumerate() {
        let field = format!("spec.config.routes[{i}]");
        if !(1..=100).contains(&r.weight) {
            c.push(
                &b.doc.at(&format!("{field}.weight")),
                format!(
                    "weight {} must be 1 to 100 (a share of the weights' sum)",
                    r.weight
                ),
            );
        }
        out.extend(destination(
            b,
            &field,
            r.destination_path.as_deref(),
            &r.destination_ref,
            r.weight,
            c,
        ));
    }
    (c.errors.len() == before).then_some(out)
}

/// One destination written at `field`.
fn destination(
    b: &BindingDoc<'_>,
    field: &str,
    path: Option<&str>,
    to: &raw::DestinationRef,
    weight: u32,
    c: &mut Collector,
) -> Option<BoundDestination> {
    check_namespace(
        &b.doc,
        &format!("{field}.destinationRef.namespace"),
        to.namespace.as_ref(),
        c,
    );
    if !matches!(to.kind.as_deref(), None | Some("Service")) {
        c.push(
            &b.doc.at(&format!("{field}.destinationRef.kind")),
            "a route's destination is a Service (or a service of its ApiInstance)",
        );
        return None;
    }
    let path = destination_path(&b.doc, &format!("{field}.destinationPath"), path, c).ok()?;
    Some(BoundDestination {
        name: to.name.clone(),
        path,
        weight,
        at: b.doc.at(&format!("{field}.destinationRef.name")),
    })
}

/// Puts a `tls-outbound` binding's context on its Service.
fn outbound(b: &BindingDoc<'_>, named: &Named, base: &Path, out: &mut Config, c: &mut Collector) {
    if b.spec.target_ref.kind.as_deref() != Some("Service") {
        c.push(
            &b.doc.at("spec.targetRef"),
            "the `tls-outbound` policy binds to a Service (targetRef.kind: Service)",
        );
        return;
    }
    let target = &b.spec.target_ref.name;
    let i = match named.get(target) {
        Some(Slot::Built(i)) => *i,
        Some(Slot::Broken) => return,
        None => {
            c.push(
                &b.doc.at("spec.targetRef.name"),
                format!("no Service named `{target}`"),
            );
            return;
        }
    };
    if let Some(mut tls) = outbound_tls(&b.doc, &b.spec.config, base, c) {
        if out.services[i].http2 {
            // An h2:// service speaks HTTP/2 whatever the binding would offer.
            tls.alpn = vec!["h2".into()];
        }
        out.services[i].tls = Some(tls);
    }
}

/// Reports bindings whose ApiInstance does not exist.
pub(super) fn report_unbound(
    bindings: &[BindingDoc<'_>],
    sorted: &Bindings<'_>,
    api_names: &HashMap<&str, Origin>,
    c: &mut Collector,
) {
    for b in bindings {
        if b.spec.policy_ref.name == "tls"
            && sorted.inbound.contains_key(&b.spec.target_ref.name)
            && !api_names.contains_key(b.spec.target_ref.name.as_str())
        {
            c.push(
                &b.doc.at("spec.targetRef.name"),
                format!("no ApiInstance named `{}`", b.spec.target_ref.name),
            );
        }
    }
    let targets = sorted
        .bound
        .iter()
        .flat_map(|(api, ps)| ps.iter().map(move |p| (api, &p.target)));
    let routes = sorted
        .routes
        .iter()
        .flat_map(|(api, rs)| rs.iter().map(move |r| (api, &r.target)));
    for (api, target) in targets.chain(routes) {
        c.push(target, format!("no ApiInstance named `{api}`"));
    }
}
