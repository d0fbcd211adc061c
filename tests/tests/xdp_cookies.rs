//! SYN cookies at the NIC with a real XDP attach on a veth pair: with a
//! listener's SYN budget at 1 per second per CPU, XDP answers nearly every
//! SYN itself with a cookie SYN-ACK, and real clients (curl, over IPv4 and
//! IPv6) still get their answers — the kernel's synproxy accepts each
//! cookie's ACK and makes the connection with the listener, window scaling
//! and all — while the listener's SYN queue never sees those SYNs.

use anyhow::ensure;
use portcullis_tests::http::{Upstream, pattern};
use portcullis_tests::{Gateway, Topology};

const PORT: u16 = 8080;
/// Connections made one after another: all but about one a second go through cookies.
const CONNECTIONS: usize = 30;

fn syn(xdp: &Gateway, listener: &str) -> anyhow::Result<serde_json::Value> {
    Ok(xdp.listener_status(listener)?["syn"].clone())
}

#[test]
fn connections_over_the_budget_are_made_through_syn_cookies() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let _client_xdp = topo.accept_xdp_replies()?;
    let xdp = Gateway::new(&topo.gw);
    xdp.cli(&["xdp", "attach", "--iface", &topo.veth.a])?;
    for v6 in [false, true] {
        let gw = topo.gw_ip(v6);
        let addr = std::net::SocketAddr::new(gw, PORT);
        let _up = Upstream::start(&topo.gw, addr)?;
        let listener = addr.to_string();
        xdp.cli(&["listener", "add", &listener])?;
        let out = xdp.cli(&["listener", "syn-budget", &listener, "--budget", "1"])?;
        ensure!(out.contains("SYN cookies"), "{out}");
        let table = topo.gw.command("nft").args(["list", "ruleset"]).output()?;
        let table = String::from_utf8_lossy(&table.stdout);
        ensure!(table.contains("synproxy"), "the ACK path is in place:\n{table}");

        let from = topo.client_ip(2, v6).to_string();
        let host = if v6 { format!("[{gw}]") } else { gw.to_string() };
        for i in 0..CONNECTIONS {
            // Half of them fetch 1 MiB, which needs the window scale the
            // cookie carried through to the listener's connection.
            let (path, want) = if i % 2 == 0 {
                ("/hello".to_owned(), None)
            } else {
                ("/bytes/1048576".to_owned(), Some(pattern(0, 1 << 20)))
            };
            let out = topo
                .client
                .command("curl")
                .args(["-sS", "--max-time", "5", "--interface", &from])
                .arg(format!("http://{host}:{PORT}{path}"))
                .output()?;
            ensure!(
                out.status.success(),
                "connection {i} over {}: {}\n{}",
                if v6 { "IPv6" } else { "IPv4" },
                String::from_utf8_lossy(&out.stderr),
                syn(&xdp, &listener)?
            );
            if let Some(want) = want {
                ensure!(
                    out.stdout == want,
                    "connection {i}: {} bytes, not the 1 MiB pattern",
                    out.stdout.len()
                );
            } else {
                ensure!(!out.stdout.is_empty(), "connection {i}: empty answer");
            }
        }
        let counts = syn(&xdp, &listener)?;
        let cookies = counts["cookies"].as_u64().unwrap_or(0);
        ensure!(counts["cookies_armed"] == true, "{counts}");
        ensure!(
            cookies >= (CONNECTIONS as u64) / 2,
            "most connections went through cookies: {counts}"
        );
        ensure!(counts["cookie_failed"] == 0, "{counts}");
        xdp.cli(&["listener", "syn-budget", &listener, "--budget", "0"])?;
    }
    let table = topo.gw.command("nft").args(["list", "ruleset"]).output()?;
    ensure!(
        !String::from_utf8_lossy(&table.stdout).contains("synproxy"),
        "with no budget left the table is gone"
    );
    Ok(())
}
