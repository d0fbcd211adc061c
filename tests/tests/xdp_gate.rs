//! The Gatekeeper at the NIC on crafted frames (BPF_PROG_TEST_RUN): a gated
//! `503` listener holds the whole exchange with a SYN cookie and answers the
//! canned 503; `reset` and `drop` modes act on the SYN; an open gate passes
//! only while the proxy's heartbeat is live; the ACLs still come first.

use std::time::Duration;

use portcullis::xdp::{AclList, GateMode, ListenerAddr};
use portcullis_common::GATE_RESPONSE;
use portcullis_tests::frames::{self, Frame, Reply, tcp_flags};
use portcullis_tests::{Prog, ip};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const CLIENT_SEQ: u32 = 7_000_000;
const REQUEST: &[u8] = b"GET /orders HTTP/1.1\r\nHost: api\r\n\r\n";

/// A reply as the client would parse it; the gate's carry no TCP options.
fn parse(request: &[u8], frame: &[u8]) -> Reply {
    let reply = frames::parse_reply(request, frame);
    assert!(reply.options.is_empty(), "no TCP options: {:?}", reply.options);
    reply
}

/// The whole exchange of one client with a gated `503` listener.
fn exchange(client: &str, server: &str, listener: &str) {
    use tcp_flags::{ACK, FIN, PSH, RST, SYN};
    let mut prog = Prog::new(1 << 12);
    let (_, id) = prog.gated(listener, GateMode::Http503);
    let (c, s) = (ip(client), ip(server));
    let seg = |flags: u8, seq: u32, ack: u32, payload: &[u8]| {
        Frame::tcp(c, s, 80, flags, payload.to_vec()).seq_ack(seq, ack)
    };

    let syn = Frame::syn(c, s, 80).seq_ack(CLIENT_SEQ, 0);
    let (action, out) = prog.reply(&syn.bytes());
    assert_eq!(action, XDP_TX, "a SYN to a gated 503 listener is answered");
    let synack = parse(&syn.bytes(), &out);
    assert_eq!((synack.src, synack.dst), (s, c));
    assert_eq!((synack.sport, synack.dport), (80, 40000));
    assert_eq!(synack.flags, SYN | ACK);
    assert_eq!(synack.ack, CLIENT_SEQ + 1);
    assert!(synack.payload.is_empty());
    let cookie = synack.seq;

    // A retransmitted SYN gets the same answer: nothing was remembered.
    let (action, out) = prog.reply(&syn.bytes());
    assert_eq!(action, XDP_TX);
    assert_eq!(parse(&syn.bytes(), &out).seq, cookie);

    // The handshake's ACK is absorbed: the kernel never sees the connection.
    let (action, _) = prog.reply(&seg(ACK, CLIENT_SEQ + 1, cookie + 1, b"").bytes());
    assert_eq!(action, XDP_DROP);

    // The request is answered with the canned 503 and a FIN.
    let request = seg(ACK | PSH, CLIENT_SEQ + 1, cookie + 1, REQUEST);
    let (action, out) = prog.reply(&request.bytes());
    assert_eq!(action, XDP_TX);
    let response = parse(&request.bytes(), &out);
    assert_eq!(response.flags, ACK | PSH | FIN);
    assert_eq!(response.seq, cookie + 1);
    let request_len = u32::try_from(REQUEST.len()).expect("small");
    assert_eq!(response.ack, CLIENT_SEQ + 1 + request_len);
    assert_eq!(response.payload, GATE_RESPONSE);
    // Retransmitted request, same answer.
    let (action, out) = prog.reply(&request.bytes());
    assert_eq!(action, XDP_TX);
    assert_eq!(parse(&request.bytes(), &out).payload, GATE_RESPONSE);

    // A request whose acknowledgement is not our cookie is not ours.
    let (action, _) = prog.reply(&seg(ACK | PSH, CLIENT_SEQ + 1, cookie + 2, REQUEST).bytes());
    assert_eq!(action, XDP_PASS, "a bad cookie goes to the kernel");
    let (action, _) = prog.reply(&seg(ACK | PSH, CLIENT_SEQ + 1, cookie ^ 0x0100_0000, REQUEST).bytes());
    assert_eq!(action, XDP_PASS);

    // The client acknowledges our answer and FIN, and closes: its FIN gets its ACK.
    let after = CLIENT_SEQ + 1 + request_len;
    let answered = cookie + 1 + u32::try_from(GATE_RESPONSE.len()).expect("small") + 1;
    let (action, _) = prog.reply(&seg(ACK, after, answered, b"").bytes());
    assert_eq!(action, XDP_DROP, "the ACK of our answer is absorbed");
    let fin = seg(ACK | FIN, after, answered, b"");
    let (action, out) = prog.reply(&fin.bytes());
    assert_eq!(action, XDP_TX);
    let fin_ack = parse(&fin.bytes(), &out);
    assert_eq!(
        (fin_ack.flags, fin_ack.seq, fin_ack.ack),
        (ACK, answered, after + 1)
    );
    // A FIN before any request (the client gives up) is acknowledged too.
    let early = seg(ACK | FIN, CLIENT_SEQ + 1, cookie + 1, b"");
    let (action, out) = prog.reply(&early.bytes());
    assert_eq!(action, XDP_TX);
    assert_eq!(parse(&early.bytes(), &out).ack, CLIENT_SEQ + 2);

    // A reset is left to the kernel (it may own a connection from before the gate closed).
    let (action, _) = prog.reply(&seg(RST | ACK, after, answered, b"").bytes());
    assert_eq!(action, XDP_PASS);

    let counters = prog.counters(id);
    assert_eq!(
        (
            counters.gate_syn_ack,
            counters.gate_503,
            counters.gate_fin_ack,
            counters.gate_absorbed,
            counters.passed
        ),
        (2, 2, 2, 2, 3),
        "{counters:?}"
    );
}

