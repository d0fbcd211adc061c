//! The Configuration resource: proxy and gateway-wide settings.

use super::documents::Documents;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::telemetry::{logs, trace};

use super::{Collector, Doc, pem, secret_value};
use crate::config::{
    Config, GateLevel, GatewaySettings, Http2Settings, ProxySettings, RedisConfig, RegistrationConfig,
    XffMode, parse_duration, parse_url, raw, secret::Resolver,
};

/// The configuration with the Configuration resource's settings (or the
/// defaults) and nothing served yet; its secret key (if any) is set up for
/// the passes that follow.
pub(super) fn configure(docs: &Documents<'_>, base: &Path, c: &mut Collector) -> Config {
    let (proxy, mut gateway) = match &docs.configuration {
        Some((doc, spec)) => {
            if let Some(key_file) = spec.secrets.as_ref().and_then(|s| s.key_file.as_ref()) {
                let path = Path::new(key_file);
                c.resolver = Resolver::new(Some(if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    base.join(path)
                }));
            }
            (proxy_settings(doc, spec, c), gateway_settings(doc, spec, base, c))
        }
        None => (ProxySettings::default(), GatewaySettings::default()),
    };
    gateway.cluster.clone_from(&docs.cluster);
    Config {
        listeners: Vec::new(),
        services: Vec::new(),
        proxy,
        gateway,
        contracts: Vec::new(),
        warnings: Vec::new(),
        dir: base.to_path_buf(),
        registration: None,
    }
}

pub(super) fn gateway_settings(
    doc: &Doc,
    spec: &raw::ConfigurationSpec,
    base: &Path,
    c: &mut Collector,
) -> GatewaySettings {
    let mut g = GatewaySettings::default();
    if let Some(logging) = &spec.logging {
        g.log_outputs = log_outputs(doc, logging, c);
        if let Some(level) = logging.runtime_logs.as_ref().and_then(|r| r.log_level.as_ref()) {
            if ["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                g.log_level.clone_from(level);
            } else {
                c.push(
                    &doc.at("spec.logging.runtimeLogs.logLevel"),
                    format!("`{level}` is not error, warn, info, debug or trace"),
                );
            }
        }
        g.access_logs = !matches!(logging.access_logs, Some(raw::AccessLogsSpec::Enabled(false)));
    }
    if let Some(redis) = spec.shared_storage.as_ref().and_then(|s| s.redis.as_ref()) {
        let at = doc.at("spec.sharedStorage.redis.address");
        let valid = redis
            .address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !valid {
            c.push(&at, format!("`{}` is not host:port", redis.address));
        }
        let password = redis
            .password
            .as_ref()
            .and_then(|p| secret_value(doc, "spec.sharedStorage.redis.password", p, base, c));
        let tls = redis.tls.as_ref().map(|t| {
            t.trusted_ca.as_ref().and_then(|ca| {
                pem(ca, base)
                    .map_err(|e| c.push(&doc.at("spec.sharedStorage.redis.tls.trustedCA"), e))
                    .ok()
            })
        });
        g.redis = Some(RedisConfig {
            address: redis.address.clone(),
            username: redis.username.clone(),
            password,
            db: redis.db.unwrap_or(0),
            tls,
        });
    }
    if let Some(gk) = &spec.gatekeeper {
        let at = doc.at("spec.gatekeeper.level");
        match &gk.level {
            None => {}
            Some(serde_yaml_ng::Value::String(level)) => match level.as_str() {
                "strict" => g.gate_level = GateLevel::Strict,
                "flexible" => g.gate_level = GateLevel::Flexible,
                "disabled" => g.gate_level = GateLevel::Disabled,
                other => c.push(&at, format!("`{other}` is not strict, flexible or disabled")),
            },
            Some(serde_yaml_ng::Value::Bool(on)) => {
                g.gate_level = if *on {
                    GateLevel::Strict
                } else {
                    GateLevel::Disabled
                };
                let spelled = if *on { "strict" } else { "disabled" };
                c.warnings
                    .push(at.error(format!("`{on}` is a legacy spelling; write `{spelled}`")));
            }
            Some(_) => c.push(&at, "expected strict, flexible or disabled"),
        }
        g.block_edit = gk.block_edit.unwrap_or(true);
        match gk.nic_action.as_deref() {
            None | Some("answer") => {}
            Some("drop") => g.nic_drop = true,
            Some(other) => c.push(
                &doc.at("spec.gatekeeper.nicAction"),
                format!("`{other}` is not answer or drop"),
            ),
        }
    }
    g.tracing = spec.tracing.as_ref().and_then(|t| tracing_settings(doc, t, c));
    g
}

