//! Tracing through `portcullis run`: W3C trace context continued or started
//! and passed upstream, one span per request exported over OTLP/HTTP
//! (protobuf) to a receiver built on the official protobuf definitions
//! (`opentelemetry-proto`), with the route, API, outcome and upstream timing,
//! and the sampling ratio applied to new traces only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance, curl};
use portcullis_tests::{NetNs, wait_for};
use prost::Message as _;

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn config(random: u32) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: traced
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
  tracing:
    provider:
      type: opentelemetry
      properties:
        address: http://127.0.0.1:4318
        serviceType: http
        serviceName: edge-gw
        timeout: 2s
        resourceAttributes:
          deployment.environment: test
    sampling:
      client: 100
      random: {random}
      overall: 100
    labels:
      - name: tenant
        type: requestHeader
        keyName: x-tenant
        defaultValue: none
      - name: site
        type: literal
        defaultValue: lab
---
{}{}",
        api_instance(
            "orders",
            "http://127.0.0.1:8080/orders",
            "http://127.0.0.1:9000/",
            ""
        ),
        api_instance(
            "broken",
            "http://127.0.0.1:8080/broken",
            "http://127.0.0.1:9009/",
            ""
        ),
    )
}

/// Every span the receiver was sent, with its resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver in `ns`: decodes each POSTed `ExportTraceServiceRequest`.
fn receiver(ns: &NetNs) -> anyhow::Result<Received> {
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:4318"))??;
    let received: Received = Arc::default();
    let spans = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(&conn);
            let mut length = 0usize;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let Ok(request) = ExportTraceServiceRequest::decode(body.as_slice()) else {
                let _ = (&conn).write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                continue;
            };
            let _ = (&conn).write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
            );
            let mut all = spans.lock().expect("spans");
            for rs in request.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .map(text)
                    .unwrap_or_default();
                for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                    all.push((service.clone(), span));
                }
            }
        }
    });
    Ok(received)
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).map(text)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn count(received: &Received) -> usize {
    received.lock().map_or(0, |r| r.len())
}

/// The `traceparent` the upstream received for a request with `headers`.
fn upstream_traceparent(ns: &NetNs, headers: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![];
    for h in headers {
        args.extend(["-H", *h]);
    }
    args.push("http://127.0.0.1:8080/orders/headers");
    let (code, echoed, err) = curl(ns, &args)?;
    ensure!(code == 0, "curl: {err}");
    echoed
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no traceparent upstream: {echoed}"))
}

#[test]
fn spans_reach_the_collector_with_the_callers_trace_and_sampling_spares_new_traces() -> anyhow::Result<()> {
    let ns = NetNs::new("tr")?;
    let dir = TempDir::new("tr")?;
    let received = receiver(&ns)?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write("gateway.yaml", &config(100))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;

    // A caller's trace is continued: same trace id, this request's span as the upstream's parent.
    let continued = upstream_traceparent(
        &ns,
        &[
            &format!("traceparent: {INCOMING}"),
            "tracestate: vendor=1",
            "x-tenant: acme",
        ],
    )?;
    ensure!(
        continued.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && continued.ends_with("-01"),
        "{continued}"
    );
    let our_span = continued[36..52].to_owned();
    ensure!(
        our_span != "00f067aa0ba902b7",
        "the gateway's own span: {continued}"
    );
    // Without one, a new trace starts.
    let fresh = upstream_traceparent(&ns, &[])?;
    ensure!(
        fresh.len() == 55 && !fresh.contains("4bf92f35") && fresh.ends_with("-01"),
        "{fresh}"
    );
    // A failed exchange is a span with an error status.
    let (_, out, _) = curl(
        &ns,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:8080/broken/x",
        ],
    )?;
    ensure!(out == "502", "{out}");

    wait_for("three spans at the collector", || Ok(count(&received) >= 3))?;
    let spans = received
        .lock()
        .map(|r| r.clone())
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let (service, first) = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736")
        .context("the continued trace's span")?;
    ensure!(service == "edge-gw");
    ensure!(
        hex(&first.parent_span_id) == "00f067aa0ba902b7" && hex(&first.span_id) == our_span,
        "{first:?}"
    );
    ensure!(
        first.trace_state == "vendor=1" && first.kind == 2 && first.name == "GET orders",
        "{first:?}"
    );
    for (key, want) in [
        ("http.response.status_code", "200"),
        ("portcullis.api", "orders"),
        ("http.route", "/orders"),
        ("portcullis.service", "orders/up"),
        ("portcullis.outcome", "ok"),
        ("url.path", "/orders/headers"),
        ("tenant", "acme"),
        ("site", "lab"),
    ] {
        ensure!(
            attr(first, key).as_deref() == Some(want),
            "{key}: {:?} in {first:?}",
            attr(first, key)
        );
    }
    ensure!(
        attr(first, "portcullis.upstream.duration_ms").is_some()
            && first.end_time_unix_nano > first.start_time_unix_nano
    );
    let fresh_trace = &fresh[3..35];
    ensure!(
        spans
            .iter()
            .any(|(_, s)| hex(&s.trace_id) == fresh_trace && s.parent_span_id.is_empty()),
        "the new trace's root span"
    );
    let failed = spans
        .iter()
        .find(|(_, s)| attr(s, "portcullis.api").as_deref() == Some("broken"))
        .context("the 502's span")?;
    ensure!(
        failed.1.status.as_ref().is_some_and(|s| s.code == 2),
        "an error status: {:?}",
        failed.1
    );

    sampling_steps(&ns, &gw, &dir, &received)
}

/// With `random: 0` new traces are not recorded (the upstream is told so by
/// the sampled flag), while a caller's sampled trace still is.
fn sampling_steps(ns: &NetNs, gw: &GatewayProcess, dir: &TempDir, received: &Received) -> anyhow::Result<()> {
    // random: 0: new traces are not recorded (the upstream is told so), callers' sampled ones still are.
    dir.write("gateway.yaml", &config(0))?;
    gw.reload()?;
    gw.wait_log("configuration reloaded", "the reload")?;
    let before = count(received);
    for _ in 0..20 {
        let unsampled = upstream_traceparent(ns, &[])?;
        ensure!(unsampled.ends_with("-00"), "not sampled: {unsampled}");
    }
    upstream_traceparent(ns, &[&format!("traceparent: {INCOMING}")])?;
    wait_for("the caller's sampled trace", || Ok(count(received) > before))?;
    std::thread::sleep(Duration::from_millis(1500));
    let after = count(received);
    ensure!(
        after == before + 1,
        "only the caller's sampled request was exported: {before} then {after}"
    );
    let (_, m, _) = curl(ns, &["http://127.0.0.1:9901/metrics"])?;
    ensure!(
        m.contains("portcullis_trace_spans_total{fate=\"exported\"} 4"),
        "{m}"
    );
    Ok(())
}