#[test]
fn a_gated_503_listener_answers_the_whole_exchange_ipv4() {
    exchange("10.1.2.3", "10.0.0.1", "10.0.0.1:80");
}

#[test]
fn a_gated_503_listener_answers_the_whole_exchange_ipv6() {
    exchange("fd00:1::3", "fd00::1", "[fd00::1]:80");
}

#[test]
fn reset_and_drop_modes_act_on_the_syn_only() {
    let mut prog = Prog::new(1 << 12);
    let (_, tls) = prog.gated("10.0.0.1:443", GateMode::Reset);
    let (_, quiet) = prog.gated("10.0.0.1:8443", GateMode::Drop);
    let (c, s) = (ip("10.1.2.3"), ip("10.0.0.1"));
    let syn = Frame::syn(c, s, 443).seq_ack(CLIENT_SEQ, 0);
    let (action, out) = prog.reply(&syn.bytes());
    assert_eq!(action, XDP_TX);
    let reset = parse(&syn.bytes(), &out);
    assert_eq!(
        (reset.flags, reset.seq, reset.ack),
        (tcp_flags::RST | tcp_flags::ACK, 0, CLIENT_SEQ + 1)
    );
    let data = Frame::tcp(c, s, 443, tcp_flags::ACK, REQUEST.to_vec());
    assert_eq!(prog.run(&data.bytes()), XDP_PASS, "only the SYN is answered");
    assert_eq!(prog.run(&Frame::syn(c, s, 8443).bytes()), XDP_DROP);
    assert_eq!(prog.counters(tls).gate_reset, 1);
    assert_eq!(prog.counters(tls).passed, 1);
    assert_eq!(prog.counters(quiet).gate_drop, 1);
}

#[test]
fn an_open_gate_passes_only_while_the_proxy_beats() {
    let mut prog = Prog::new(1 << 12);
    let (listener, id) = prog.gated("10.0.0.1:80", GateMode::Http503);
    let syn = Frame::syn(ip("10.1.2.3"), ip("10.0.0.1"), 80);
    prog.maps
        .set_gate(&listener, GateMode::Http503, true)
        .expect("open");
    assert_eq!(prog.run(&syn.bytes()), XDP_TX, "open, but no proxy ever beat");
    prog.maps.take_over(4242, Duration::from_secs(30)).expect("beat");
    assert_eq!(prog.run(&syn.bytes()), XDP_PASS, "open and attended");
    assert!(prog.maps.heartbeat().expect("heartbeat").live());
    assert!(prog.maps.beat(4242).expect("beat"), "the owner beats");
    assert!(!prog.maps.beat(1).expect("beat"), "another proxy does not");
    prog.maps.stop_beating(1).expect("not the owner");
    assert_eq!(prog.run(&syn.bytes()), XDP_PASS, "only the owner stops the beat");
    prog.maps.stop_beating(4242).expect("owner");
    assert_eq!(prog.run(&syn.bytes()), XDP_TX, "the proxy stopped: gated again");
    prog.maps.take_over(4242, Duration::from_nanos(1)).expect("beat");
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(prog.run(&syn.bytes()), XDP_TX, "a stale beat counts as no proxy");
    prog.maps.take_over(4242, Duration::from_secs(30)).expect("beat");
    prog.maps
        .set_gate(&listener, GateMode::Http503, false)
        .expect("close");
    assert_eq!(prog.run(&syn.bytes()), XDP_TX, "closed by the proxy");
    assert_eq!(prog.counters(id).passed, 2);

    // A listener with no gate mode (ACLs only) is never gated.
    let plain: ListenerAddr = "10.0.0.1:81".parse().expect("listener");
    prog.maps.add_listener(&plain).expect("added");
    prog.maps.stop_beating(4242).expect("owner");
    assert_eq!(
        prog.run(&Frame::syn(ip("10.1.2.3"), ip("10.0.0.1"), 81).bytes()),
        XDP_PASS
    );
}

#[test]
fn the_acls_come_before_the_gate() {
    let mut prog = Prog::new(1 << 12);
    let (listener, id) = prog.gated("10.0.0.1:80", GateMode::Http503);
    prog.maps
        .acl_add(&AclList::Deny(listener), "10.9.0.0/16".parse().expect("cidr"))
        .expect("acl");
    let denied = Frame::syn(ip("10.9.1.1"), ip("10.0.0.1"), 80);
    assert_eq!(prog.run(&denied.bytes()), XDP_DROP);
    let c = prog.counters(id);
    assert_eq!((c.drop_listener_deny, c.gate_syn_ack), (1, 0));
}
