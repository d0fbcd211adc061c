//! The per-source SYN limit at the NIC, run in the kernel with
//! BPF_PROG_TEST_RUN against real (pinned) maps.

use portcullis::xdp::{CookieOffer, SynLimit};
use portcullis_tests::frames::{self, Frame, tcp_flags};
use portcullis_tests::{Prog, ip};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

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
    prog.maps.set_syn_rate(&listener, 1, 5).expect("limit set");
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
    prog.maps.set_syn_rate(&listener, 0, 0).expect("limit off");
    assert!((0..50).all(|_| syn(&mut prog, "10.1.1.1", "10.0.0.1") == XDP_PASS));
}

#[test]
fn ipv6_sources_share_a_bucket_per_64() {
    let mut prog = Prog::new(1 << 10);
    let (listener, id) = prog.listener("[fd00::1]:80");
    prog.maps.set_syn_rate(&listener, 1, 3).expect("limit set");
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
    prog.maps.set_syn_rate(&listener, 1000, 1).expect("limit set");
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
            ..SynLimit::DEFAULT
        },
        SynLimit {
            rate: 1,
            burst: SynLimit::MAX + 1,
            ..SynLimit::DEFAULT
        },
        SynLimit {
            rate: 5,
            burst: 0,
            ..SynLimit::DEFAULT
        },
        SynLimit {
            budget: SynLimit::MAX + 1,
            ..SynLimit::DEFAULT
        },
    ] {
        let err = prog.maps.set_syn_limit(&listener, bad).expect_err("refused");
        assert!(err.to_string().contains("10.0.0.1:80"), "{err}");
    }
}

/// A Linux client's SYN options: MSS 1460, SACK permitted, timestamp 12345,
/// NOP, window scale 9.
const LINUX_OPTIONS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0x30, 0x39, 0, 0, 0, 0, 1, 3, 3, 9,
];
const CLIENT_SEQ: u32 = 7_000_000;

/// Sends `syn` and returns the cookie SYN-ACK XDP answered it with.
fn cookie_reply(prog: &mut Prog, syn: &Frame) -> frames::Reply {
    let (action, out) = prog.reply(&syn.bytes());
    assert_eq!(action, XDP_TX, "a SYN over the budget is answered at the NIC");
    let reply = frames::parse_reply(&syn.bytes(), &out);
    assert_eq!((reply.src, reply.dst), (syn.dst, syn.src));
    assert_eq!((reply.sport, reply.dport), (80, 40000));
    assert_eq!(reply.flags, tcp_flags::SYN | tcp_flags::ACK);
    assert_eq!(reply.ack, CLIENT_SEQ + 1);
    assert!(reply.payload.is_empty());
    reply
}

#[test]
fn syns_over_the_budget_get_cookies_once_the_ack_path_is_armed() {
    for (client, server, listener) in [
        ("10.1.1.1", "10.0.0.1", "10.0.0.1:80"),
        ("fd00:1::1", "fd00::1", "[fd00::1]:80"),
    ] {
        let mut prog = Prog::new(1 << 10);
        let (listener, id) = prog.listener(listener);
        let syn = Frame::syn(ip(client), ip(server), 80)
            .seq_ack(CLIENT_SEQ, 0)
            .tcp_options(&LINUX_OPTIONS);

        // A budget without its ACK path never answers: the kernel's own
        // handshake (and its own cookies) take every SYN.
        prog.maps.set_syn_budget(&listener, 2, None).expect("budget");
        assert!((0..5).all(|_| prog.run(&syn.bytes()) == XDP_PASS));

        let offer = CookieOffer { mss: 1400, wscale: 7 };
        prog.maps
            .set_syn_budget(&listener, 2, Some(offer))
            .expect("armed");
        assert_eq!(
            prog.maps.syn_limit(id).expect("limit").budget,
            2,
            "the per-source limit is kept beside the budget"
        );
        assert_eq!(
            [prog.run(&syn.bytes()), prog.run(&syn.bytes())],
            [XDP_PASS; 2],
            "within the budget"
        );
        let reply = cookie_reply(&mut prog, &syn);
        // MSS offered; SACK permitted; our timestamp echoes the client's and
        // carries its window scale (9) and SACK (bit 4) for the synproxy; our scale.
        let o = &reply.options;
        assert_eq!(o.len(), 20, "{o:?}");
        assert_eq!(&o[..4], &[2, 4, 0x05, 0x78], "MSS 1400");
        assert_eq!(&o[4..8], &[4, 2, 8, 10], "SACK permitted, then the timestamp");
        let tsval = u32::from_be_bytes(o[8..12].try_into().expect("4"));
        assert_eq!(
            tsval & 0x1f,
            9 | 1 << 4,
            "the client's scale and SACK in our timestamp"
        );
        assert_eq!(
            &o[12..16],
            &12345u32.to_be_bytes(),
            "the client's timestamp echoed"
        );
        assert_eq!(&o[16..20], &[1, 3, 3, 7], "our window scale");
        // Stateless: the same SYN gets the same cookie.
        assert_eq!(cookie_reply(&mut prog, &syn).seq, reply.seq);

        // A SYN without options: MSS only, no timestamp to carry anything else.
        let bare = Frame::syn(ip(client), ip(server), 80).seq_ack(CLIENT_SEQ, 0);
        let reply = cookie_reply(&mut prog, &bare);
        assert_eq!(&reply.options[..4], &[2, 4, 0x05, 0x78]);
        assert!(reply.options[4..].iter().all(|&b| b == 1), "{:?}", reply.options);

        // Established traffic is never budgeted.
        let data = Frame::tcp(ip(client), ip(server), 80, 0x18, b"GET /".to_vec());
        assert_eq!(prog.run(&data.bytes()), XDP_PASS);
        let c = prog.maps.syn_counters(id).expect("counters");
        assert_eq!((c.within, c.cookies, c.cookie_failed), (10, 3, 0), "{c:?}");

        // Off: the kernel takes every SYN again.
        prog.maps.set_syn_budget(&listener, 0, Some(offer)).expect("off");
        assert!((0..5).all(|_| prog.run(&syn.bytes()) == XDP_PASS));
    }
}
