//! The IPv4 list tables and the port array against a model: after every
//! in-place edit and whole-list replace, BPF_PROG_TEST_RUN verdicts on the
//! prefixes' edges and on random addresses are what set membership says.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use portcullis::xdp::AclList;
use portcullis_tests::{Prog, Rng, frames::Frame, ip};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Prefixes for the model test.
trait Prefixes {
    fn prefix(&mut self) -> Ipv4Net;
}

impl Prefixes for Rng {
    /// A prefix inside 10.0.0.0/14 (so prefixes overlap and nest), now and
    /// then a short one covering all of it, or more than a /8.
    fn prefix(&mut self) -> Ipv4Net {
        let len = match self.below(20) {
            0 => 5,
            1 => 12,
            2..=4 => 14 + self.below(10),
            5..=9 => 24,
            10..=13 => 25 + self.below(7),
            _ => 32,
        };
        let addr = 0x0a00_0000 | (self.next_u32() & 0x0003_ffff);
        Ipv4Net::new(Ipv4Addr::from(addr), u8::try_from(len).expect("≤ 32"))
            .expect("valid")
            .trunc()
    }
}

fn probes(model: &BTreeSet<Ipv4Net>, rng: &mut Rng) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for net in model {
        let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
        out.extend([first, last, first.wrapping_sub(1), last.wrapping_add(1)]);
        out.push(first + rng.below(last - first + 1));
    }
    out.extend((0..24).map(|_| 0x0a00_0000 | (rng.next_u32() & 0x0003_ffff)));
    out.into_iter().map(Ipv4Addr::from).collect()
}

fn check(prog: &mut Prog, list: &AclList, model: &BTreeSet<Ipv4Net>, rng: &mut Rng, step: &str) {
    let entries: Vec<IpNet> = model.iter().copied().map(IpNet::V4).collect();
    assert_eq!(prog.maps.acl_entries(list).expect("entries"), entries, "{step}");
    for addr in probes(model, rng) {
        let member = model.iter().any(|n| n.contains(&addr));
        let expected = if model.is_empty() || member {
            XDP_PASS
        } else {
            XDP_DROP
        };
        let frame = Frame::syn(addr.into(), ip("10.255.0.1"), 80).bytes();
        assert_eq!(
            prog.run(&frame),
            expected,
            "{step}: {addr} (in the list: {member}; list {model:?})"
        );
    }
}

#[test]
fn ipv4_tables_follow_every_edit_and_replace() {
    let mut prog = Prog::new(1 << 16);
    let (listener, _) = prog.listener("10.255.0.1:80");
    let list = AclList::Allow(listener);
    let mut model = BTreeSet::new();
    let mut rng = Rng(0x007a_b1e5);
    for step in 0..160 {
        let what = match rng.below(10) {
            0 => {
                let n = rng.below(24);
                let next: BTreeSet<Ipv4Net> = (0..n).map(|_| rng.prefix()).collect();
                let nets: Vec<IpNet> = next.iter().copied().map(IpNet::V4).collect();
                prog.maps.acl_replace(&list, &nets).expect("replace");
                model = next;
                format!("replace with {n}")
            }
            1..=4 if !model.is_empty() => {
                let index = rng.below(u32::try_from(model.len()).expect("small")) as usize;
                let net = *model.iter().nth(index).expect("in range");
                prog.maps.acl_remove(&list, IpNet::V4(net)).expect("remove");
                model.remove(&net);
                format!("remove {net}")
            }
            _ => {
                let net = rng.prefix();
                let added = prog.maps.acl_add(&list, IpNet::V4(net)).expect("add");
                assert_eq!(added, model.insert(net), "add {net} reports whether it was new");
                format!("add {net}")
            }
        };
        check(
            &mut prog,
            &list,
            &model,
            &mut rng,
            &format!("step {step} ({what})"),
        );
    }
    // Emptied, the list holds no table and no long-prefix map behind it.
    for net in model.clone() {
        prog.maps.acl_remove(&list, IpNet::V4(net)).expect("remove");
    }
    prog.maps
        .acl_replace(&list, &[IpNet::V4("10.0.0.7/32".parse().expect("cidr"))])
        .expect("replace");
    prog.maps.acl_replace(&list, &[]).expect("replace");
    assert_eq!(prog.maps.acl4_footprint().expect("footprint"), (0, 0));
}