/// `spec.tracing`: the OTLP/HTTP collector, sampling and labels.
fn tracing_settings(doc: &Doc, spec: &raw::TracingSpec, c: &mut Collector) -> Option<trace::Settings> {
    let at = |field: &str| doc.at(&format!("spec.tracing.{field}"));
    if spec.provider.kind != "opentelemetry" {
        c.push(
            &at("provider.type"),
            format!(
                "provider `{}` is not offered: `opentelemetry` exports to a collector of your own",
                spec.provider.kind
            ),
        );
        return None;
    }
    let Some(p) = &spec.provider.properties else {
        c.push(
            &at("provider"),
            "needs properties.address: the collector's OTLP/HTTP receiver (http://HOST:4318)",
        );
        return None;
    };
    if let Some(t) = p.service_type.as_deref().filter(|t| *t != "http") {
        c.push(
            &at("provider.properties.serviceType"),
            format!("serviceType `{t}` is not offered: spans go over OTLP/HTTP (protobuf); give the collector's HTTP receiver (port 4318) and `http`"),
        );
    }
    let collector = collector(&at("provider.properties.address"), p.address.as_deref(), c);
    let timeout = match p.timeout.as_deref().map(parse_duration) {
        None => Duration::from_secs(10),
        Some(Ok(d)) if !d.is_zero() => d,
        Some(Ok(_)) => {
            c.push(&at("provider.properties.timeout"), "must be longer than 0s");
            Duration::from_secs(10)
        }
        Some(Err(e)) => {
            c.push(&at("provider.properties.timeout"), e);
            Duration::from_secs(10)
        }
    };
    let sampling = spec.sampling.as_ref();
    let mut percent = |field: &str, value: Option<f64>| -> f64 {
        match value {
            None => 1.0,
            Some(v) if (0.0..=100.0).contains(&v) => v / 100.0,
            Some(v) => {
                c.push(
                    &at(&format!("sampling.{field}")),
                    format!("{v} is not a percentage (0 to 100)"),
                );
                1.0
            }
        }
    };
    let overall = percent("overall", sampling.and_then(|s| s.overall));
    let random = percent("random", sampling.and_then(|s| s.random));
    let client = percent("client", sampling.and_then(|s| s.client));
    let labels = spec
        .labels
        .iter()
        .enumerate()
        .filter_map(|(i, l)| tracing_label(&at(&format!("labels[{i}]")), l, c))
        .collect();
    Some(trace::Settings {
        collector: collector?,
        service_name: p.service_name.clone().unwrap_or_else(|| "portcullis".into()),
        resource: p
            .resource_attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        timeout,
        ratio: overall * random,
        client_ratio: overall * client,
        labels,
    })
}

