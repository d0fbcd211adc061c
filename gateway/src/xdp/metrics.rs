//! What XDP counted, in the Prometheus (OpenMetrics) text the admin
//! listener serves beside the proxy's own metrics: read from the pinned maps
//! at scrape time, so the figures are the NIC's, whether or not the proxy was
//! up when the packets came.

use std::fmt::Write as _;

use super::{Maps, UNATTRIBUTED, XdpError};

/// The metric families this module writes (their base names).
pub const METRICS: [&str; 4] = [
    "portcullis_xdp_packets",
    "portcullis_xdp_syns",
    "portcullis_xdp_gate_open",
    "portcullis_xdp_listeners",
];

/// Appends the families of [`METRICS`] for every listener in `maps`.
pub fn write(maps: &Maps, out: &mut String) -> Result<(), XdpError> {
    let listeners = maps.listeners()?;
    let _ = writeln!(
        out,
        "# HELP portcullis_xdp_packets Packets XDP judged at the NIC, by listener and verdict (listener \"-\": not attributable to one).\n# TYPE portcullis_xdp_packets counter"
    );
    let mut packets = |listener: &str, verdict: &str, n: u64| {
        let _ = writeln!(
            out,
            "portcullis_xdp_packets_total{{listener=\"{listener}\",verdict=\"{verdict}\"}} {n}"
        );
    };
    let unattributed = maps.counters(UNATTRIBUTED)?;
    packets("-", "malformed_passed", unattributed.malformed_passed);
    packets("-", "fragment_passed", unattributed.fragment_passed);
    packets("-", "drop_global_deny", unattributed.drop_global_deny);
    let mut syns = Vec::with_capacity(listeners.len());
    for l in &listeners {
        let name = l.addr.addr.to_string();
        let c = maps.counters(l.id)?;
        for (verdict, n) in [
            ("passed", c.passed),
            ("drop_global_deny", c.drop_global_deny),
            ("drop_listener_deny", c.drop_listener_deny),
            ("drop_not_allowed", c.drop_not_allowed),
            ("gate_syn_ack", c.gate_syn_ack),
            ("gate_503", c.gate_503),
            ("gate_reset", c.gate_reset),
            ("gate_drop", c.gate_drop),
            ("gate_failed", c.gate_failed),
        ] {
            packets(&name, verdict, n);
        }
        syns.push((name, maps.syn_counters(l.id)?));
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_xdp_syns SYNs to open listeners, by listener and verdict (within the per-source rate, over it, answered with a cookie over the listener's budget, cookie not written).\n# TYPE portcullis_xdp_syns counter"
    );
    for (name, s) in &syns {
        for (verdict, n) in [
            ("within", s.within),
            ("over_rate", s.over_rate),
            ("cookie", s.cookies),
            ("cookie_failed", s.cookie_failed),
        ] {
            let _ = writeln!(
                out,
                "portcullis_xdp_syns_total{{listener=\"{name}\",verdict=\"{verdict}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_xdp_gate_open 1 while the proxy holds the listener's gate open at the NIC, 0 while XDP answers for it (mode: what it answers).\n# TYPE portcullis_xdp_gate_open gauge"
    );
    for l in &listeners {
        let _ = writeln!(
            out,
            "portcullis_xdp_gate_open{{listener=\"{}\",mode=\"{}\"}} {}",
            l.addr.addr,
            l.gate_mode.label(),
            u8::from(l.gate_open)
        );
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_xdp_listeners Listeners whose traffic XDP judges.\n# TYPE portcullis_xdp_listeners gauge\nportcullis_xdp_listeners {}",
        listeners.len()
    );
    Ok(())
}
