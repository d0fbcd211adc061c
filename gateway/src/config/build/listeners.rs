//! Pass 5: ApiInstances become routes on listeners; each listener is then
//! checked whole (one scheme, one network, one TLS context) and its routes
//! ordered for matching.

use super::bindings::Bindings;
use super::services::Named;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::{ApiDoc, Collector, check_host_pattern, check_namespace, network, normalize_base, side};
use crate::config::{
    Config, InboundTls, ListenerConfig, Origin, PolicySpec, RouteConfig, SynLimitConfig, Url,
    WebSocketConfig, parse_duration, parse_url,
};

/// A listener being assembled.
pub(super) struct ListenerDraft {
    /// Whether its scheme is https.
    https: bool,
    /// Its routes, each with where its ApiInstance is named.
    routes: Vec<(RouteConfig, Origin)>,
    /// Its inbound TLS context, from an ApiInstance's tls binding.
    tls: Option<InboundTls>,
    /// Whether it faces the internet, and where that was first said.
    network: Option<(bool, Origin)>,
    /// Whether it takes h2c, and where that was first said.
    h2c: Option<(bool, Origin)>,
    /// Its own PROXY protocol setting (over the Configuration's), and where it was first said.
    proxy_protocol: Option<(Option<Vec<ipnet::IpNet>>, Origin)>,
    /// Its SYN limits, and where they were first said.
    syn_limit: Option<(SynLimitConfig, Origin)>,
}

/// What the ApiInstances came to.
pub(super) struct Drafts<'a> {
    pub listeners: BTreeMap<SocketAddr, ListenerDraft>,
    /// Every ApiInstance name, with where it is defined.
    pub api_names: HashMap<&'a str, Origin>,
}

/// The policies an ApiInstance lists itself, located.
fn own_policies(api: &ApiDoc<'_>, c: &mut Collector) -> Vec<PolicySpec> {
    let mut policies = Vec::new();
    for (i, p) in api.spec.policies.iter().enumerate() {
        let field = format!("spec.policies[{i}]");
        check_namespace(
            &api.doc,
            &format!("{field}.policyRef.namespace"),
            p.policy_ref.namespace.as_ref(),
            c,
        );
        let written = p.rules.as_deref().unwrap_or_default();
        let Some(rules) = super::routes::rules(&api.doc, &format!("{field}.rules"), written, c) else {
            continue;
        };
        policies.push(PolicySpec {
            name: p.policy_ref.name.clone(),
            config: p.config.clone(),
            origin: api.doc.at(&format!("{field}.config")),
            name_at: api.doc.at(&format!("{field}.policyRef.name")),
            rules,
        });
    }
    policies
}

/// The address an ApiInstance listens on, and whether it is https.
fn listen_addr(api: &ApiDoc<'_>, c: &mut Collector) -> Option<(SocketAddr, Url)> {
    let addr_at = api.doc.at("spec.address");
    let url = match parse_url(&api.spec.address) {
        Ok(u) => u,
        Err(e) => {
            c.push(&addr_at, e);
            return None;
        }
    };
    if url.http2 {
        c.push(
            &addr_at,
            "a listener is http:// or https://; HTTP/2 is negotiated by ALPN over TLS, and `http2.cleartext` takes h2c on http://",
        );
        return None;
    }
    let Ok(ip) = url.host.parse::<IpAddr>() else {
        c.push(
            &addr_at,
            format!(
                "listen host `{}` must be an IP address (0.0.0.0 or [::] for all)",
                url.host
            ),
        );
        return None;
    };
    Some((SocketAddr::new(ip, url.port), url))
}

/// An ApiInstance's WebSocket settings over the defaults.
fn websocket(api: &ApiDoc<'_>, c: &mut Collector) -> WebSocketConfig {
    let mut out = WebSocketConfig::default();
    let Some(spec) = &api.spec.websocket else {
        return out;
    };
    let mut duration = |value: &Option<String>, field: &str, slot: &mut std::time::Duration| {
        if let Some(v) = value {
            match parse_duration(v) {
                Ok(d) => *slot = d,
                Err(e) => c.push(&api.doc.at(&format!("spec.websocket.{field}")), e),
            }
        }
    };
    duration(&spec.idle_timeout, "idleTimeout", &mut out.idle_timeout);
    duration(&spec.max_duration, "maxDuration", &mut out.max_duration);
    if spec.max_connections == Some(0) {
        c.push(
            &api.doc.at("spec.websocket.maxConnections"),
            "must be at least 1; set `enabled: false` not to carry WebSockets",
        );
    }
    out.enabled = spec.enabled.unwrap_or(out.enabled);
    out.max_connections = spec.max_connections;
    out.close_on_reload = spec.close_on_reload.unwrap_or(out.close_on_reload);
    out
}