#[test]
fn tables_of_removed_listeners_and_replaced_generations_are_freed() {
    let mut prog = Prog::new(1 << 16);
    let (a, _) = prog.listener("10.255.0.1:80");
    let (b, _) = prog.listener("10.255.0.2:80");
    let nets = |v: &[&str]| {
        v.iter()
            .map(|s| s.parse::<IpNet>().expect("cidr"))
            .collect::<Vec<_>>()
    };
    prog.maps
        .acl_replace(&AclList::Allow(a), &nets(&["10.1.0.0/16", "10.2.3.4/32"]))
        .expect("replace");
    prog.maps
        .acl_replace(&AclList::Deny(b), &nets(&["10.3.0.0/25", "10.3.0.128/26"]))
        .expect("replace");
    prog.maps
        .acl_replace(&AclList::Deny(b), &nets(&["10.4.0.0/25"]))
        .expect("replace");
    assert_eq!(
        prog.maps.acl4_footprint().expect("footprint"),
        (2, 2),
        "one table a list, one /24 each"
    );
    prog.maps.remove_listener(&a).expect("remove");
    assert_eq!(prog.maps.acl4_footprint().expect("footprint"), (1, 1));
    assert_eq!(
        prog.run(&Frame::syn(ip("10.4.0.1"), ip("10.255.0.2"), 80).bytes()),
        XDP_DROP
    );
    prog.maps.remove_listener(&b).expect("remove");
    assert_eq!(prog.maps.acl4_footprint().expect("footprint"), (0, 0));
}

#[test]
fn port_bits_find_specific_and_wildcard_listeners_and_forget_removed_ones() {
    let mut prog = Prog::new(1 << 16);
    let (specific, _) = prog.listener("10.255.0.1:443");
    let (wildcard, _) = prog.listener("0.0.0.0:443");
    let (v6, _) = prog.listener("[::]:443");
    prog.acl(AclList::Deny(specific), "10.1.0.0/16");
    prog.acl(AclList::Deny(wildcard), "10.2.0.0/16");
    prog.acl(AclList::Deny(v6), "fd02::/16");
    let syn = |src: &str, dst: &str| Frame::syn(ip(src), ip(dst), 443).bytes();
    assert_eq!(
        prog.run(&syn("10.1.0.9", "10.255.0.1")),
        XDP_DROP,
        "the specific listener"
    );
    assert_eq!(
        prog.run(&syn("10.2.0.9", "10.255.0.1")),
        XDP_PASS,
        "not the wildcard's list"
    );
    assert_eq!(prog.run(&syn("10.2.0.9", "10.255.0.9")), XDP_DROP, "the wildcard");
    assert_eq!(
        prog.run(&syn("fd02::9", "fd00::1")),
        XDP_DROP,
        "the IPv6 wildcard"
    );
    prog.maps.remove_listener(&specific).expect("remove");
    assert_eq!(
        prog.run(&syn("10.2.0.9", "10.255.0.1")),
        XDP_DROP,
        "now the wildcard's"
    );
    prog.maps.remove_listener(&wildcard).expect("remove");
    assert_eq!(
        prog.run(&syn("10.2.0.9", "10.255.0.1")),
        XDP_PASS,
        "no IPv4 listener left"
    );
    assert_eq!(
        prog.run(&syn("fd02::9", "fd00::1")),
        XDP_DROP,
        "the IPv6 one stays"
    );
    prog.maps.remove_listener(&v6).expect("remove");
    assert_eq!(prog.run(&syn("fd02::9", "fd00::1")), XDP_PASS);
}

/// Removes an instance's pins when the test ends, however it ends.
struct Pins(String);

impl Drop for Pins {
    fn drop(&mut self) {
        portcullis_tests::remove_pins(&self.0);
    }
}

