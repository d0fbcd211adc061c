//! Services: named Service resources and the upstreams ApiInstances name inline.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use super::{Collector, Doc, ServiceDoc, check_host_pattern};
use crate::config::{
    Balance, Config, EndpointConfig, HostHeader, OutboundTls, ProxySettings, ServiceConfig, TlsVersion,
    parse_duration, parse_url, raw,
};

/// Where a named Service went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// Built: its index in `Config::services`.
    Built(usize),
    /// Known but invalid (already reported): references to it stay quiet.
    Broken,
}

/// Named Services by name.
pub(super) type Named = HashMap<String, Slot>;

/// Pass 3: named Service resources, so ApiInstances and bindings can refer to them.
pub(super) fn named(services: &[(String, ServiceDoc<'_>)], out: &mut Config, c: &mut Collector) -> Named {
    let mut index = Named::new();
    let mut defined: HashMap<&str, &Doc> = HashMap::new();
    for (name, sd) in services {
        if let Some(prev) = defined.get(name.as_str()) {
            c.push(
                &sd.doc.at("metadata.name"),
                format!(
                    "Service `{name}` is defined twice (also {}:{})",
                    prev.file,
                    prev.at("metadata.name").line
                ),
            );
            continue;
        }
        if let Some(svc) = service(name, &sd.doc, "spec", &sd.spec, &out.proxy, c) {
            index.insert(name.clone(), Slot::Built(out.services.len()));
            out.services.push(svc);
        } else {
            index.insert(name.clone(), Slot::Broken);
        }
        defined.insert(name, &sd.doc);
    }
    index
}

/// Warns of every named Service no route uses.
pub(super) fn warn_unused(
    services: &[(String, ServiceDoc<'_>)],
    named: &Named,
    out: &Config,
    c: &mut Collector,
) {
    let used: HashSet<usize> = out
        .listeners
        .iter()
        .flat_map(|l| &l.routes)
        .flat_map(|r| &r.upstreams)
        .flat_map(|u| u.destinations.iter().map(|d| d.service))
        .collect();
    for (name, sd) in services {
        if matches!(named.get(name), Some(Slot::Built(i)) if !used.contains(i)) {
            c.warnings.push(
                sd.doc
                    .at("metadata.name")
                    .error(format!("Service `{name}` is not used by any ApiInstance")),
            );
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one check per Service field, in field order"
)]
pub(super) fn service(
    name: &str,
    doc: &Doc,
    prefix: &str,
    spec: &raw::ServiceSpec,
    proxy: &ProxySettings,
    c: &mut Collector,
) -> Option<ServiceConfig> {
    let before = c.errors.len();
    let mut addresses: Vec<(String, String)> = Vec::new();
    if let Some(a) = &spec.address {
        addresses.push((a.clone(), format!("{prefix}.address")));
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        addresses.push((e.clone(), format!("{prefix}.endpoints[{i}]")));
    }
    if addresses.is_empty() {
        c.push(
            &doc.at(prefix),
            format!("Service `{name}` needs an address or endpoints"),
        );
        return None;
    }
    let mut endpoints = Vec::new();
    let mut scheme = None;
    for (text, field) in &addresses {
        let at = doc.at(field);
        let url = match parse_url(text) {
            Ok(u) => u,
            Err(e) => {
                c.push(&at, e);
                continue;
            }
        };
        if *scheme.get_or_insert((url.tls, url.http2)) != (url.tls, url.http2) {
            c.push(&at, "all endpoints of a service use the same scheme");
        }
        match (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map(|mut a| a.next())
        {
            Ok(Some(addr)) => {
                let default_port = if url.tls { 443 } else { 80 };
                let host_part = if url.host.contains(':') {
                    format!("[{}]", url.host)
                } else {
                    url.host.clone()
                };
                let authority = if url.port == default_port {
                    host_part
                } else {
                    format!("{host_part}:{}", url.port)
                };
                endpoints.push(EndpointConfig {
                    addr,
                    authority,
                    host: url.host.clone(),
                });
            }
            _ => c.push(&at, format!("cannot resolve upstream host `{}`", url.host)),
        }
    }
    let balance = match spec.load_balancing.as_deref() {
        None | Some("roundRobin") => Balance::RoundRobin,
        Some("leastRequests") => Balance::LeastRequests,
        Some(other) => {
            c.push(
                &doc.at(&format!("{prefix}.loadBalancing")),
                format!("`{other}` is not roundRobin or leastRequests"),
            );
            Balance::RoundRobin
        }
    };
    let host_header = match spec.host_header.as_deref() {
        None | Some("preserve") => HostHeader::Preserve,
        Some("upstream") => HostHeader::Upstream,
        Some(fixed) => match check_host_pattern(fixed.split(':').next().unwrap_or("")) {
            Ok(()) if !fixed.starts_with("*.") => HostHeader::Fixed(fixed.to_string()),
            _ => {
                c.push(
                    &doc.at(&format!("{prefix}.hostHeader")),
                    format!("`{fixed}` is not preserve, upstream or a host name"),
                );
                HostHeader::Preserve
            }
        },
    };
    let ips: Vec<IpAddr> = endpoints.iter().map(|e: &EndpointConfig| e.addr.ip()).collect();
    let external = network(
        doc,
        &format!("{prefix}.network"),
        spec.network.as_deref(),
        &ips,
        c,
    );
    let mut duration = |value: Option<&String>, field: &str, default: Duration| match value {
        Some(v) => parse_duration(v).unwrap_or_else(|e| {
            c.push(&doc.at(&format!("{prefix}.{field}")), e);
            default
        }),
        None => default,
    };
    let timeouts = spec.timeouts.as_ref();
    let connect_timeout = duration(
        timeouts.and_then(|t| t.connect.as_ref()),
        "timeouts.connect",
        proxy.timeouts.upstream_connect,
    );
    let response_timeout = duration(
        timeouts.and_then(|t| t.response.as_ref()),
        "timeouts.response",
        proxy.timeouts.upstream_response,
    );
    let outlier = super::health::outlier_detection(doc, prefix, spec, c);
    let breaker = super::health::circuit_breaker(doc, prefix, spec.circuit_breaker.as_ref(), c);
    let proxy_protocol = match spec.proxy_protocol.as_deref() {
        None => None,
        Some(_) if scheme.is_some_and(|(_, http2)| http2) => {
            c.push(
                &doc.at(&format!("{prefix}.proxyProtocol")),
                "an HTTP/2 connection carries many clients' requests; PROXY protocol needs one connection per client (use http:// or https://)",
            );
            None
        }
        Some("v1") => Some(1),
        Some("v2") => Some(2),
        Some(other) => {
            c.push(
                &doc.at(&format!("{prefix}.proxyProtocol")),
                format!("`{other}` is not v1 or v2"),
            );
            None
        }
    };
    let (tls, http2) = scheme.unwrap_or_default();
    let health = super::health::health_check(doc, prefix, spec.health_check.as_ref(), http2, c);
    let tls = if tls {
        Some(OutboundTls {
            ca: None,
            client: None,
            sni: None,
            min: TlsVersion::V12,
            max: TlsVersion::V13,
            alpn: vec![if http2 { "h2" } else { "http/1.1" }.into()],
            origin: doc.at(prefix),
        })
    } else {
        None
    };
    if c.errors.len() > before {
        return None;
    }
    Some(ServiceConfig {
        name: name.to_string(),
        endpoints,
        balance,
        tls,
        http2,
        proxy_protocol,
        host_header,
        connect_timeout,
        response_timeout,
        retries: spec.retries.unwrap_or(1),
        health,
        outlier,
        breaker,
        external,
    })
}

pub(super) fn side(external: bool) -> &'static str {
    if external { "external" } else { "internal" }
}

/// Whether an address is outside private networks (loopback, RFC 1918, link-local, ULA count as internal).
pub(super) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_private() || v4.is_link_local()),
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// `external`/`internal` as written, or by address: any public (or any-address) one makes it external.
pub(super) fn network(
    doc: &Doc,
    field: &str,
    written: Option<&str>,
    ips: &[IpAddr],
    c: &mut Collector,
) -> bool {
    match written {
        Some("external") => true,
        Some("internal") => false,
        Some(other) => {
            c.push(&doc.at(field), format!("`{other}` is not external or internal"));
            false
        }
        None => ips.iter().any(|ip| ip.is_unspecified() || is_public(*ip)),
    }
}