/// The collector at `address` (`http://HOST[:PORT][/PATH]`, path `/v1/traces` by default).
fn collector(
    at: &crate::config::Origin,
    address: Option<&str>,
    c: &mut Collector,
) -> Option<trace::Collector> {
    let Some(address) = address else {
        c.push(
            at,
            "the collector's OTLP/HTTP receiver is required (http://HOST:4318)",
        );
        return None;
    };
    let Some(rest) = address.strip_prefix("http://") else {
        c.push(
            at,
            format!("`{address}`: spans go over plain OTLP/HTTP (http://HOST:4318); keep the collector on loopback or a private network (h2:// and https:// are not offered yet)"),
        );
        return None;
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    if authority.is_empty() || authority.contains('@') {
        c.push(at, format!("`{address}` has no host"));
        return None;
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:4318")
    };
    let path = if path.trim_matches('/').is_empty() {
        "/v1/traces".to_owned()
    } else {
        format!("/{path}")
    };
    Some(trace::Collector { authority, path })
}

/// One span label: a literal, a request header, or an environment variable read now.
fn tracing_label(
    at: &crate::config::Origin,
    spec: &raw::TracingLabelSpec,
    c: &mut Collector,
) -> Option<trace::Label> {
    let default = spec.default_value.clone().unwrap_or_default();
    let mut key = || {
        let key = spec.key_name.clone();
        if key.is_none() {
            c.push(at, format!("a `{}` label needs keyName", spec.kind));
        }
        key
    };
    let source = match spec.kind.as_str() {
        "literal" => trace::LabelSource::Literal(default),
        "environment" => trace::LabelSource::Literal(std::env::var(key()?).unwrap_or(default)),
        "requestHeader" => trace::LabelSource::Header {
            name: key()?.to_ascii_lowercase(),
            default,
        },
        other => {
            c.push(
                at,
                format!("label type `{other}` is not literal, requestHeader or environment"),
            );
            return None;
        }
    };
    Some(trace::Label {
        name: spec.name.clone(),
        source,
    })
}

#[expect(
    clippy::too_many_lines,
    reason = "one check per Configuration field, in field order"
)]
pub(super) fn proxy_settings(doc: &Doc, spec: &raw::ConfigurationSpec, c: &mut Collector) -> ProxySettings {
    let mut s = ProxySettings::default();
    if let Some(pp) = &spec.proxy_protocol {
        s.proxy_protocol = proxy_protocol(doc, "spec.proxyProtocol", pp, c);
    }
    let Some(p) = &spec.proxy else { return s };
    if let Some(w) = p.workers {
        if w == 0 || w > 1024 {
            c.push(
                &doc.at("spec.proxy.workers"),
                "workers must be 1-1024 (leave it out for one per CPU)",
            );
        } else {
            s.workers = w;
        }
    }
    if let Some(a) = &p.admin {
        if a == "off" {
            s.admin = None;
        } else {
            match a.parse::<SocketAddr>() {
                Ok(addr) => s.admin = Some(addr),
                Err(_) => c.push(
                    &doc.at("spec.proxy.admin"),
                    format!("`{a}` is not ip:port or `off`"),
                ),
            }
        }
    }
    if let Some(l) = &p.limits {
        let mut positive = |v: Option<usize>, field: &str, slot: &mut usize| {
            if let Some(v) = v {
                if v == 0 {
                    c.push(&doc.at(field), "must be greater than zero");
                } else {
                    *slot = v;
                }
            }
        };
        positive(
            l.request_line_bytes,
            "spec.proxy.limits.requestLineBytes",
            &mut s.limits.request_line,
        );
        positive(
            l.header_bytes,
            "spec.proxy.limits.headerBytes",
            &mut s.limits.header_bytes,
        );
        positive(l.headers, "spec.proxy.limits.headers", &mut s.limits.headers);
        positive(
            l.max_connections,
            "spec.proxy.limits.maxConnections",
            &mut s.max_connections,
        );
        if let Some(b) = l.max_body_bytes {
            s.max_body = b;
        }
        if s.limits.request_line > s.limits.header_bytes {
            c.push(
                &doc.at("spec.proxy.limits.requestLineBytes"),
                "the request line limit exceeds the header bytes limit",
            );
        }
    }
    if let Some(t) = &p.timeouts {
        let mut set = |v: &Option<String>, field: &str, slot: &mut Duration| {
            if let Some(v) = v {
                match parse_duration(v) {
                    Ok(d) => *slot = d,
                    Err(e) => c.push(&doc.at(field), e),
                }
            }
        };
        set(
            &t.request_headers,
            "spec.proxy.timeouts.requestHeaders",
            &mut s.timeouts.request_headers,
        );
        set(&t.idle, "spec.proxy.timeouts.idle", &mut s.timeouts.idle);
        set(
            &t.upstream_connect,
            "spec.proxy.timeouts.upstreamConnect",
            &mut s.timeouts.upstream_connect,
        );
        set(
            &t.upstream_response,
            "spec.proxy.timeouts.upstreamResponse",
            &mut s.timeouts.upstream_response,
        );
    }
    if let Some(f) = &p.forwarded {
        match f.x_forwarded_for.as_deref() {
            None | Some("append") => {}
            Some("replace") => s.forwarded.xff = XffMode::Replace,
            Some("off") => s.forwarded.xff = XffMode::Off,
            Some(other) => c.push(
                &doc.at("spec.proxy.forwarded.xForwardedFor"),
                format!("`{other}` is not append, replace or off"),
            ),
        }
        s.forwarded.proto = f.x_forwarded_proto.unwrap_or(true);
        s.forwarded.host = f.x_forwarded_host.unwrap_or(true);
        s.forwarded.via = f.via.unwrap_or(true);
    }
    if let Some(h) = &p.http2 {
        http2_settings(doc, h, &mut s.http2, c);
    }
    s
}