/// Highest SYN rate and burst XDP's buckets take (`SynLimit::MAX` in the program's ABI).
const SYN_LIMIT_MAX: u32 = 1_000_000;

/// The per-source SYN rate when `synLimit` names none (the XDP maps' default).
const SYN_RATE_DEFAULT: u32 = 10_000;

/// An ApiInstance's `synLimit`: the burst twice the rate by default.
fn syn_limit(api: &ApiDoc<'_>, c: &mut Collector) -> Option<SynLimitConfig> {
    let spec = api.spec.syn_limit.as_ref()?;
    let rate = spec.per_source_rate.unwrap_or(SYN_RATE_DEFAULT);
    let burst = spec.burst.unwrap_or(rate.saturating_mul(2));
    let mut ok = true;
    if spec.budget.is_some_and(|b| b > SYN_LIMIT_MAX) {
        c.push(
            &api.doc.at("spec.synLimit.budget"),
            format!("must be at most {SYN_LIMIT_MAX} (0 turns SYN cookies off)"),
        );
        ok = false;
    }
    if rate > SYN_LIMIT_MAX {
        c.push(
            &api.doc.at("spec.synLimit.perSourceRate"),
            format!("must be at most {SYN_LIMIT_MAX} (0 turns the limit off)"),
        );
        ok = false;
    }
    if burst > SYN_LIMIT_MAX || (rate > 0 && burst == 0) {
        c.push(
            &api.doc.at("spec.synLimit.burst"),
            format!("must be 1 to {SYN_LIMIT_MAX}"),
        );
        ok = false;
    }
    ok.then_some(SynLimitConfig {
        rate,
        burst,
        budget: spec.budget,
    })
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// Turns every ApiInstance into a route on its listener's draft.
pub(super) fn draft<'a>(
    apis: &'a [ApiDoc<'_>],
    bindings: &mut Bindings<'_>,
    named: &Named,
    out: &mut Config,
    c: &mut Collector,
) -> Drafts<'a> {
    let mut drafts = Drafts {
        listeners: BTreeMap::new(),
        api_names: HashMap::new(),
    };
    for api in apis {
        let name_at = api.doc.at("metadata.name");
        if let Some(prev) = drafts.api_names.insert(&api.name, name_at.clone()) {
            c.push(
                &name_at,
                format!(
                    "ApiInstance `{}` is defined twice (also {}:{})",
                    api.name, prev.file, prev.line
                ),
            );
            continue;
        }
        let Some((listen, url)) = listen_addr(api, c) else {
            continue;
        };
        for (i, host) in api.spec.hosts.iter().enumerate() {
            if let Err(e) = check_host_pattern(host) {
                c.push(&api.doc.at(&format!("spec.hosts[{i}]")), e);
            }
        }
        let mut policies = own_policies(api, c);
        policies.extend(bindings.take(&api.name));
        let bound_routes = bindings.take_routes(&api.name);
        let Some(upstreams) = super::routes::api_routes(api, bound_routes, named, out, c) else {
            continue;
        };
        let max_body = api
            .spec
            .limits
            .as_ref()
            .and_then(|l| l.max_body_bytes)
            .unwrap_or(out.proxy.max_body);
        let route = RouteConfig {
            api: api.name.clone(),
            hosts: api.spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            base_path: normalize_base(&url.path),
            upstreams,
            max_body,
            policies,
            websocket: websocket(api, c),
        };
        let entry = drafts.listeners.entry(listen).or_insert_with(|| ListenerDraft {
            https: url.tls,
            routes: Vec::new(),
            tls: None,
            network: None,
            h2c: None,
            proxy_protocol: None,
            syn_limit: None,
        });
        entry.add(api, listen, &url, route, name_at, bindings, c);
    }
    drafts
}

impl ListenerDraft {
    /// The settings every ApiInstance on a port must agree on: h2c, PROXY protocol, the SYN limit.
    fn port_settings(&mut self, api: &ApiDoc<'_>, listen: SocketAddr, url: &Url, c: &mut Collector) {
        if let Some(cleartext) = api.spec.http2.as_ref().and_then(|h| h.cleartext) {
            let at = api.doc.at("spec.http2.cleartext");
            if cleartext && url.tls {
                c.push(
                    &at,
                    "h2c is for http:// listeners; over TLS HTTP/2 is negotiated by ALPN (the tls binding's `alpn`)",
                );
            } else {
                agree(&mut self.h2c, cleartext, at, c, |other, prev| {
                    format!(
                        "{listen} has h2c {} here but {} at {}:{}; HTTP/2 is per port",
                        on_off(cleartext),
                        on_off(*other),
                        prev.file,
                        prev.line
                    )
                });
            }
        }
        if let Some(pp) = &api.spec.proxy_protocol {
            let setting = super::settings::proxy_protocol(&api.doc, "spec.proxyProtocol", pp, c);
            agree(
                &mut self.proxy_protocol,
                setting,
                api.doc.at("spec.proxyProtocol"),
                c,
                |_, prev| {
                    format!(
                        "{listen} has another PROXY protocol setting at {}:{}; it is per port",
                        prev.file, prev.line
                    )
                },
            );
        }
        if let Some(limit) = syn_limit(api, c) {
            agree(
                &mut self.syn_limit,
                limit,
                api.doc.at("spec.synLimit"),
                c,
                |_, prev| {
                    format!(
                        "{listen} has another SYN limit at {}:{}; it is per port",
                        prev.file, prev.line
                    )
                },
            );
        }
    }

