//! The per-source SYN limit at the NIC, run in the kernel with
//! BPF_PROG_TEST_RUN against real (pinned) maps.

use portcullis::xdp::SynLimit;
use portcullis_tests::{Prog, frames::Frame, ip};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn syn(prog: &mut Prog, src: &str, dst: &str) -> u32 {
    prog.run(&Frame::syn(ip(src), ip(dst), 80).bytes())
}

#[test]
fn a_source_over_its_rate_has_its_syns_dropped() {
    let mut prog = Prog::new(1 << 10);
    let (listener, id) = prog.listener("10.0.0.1:80");
    assert_eq!(
        prog.maps.syn_limit(id).expect("limit"),
        SynLimit::DEFAULT,
        "a new listener is limited by default"
    );
    prog.maps
        .set_syn_limit(&listener, SynLimit { rate: 1, burst: 5 })
        .expect("limit set");
    let verdicts: Vec<u32> = (0..8).map(|_| syn(&mut prog, "10.1.1.1", "10.0.0.1")).collect();
    assert_eq!(
        verdicts,
        [[XDP_PASS; 5].as_slice(), &[XDP_DROP; 3]].concat(),
        "a burst of 5"
    );
    // Only SYNs are limited: the source's established traffic still passes.
    let data = Frame::tcp(ip("10.1.1.1"), ip("10.0.0.1"), 80, 0x18, b"GET /".to_vec());
    assert_eq!(prog.run(&data.bytes()), XDP_PASS);
    assert_eq!(
        syn(&mut prog, "10.1.1.2", "10.0.0.1"),
        XDP_PASS,
        "each /32 has its own bucket"
    );
    let c = prog.maps.syn_counters(id).expect("counters");
    assert_eq!((c.within, c.over_rate), (6, 3), "{c:?}");
    assert_eq!(
        prog.counters(id).passed,
        7,
        "dropped SYNs are not counted as passed"
    );

    // Off: nothing is limited.
    prog.maps
        .set_syn_limit(&listener, SynLimit { rate: 0, burst: 0 })
        .expect("limit off");
    assert!((0..50).all(|_| syn(&mut prog, "10.1.1.1", "10.0.0.1") == XDP_PASS));
}

#[test]
fn ipv6_sources_share_a_bucket_per_64() {
    let mut prog = Prog::new(1 << 10);
    let (listener, id) = prog.listener("[fd00::1]:80");
    prog.maps
        .set_syn_limit(&listener, SynLimit { rate: 1, burst: 3 })
        .expect("limit set");
    let dst = "fd00::1";
    let verdicts: Vec<u32> = ["fd00:1::1", "fd00:1::2", "fd00:1:0:0:ffff::3", "fd00:1::4"]
        .iter()
        .map(|src| syn(&mut prog, src, dst))
        .collect();
    assert_eq!(
        verdicts,
        [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP],
        "one /64, one bucket"
    );
    assert_eq!(
        syn(&mut prog, "fd00:1:0:1::1", dst),
        XDP_PASS,
        "the next /64 has its own"
    );
    let c = prog.maps.syn_counters(id).expect("counters");
    assert_eq!((c.within, c.over_rate), (4, 1), "{c:?}");
}

#[test]
fn a_bucket_refills_at_the_rate() {
    let mut prog = Prog::new(1 << 10);
    let (listener, _) = prog.listener("10.0.0.1:80");
    prog.maps
        .set_syn_limit(&listener, SynLimit { rate: 1000, burst: 1 })
        .expect("limit set");
    assert_eq!(syn(&mut prog, "10.1.1.1", "10.0.0.1"), XDP_PASS);
    assert_eq!(
        syn(&mut prog, "10.1.1.1", "10.0.0.1"),
        XDP_DROP,
        "the burst of 1 is spent"
    );
    // 1000/s: a token every millisecond, capped at the burst.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(syn(&mut prog, "10.1.1.1", "10.0.0.1"), XDP_PASS, "refilled");
    assert_eq!(
        syn(&mut prog, "10.1.1.1", "10.0.0.1"),
        XDP_DROP,
        "never beyond the burst"
    );
    // Limits the arithmetic cannot hold, or a rate with no burst, are refused.
    for bad in [
        SynLimit {
            rate: SynLimit::MAX + 1,
            burst: 1,
        },
        SynLimit {
            rate: 1,
            burst: SynLimit::MAX + 1,
        },
        SynLimit { rate: 5, burst: 0 },
    ] {
        let err = prog.maps.set_syn_limit(&listener, bad).expect_err("refused");
        assert!(err.to_string().contains("10.0.0.1:80"), "{err}");
    }
}
