//! The Grafana dashboard shipped in `images/` queries only metrics the
//! gateway exports: every `portcullis_*` name in its expressions is a family
//! of the proxy's registry or of what XDP's maps are exported as.

use std::collections::BTreeSet;

use portcullis::telemetry::{
    ApiLabels, GateLabels, GrpcLabels, HandshakeLabels, Metrics, RequestLabels, TunnelBytesLabels,
    TunnelLabels, UpstreamLabels,
};

/// A registry with one sample in every family (an empty family is not written).
fn sampled() -> Metrics {
    let m = Metrics::default();
    let api = ApiLabels { api: "a".into() };
    let text = |s: &str| s.to_owned();
    m.requests
        .get_or_create(&RequestLabels {
            api: text("a"),
            status: 200,
        })
        .inc();
    m.latency.get_or_create(&api).observe(0.1);
    m.upstream_errors
        .get_or_create(&UpstreamLabels {
            service: text("s"),
            kind: text("io"),
        })
        .inc();
    m.tls_handshakes
        .get_or_create(&HandshakeLabels { result: text("ok") })
        .inc();
    m.gate_rejections
        .get_or_create(&GateLabels {
            api: text("a"),
            reason: text("r"),
        })
        .inc();
    m.gate_open.get_or_create(&api).set(1);
    m.websocket_open.get_or_create(&api).set(1);
    m.websocket_closed
        .get_or_create(&TunnelLabels {
            api: text("a"),
            reason: text("closed"),
        })
        .inc();
    m.websocket_bytes
        .get_or_create(&TunnelBytesLabels {
            api: text("a"),
            direction: text("client"),
        })
        .inc();
    m.grpc_calls
        .get_or_create(&GrpcLabels {
            api: text("a"),
            grpc_status: 0,
        })
        .inc();
    m
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../images/grafana-dashboard.json");
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let exported: BTreeSet<String> = sampled()
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .chain(portcullis::xdp::metrics::METRICS.iter().map(|m| (*m).to_owned()))
        .collect();
    let name = regex::Regex::new(r"portcullis_[a-z0-9_]+").expect("pattern");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for m in name.find_iter(expr) {
                let full = m.as_str();
                let base = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| full.strip_suffix(s))
                    .unwrap_or(full);
                assert!(
                    exported.contains(base),
                    "panel {:?} queries {full}, which is not exported; exported: {exported:?}",
                    panel["title"]
                );
                queried.insert(base.to_owned());
            }
        }
    }
    assert!(
        queried.len() >= 10,
        "the dashboard covers the gateway: {queried:?}"
    );
}
