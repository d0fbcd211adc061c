//! Pass 4: PolicyBindings sorted out — inbound TLS contexts by ApiInstance,
//! outbound TLS put on their Services, request policies by ApiInstance.

use super::services::{Named, Slot};
use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::{BindingDoc, Collector, check_namespace, inbound_tls, outbound_tls};
use crate::config::{Config, InboundTls, Origin, PolicySpec};

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
        match b.spec.policy_ref.name.as_str() {
            "tls" => sorted.inbound_tls(b, base, c),
            "tls-outbound" => outbound(b, named, base, out, c),
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
        if !matches!(b.spec.target_ref.kind.as_deref(), None | Some("ApiInstance")) {
            c.push(
                &b.doc.at("spec.targetRef.kind"),
                format!("policy `{name}` binds to an ApiInstance"),
            );
            return;
        }
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
                },
                target: b.doc.at("spec.targetRef.name"),
            });
    }

    /// The policies bound to `api`, in their order (bindings without one last, in file order).
    pub fn take(&mut self, api: &str) -> Vec<PolicySpec> {
        let mut bound = self.bound.remove(api).unwrap_or_default();
        bound.sort_by_key(|p| (p.order.unwrap_or(u32::MAX), p.seq));
        bound.into_iter().map(|p| p.spec).collect()
    }
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
    for (api, specs) in &sorted.bound {
        for p in specs {
            c.push(&p.target, format!("no ApiInstance named `{api}`"));
        }
    }
}