#[test]
fn maps_of_abi_2_are_taken_over_with_their_lists() {
    use aya::maps::{Array, LpmTrie, Map, MapData};
    use portcullis::xdp::Instance;
    use portcullis_common::{AclV4, config_slot, map_names};

    let pins = Pins(portcullis_tests::unique_name("u"));
    let instance = Instance::new(&pins.0).expect("instance");
    let listener = "10.255.0.1:80".parse().expect("listener");
    {
        let _loaded = instance.load(1 << 16).expect("loads");
        let mut maps = instance.maps().expect("maps");
        maps.add_listener(&listener).expect("listener");
        let nets: Vec<IpNet> = ["10.1.0.0/16", "10.2.3.4/32", "10.2.3.64/26"]
            .iter()
            .map(|s| s.parse().expect("cidr"))
            .collect();
        maps.acl_replace(&AclList::Allow(listener), &nets)
            .expect("replace");
    }
    // What an ABI 2 program left: no port array, no values by id, no IPv4
    // tables, trie values 1.
    let pin = |map: &str| instance.pin_dir().join(map);
    for map in [
        map_names::PORTS,
        map_names::VALUES,
        map_names::ACL4_TABLES,
        map_names::ACL4_LONG,
    ] {
        std::fs::remove_file(pin(map)).expect("unpin");
    }
    let open = |map: &str| Map::from_map_data(MapData::from_pin(pin(map)).expect("pin")).expect("map");
    let mut config: Array<MapData, u32> = Array::try_from(open(map_names::CONFIG)).expect("config");
    config.set(config_slot::ABI, 2, 0).expect("ABI 2");
    let mut trie: LpmTrie<MapData, AclV4, u32> = LpmTrie::try_from(open(map_names::ACL_V4)).expect("trie");
    let keys: Vec<_> = trie.keys().map(|k| k.expect("key")).collect();
    assert_eq!(keys.len(), 3);
    for key in &keys {
        trie.insert(key, 1, 0).expect("value 1");
    }

    let loaded = instance.load(1 << 16).expect("ABI 2 maps are taken over");
    let mut prog = Prog::from_parts(loaded, instance.maps().expect("maps"));
    let syn = |src: &str| Frame::syn(ip(src), ip("10.255.0.1"), 80).bytes();
    for (src, expected) in [
        ("10.1.9.9", XDP_PASS),
        ("10.2.3.4", XDP_PASS),
        ("10.2.3.100", XDP_PASS),
        ("10.2.3.5", XDP_DROP),
        ("10.9.0.1", XDP_DROP),
    ] {
        assert_eq!(prog.run(&syn(src)), expected, "{src} after the takeover");
    }
    assert_eq!(
        prog.run(&Frame::syn(ip("10.9.0.1"), ip("10.255.0.1"), 81).bytes()),
        XDP_PASS
    );
    // In-place edits work on the taken-over lists.
    prog.maps
        .acl_remove(&AclList::Allow(listener), "10.2.3.4/32".parse().expect("cidr"))
        .expect("remove");
    assert_eq!(prog.run(&syn("10.2.3.4")), XDP_DROP);
    assert_eq!(prog.run(&syn("10.2.3.100")), XDP_PASS);
}

#[test]
fn several_specific_listeners_on_one_port_are_told_apart() {
    let mut prog = Prog::new(1 << 16);
    let (a, _) = prog.listener("10.255.0.1:8443");
    prog.acl(AclList::Deny(a), "10.1.0.0/16");
    let syn = |src: &str, dst: &str| Frame::syn(ip(src), ip(dst), 8443).bytes();
    assert_eq!(
        prog.run(&syn("10.1.0.9", "10.255.0.1")),
        XDP_DROP,
        "the only specific one"
    );
    assert_eq!(
        prog.run(&syn("10.1.0.9", "10.255.0.2")),
        XDP_PASS,
        "another address"
    );
    let (b, _) = prog.listener("10.255.0.2:8443");
    prog.acl(AclList::Deny(b), "10.2.0.0/16");
    let (c, _) = prog.listener("10.255.0.3:8443");
    prog.acl(AclList::Allow(c), "10.3.0.0/16");
    for (src, dst, expected) in [
        ("10.1.0.9", "10.255.0.1", XDP_DROP),
        ("10.2.0.9", "10.255.0.1", XDP_PASS),
        ("10.2.0.9", "10.255.0.2", XDP_DROP),
        ("10.1.0.9", "10.255.0.2", XDP_PASS),
        ("10.1.0.9", "10.255.0.3", XDP_DROP),
        ("10.3.0.9", "10.255.0.3", XDP_PASS),
        ("10.1.0.9", "10.255.0.4", XDP_PASS),
    ] {
        assert_eq!(
            prog.run(&syn(src, dst)),
            expected,
            "{src} → {dst} with three listeners"
        );
    }
    prog.maps.remove_listener(&a).expect("remove");
    prog.maps.remove_listener(&c).expect("remove");
    assert_eq!(prog.run(&syn("10.2.0.9", "10.255.0.2")), XDP_DROP, "the one left");
    assert_eq!(
        prog.run(&syn("10.1.0.9", "10.255.0.1")),
        XDP_PASS,
        "a removed one"
    );
    // A gate set after the fact is what XDP reads through the port's entry.
    prog.maps
        .set_gate(&b, portcullis::xdp::GateMode::Drop, false)
        .expect("gate");
    assert_eq!(
        prog.run(&syn("10.4.0.9", "10.255.0.2")),
        XDP_DROP,
        "gated, drop mode"
    );
}