/// A `proxyProtocol` mapping at `field`: the trusted sources, or `None`
/// when it turns the protocol off (or is broken, which `c` then says).
pub(super) fn proxy_protocol(
    doc: &Doc,
    field: &str,
    spec: &raw::ProxyProtocolSpec,
    c: &mut Collector,
) -> Option<Vec<ipnet::IpNet>> {
    if spec.enabled == Some(false) {
        return None;
    }
    let Some(sources) = &spec.trusted_sources else {
        c.push(
            &doc.at(&format!("{field}.enabled")),
            "PROXY protocol needs `trustedSources` (the load balancers' addresses): a header from anyone else would let a client choose its own address",
        );
        return None;
    };
    let mut nets = Vec::new();
    for (i, text) in sources.iter().enumerate() {
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(net) => nets.push(net),
            Err(_) => c.push(
                &doc.at(&format!("{field}.trustedSources[{i}]")),
                format!("`{text}` is not an IP address or CIDR"),
            ),
        }
    }
    if nets.is_empty() {
        c.push(
            &doc.at(&format!("{field}.trustedSources")),
            "name at least one trusted source",
        );
        return None;
    }
    Some(nets)
}

/// `spec.proxy.http2` over the defaults: each limit at least 1, windows within HTTP/2's range.
fn http2_settings(doc: &Doc, h: &raw::Http2Spec, out: &mut Http2Settings, c: &mut Collector) {
    const MAX_WINDOW: u32 = (1 << 31) - 1;
    let mut set = |v: Option<u32>, field: &str, range: std::ops::RangeInclusive<u32>, slot: &mut u32| {
        if let Some(v) = v {
            if range.contains(&v) {
                *slot = v;
            } else {
                c.push(
                    &doc.at(&format!("spec.proxy.http2.{field}")),
                    format!("must be {} to {}", range.start(), range.end()),
                );
            }
        }
    };
    set(
        h.max_concurrent_streams,
        "maxConcurrentStreams",
        1..=10_000,
        &mut out.max_concurrent_streams,
    );
    set(
        h.stream_window_bytes,
        "streamWindowBytes",
        65_535..=MAX_WINDOW,
        &mut out.stream_window,
    );
    set(
        h.connection_window_bytes,
        "connectionWindowBytes",
        65_535..=MAX_WINDOW,
        &mut out.connection_window,
    );
    set(
        h.control_frames_per_second,
        "controlFramesPerSecond",
        1..=1_000_000,
        &mut out.control_frames_per_second,
    );
}

/// A policy's `spec.config` as `T`, the error located at the field serde names.
pub(super) fn from_config<T: for<'de> Deserialize<'de>>(
    doc: &Doc,
    value: &serde_yaml_ng::Value,
    c: &mut Collector,
) -> Option<T> {
    from_mapping(doc, "spec.config", value, c)
}

/// The mapping at `field` (absent: empty) as `T`, the error located at the field serde names.
fn from_mapping<T: for<'de> Deserialize<'de>>(
    doc: &Doc,
    field: &str,
    value: &serde_yaml_ng::Value,
    c: &mut Collector,
) -> Option<T> {
    let value = if value.is_null() {
        serde_yaml_ng::Value::Mapping(serde_yaml_ng::Mapping::new())
    } else {
        value.clone()
    };
    match serde_yaml_ng::from_value::<T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let message = e.to_string();
            let at = message
                .split_once(": ")
                .filter(|(p, _)| !p.contains(' '))
                .map_or_else(|| field.to_owned(), |(p, _)| format!("{field}.{p}"));
            c.push(&doc.at(&at), message);
            None
        }
    }
}

