//! The ACK path of the SYN cookies XDP answers with over a listener's SYN
//! budget: one nftables table per instance (`inet portcullis_<instance>`)
//! whose synproxy rule takes a cookie's ACK — a segment of a connection
//! conntrack has never seen — checks the cookie with the kernel's own secret
//! (the one XDP's cookie helper used), opens the connection with the
//! listener, and translates sequence numbers for its life. Connections whose
//! SYN reached the kernel are tracked as usual and never touch the rule.
//!
//! The table is written with `nft -f -`, in one transaction, rather than
//! through a netlink crate: none of the maintained ones builds the synproxy
//! expression, and `nft`'s own language is the interface nftables keeps stable.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use super::maps::{CookieOffer, ListenerAddr, Maps, Protocol};
use super::{Instance, XdpError};

/// The nftables table of an instance's synproxy rules.
pub fn table_name(instance: &Instance) -> String {
    let name: String = instance
        .name()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("portcullis_{name}")
}

/// The window scale the kernel gives a listener's connections when the
/// socket leaves its buffer to autotuning (as the gateway's do): the one a
/// cookie SYN-ACK must offer, since the synproxy passes the listener's
/// windows through unscaled.
pub fn kernel_wscale() -> u8 {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let rmem_max = read("/proc/sys/net/core/rmem_max")
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    let tcp_rmem = read("/proc/sys/net/ipv4/tcp_rmem")
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(6_291_456);
    wscale_for(tcp_rmem, rmem_max)
}

/// The kernel's choice (`tcp_select_initial_window`): the scale that lets the
/// largest receive buffer be advertised, at most 14.
fn wscale_for(tcp_rmem_max: u64, rmem_max: u64) -> u8 {
    let space = tcp_rmem_max.max(rmem_max).min(u64::from(u16::MAX) << 14);
    let log2 = 63 - u64::leading_zeros(space.max(1));
    u8::try_from(log2.saturating_sub(15).min(14)).unwrap_or(14)
}

/// What a cookie SYN-ACK offers on a listener of this family.
pub fn offer(listener: &ListenerAddr, wscale: u8) -> CookieOffer {
    let mss = if listener.addr.is_ipv4() { 1460 } else { 1440 };
    CookieOffer { mss, wscale }
}

/// The conntrack state of a cookie's ACK, a bare ACK of a connection
/// conntrack never saw: new where conntrack picks connections up midstream
/// (`nf_conntrack_tcp_loose`, on by default), invalid where it does not.
/// Only that state: an invalid segment of a tracked connection is the
/// kernel's to judge, as without the table.
fn cookie_ack_state() -> &'static str {
    let loose = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_loose").unwrap_or_default();
    if loose.trim() == "0" {
        "invalid,untracked"
    } else {
        "new,untracked"
    }
}

/// One rule: a cookie's ACK for `listener` goes to the synproxy.
fn rule(listener: &ListenerAddr, wscale: u8) -> String {
    let port = listener.addr.port();
    let dest = match listener.addr.ip() {
        IpAddr::V4(a) if a.is_unspecified() => "meta nfproto ipv4".to_owned(),
        IpAddr::V6(a) if a.is_unspecified() => "meta nfproto ipv6".to_owned(),
        IpAddr::V4(a) => format!("ip daddr {a}"),
        IpAddr::V6(a) => format!("ip6 daddr {a}"),
    };
    let mss = offer(listener, wscale).mss;
    format!(
        "\t\t{dest} tcp dport {port} tcp flags & (fin|syn|rst|ack) == ack ct state {} \
         synproxy mss {mss} wscale {wscale} timestamp sack-perm\n",
        cookie_ack_state()
    )
}

/// The table that holds exactly `listeners`' rules, replacing whatever the
/// instance had, in one transaction.
fn ruleset(table: &str, listeners: &[ListenerAddr], wscale: u8) -> String {
    let mut text = format!("table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n");
    text.push_str("\tchain cookie_acks {\n\t\ttype filter hook input priority filter; policy accept;\n");
    for listener in listeners {
        text.push_str(&rule(listener, wscale));
    }
    text.push_str("\t}\n}\n");
    text
}