    /// Adds `api`'s route, checking it against what the listener already has.
    #[expect(clippy::too_many_arguments, reason = "one route's whole context")]
    fn add(
        &mut self,
        api: &ApiDoc<'_>,
        listen: SocketAddr,
        url: &Url,
        route: RouteConfig,
        name_at: Origin,
        bindings: &mut Bindings<'_>,
        c: &mut Collector,
    ) {
        let addr_at = api.doc.at("spec.address");
        let ip = listen.ip();
        let external = network(&api.doc, "spec.network", api.spec.network.as_deref(), &[ip], c);
        match &self.network {
            Some((other, at)) if *other != external => c.push(
                &api.doc.at("spec.network"),
                format!(
                    "{listen} is {} here but {} at {}:{}; one port is one network",
                    side(external),
                    side(*other),
                    at.file,
                    at.line
                ),
            ),
            Some(_) => {}
            // Kept at the address: the first ApiInstance may leave its network to the default.
            None => self.network = Some((external, addr_at.clone())),
        }
        self.port_settings(api, listen, url, c);
        if self.https != url.tls {
            c.push(
                &addr_at,
                format!("{listen} is used with both http and https; one port has one scheme"),
            );
            return;
        }
        if let Some(tls) = bindings.inbound.remove(&api.name) {
            if !url.tls {
                c.push(
                    &tls.origin,
                    format!(
                        "ApiInstance `{}` has a tls binding but an http:// address; use https://",
                        api.name
                    ),
                );
            } else if self.tls.is_some() {
                c.push(
                    &tls.origin,
                    format!("{listen} already has a TLS context from another ApiInstance; TLS is per port"),
                );
            } else {
                self.tls = Some(tls);
            }
        }
        if let Some((_, prev)) = self
            .routes
            .iter()
            .find(|(r, _)| r.base_path == route.base_path && r.hosts == route.hosts)
        {
            c.push(
                &addr_at,
                format!(
                    "route {listen}{} is already served by the ApiInstance at {}:{}",
                    route.base_path, prev.file, prev.line
                ),
            );
            return;
        }
        self.routes.push((route, name_at));
    }
}

/// Checks every listener whole and puts it in `out`, its routes ordered for matching.
pub(super) fn finish(
    listeners: BTreeMap<SocketAddr, ListenerDraft>,
    broken_tls: &HashSet<String>,
    out: &mut Config,
    c: &mut Collector,
) {
    for (addr, draft) in listeners {
        if draft.https && draft.tls.is_none() {
            if !draft.routes.iter().any(|(r, _)| broken_tls.contains(&r.api)) {
                let (_, at) = &draft.routes[0];
                c.push(
                    at,
                    format!("{addr} is https but no `tls` PolicyBinding targets an ApiInstance on it"),
                );
            }
            continue;
        }
        let mut routes: Vec<RouteConfig> = draft.routes.into_iter().map(|(r, _)| r).collect();
        // Host-specific routes before catch-alls, then longest base path first.
        routes.sort_by(|a, b| {
            a.hosts
                .is_empty()
                .cmp(&b.hosts.is_empty())
                .then(b.base_path.len().cmp(&a.base_path.len()))
        });
        out.listeners.push(ListenerConfig {
            addr,
            external: draft.network.is_some_and(|(e, _)| e),
            tls: draft.tls,
            h2c: draft.h2c.is_some_and(|(on, _)| on),
            syn_limit: draft.syn_limit.map(|(limit, _)| limit),
            proxy_protocol: match draft.proxy_protocol {
                Some((setting, _)) => setting,
                None => out.proxy.proxy_protocol.clone(),
            },
            routes,
        });
    }
}

/// Keeps the first `value` a port was given and reports, at `at`, any later
/// one that differs: the settings every ApiInstance on one port must share.
fn agree<T: PartialEq>(
    slot: &mut Option<(T, Origin)>,
    value: T,
    at: Origin,
    c: &mut Collector,
    conflict: impl FnOnce(&T, &Origin) -> String,
) {
    match slot {
        Some((other, prev)) if *other != value => c.push(&at, conflict(other, prev)),
        Some(_) => {}
        None => *slot = Some((value, at)),
    }
}