/// Why `path` may not hold a secret, if group or others can read it.
fn loose(path: &Path) -> Option<String> {
    match crate::config::secret::read_private(path) {
        Err(e @ crate::config::secret::SecretError::Loose { .. }) => Some(e.to_string()),
        _ => None,
    }
}

/// The replica's registration, its files checked: the registration and the
/// key must be private to the gateway's user, the certificate and CA must exist.
pub(super) fn registration(
    docs: &Documents<'_>,
    base: &Path,
    c: &mut Collector,
) -> Option<RegistrationConfig> {
    let (doc, replica, spec) = docs.registration.as_ref()?;
    let mut ok = true;
    // Relative paths are beside the registration file itself: when conf.d
    // holds a link to one kept in the state directory (where renewal can
    // write under the packaged unit), beside its target.
    let home = std::fs::canonicalize(base.join(doc.file))
        .ok()
        .and_then(|real| real.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| base.to_path_buf());
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            home.join(p)
        }
    };
    if let Some(why) = loose(&base.join(doc.file)) {
        c.push(&doc.at("metadata"), why);
        ok = false;
    }
    match parse_url(&spec.control_plane) {
        Ok(url) if url.tls => {}
        Ok(_) => {
            c.push(
                &doc.at("spec.controlPlane"),
                "the control plane is reached over https:// only",
            );
            ok = false;
        }
        Err(e) => {
            c.push(&doc.at("spec.controlPlane"), e);
            ok = false;
        }
    }
    let key = resolve(&spec.key);
    if !key.exists() {
        c.push(&doc.at("spec.key"), format!("{} does not exist", key.display()));
        ok = false;
    } else if let Some(why) = loose(&key) {
        c.push(&doc.at("spec.key"), why);
        ok = false;
    }
    for (field, file) in [
        ("spec.certificate", &spec.certificate),
        ("spec.caBundle", &spec.ca_bundle),
    ] {
        if !resolve(file).exists() {
            c.push(
                &doc.at(field),
                format!("{} does not exist", resolve(file).display()),
            );
            ok = false;
        }
    }
    ok.then(|| RegistrationConfig {
        replica: replica.clone(),
        cluster: spec.cluster.clone(),
        control_plane: spec.control_plane.trim_end_matches('/').to_owned(),
        certificate: resolve(&spec.certificate),
        key,
        ca_bundle: resolve(&spec.ca_bundle),
        origin: doc.at("metadata"),
    })
}

/// `spec.logging.outputs`, routed by `runtimeLogs.outputs` and `accessLogs.outputs`.
fn log_outputs(doc: &Doc, logging: &raw::LoggingSpec, c: &mut Collector) -> Vec<logs::Output> {
    let runtime_names = logging.runtime_logs.as_ref().and_then(|r| r.outputs.as_ref());
    let access_names = match &logging.access_logs {
        Some(raw::AccessLogsSpec::Routed(r)) => Some(&r.outputs),
        _ => None,
    };
    let routed = runtime_names.is_some() || access_names.is_some();
    let mut out: Vec<logs::Output> = Vec::new();
    for (i, spec) in logging.outputs.iter().flatten().enumerate() {
        let field = format!("spec.logging.outputs[{i}]");
        if out.iter().any(|o| o.name == spec.name) {
            c.push(
                &doc.at(&format!("{field}.name")),
                format!("a second output named `{}`", spec.name),
            );
            continue;
        }
        let Some(sink) = log_sink(doc, &field, spec, c) else {
            continue;
        };
        let named = |list: Option<&Vec<String>>| list.is_some_and(|l| l.contains(&spec.name));
        let output = logs::Output {
            name: spec.name.clone(),
            sink,
            runtime: !routed || named(runtime_names),
            access: !routed || named(access_names),
        };
        if !output.runtime && !output.access {
            c.warnings.push(doc.at(&field).error(format!(
                "output `{}` carries nothing: name it in runtimeLogs.outputs or accessLogs.outputs",
                spec.name
            )));
        }
        out.push(output);
    }
    let lists = [("runtimeLogs", runtime_names), ("accessLogs", access_names)];
    for (key, names) in lists {
        for (i, name) in names.into_iter().flatten().enumerate() {
            if !logging.outputs.iter().flatten().any(|o| &o.name == name) {
                c.push(
                    &doc.at(&format!("spec.logging.{key}.outputs[{i}]")),
                    format!("no output named `{name}` in spec.logging.outputs"),
                );
            }
        }
    }
    out
}