fn nft(table: &str, action: &'static str, script: &str) -> Result<(), XdpError> {
    let failed = |detail: String| XdpError::Synproxy {
        table: table.to_owned(),
        action,
        detail,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run nft: {e}")))?;
    child
        .stdin
        .take()
        .ok_or_else(|| failed("no stdin".into()))?
        .write_all(script.as_bytes())
        .map_err(|e| failed(format!("writing to nft: {e}")))?;
    let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// Removes the instance's synproxy table, if it has one (none can exist
/// where nftables is not installed).
pub fn remove_table(instance: &Instance) -> Result<(), XdpError> {
    let installed = Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        return Ok(());
    }
    let table = table_name(instance);
    nft(
        &table,
        "removed",
        &format!("table inet {table} {{}}\ndelete table inet {table}\n"),
    )
}

impl Maps {
    /// Every listener's SYN budget as the maps hold it, with `listener`'s set
    /// to `budget`: what [`Maps::set_syn_cookies`] takes to change one.
    pub fn syn_budgets_with(
        &self,
        listener: &ListenerAddr,
        budget: u32,
    ) -> Result<Vec<(ListenerAddr, u32)>, XdpError> {
        let mut out = Vec::new();
        let mut found = false;
        for l in self.listeners()? {
            if l.addr == *listener {
                found = true;
                out.push((l.addr, budget));
            } else {
                out.push((l.addr, self.syn_limit(l.id)?.budget));
            }
        }
        if !found {
            return Err(XdpError::UnknownListener {
                listener: listener.to_string(),
            });
        }
        Ok(out)
    }

    /// Gives each of `budgets`' TCP listeners its SYN budget (SYNs per
    /// second per CPU before cookies; 0: none) with the cookies' ACK path in
    /// place: the instance's synproxy table is rewritten to hold exactly
    /// the listeners with a budget, then their budgets are armed. Should the
    /// table not be written, every budget stays unarmed (the kernel takes
    /// every SYN, as without a budget) and the error says why.
    pub fn set_syn_cookies(&mut self, budgets: &[(ListenerAddr, u32)]) -> Result<(), XdpError> {
        let wscale = kernel_wscale();
        let armed: Vec<ListenerAddr> = budgets
            .iter()
            .filter(|(l, budget)| *budget > 0 && l.protocol == Protocol::Tcp)
            .map(|(l, _)| *l)
            .collect();
        let table = table_name(&self.instance);
        let written = if armed.is_empty() {
            remove_table(&self.instance)
        } else {
            nft(&table, "written", &ruleset(&table, &armed, wscale))
        };
        for (listener, budget) in budgets {
            let cookies = (written.is_ok() && armed.contains(listener)).then(|| offer(listener, wscale));
            self.set_syn_budget(listener, *budget, cookies)?;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_the_table_with_one_rule_per_listener() {
        let listeners: Vec<ListenerAddr> = ["10.0.0.1:80", "0.0.0.0:443", "[fd00::1]:8080", "[::]:80"]
            .iter()
            .map(|l| l.parse().expect("listener"))
            .collect();
        let text = ruleset("portcullis_x", &listeners, 7);
        assert!(text.starts_with("table inet portcullis_x {}\ndelete table inet portcullis_x\n"));
        for dest in [
            "ip daddr 10.0.0.1 tcp dport 80 ",
            "meta nfproto ipv4 tcp dport 443 ",
            "ip6 daddr fd00::1 tcp dport 8080 ",
            "meta nfproto ipv6 tcp dport 80 ",
        ] {
            assert!(text.contains(dest), "{dest} in\n{text}");
        }
        assert!(text.contains("synproxy mss 1460 wscale 7 timestamp sack-perm"));
        assert!(text.contains("synproxy mss 1440 wscale 7 timestamp sack-perm"));
        assert_eq!(
            table_name(&Instance::new("a.b-c").expect("name")),
            "portcullis_a_b_c"
        );
    }

    #[test]
    fn the_window_scale_follows_the_largest_receive_buffer() {
        // Debian's defaults: tcp_rmem max 6 MiB, rmem_max 208 KiB.
        assert_eq!(wscale_for(6_291_456, 212_992), 7);
        assert_eq!(wscale_for(6_291_456, 33_554_432), 10);
        assert_eq!(wscale_for(65_535, 0), 0);
        assert_eq!(wscale_for(u64::MAX, 0), 14);
    }
}
