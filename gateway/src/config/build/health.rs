//! A Service's endpoint health: active checks, outlier detection and the circuit breaker.

use std::time::Duration;

use super::{Collector, Doc};
use crate::config::{CircuitBreaker, HealthCheck, OutlierDetection, parse_duration, raw};

/// A duration written at `field`, or `default` (reported when it does not parse).
fn duration(
    doc: &Doc,
    field: &str,
    value: Option<&String>,
    default: Duration,
    c: &mut Collector,
) -> Duration {
    let Some(v) = value else { return default };
    match parse_duration(v) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            c.push(&doc.at(field), "must be longer than 0s");
            default
        }
        Err(e) => {
            c.push(&doc.at(field), e);
            default
        }
    }
}

/// A count written at `field` that must be at least 1.
fn at_least_one(doc: &Doc, field: &str, value: Option<u32>, default: u32, c: &mut Collector) -> u32 {
    match value {
        Some(0) => {
            c.push(&doc.at(field), "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    }
}

/// `spec.healthCheck` at `prefix`; `http2` services cannot be checked yet.
pub(super) fn health_check(
    doc: &Doc,
    prefix: &str,
    spec: Option<&raw::HealthCheckSpec>,
    http2: bool,
    c: &mut Collector,
) -> Option<HealthCheck> {
    let spec = spec?;
    let field = |name: &str| format!("{prefix}.healthCheck.{name}");
    if http2 {
        c.push(
            &doc.at(&format!("{prefix}.healthCheck")),
            "health checks speak HTTP/1.1; an h2c:// or h2:// service cannot be checked yet (outlier detection still applies)",
        );
        return None;
    }
    if !spec.path.starts_with('/') || spec.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        c.push(
            &doc.at(&field("path")),
            format!("`{}` must be a path starting with / (no spaces)", spec.path),
        );
    }
    let interval = duration(
        doc,
        &field("interval"),
        spec.interval.as_ref(),
        Duration::from_secs(5),
        c,
    );
    let timeout = duration(
        doc,
        &field("timeout"),
        spec.timeout.as_ref(),
        Duration::from_secs(1),
        c,
    );
    if timeout > interval {
        c.push(
            &doc.at(&field("timeout")),
            format!("{timeout:?} is longer than the interval ({interval:?}): checks would overlap"),
        );
    }
    let mut expected = Vec::new();
    for (i, v) in spec.expected_statuses.iter().flatten().enumerate() {
        match status_range(v) {
            Some(range) => expected.push(range),
            None => c.push(
                &doc.at(&format!("{}[{i}]", field("expectedStatuses"))),
                "a status (200) or an inclusive range (\"200-399\") within 100-599",
            ),
        }
    }
    if expected.is_empty() {
        expected.push((200, 299));
    }
    Some(HealthCheck {
        path: spec.path.clone(),
        interval,
        timeout,
        healthy_threshold: at_least_one(doc, &field("healthyThreshold"), spec.healthy_threshold, 2, c),
        unhealthy_threshold: at_least_one(doc, &field("unhealthyThreshold"), spec.unhealthy_threshold, 3, c),
        expected,
    })
}

fn status_range(v: &serde_yaml_ng::Value) -> Option<(u16, u16)> {
    let code = |s: &str| s.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c));
    let (lo, hi) = match v {
        serde_yaml_ng::Value::Number(n) => {
            let c = code(&n.to_string())?;
            (c, c)
        }
        serde_yaml_ng::Value::String(s) => match s.split_once('-') {
            Some((lo, hi)) => (code(lo)?, code(hi)?),
            None => (code(s)?, code(s)?),
        },
        _ => return None,
    };
    (lo <= hi).then_some((lo, hi))
}

/// `spec.outlierDetection` (with the older `ejectFor`) at `prefix`.
pub(super) fn outlier_detection(
    doc: &Doc,
    prefix: &str,
    spec: &raw::ServiceSpec,
    c: &mut Collector,
) -> OutlierDetection {
    let mut out = OutlierDetection::default();
    let field = |name: &str| format!("{prefix}.outlierDetection.{name}");
    let written = spec.outlier_detection.as_ref();
    let base = written.and_then(|o| o.base_ejection_time.as_ref());
    if base.is_some() && spec.eject_for.is_some() {
        c.push(
            &doc.at(&format!("{prefix}.ejectFor")),
            "`ejectFor` is the older name of outlierDetection.baseEjectionTime: give one of them",
        );
    }
    out.base_ejection = match (base, &spec.eject_for) {
        (Some(b), _) => duration(doc, &field("baseEjectionTime"), Some(b), out.base_ejection, c),
        (None, Some(e)) => duration(doc, &format!("{prefix}.ejectFor"), Some(e), out.base_ejection, c),
        (None, None) => out.base_ejection,
    };
    let Some(o) = written else {
        out.max_ejection = out.max_ejection.max(out.base_ejection);
        return out;
    };
    out.consecutive_5xx = o.consecutive_5xx.unwrap_or(out.consecutive_5xx);
    out.consecutive_connect_failures = o
        .consecutive_connect_failures
        .unwrap_or(out.consecutive_connect_failures);
    let max = duration(
        doc,
        &field("maxEjectionTime"),
        o.max_ejection_time.as_ref(),
        out.max_ejection,
        c,
    );
    if o.max_ejection_time.is_some() && max < out.base_ejection {
        c.push(
            &doc.at(&field("maxEjectionTime")),
            "is shorter than baseEjectionTime: the first ejection would already exceed it",
        );
    }
    out.max_ejection = max.max(out.base_ejection);
    if let Some(p) = o.max_ejection_percent {
        if (1..=100).contains(&p) {
            out.max_ejection_percent = p;
        } else {
            c.push(
                &doc.at(&field("maxEjectionPercent")),
                "must be 1 to 100 (one endpoint may always be ejected)",
            );
        }
    }
    out
}

/// `spec.circuitBreaker` at `prefix`.
pub(super) fn circuit_breaker(
    doc: &Doc,
    prefix: &str,
    spec: Option<&raw::CircuitBreakerSpec>,
    c: &mut Collector,
) -> CircuitBreaker {
    let Some(spec) = spec else {
        return CircuitBreaker::default();
    };
    let field = |name: &str| format!("{prefix}.circuitBreaker.{name}");
    CircuitBreaker {
        max_connections: spec
            .max_connections
            .map(|n| at_least_one(doc, &field("maxConnections"), Some(n), 1, c)),
        max_pending_requests: spec
            .max_pending_requests
            .map(|n| at_least_one(doc, &field("maxPendingRequests"), Some(n), 1, c)),
    }
}
