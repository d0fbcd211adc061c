//! The XDP program under `BPF_PROG_TEST_RUN`, on frames from the fuzzer:
//! it never aborts, never passes a frame from a denied source to the
//! listener that denies it, and answers (`XDP_TX`) only TCP frames to the
//! gated listener. Needs root and a built program (`cargo xtask fuzz xdp`).
#![no_main]

use std::cell::RefCell;
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use portcullis::xdp::{AclList, GateMode, Instance, ListenerAddr, Loaded};

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The program with pins of its own (`fuzzxdp<pid>`; `cargo xtask fuzz` removes
/// them after the run, crashed or not): the open listener 10.0.0.1:80 that
/// denies 192.0.2.0/24, and the gated 10.0.0.1:443.
fn setup() -> Loaded {
    let instance = Instance::new(&format!("fuzzxdp{}", std::process::id())).expect("instance name");
    let loaded = instance.load(1 << 10).expect("the program loads and verifies");
    let mut maps = instance.maps().expect("maps");
    let open: ListenerAddr = "10.0.0.1:80".parse().expect("listener");
    maps.add_listener(&open).expect("listener added");
    maps.acl_add(&AclList::Deny(open), "192.0.2.0/24".parse().expect("cidr"))
        .expect("deny list");
    let gated: ListenerAddr = "10.0.0.1:443".parse().expect("listener");
    maps.add_listener(&gated).expect("listener added");
    maps.set_gate(&gated, GateMode::Http503, false)
        .expect("gate closed");
    loaded
}

thread_local! {
    static PROG: RefCell<Loaded> = RefCell::new(setup());
}

/// (source, destination, protocol, destination port) of an IPv4 frame (up
/// to two VLAN tags), as we read it; fragments and malformed transport
/// headers have no port, as the program's lists see them.
fn ipv4(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, Option<u16>)> {
    let mut at = 12;
    for _ in 0..2 {
        if matches!(frame.get(at..at + 2)?, [0x81, 0x00] | [0x88, 0xa8]) {
            at += 4;
        }
    }
    if frame.get(at..at + 2)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(at + 2..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    // A TCP header shorter than 20 bytes or cut off is passed as malformed:
    // the kernel drops it before any socket sees it.
    let l4 = ip.get(ihl..).unwrap_or_default();
    let whole = match ip[9] {
        6 => l4.len() >= 20 && usize::from(l4[12] >> 4) >= 5 && usize::from(l4[12] >> 4) * 4 <= l4.len(),
        _ => l4.len() >= 8,
    };
    let port = (!fragment && whole).then(|| u16::from_be_bytes([l4[2], l4[3]]));
    Some((src, dst, ip[9], port))
}

/// Frames `BPF_PROG_TEST_RUN` takes: an Ethernet header, and within one page with room around it.
const FRAME_LEN: std::ops::RangeInclusive<usize> = 14..=3000;

fuzz_target!(|frame: &[u8]| {
    if !FRAME_LEN.contains(&frame.len()) {
        return;
    }
    let action = PROG.with(|p| p.borrow_mut().test_run_frame(frame).expect("test run").0);
    assert_ne!(action, XDP_ABORTED, "the program aborted");
    let seen = ipv4(frame);
    let denied = seen.is_some_and(|(src, dst, proto, port)| {
        proto == 6
            && dst == Ipv4Addr::new(10, 0, 0, 1)
            && port == Some(80)
            && src.octets()[..3] == [192, 0, 2]
    });
    assert!(
        !(denied && action == XDP_PASS),
        "a denied source passed: {frame:02x?}"
    );
    if action == XDP_TX {
        let ours = seen.is_some_and(|(_, dst, proto, port)| {
            proto == 6 && dst == Ipv4Addr::new(10, 0, 0, 1) && port == Some(443)
        });
        assert!(
            ours,
            "answered a frame that is not to the gated listener: {frame:02x?}"
        );
    }
});