/// Where one output writes, from its `type` and `parameters`.
fn log_sink(doc: &Doc, field: &str, spec: &raw::LogOutputSpec, c: &mut Collector) -> Option<logs::Sink> {
    let params = &spec.parameters;
    match spec.kind.as_str() {
        "file" => {
            let p: raw::FileOutputParams = from_mapping(doc, &format!("{field}.parameters"), params, c)?;
            let path = match (&p.path, &p.file) {
                (_, Some(file)) if Path::new(file).is_absolute() => PathBuf::from(file),
                (Some(dir), Some(file)) => Path::new(dir).join(file),
                (Some(dir), None) => Path::new(dir).join("portcullis.log"),
                (None, _) => {
                    c.push(
                        &doc.at(&format!("{field}.parameters")),
                        "a file output needs an absolute `file`, or `path` (a directory) with an optional `file` name",
                    );
                    return None;
                }
            };
            if !path.is_absolute() {
                c.push(
                    &doc.at(&format!("{field}.parameters.path")),
                    format!("{} is not an absolute path", path.display()),
                );
                return None;
            }
            let format = log_format(doc, field, p.format.as_deref(), c)?;
            Some(logs::Sink::File { path, format })
        }
        "stdout" => {
            let p: raw::StdoutOutputParams = from_mapping(doc, &format!("{field}.parameters"), params, c)?;
            Some(logs::Sink::Stdout {
                format: log_format(doc, field, p.format.as_deref(), c)?,
            })
        }
        "syslog" => {
            let p: raw::SyslogOutputParams = from_mapping(doc, &format!("{field}.parameters"), params, c)?;
            let at = |name: &str| doc.at(&format!("{field}.parameters.{name}"));
            if p.host.is_some() || p.port.is_some() || p.mode.as_deref().is_some_and(|m| m != "unix") {
                c.push(
                    &at(if p.mode.is_some() { "mode" } else { "host" }),
                    "syslog goes to a Unix socket here (`path`, default /dev/log): journald and rsyslog forward it on",
                );
                return None;
            }
            if p.syslog_format.as_deref().is_some_and(|f| f != "rfc5424") {
                c.push(&at("syslog_format"), "only rfc5424 is written");
                return None;
            }
            let Some(facility) = facility(p.facility.as_deref().unwrap_or("daemon")) else {
                c.push(&at("facility"), "user, daemon, auth or local0 to local7");
                return None;
            };
            Some(logs::Sink::Syslog {
                socket: PathBuf::from(p.path.as_deref().unwrap_or("/dev/log")),
                facility,
                app_name: p.app_name.unwrap_or_else(|| "portcullis".into()),
            })
        }
        other => {
            c.push(
                &doc.at(&format!("{field}.type")),
                format!(
                    "output type `{other}` is not offered: Portcullis writes file, stdout and syslog outputs (and stderr always); ship those on with your log agent"
                ),
            );
            None
        }
    }
}

fn log_format(doc: &Doc, field: &str, written: Option<&str>, c: &mut Collector) -> Option<logs::Format> {
    match written {
        None | Some("plain") => Some(logs::Format::Plain),
        Some("json" | "json_lines") => Some(logs::Format::Json),
        Some(other) => {
            c.push(
                &doc.at(&format!("{field}.parameters.format")),
                format!("format `{other}` is not offered: plain or json (JSON lines)"),
            );
            None
        }
    }
}

/// A syslog facility's number.
fn facility(name: &str) -> Option<u8> {
    match name {
        "user" => Some(1),
        "daemon" => Some(3),
        "auth" => Some(4),
        _ => name
            .strip_prefix("local")
            .and_then(|n| n.parse::<u8>().ok())
            .filter(|n| *n <= 7)
            .map(|n| 16 + n),
    }
}
