//! XDP verdicts on crafted frames, run in the kernel with BPF_PROG_TEST_RUN
//! against real (pinned) maps filled through the gateway's `xdp` module.

use ipnet::IpNet;
use portcullis::xdp::{AclList, Counters, UNATTRIBUTED};
use portcullis_tests::{
    Prog,
    frames::{Ext, Frame, L4, arp},
    ip,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Global deny 192.0.2.0/24, listener deny 10.9.9.0/24, listener allow
/// 10.0.0.0/8 on 10.0.0.1:80 (and the v6 equivalents on [fd00::1]:80).
fn policy(prog: &mut Prog, v6: bool) -> u32 {
    let (listener, id) = prog.listener(if v6 { "[fd00::1]:80" } else { "10.0.0.1:80" });
    let (global, deny, allow) = if v6 {
        ("2001:db8::/32", "fd09::/16", "fd00::/8")
    } else {
        ("192.0.2.0/24", "10.9.9.0/24", "10.0.0.0/8")
    };
    prog.acl(AclList::GlobalDeny, global);
    prog.acl(AclList::Deny(listener), deny);
    prog.acl(AclList::Allow(listener), allow);
    id
}

fn check_verdicts(v6: bool) {
    let mut prog = Prog::new(1 << 16);
    let id = policy(&mut prog, v6);
    let pick = |a: &str, b: &str| ip(if v6 { b } else { a });
    let dst = pick("10.0.0.1", "fd00::1");
    let cases = [
        (pick("192.0.2.5", "2001:db8::5"), XDP_DROP),
        (pick("10.9.9.9", "fd09::9"), XDP_DROP),
        (pick("10.1.2.3", "fd00:1::3"), XDP_PASS),
        (pick("172.16.0.1", "fe80::1"), XDP_DROP),
    ];
    for (src, expected) in cases {
        assert_eq!(
            prog.run(&Frame::syn(src, dst, 80).bytes()),
            expected,
            "SYN from {src}"
        );
        // Every packet to the listener is judged, not only SYNs.
        let data = Frame::tcp(src, dst, 80, 0x18, b"GET / HTTP/1.1\r\n\r\n".to_vec());
        assert_eq!(prog.run(&data.bytes()), expected, "data from {src}");
    }
    let c = prog.counters(id);
    assert_eq!(
        (
            c.drop_global_deny,
            c.drop_listener_deny,
            c.passed,
            c.drop_not_allowed
        ),
        (2, 2, 2, 2),
        "{c:?}"
    );
    // Not a listener: another port, or another address.
    let stranger = pick("172.16.0.1", "fe80::1");
    assert_eq!(prog.run(&Frame::syn(stranger, dst, 81).bytes()), XDP_PASS);
    assert_eq!(
        prog.run(&Frame::syn(stranger, pick("10.0.0.2", "fd00::2"), 80).bytes()),
        XDP_PASS
    );
    assert_eq!(prog.counters(id), c, "non-listener traffic is not counted");
    assert_eq!(prog.counters(UNATTRIBUTED), Counters::default());
}

#[test]
fn every_verdict_ipv4() {
    check_verdicts(false);
}

#[test]
fn every_verdict_ipv6() {
    check_verdicts(true);
}

#[test]
fn longest_prefix_and_deny_before_allow() {
    let mut prog = Prog::new(1 << 16);
    let (listener, id) = prog.listener("10.0.0.1:443");
    prog.acl(AclList::Allow(listener), "10.0.0.0/8");
    prog.acl(AclList::Allow(listener), "10.1.0.0/16");
    prog.acl(AclList::Deny(listener), "10.1.2.0/24");
    let dst = ip("10.0.0.1");
    assert_eq!(prog.run(&Frame::syn(ip("10.1.2.3"), dst, 443).bytes()), XDP_DROP);
    assert_eq!(prog.run(&Frame::syn(ip("10.1.3.3"), dst, 443).bytes()), XDP_PASS);
    assert_eq!(
        prog.run(&Frame::syn(ip("10.200.3.3"), dst, 443).bytes()),
        XDP_PASS
    );
    prog.acl(AclList::GlobalDeny, "0.0.0.0/0");
    assert_eq!(prog.run(&Frame::syn(ip("10.1.3.3"), dst, 443).bytes()), XDP_DROP);
    let c = prog.counters(id);
    assert_eq!((c.drop_listener_deny, c.passed, c.drop_global_deny), (1, 2, 1));
}

#[test]
fn vlan_tags() {
    let mut prog = Prog::new(1 << 16);
    let (listener, id) = prog.listener("10.0.0.1:80");
    prog.acl(AclList::Deny(listener), "10.9.0.0/16");
    let frame = Frame::syn(ip("10.9.0.1"), ip("10.0.0.1"), 80);
    assert_eq!(
        prog.run(&frame.clone().vlan(0x8100, 10).bytes()),
        XDP_DROP,
        "802.1Q"
    );
    assert_eq!(
        prog.run(&frame.clone().vlan(0x88a8, 100).vlan(0x8100, 10).bytes()),
        XDP_DROP,
        "802.1ad + 802.1Q"
    );
    let v6 = Frame::syn(ip("fd00::9"), ip("fd00::1"), 80).vlan(0x8100, 7);
    assert_eq!(
        prog.run(&v6.bytes()),
        XDP_PASS,
        "v6 frame to a v4-only listener is not judged"
    );
    // A third tag is not parsed: the kernel drops such frames itself unless a
    // stacked VLAN device exists, so it is passed untouched and not counted.
    let triple = frame.vlan(0x88a8, 1).vlan(0x8100, 2).vlan(0x8100, 3);
    assert_eq!(prog.run(&triple.bytes()), XDP_PASS);
    assert_eq!(prog.counters(id).drop_listener_deny, 2);
}

#[test]
fn ipv4_options_are_skipped() {
    let mut prog = Prog::new(1 << 16);
    let (listener, _) = prog.listener("10.0.0.1:80");
    prog.acl(AclList::Deny(listener), "10.9.0.0/16");
    let mut frame = Frame::syn(ip("10.9.0.1"), ip("10.0.0.1"), 80);
    // Record-route-shaped option: 40 bytes, the maximum.
    frame.ipv4_options = vec![7, 39, 4];
    frame.ipv4_options.resize(40, 0);
    assert_eq!(prog.run(&frame.bytes()), XDP_DROP);
    frame.ipv4_options.truncate(12);
    assert_eq!(prog.run(&frame.bytes()), XDP_DROP);
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    let mut prog = Prog::new(1 << 16);
    let (listener, id) = prog.listener("[fd00::1]:80");
    prog.acl(AclList::Deny(listener), "fd09::/16");
    let mut frame = Frame::syn(ip("fd09::1"), ip("fd00::1"), 80);
    frame.ipv6_ext = vec![
        Ext::HopByHop,
        Ext::Routing,
        Ext::DestOpts { units: 3 },
        Ext::Fragment {
            offset: 0,
            more: true,
        },
        Ext::Auth,
    ];
    assert_eq!(prog.run(&frame.bytes()), XDP_DROP);
    assert_eq!(prog.counters(id).drop_listener_deny, 1);
}

#[test]
fn fragments_and_portless_packets_meet_the_global_deny_list() {
    let mut prog = Prog::new(1 << 16);
    let (listener, id) = prog.listener("10.0.0.1:80");
    prog.acl(AclList::Deny(listener), "10.9.0.0/16");
    prog.acl(AclList::GlobalDeny, "192.0.2.0/24");
    prog.acl(AclList::GlobalDeny, "2001:db8::/32");
    let dst = ip("10.0.0.1");

    // First fragment: carries the ports, judged like any packet.
    let mut first = Frame::syn(ip("10.9.0.1"), dst, 80);
    first.ipv4_fragment = (0, true);
    assert_eq!(prog.run(&first.bytes()), XDP_DROP);

    // Later fragments carry no ports: only the global deny list applies.
    let later = |src: &str| {
        let mut f = Frame::new(
            ip(src),
            dst,
            L4::Raw {
                proto: 6,
                bytes: vec![0; 64],
            },
        );
        f.ipv4_fragment = (185, false);
        f.bytes()
    };
    assert_eq!(prog.run(&later("10.9.0.1")), XDP_PASS);
    assert_eq!(prog.run(&later("192.0.2.1")), XDP_DROP);

    let mut v6_later = Frame::new(
        ip("2001:db8::1"),
        ip("fd00::1"),
        L4::Raw {
            proto: 6,
            bytes: vec![0; 64],
        },
    );
    v6_later.ipv6_ext = vec![Ext::Fragment {
        offset: 100,
        more: false,
    }];
    assert_eq!(prog.run(&v6_later.bytes()), XDP_DROP);
    v6_later.src = ip("fd09::1");
    assert_eq!(prog.run(&v6_later.bytes()), XDP_PASS);

    // ESP: no ports either.
    let esp = Frame::new(
        ip("192.0.2.9"),
        dst,
        L4::Raw {
            proto: 50,
            bytes: vec![0; 32],
        },
    );
    assert_eq!(prog.run(&esp.bytes()), XDP_DROP);

    // An extension chain longer than the program walks (8).
    let mut long = Frame::syn(ip("2001:db8::7"), ip("fd00::1"), 80);
    long.ipv6_ext = vec![Ext::DestOpts { units: 1 }; 9];
    assert_eq!(prog.run(&long.bytes()), XDP_DROP);
    long.src = ip("fd09::7");
    assert_eq!(prog.run(&long.bytes()), XDP_PASS);

    assert_eq!(prog.counters(id).drop_listener_deny, 1);
    let u = prog.counters(UNATTRIBUTED);
    assert_eq!(
        (u.drop_global_deny, u.fragment_passed, u.malformed_passed),
        (4, 3, 0),
        "{u:?}"
    );
}

#[test]
fn truncated_frames_pass_untouched_at_every_offset() {
    let mut prog = Prog::new(1 << 16);
    let (v4, _) = prog.listener("10.0.0.1:80");
    let (v6, _) = prog.listener("[fd00::1]:80");
    let (udp, _) = prog.listener("udp:10.0.0.1:53");
    prog.acl(AclList::Deny(v4), "10.9.0.0/16");
    prog.acl(AclList::Deny(v6), "fd09::/16");
    prog.acl(AclList::Deny(udp), "10.9.0.0/16");

    let mut with_options = Frame::syn(ip("10.9.0.1"), ip("10.0.0.1"), 80);
    with_options.ipv4_options = vec![1; 8];
    with_options.tcp_doff = Some(7);
    if let L4::Tcp { payload, .. } = &mut with_options.l4 {
        payload.extend_from_slice(&[1; 8]);
    }
    let mut v6_ext = Frame::syn(ip("fd09::1"), ip("fd00::1"), 80);
    v6_ext.ipv6_ext = vec![
        Ext::HopByHop,
        Ext::Fragment {
            offset: 0,
            more: true,
        },
        Ext::Auth,
    ];
    let shapes = [
        ("ipv4/tcp", Frame::syn(ip("10.9.0.1"), ip("10.0.0.1"), 80), 0),
        ("ipv4 options/tcp options", with_options, 8),
        (
            "802.1ad+802.1Q/ipv4/tcp",
            Frame::syn(ip("10.9.0.1"), ip("10.0.0.1"), 80)
                .vlan(0x88a8, 1)
                .vlan(0x8100, 2),
            0,
        ),
        ("ipv4/udp", Frame::udp(ip("10.9.0.1"), ip("10.0.0.1"), 53), 0),
        ("ipv6/tcp", Frame::syn(ip("fd09::1"), ip("fd00::1"), 80), 0),
        ("ipv6 ext/tcp", v6_ext, 0),
    ];
    for (name, frame, tcp_options) in shapes {
        let bytes = frame.bytes();
        assert_eq!(prog.run(&bytes), XDP_DROP, "{name}: the whole frame is dropped");
        let headers = frame.header_len() + tcp_options;
        let before = prog.counters(UNATTRIBUTED).malformed_passed;
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for cut in 14..headers {
            assert_eq!(
                prog.run(&bytes[..cut]),
                XDP_PASS,
                "{name} cut at {cut} of {headers}"
            );
        }
        let after = prog.counters(UNATTRIBUTED).malformed_passed;
        assert_eq!(
            after - before,
            (headers - 14) as u64,
            "{name}: every cut counted as malformed"
        );
    }
}

#[test]
fn malformed_headers_and_non_ip_pass() {
    let mut prog = Prog::new(1 << 16);
    let (listener, id) = prog.listener("10.0.0.1:80");
    prog.acl(AclList::Deny(listener), "10.9.0.0/16");
    let base = Frame::syn(ip("10.9.0.1"), ip("10.0.0.1"), 80);

    let mut bad_ihl = base.clone();
    bad_ihl.ipv4_ihl = Some(4);
    let mut bad_doff = base.clone();
    bad_doff.tcp_doff = Some(3);
    let mut bad_version = base.bytes();
    bad_version[14] = 0x55;
    for frame in [bad_ihl.bytes(), bad_doff.bytes(), bad_version] {
        assert_eq!(prog.run(&frame), XDP_PASS);
    }
    assert_eq!(prog.counters(UNATTRIBUTED).malformed_passed, 3);

    assert_eq!(prog.run(&arp()), XDP_PASS);
    let icmp = Frame::new(
        ip("10.9.0.1"),
        ip("10.0.0.1"),
        L4::Raw {
            proto: 1,
            bytes: vec![8, 0, 0, 0],
        },
    );
    assert_eq!(prog.run(&icmp.bytes()), XDP_PASS);
    assert_eq!(
        prog.counters(UNATTRIBUTED).malformed_passed,
        3,
        "ARP and ICMP are not malformed"
    );
    assert_eq!(prog.counters(id), Counters::default());
}

#[test]
fn wildcard_and_udp_listeners() {
    let mut prog = Prog::new(1 << 16);
    let (any4, id4) = prog.listener("0.0.0.0:8080");
    let (any6, id6) = prog.listener("[::]:8080");
    let (dns, id_dns) = prog.listener("udp:10.0.0.1:53");
    prog.acl(AclList::Deny(any4), "10.9.0.0/16");
    prog.acl(AclList::Deny(any6), "fd09::/16");
    prog.acl(AclList::Allow(dns), "10.1.0.0/16");

    assert_eq!(
        prog.run(&Frame::syn(ip("10.9.0.1"), ip("10.0.0.77"), 8080).bytes()),
        XDP_DROP
    );
    assert_eq!(
        prog.run(&Frame::syn(ip("10.8.0.1"), ip("10.0.0.77"), 8080).bytes()),
        XDP_PASS
    );
    assert_eq!(
        prog.run(&Frame::syn(ip("fd09::1"), ip("fd00::77"), 8080).bytes()),
        XDP_DROP
    );
    assert_eq!(
        prog.run(&Frame::udp(ip("10.2.0.1"), ip("10.0.0.1"), 53).bytes()),
        XDP_DROP
    );
    assert_eq!(
        prog.run(&Frame::udp(ip("10.1.0.1"), ip("10.0.0.1"), 53).bytes()),
        XDP_PASS
    );
    // TCP to the UDP listener's port is another listener (none).
    assert_eq!(
        prog.run(&Frame::syn(ip("10.2.0.1"), ip("10.0.0.1"), 53).bytes()),
        XDP_PASS
    );

    assert_eq!(
        (prog.counters(id4).drop_listener_deny, prog.counters(id4).passed),
        (1, 1)
    );
    assert_eq!(prog.counters(id6).drop_listener_deny, 1);
    let c = prog.counters(id_dns);
    assert_eq!((c.drop_not_allowed, c.passed), (1, 1));
}

#[test]
fn whole_list_replace_is_atomic_and_cleans_up() {
    let mut prog = Prog::new(1 << 16);
    let (listener, _) = prog.listener("10.0.0.1:80");
    let list = AclList::Allow(listener);
    let nets = |v: &[&str]| {
        v.iter()
            .map(|s| s.parse::<IpNet>().expect("cidr"))
            .collect::<Vec<_>>()
    };
    let syn = |src: &str| Frame::syn(ip(src), ip("10.0.0.1"), 80).bytes();

    prog.maps
        .acl_replace(&list, &nets(&["10.1.0.0/16", "10.2.0.0/16"]))
        .expect("replace");
    assert_eq!(prog.run(&syn("10.1.0.1")), XDP_PASS);
    assert_eq!(prog.run(&syn("10.3.0.1")), XDP_DROP);

    prog.maps
        .acl_replace(&list, &nets(&["10.3.0.0/16", "10.3.0.0/16", "10.3.7.7/16"]))
        .expect("replace");
    assert_eq!(prog.run(&syn("10.1.0.1")), XDP_DROP);
    assert_eq!(prog.run(&syn("10.3.0.1")), XDP_PASS);
    assert_eq!(
        prog.maps.acl_entries(&list).expect("entries"),
        nets(&["10.3.0.0/16"])
    );
    // The old generation is gone from the trie: only one entry remains in all.
    let listed = prog.maps.listeners().expect("listeners");
    assert_eq!(listed[0].allow_len, 1);

    // Emptying an allow list opens the listener again.
    prog.maps.acl_replace(&list, &[]).expect("replace");
    assert_eq!(prog.run(&syn("10.1.0.1")), XDP_PASS);

    // A family mismatch is refused before anything changes.
    assert!(
        prog.maps
            .acl_replace(&list, &nets(&["10.5.0.0/16", "fd00::/8"]))
            .is_err()
    );
    assert_eq!(prog.run(&syn("10.1.0.1")), XDP_PASS);
}

#[test]
fn single_entries_in_place_and_listener_lifecycle() {
    let mut prog = Prog::new(1 << 16);
    let (listener, id) = prog.listener("10.0.0.1:80");
    let allow = AclList::Allow(listener);
    let syn = |src: &str| Frame::syn(ip(src), ip("10.0.0.1"), 80).bytes();
    let net = |s: &str| s.parse::<IpNet>().expect("cidr");

    assert!(prog.maps.acl_add(&allow, net("10.1.0.0/16")).expect("add"));
    assert!(
        !prog.maps.acl_add(&allow, net("10.1.0.0/16")).expect("add twice"),
        "idempotent"
    );
    assert!(prog.maps.acl_add(&allow, net("10.2.0.0/16")).expect("add"));
    assert_eq!(prog.run(&syn("10.9.0.1")), XDP_DROP);
    prog.maps.acl_remove(&allow, net("10.1.0.0/16")).expect("remove");
    assert_eq!(
        prog.run(&syn("10.1.0.1")),
        XDP_DROP,
        "removed entry no longer allows"
    );
    assert!(
        prog.maps.acl_remove(&allow, net("10.1.0.0/16")).is_err(),
        "missing entry is an error"
    );
    prog.maps.acl_remove(&allow, net("10.2.0.0/16")).expect("remove");
    assert_eq!(
        prog.run(&syn("10.9.0.1")),
        XDP_PASS,
        "empty allow list means open"
    );

    prog.acl(AclList::Deny(listener), "10.9.0.0/16");
    assert_eq!(prog.run(&syn("10.9.0.1")), XDP_DROP);
    prog.maps.remove_listener(&listener).expect("remove listener");
    assert_eq!(prog.run(&syn("10.9.0.1")), XDP_PASS, "no longer a listener");
    let (_, again) = prog.listener("10.0.0.1:80");
    assert_eq!(again, id, "id reused");
    assert_eq!(
        prog.counters(again),
        Counters::default(),
        "counters start at zero"
    );
    assert_eq!(
        prog.run(&syn("10.9.0.1")),
        XDP_PASS,
        "old ACL entries did not survive"
    );
}
