//! The Portcullis XDP program: judges every packet addressed to a listener
//! against the connection ACLs before the kernel spends anything on it.
//!
//! Order of checks for listener traffic: global deny list, the listener's deny
//! list, the listener's allow list (non-empty means default deny). Anything
//! that is not for a listener, or that cannot be parsed, is passed untouched.
//! IPv6 extension headers (hop-by-hop, routing, destination options, fragment,
//! AH) are skipped, up to [`MAX_IPV6_EXT`] of them; a longer chain, ESP, and
//! non-first fragments carry no usable ports, so only the global deny list is
//! applied to them (by source address) and they are otherwise passed.
//!
//! After the ACLs, a TCP listener whose gate is closed (the proxy says so, or
//! its heartbeat is stale) is answered here, per its gate mode: a SYN gets a
//! RST, or is dropped, or (`503` mode) the whole exchange is held statelessly
//! with a SYN cookie and the request is answered with a canned 503 + FIN; see
//! [`gate`].
//!
//! Before the gate, a SYN to a TCP listener takes a token from its source's
//! bucket ([`syn_within_rate`]: per /32 or /64, per CPU, at the listener's
//! rate); a source over the rate has its SYNs dropped. After the gate, a SYN
//! to an open listener takes a token from the listener's budget on this CPU;
//! over it, once the gateway has put the ACK path in place, XDP answers the
//! SYN itself with a SYN cookie in the kernel's format ([`cookie_syn_ack`]),
//! so a flood of spoofed sources never reaches the listener's SYN queue: the
//! client's ACK goes to the nftables synproxy, which checks the cookie and
//! makes the connection with the listener.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    btf_maps,
    helpers::generated as helpers,
    macros::{btf_map, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use portcullis_common::{
    Acl4Long, AclKind, AclScope, AclV4, AclV6, Counters, DEFAULT_ACL_CAPACITY, GATE_RESPONSE,
    GATE_RESPONSE_LEN, GATE_RESPONSE_SUM, LIST_SLOTS, ListenerKey, ListenerValue, MAX_LISTENERS, PORT_SLOTS,
    PortEntry, SYN_SOURCES, SynBucket, SynCounters, SynKey, SynLimit, TABLE_WORDS, UNATTRIBUTED, acl_flags,
    config_slot, family, gate_mode, heartbeat_slot, list_slot, port_bits, port_slot, proto, table_bits,
    table_position,
};

#[map]
static PC_LISTENERS: HashMap<ListenerKey, ListenerValue> = HashMap::pinned(MAX_LISTENERS, 0);
#[map]
static PC_ACL_V4: LpmTrie<AclV4, u32> = LpmTrie::pinned(DEFAULT_ACL_CAPACITY, 0);
#[map]
static PC_ACL_V6: LpmTrie<AclV6, u32> = LpmTrie::pinned(DEFAULT_ACL_CAPACITY, 0);
#[map]
static PC_CONFIG: Array<u32> = Array::pinned(config_slot::LEN, 0);
#[map]
static PC_COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_LISTENERS + 1, 0);
#[map]
static PC_HEARTBEAT: Array<u64> = Array::pinned(heartbeat_slot::LEN, 0);
#[map]
static PC_PORTS: Array<PortEntry> = Array::pinned(PORT_SLOTS, BPF_F_MMAPABLE);
#[map]
static PC_VALUES: Array<ListenerValue> = Array::pinned(MAX_LISTENERS + 1, BPF_F_MMAPABLE);
#[map]
static PC_SYN_LIMITS: Array<SynLimit> = Array::pinned(MAX_LISTENERS + 1, 0);
#[map]
static PC_SYN_RATE: LruPerCpuHashMap<SynKey, SynBucket> = LruPerCpuHashMap::pinned(SYN_SOURCES, 0);
#[map]
static PC_SYN_COUNTERS: PerCpuArray<SynCounters> = PerCpuArray::pinned(MAX_LISTENERS + 1, 0);
#[map]
static PC_SYN_BUDGET: PerCpuArray<SynBucket> = PerCpuArray::pinned(MAX_LISTENERS + 1, 0);
#[map]
static PC_ACL4_LONG: HashMap<Acl4Long, [u64; 4]> = HashMap::pinned(DEFAULT_ACL_CAPACITY, BPF_F_NO_PREALLOC);
/// One table per IPv4 list generation; the loader pins it by path.
#[btf_map]
static PC_ACL4_TABLES: btf_maps::ArrayOfMaps<
    btf_maps::Array<u64, { TABLE_WORDS as usize }>,
    { LIST_SLOTS as usize },
> = btf_maps::ArrayOfMaps::new();

/// The canned 503, where `bpf_xdp_store_bytes` can read it.
static RESPONSE: [u8; GATE_RESPONSE_LEN] = GATE_RESPONSE;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;
/// Most IPv6 extension headers skipped before giving up on the ports.
const MAX_IPV6_EXT: usize = 8;

/// What parsing found out about a frame.
enum Parsed {
    /// Not IP, or not TCP/UDP: not ours to judge.
    Other,
    /// Headers cut short or inconsistent.
    Malformed,
    /// IP traffic whose ports cannot be known (non-first fragment, ESP,
    /// extension chain too long): judged by source address only.
    NoPorts(Addrs),
    /// A TCP or UDP packet: where its headers are and its destination port.
    /// Its addresses are read only once a listener may be on the port.
    Ports(Head),
}

/// Where a TCP or UDP packet's headers are, and what [`find_port`] needs.
#[derive(Clone, Copy)]
struct Head {
    family: u8,
    proto: u8,
    dport_be: u16,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP/UDP header.
    l4: usize,
    /// Offset just past the IP payload (its declared length).
    end: usize,
}

#[derive(Clone, Copy)]
struct Addrs {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

#[derive(Clone, Copy)]
struct Flow {
    addrs: Addrs,
    proto: u8,
    dport_be: u16,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP/UDP header.
    l4: usize,
    /// Offset just past the IP payload (its declared length).
    end: usize,
    /// The first 20 bytes of the TCP header (zero for UDP).
    tcp: [u8; 20],
}

enum Verdict {
    Pass,
    Drop,
    /// The frame was rewritten into a reply: send it back out.
    Tx,
}

/// Entry point: attached to every interface the gateway guards.
#[xdp]
pub fn portcullis_xdp(ctx: XdpContext) -> u32 {
    match judge(&ctx) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Tx => xdp_action::XDP_TX,
    }
}

#[inline(always)]
fn judge(ctx: &XdpContext) -> Verdict {
    match parse(ctx) {
        Parsed::Other => Verdict::Pass,
        Parsed::Malformed => {
            count(UNATTRIBUTED, |c| c.malformed_passed += 1);
            Verdict::Pass
        }
        Parsed::NoPorts(addrs) => {
            if globally_denied(&addrs) {
                count(UNATTRIBUTED, |c| c.drop_global_deny += 1);
                return Verdict::Drop;
            }
            count(UNATTRIBUTED, |c| c.fragment_passed += 1);
            Verdict::Pass
        }
        Parsed::Ports(head) => {
            let Some(port) = find_port(&head) else {
                return Verdict::Pass;
            };
            // Parsing checked these bytes are there; the verifier wants it again.
            let Some(flow) = read_flow(ctx, head) else {
                return Verdict::Pass;
            };
            judge_flow(ctx, &flow, &port)
        }
    }
}

#[inline(always)]
fn judge_flow(ctx: &XdpContext, flow: &Flow, port: &Port) -> Verdict {
    let Some(listener) = find_listener(flow, port) else {
        return Verdict::Pass;
    };
    let id = listener.id;
    let addrs = &flow.addrs;
    if globally_denied(addrs) {
        count(id, |c| c.drop_global_deny += 1);
        return Verdict::Drop;
    }
    let acl = listener.acl;
    if acl & acl_flags::DENY_ACTIVE != 0 {
        let generation = u32::from(acl & acl_flags::DENY_GEN != 0);
        if acl_match(addrs, AclKind::Deny, generation, id) {
            count(id, |c| c.drop_listener_deny += 1);
            return Verdict::Drop;
        }
    }
    if acl & acl_flags::ALLOW_ACTIVE != 0 {
        let generation = u32::from(acl & acl_flags::ALLOW_GEN != 0);
        if !acl_match(addrs, AclKind::Allow, generation, id) {
            count(id, |c| c.drop_not_allowed += 1);
            return Verdict::Drop;
        }
    }
    let syn = flow.proto == proto::TCP && flow.tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let limit = if syn { PC_SYN_LIMITS.get(id) } else { None };
    if let Some(limit) = limit
        && limit.rate != 0
        && !syn_within_rate(flow, id, limit)
    {
        return Verdict::Drop;
    }
    if listener.gate_mode != gate_mode::NONE && flow.proto == proto::TCP && gated(&listener) {
        return gate(ctx, flow, listener.gate_mode, id);
    }
    if let Some(limit) = limit
        && limit.budget != 0
        && limit.cookies != 0
        && let Some(verdict) = over_budget(ctx, flow, id, limit)
    {
        return verdict;
    }
    count(id, |c| c.passed += 1);
    Verdict::Pass
}

/// Takes a token from `bucket`, refilled at `rate` per second up to `burst`;
/// false when it is empty. A bucket never used starts full.
#[inline(always)]
fn take_token(bucket: &mut SynBucket, rate: u32, burst: u32, now: u64) -> bool {
    let full = u64::from(burst) * SYN_TOKEN;
    let tokens = if bucket.last_ns == 0 {
        full
    } else {
        let elapsed = now.saturating_sub(bucket.last_ns).min(SYN_REFILL_CAP_NS);
        bucket.tokens.saturating_add(elapsed * u64::from(rate)).min(full)
    };
    bucket.last_ns = now;
    if tokens >= SYN_TOKEN {
        bucket.tokens = tokens - SYN_TOKEN;
        true
    } else {
        bucket.tokens = tokens;
        false
    }
}

/// A SYN over listener `id`'s budget on this CPU (its `limit` has a budget
/// and cookies armed): answered here with a cookie SYN-ACK. `None`: the SYN
/// goes to the kernel.
#[inline(always)]
fn over_budget(ctx: &XdpContext, flow: &Flow, id: u32, limit: &SynLimit) -> Option<Verdict> {
    let bucket = PC_SYN_BUDGET.get_ptr_mut(id)?;
    // SAFETY: a helper without arguments.
    let now = unsafe { helpers::bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
    if take_token(unsafe { &mut *bucket }, limit.budget, limit.budget, now) {
        return None;
    }
    let mut segment = Segment {
        seq: 0,
        ack: 0,
        flags: 0,
    };
    let mut options = [0u8; 20];
    let answered = cookie_syn_ack(ctx, flow, limit, &mut segment, &mut options)
        && send(ctx, flow, &segment, Some(&options), false);
    if let Some(counters) = PC_SYN_COUNTERS.get_ptr_mut(id) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
        let counters = unsafe { &mut *counters };
        if answered {
            counters.cookies += 1;
        } else {
            counters.cookie_failed += 1;
        }
    }
    Some(if answered { Verdict::Tx } else { Verdict::Drop })
}

/// Nanotokens per SYN.
const SYN_TOKEN: u64 = 1_000_000_000;
/// Longest refill counted at once, so `elapsed × rate` stays in 64 bits.
const SYN_REFILL_CAP_NS: u64 = 10_000_000_000;

/// Takes a token from the SYN's source bucket (its /32 or /64) on listener
/// `id`, whose `limit` has a rate; false, and counted, when the source is
/// over it.
#[inline(always)]
fn syn_within_rate(flow: &Flow, id: u32, limit: &SynLimit) -> bool {
    let src = &flow.addrs.src;
    let mut net = [src[0], src[1], src[2], src[3], 0, 0, 0, 0];
    if flow.addrs.family == family::V6 {
        net[4..].copy_from_slice(&src[4..8]);
    }
    let key = SynKey {
        id,
        family: u32::from(flow.addrs.family),
        net,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { helpers::bpf_ktime_get_ns() };
    let within = match PC_SYN_RATE.get_ptr_mut(&key) {
        // SAFETY: the pointer is to this CPU's copy of the value, valid for this run.
        Some(bucket) => take_token(unsafe { &mut *bucket }, limit.rate, limit.burst, now),
        None => {
            let mut fresh = SynBucket::default();
            let within = take_token(&mut fresh, limit.rate, limit.burst, now);
            // A full map evicts its least recent source; a failed insert lets this SYN by.
            let _ = PC_SYN_RATE.insert(&key, &fresh, 0);
            within
        }
    };
    if let Some(counters) = PC_SYN_COUNTERS.get_ptr_mut(id) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
        let counters = unsafe { &mut *counters };
        if within {
            counters.within += 1;
        } else {
            counters.over_rate += 1;
        }
    }
    within
}

/// A port some listener of the packet's family is on: its entry. Only the
/// pointer is kept: the main frame has 32 bytes to spare under the kernel 6.1
/// verifier's 512 for the gate's call chain.
struct Port {
    entry: *const PortEntry,
}

/// The packet's port, if a listener of its family is on it. Called before
/// the addresses are read, so traffic for no listener costs one array read.
#[inline(always)]
fn find_port(head: &Head) -> Option<Port> {
    let entry = PC_PORTS.get_ptr(port_slot(head.proto, u16::from_be(head.dport_be)))?;
    // SAFETY: the pointer is into a live map element; each field is read
    // once, in order, as userspace writes them (see PortEntry).
    let bits = unsafe { core::ptr::read_volatile(&raw const (*entry).bits) };
    let mine = if head.family == family::V4 {
        port_bits::SPECIFIC_V4 | port_bits::WILDCARD_V4
    } else {
        port_bits::SPECIFIC_V6 | port_bits::WILDCARD_V6
    };
    (bits & mine != 0).then_some(Port { entry })
}

/// The listener a flow is for. The port's entry names its wildcard
/// listeners and its only specific IPv4 one; only a port with several
/// specific listeners of the family costs a hash lookup.
#[inline(always)]
fn find_listener(flow: &Flow, port: &Port) -> Option<ListenerValue> {
    let entry = port.entry;
    // SAFETY: as in find_port; read again, so an edit between the two reads
    // is seen as if the packet came after it.
    let bits = unsafe { core::ptr::read_volatile(&raw const (*entry).bits) };
    let v4 = flow.addrs.family == family::V4;
    let (specific, wildcard) = if v4 {
        (port_bits::SPECIFIC_V4, port_bits::WILDCARD_V4)
    } else {
        (port_bits::SPECIFIC_V6, port_bits::WILDCARD_V6)
    };
    if bits & specific != 0 {
        // SAFETY: as above.
        let one = if v4 {
            unsafe { core::ptr::read_volatile(&raw const (*entry).one_v4) }
        } else {
            0
        };
        if one != 0 {
            // SAFETY: as above; `one` read again after the address confirms the pair.
            let (addr, again) = unsafe {
                (
                    core::ptr::read_volatile(&raw const (*entry).one_v4_addr),
                    core::ptr::read_volatile(&raw const (*entry).one_v4),
                )
            };
            if again == one
                && addr
                    == [
                        flow.addrs.dst[0],
                        flow.addrs.dst[1],
                        flow.addrs.dst[2],
                        flow.addrs.dst[3],
                    ]
            {
                return listener_by_id(one);
            }
        } else {
            let key = ListenerKey {
                addr: flow.addrs.dst,
                port_be: flow.dport_be,
                proto: flow.proto,
                family: flow.addrs.family,
                pad: 0,
            };
            if let Some(value) = PC_LISTENERS.get_ptr(&key) {
                // SAFETY: the pointer is into a live map element; the value is
                // Copy and read once.
                return Some(unsafe { *value });
            }
        }
    }
    if bits & wildcard == 0 {
        return None;
    }
    // SAFETY: as above.
    let id = unsafe {
        if v4 {
            core::ptr::read_volatile(&raw const (*entry).wildcard_v4)
        } else {
            core::ptr::read_volatile(&raw const (*entry).wildcard_v6)
        }
    };
    if id == 0 {
        return None;
    }
    listener_by_id(id)
}

/// A listener's value from `PC_VALUES`, each field read once.
#[inline(always)]
fn listener_by_id(id: u32) -> Option<ListenerValue> {
    let value = PC_VALUES.get_ptr(id)?;
    // SAFETY: the pointer is into a live map element; userspace stores each
    // field atomically, so each read sees one whole value of its field.
    unsafe {
        Some(ListenerValue {
            id,
            acl: core::ptr::read_volatile(&raw const (*value).acl),
            allow_len: 0,
            deny_len: 0,
            gate_mode: core::ptr::read_volatile(&raw const (*value).gate_mode),
            gate_open: core::ptr::read_volatile(&raw const (*value).gate_open),
        })
    }
}

#[inline(always)]
fn globally_denied(addrs: &Addrs) -> bool {
    let Some(flags) = PC_CONFIG.get(config_slot::GLOBAL_ACL) else {
        return false;
    };
    let flags = *flags;
    if flags & acl_flags::DENY_ACTIVE == 0 {
        return false;
    }
    let generation = u32::from(flags & acl_flags::DENY_GEN != 0);
    acl_match(addrs, AclKind::GlobalDeny, generation, 0)
}

/// Whether the source is in one generation of a list. IPv4 reads the list's
/// table (one word per 32 /24s) and, only for a /24 that holds longer
/// prefixes, that /24's 256-bit map; IPv6 asks the trie.
#[inline(always)]
fn acl_match(addrs: &Addrs, kind: AclKind, generation: u32, listener: u32) -> bool {
    let scope = AclScope::new(kind, generation, listener);
    if addrs.family == family::V4 {
        let addr = u32::from_be_bytes([addrs.src[0], addrs.src[1], addrs.src[2], addrs.src[3]]);
        let net24 = addr >> 8;
        let (word, shift) = table_position(net24);
        let Some(bits) = PC_ACL4_TABLES.get_value(list_slot(kind, generation, listener), &word) else {
            return false;
        };
        let state = (*bits >> shift) & 3;
        if state & table_bits::FULL != 0 {
            return true;
        }
        if state & table_bits::LONG == 0 {
            return false;
        }
        let Some(long) = PC_ACL4_LONG.get_ptr(&Acl4Long { scope, net24 }) else {
            return false;
        };
        let host = addr & 0xff;
        // SAFETY: the pointer is into a live map element, read once.
        let covered = unsafe { (*long)[(host >> 6) as usize & 3] };
        (covered >> (host & 63)) & 1 != 0
    } else {
        let key = Key::new(
            AclScope::BITS + 128,
            AclV6 {
                scope,
                addr: addrs.src,
            },
        );
        PC_ACL_V6.get(&key).is_some()
    }
}

/// The empty program: `cargo xtask bench xdp`'s floor.
#[xdp]
pub fn portcullis_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(slot: u32, bump: impl FnOnce(&mut Counters)) {
    if let Some(counters) = PC_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU element of a live map: no other writer on this CPU
        // while the program runs.
        bump(unsafe { &mut *counters });
    }
}

/// Bounds-checked pointer to a `T` at `offset` bytes into the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads `N` bytes at `offset`, or `None` past the end of the frame.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    // SAFETY: ptr_at checked that N bytes from offset are inside the frame;
    // [u8; N] has alignment 1.
    ptr_at::<[u8; N]>(ctx, offset).map(|p| unsafe { *p })
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = bytes::<ETH_HLEN>(ctx, 0) else {
        return Parsed::Malformed;
    };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = bytes::<4>(ctx, offset) else {
            return Parsed::Malformed;
        };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(ip) = bytes::<20>(ctx, offset) else {
        return Parsed::Malformed;
    };
    let ihl = usize::from(ip[0] & 0x0f);
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Parsed::Malformed;
    }
    let addrs = || {
        Parsed::NoPorts(v4_addrs(&[
            ip[12], ip[13], ip[14], ip[15], ip[16], ip[17], ip[18], ip[19],
        ]))
    };
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return addrs();
    }
    let end = offset + usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    parse_l4(
        ctx,
        family::V4,
        Ip {
            l3: offset,
            l4: offset + ihl * 4,
            end,
        },
        ip[9],
        addrs,
    )
}

/// An IPv4 packet's addresses from its header's last 8 bytes.
#[inline(always)]
fn v4_addrs(both: &[u8; 8]) -> Addrs {
    // Widened as integers: zeroing the other 12 bytes of an array would be a
    // call to the byte loop BPF has for `memset`.
    let padded = |at: usize| {
        u128::from(u32::from_ne_bytes([
            both[at],
            both[at + 1],
            both[at + 2],
            both[at + 3],
        ]))
        .to_ne_bytes()
    };
    Addrs {
        src: padded(0),
        dst: padded(4),
        family: family::V4,
    }
}

/// An IPv6 packet's addresses from the 32 bytes after its header's first 8.
#[inline(always)]
fn v6_addrs(both: &[u8; 32]) -> Addrs {
    let mut addrs = Addrs {
        src: [0; 16],
        dst: [0; 16],
        family: family::V6,
    };
    addrs.src.copy_from_slice(&both[..16]);
    addrs.dst.copy_from_slice(&both[16..]);
    addrs
}

/// Where the IP header, the transport header and the IP payload's end are.
#[derive(Clone, Copy)]
struct Ip {
    l3: usize,
    l4: usize,
    end: usize,
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(ip) = bytes::<8>(ctx, offset) else {
        return Parsed::Malformed;
    };
    if ip[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    // The answer for a packet whose ports cannot be known.
    let addrs = || match bytes::<32>(ctx, offset + 8) {
        Some(both) => Parsed::NoPorts(v6_addrs(&both)),
        None => Parsed::Malformed,
    };
    let mut next = ip[6];
    let mut cursor = offset + 40;
    let end = cursor + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ptr_at::<u8>(ctx, cursor - 1).is_none() {
        return Parsed::Malformed;
    }
    for _ in 0..MAX_IPV6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units.
            0 | 43 | 60 => {
                let Some(ext) = bytes::<2>(ctx, cursor) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                cursor += (usize::from(ext[1]) + 1) * 8;
            }
            // Fragment header: only the first fragment carries the ports.
            44 => {
                let Some(ext) = bytes::<8>(ctx, cursor) else {
                    return Parsed::Malformed;
                };
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return addrs();
                }
                next = ext[0];
                cursor += 8;
            }
            // Authentication header: length in 4-byte units, minus 2.
            51 => {
                let Some(ext) = bytes::<2>(ctx, cursor) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                cursor += (usize::from(ext[1]) + 2) * 4;
            }
            _ => {
                return parse_l4(
                    ctx,
                    family::V6,
                    Ip {
                        l3: offset,
                        l4: cursor,
                        end,
                    },
                    next,
                    addrs,
                );
            }
        }
    }
    match next {
        0 | 43 | 44 | 50 | 51 | 60 => addrs(),
        _ => parse_l4(
            ctx,
            family::V6,
            Ip {
                l3: offset,
                l4: cursor,
                end,
            },
            next,
            addrs,
        ),
    }
}

/// The transport header at `ip.l4`; `no_ports` answers for ESP.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, family: u8, ip: Ip, protocol: u8, no_ports: impl FnOnce() -> Parsed) -> Parsed {
    let offset = ip.l4;
    let dport_be = match protocol {
        proto::TCP => {
            let Some(tcp) = bytes::<13>(ctx, offset) else {
                return Parsed::Malformed;
            };
            let header_len = usize::from(tcp[12] >> 4) * 4;
            if header_len < 20 || ptr_at::<u8>(ctx, offset + header_len - 1).is_none() {
                return Parsed::Malformed;
            }
            u16::from_ne_bytes([tcp[2], tcp[3]])
        }
        proto::UDP => {
            let Some(udp) = bytes::<8>(ctx, offset) else {
                return Parsed::Malformed;
            };
            u16::from_ne_bytes([udp[2], udp[3]])
        }
        // ESP hides its payload: no ports to judge.
        50 => return no_ports(),
        _ => return Parsed::Other,
    };
    Parsed::Ports(Head {
        family,
        proto: protocol,
        dport_be,
        l3: ip.l3,
        l4: ip.l4,
        end: ip.end,
    })
}

/// A packet's addresses and TCP header, read once a listener may be on its port.
#[inline(always)]
fn read_flow(ctx: &XdpContext, head: Head) -> Option<Flow> {
    let addrs = if head.family == family::V4 {
        v4_addrs(&bytes::<8>(ctx, head.l3 + 12)?)
    } else {
        v6_addrs(&bytes::<32>(ctx, head.l3 + 8)?)
    };
    let tcp = if head.proto == proto::TCP {
        bytes::<20>(ctx, head.l4)?
    } else {
        [0; 20]
    };
    Some(Flow {
        addrs,
        proto: head.proto,
        dport_be: head.dport_be,
        l3: head.l3,
        l4: head.l4,
        end: head.end,
        tcp,
    })
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
/// Length of the canned response as TCP sequence space.
const RESPONSE_SEQ: u32 = GATE_RESPONSE_LEN as u32;

/// Whether a listener counts as gated: the proxy closed its gate, or no live
/// proxy has beaten lately (crash, restart).
#[inline(always)]
fn gated(listener: &ListenerValue) -> bool {
    if listener.gate_open == 0 {
        return true;
    }
    let (Some(beat), Some(timeout)) = (
        PC_HEARTBEAT.get(heartbeat_slot::BEAT),
        PC_HEARTBEAT.get(heartbeat_slot::TIMEOUT),
    ) else {
        return true;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { helpers::bpf_ktime_get_ns() };
    *beat == 0 || now.saturating_sub(*beat) > *timeout
}

#[inline(always)]
fn be32(bytes: &[u8; 20], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Answers a TCP packet for a gated listener.
///
/// `reset` and `drop` modes act on the SYN only. `503` mode holds the whole
/// exchange without state: the SYN-ACK's sequence number is a SYN cookie
/// made over the 4-tuple (with client sequence 0, so that any later segment
/// can be checked from its acknowledgement number alone). A segment whose
/// acknowledgement validates as `cookie + 1` is the handshake's ACK (absorbed)
/// or the request (answered with the canned 503 + FIN); one that validates as
/// `cookie + 1 + len(503) (+1)` acknowledges our answer (absorbed; a FIN gets
/// its ACK). Nothing else is ours: it goes to the kernel, which owns any
/// connection made before the gate closed. A function of its own, so that
/// its buffers are not in the frame of the path every packet takes.
#[inline(never)]
fn gate(ctx: &XdpContext, flow: &Flow, mode: u32, id: u32) -> Verdict {
    let flags = flow.tcp[13];
    let seq = be32(&flow.tcp, 4);
    let ack = be32(&flow.tcp, 8);
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        return match mode {
            gate_mode::HTTP_503 => match syn_cookie(flow) {
                Some(cookie) if reply(ctx, flow, cookie, seq.wrapping_add(1), TCP_SYN | TCP_ACK, false) => {
                    count(id, |c| c.gate_syn_ack += 1);
                    Verdict::Tx
                }
                _ => failed(id),
            },
            gate_mode::RESET => {
                if reply(ctx, flow, 0, seq.wrapping_add(1), TCP_RST | TCP_ACK, false) {
                    count(id, |c| c.gate_reset += 1);
                    Verdict::Tx
                } else {
                    failed(id)
                }
            }
            _ => {
                count(id, |c| c.gate_drop += 1);
                Verdict::Drop
            }
        };
    }
    if mode != gate_mode::HTTP_503 || flags & TCP_ACK == 0 || flags & (TCP_RST | TCP_SYN) != 0 {
        count(id, |c| c.passed += 1);
        return Verdict::Pass;
    }
    let header = usize::from(flow.tcp[12] >> 4) * 4;
    let data = (flow.end.saturating_sub(flow.l4 + header) & 0xffff) as u32;
    let fin = u32::from(flags & TCP_FIN != 0);
    if cookie_ok(flow, ack.wrapping_sub(1)) {
        if data > 0 {
            let acked = seq.wrapping_add(data).wrapping_add(fin);
            if reply(ctx, flow, ack, acked, TCP_ACK | TCP_PSH | TCP_FIN, true) {
                count(id, |c| c.gate_503 += 1);
                return Verdict::Tx;
            }
            return failed(id);
        }
        if fin == 1 && reply(ctx, flow, ack, seq.wrapping_add(1), TCP_ACK, false) {
            count(id, |c| c.gate_fin_ack += 1);
            return Verdict::Tx;
        }
        count(id, |c| c.gate_absorbed += 1);
        return Verdict::Drop;
    }
    let answered = cookie_ok(flow, ack.wrapping_sub(1 + RESPONSE_SEQ))
        || cookie_ok(flow, ack.wrapping_sub(2 + RESPONSE_SEQ));
    if !answered {
        count(id, |c| c.passed += 1);
        return Verdict::Pass;
    }
    if fin == 1 {
        let acked = seq.wrapping_add(data).wrapping_add(1);
        if reply(ctx, flow, ack, acked, TCP_ACK, false) {
            count(id, |c| c.gate_fin_ack += 1);
            return Verdict::Tx;
        }
    }
    count(id, |c| c.gate_absorbed += 1);
    Verdict::Drop
}

/// A reply could not be written (the frame cannot be resized): dropped and counted.
#[inline(always)]
fn failed(id: u32) -> Verdict {
    count(id, |c| c.gate_failed += 1);
    Verdict::Drop
}

/// IPv4 and TCP headers (client to listener) as the cookie helpers read
/// them: the 4-tuple, client sequence `seq`, acknowledgement `ack`, no options.
#[inline(always)]
fn cookie_headers_v4(flow: &Flow, seq: u32, ack: u32) -> ([u8; 20], [u8; 20]) {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[9] = proto::TCP;
    ip[12..16].copy_from_slice(&flow.addrs.src[..4]);
    ip[16..20].copy_from_slice(&flow.addrs.dst[..4]);
    (ip, cookie_tcp(flow, seq, ack))
}

#[inline(always)]
fn cookie_headers_v6(flow: &Flow, seq: u32, ack: u32) -> ([u8; 40], [u8; 20]) {
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[6] = proto::TCP;
    ip[8..24].copy_from_slice(&flow.addrs.src);
    ip[24..40].copy_from_slice(&flow.addrs.dst);
    (ip, cookie_tcp(flow, seq, ack))
}

#[inline(always)]
fn cookie_tcp(flow: &Flow, seq: u32, ack: u32) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[..4].copy_from_slice(&flow.tcp[..4]);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp
}

/// A SYN cookie for the flow's 4-tuple (client sequence 0). Out of line,
/// like [`cookie_checks`], to keep the gate's frame small.
#[inline(never)]
fn syn_cookie(flow: &Flow) -> Option<u32> {
    // SAFETY: the helpers read fixed-size, initialised stack buffers.
    let made = unsafe {
        if flow.addrs.family == family::V4 {
            let (mut ip, mut tcp) = cookie_headers_v4(flow, 0, 0);
            helpers::bpf_tcp_raw_gen_syncookie_ipv4(ip.as_mut_ptr().cast(), tcp.as_mut_ptr().cast(), 20)
        } else {
            let (mut ip, mut tcp) = cookie_headers_v6(flow, 0, 0);
            helpers::bpf_tcp_raw_gen_syncookie_ipv6(ip.as_mut_ptr().cast(), tcp.as_mut_ptr().cast(), 20)
        }
    };
    (made >= 0).then_some(made as u32)
}

/// Whether `cookie` is exactly a live SYN cookie this program made for the
/// flow's 4-tuple. The kernel's check accepts `cookie + 1..=3` too (they
/// decode as other MSS indexes); ours are made with index 0, so `cookie - 1`
/// must not check.
#[inline(always)]
fn cookie_ok(flow: &Flow, cookie: u32) -> bool {
    cookie_checks(flow, cookie) && !cookie_checks(flow, cookie.wrapping_sub(1))
}

#[inline(never)]
fn cookie_checks(flow: &Flow, cookie: u32) -> bool {
    // SAFETY: the helpers read fixed-size, initialised stack buffers.
    let checked = unsafe {
        if flow.addrs.family == family::V4 {
            let (mut ip, mut tcp) = cookie_headers_v4(flow, 1, cookie.wrapping_add(1));
            helpers::bpf_tcp_raw_check_syncookie_ipv4(ip.as_mut_ptr().cast(), tcp.as_mut_ptr().cast())
        } else {
            let (mut ip, mut tcp) = cookie_headers_v6(flow, 1, cookie.wrapping_add(1));
            helpers::bpf_tcp_raw_check_syncookie_ipv6(ip.as_mut_ptr().cast(), tcp.as_mut_ptr().cast())
        }
    };
    checked == 0
}

/// What a SYN's TCP options ask for, as a SYN cookie can keep it.
#[derive(Clone, Copy, Default)]
struct SynOptions {
    /// The client's timestamp (`None`: it sent none, so no window scale or
    /// SACK survive a cookie either).
    tsval: Option<u32>,
    /// The client's window scale, if it offered one.
    wscale: Option<u8>,
    sack: bool,
    /// The client's MSS option (`None`: the default of 536 applies).
    mss: Option<[u8; 2]>,
}

/// Most options read from a SYN: more than any client sends (Linux 5,
/// Windows 6, macOS 8 with padding); the rest count as absent. Few, so that
/// the verifier's walk of the loop stays short.
const MAX_SYN_OPTIONS: usize = 10;

/// `N` bytes of the frame at `offset`, through the helper: an offset the
/// verifier need not track exactly, unlike a packet or stack pointer's.
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    // SAFETY: `out` is a stack buffer of N bytes; the helper bounds-checks the frame.
    let loaded =
        unsafe { helpers::bpf_xdp_load_bytes(ctx.ctx, offset as u32, out.as_mut_ptr().cast(), N as u32) };
    (loaded == 0).then_some(out)
}

/// The TCP options of the SYN whose TCP header is at `l4` and `len` bytes
/// long. The walk only notes where each kind of option starts (by the kind's
/// low 4 bits), so that the verifier's states along it do not multiply with
/// the options seen; each wanted option is then read, its kind and length
/// checked again, through [`load`].
#[inline(always)]
fn syn_options(ctx: &XdpContext, l4: usize, len: usize) -> SynOptions {
    let mut at = [0u8; 16];
    let mut i = 20usize;
    for _ in 0..MAX_SYN_OPTIONS {
        if i >= len {
            break;
        }
        let Some([kind, size]) = load::<2>(ctx, l4 + i) else {
            break;
        };
        if kind == 0 {
            break;
        }
        if kind == 1 {
            i += 1;
            continue;
        }
        let size = usize::from(size);
        if size < 2 || i + size > len {
            break;
        }
        at[usize::from(kind & 15)] = (i & 0x3f) as u8;
        i += size;
    }
    let found = |kind: u8, size: u8| -> Option<usize> {
        let start = usize::from(at[usize::from(kind & 15)]);
        (start != 0 && load::<2>(ctx, l4 + start) == Some([kind, size])).then_some(l4 + start + 2)
    };
    SynOptions {
        tsval: found(8, 10)
            .and_then(|o| load::<4>(ctx, o))
            .map(u32::from_be_bytes),
        wscale: found(3, 3).and_then(|o| load::<1>(ctx, o)).map(|[w]| w),
        sack: found(4, 2).is_some(),
        mss: found(2, 4).and_then(|o| load::<2>(ctx, o)),
    }
}

/// The SYN-ACK to a SYN whose sequence number is a SYN cookie in the
/// kernel's format, over the SYN's 4-tuple, sequence number and MSS, so that
/// the netfilter synproxy accepts the client's ACK. With a client timestamp,
/// ours carries its window scale and SACK the way the synproxy decodes them
/// (low 4 bits the scale, 0xf for none; bit 4 SACK); ours offers the scale
/// and MSS `limit` names. A function of its own: its buffers would not fit
/// the program's stack frame beside the others. False: no cookie was made.
#[inline(never)]
fn cookie_syn_ack(
    ctx: &XdpContext,
    flow: &Flow,
    limit: &SynLimit,
    segment: &mut Segment,
    options: &mut [u8; 20],
) -> bool {
    let len = usize::from(flow.tcp[12] >> 4) * 4;
    if !(20..=60).contains(&len) {
        return false;
    }
    let asked = syn_options(ctx, flow.l4, len);
    // The header the cookie helper reads: the SYN's, with its MSS (what the
    // cookie encodes) as the only option, so its length is a constant the
    // verifier of every kernel takes.
    let mut th = [0u8; 24];
    th[..20].copy_from_slice(&flow.tcp);
    th[12] = 6 << 4;
    let [hi, lo] = asked.mss.unwrap_or(536u16.to_be_bytes());
    th[20..].copy_from_slice(&[2, 4, hi, lo]);
    // SAFETY: the helpers read fixed-size, initialised stack buffers, the
    // TCP header 24 bytes as its data offset says.
    let made = unsafe {
        if flow.addrs.family == family::V4 {
            let (mut ip, _) = cookie_headers_v4(flow, 0, 0);
            helpers::bpf_tcp_raw_gen_syncookie_ipv4(ip.as_mut_ptr().cast(), th.as_mut_ptr().cast(), 24)
        } else {
            let (mut ip, _) = cookie_headers_v6(flow, 0, 0);
            helpers::bpf_tcp_raw_gen_syncookie_ipv6(ip.as_mut_ptr().cast(), th.as_mut_ptr().cast(), 24)
        }
    };
    if made < 0 {
        return false;
    }
    let mss = if limit.mss == 0 { 1460 } else { limit.mss };
    *options = [1u8; 20];
    options[..4].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
    if let Some(client_ts) = asked.tsval {
        // SAFETY: a helper without arguments.
        let now_ns = unsafe { helpers::bpf_ktime_get_ns() };
        let mut tsval = ((now_ns / 1_000_000) as u32) & !0x3f;
        // A scale above 14 is read as 14 (RFC 7323); 0xf means none.
        tsval |= u32::from(asked.wscale.map_or(0xf, |w| w.min(14)));
        if asked.sack {
            tsval |= 1 << 4;
            options[4..6].copy_from_slice(&[4, 2]);
        }
        options[6..8].copy_from_slice(&[8, 10]);
        options[8..12].copy_from_slice(&tsval.to_be_bytes());
        options[12..16].copy_from_slice(&client_ts.to_be_bytes());
        if asked.wscale.is_some() {
            options[17..20].copy_from_slice(&[3, 3, limit.wscale]);
        }
    }
    *segment = Segment {
        seq: made as u32,
        ack: be32(&flow.tcp, 4).wrapping_add(1),
        flags: TCP_SYN | TCP_ACK,
    };
    true
}

/// A reply's sequence, acknowledgement and flags.
#[derive(Clone, Copy)]
struct Segment {
    seq: u32,
    ack: u32,
    flags: u8,
}

#[inline(always)]
fn checksum(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Rewrites the frame into a reply to the flow's sender, without TCP options.
#[inline(always)]
fn reply(ctx: &XdpContext, flow: &Flow, seq: u32, ack: u32, flags: u8, response: bool) -> bool {
    send(ctx, flow, &Segment { seq, ack, flags }, None, response)
}

/// Headers being written, off the stack (the program's frames are near their limit).
#[map]
static PC_SCRATCH: PerCpuArray<[u8; 80]> = PerCpuArray::with_max_entries(1, 0);

/// Rewrites the frame into a segment to the flow's sender: MACs, addresses
/// and ports swapped (VLAN tags kept), fresh IP and TCP headers with the
/// segment's numbers and flags and, if given, 20 bytes of TCP `options`, and
/// the canned 503 as payload if `response`. A function of its own, called
/// from the gate and the SYN budget, with its headers in [`PC_SCRATCH`].
#[inline(never)]
fn send(
    ctx: &XdpContext,
    flow: &Flow,
    segment: &Segment,
    options: Option<&[u8; 20]>,
    response: bool,
) -> bool {
    // Ethernet and up to two VLAN tags, kept before the frame is resized.
    let Some(mut l2) = bytes::<22>(ctx, 0) else {
        return false;
    };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&l2[..6]);
    l2.copy_within(6..12, 0);
    l2[6..12].copy_from_slice(&mac);
    let Some(hdr) = PC_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // Zeroed a word at a time: `[0; 80]` would be a call to BPF's byte-loop
    // `memset`, one frame more on the gate's call chain, which the kernel
    // 6.1 verifier's 512-byte limit on a chain's frames cannot spare.
    for word in 0..10 {
        // SAFETY: the map's values are 8-byte aligned and 80 bytes long.
        unsafe { hdr.cast::<u64>().add(word).write_volatile(0) };
    }
    // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
    let hdr = unsafe { &mut *hdr };
    let payload = if response { GATE_RESPONSE_LEN } else { 0 };
    let payload_sum = if response { GATE_RESPONSE_SUM } else { 0 };
    let th = if options.is_some() { 40 } else { 20 };
    let v4 = flow.addrs.family == family::V4;
    let ip_len = if v4 { 20 } else { 40 };
    let segment_len = (th + payload) as u16;
    let pseudo = if v4 {
        hdr[0] = 0x45;
        hdr[2..4].copy_from_slice(&(20 + segment_len).to_be_bytes());
        hdr[6] = 0x40;
        hdr[8] = 64;
        hdr[9] = proto::TCP;
        hdr[12..16].copy_from_slice(&flow.addrs.dst[..4]);
        hdr[16..20].copy_from_slice(&flow.addrs.src[..4]);
        let sum = checksum(words_in(hdr, 0, 20));
        hdr[10..12].copy_from_slice(&sum);
        words_in(hdr, 12, 8)
    } else {
        hdr[0] = 0x60;
        hdr[4..6].copy_from_slice(&segment_len.to_be_bytes());
        hdr[6] = proto::TCP;
        hdr[7] = 64;
        hdr[8..24].copy_from_slice(&flow.addrs.dst);
        hdr[24..40].copy_from_slice(&flow.addrs.src);
        words_in(hdr, 8, 32)
    };
    let tcp = ip_len;
    hdr[tcp..tcp + 2].copy_from_slice(&flow.tcp[2..4]);
    hdr[tcp + 2..tcp + 4].copy_from_slice(&flow.tcp[0..2]);
    hdr[tcp + 4..tcp + 8].copy_from_slice(&segment.seq.to_be_bytes());
    hdr[tcp + 8..tcp + 12].copy_from_slice(&segment.ack.to_be_bytes());
    hdr[tcp + 12] = ((th / 4) as u8) << 4;
    hdr[tcp + 13] = segment.flags;
    hdr[tcp + 14] = 0xff;
    hdr[tcp + 15] = 0xff;
    if let Some(options) = options {
        hdr[tcp + 20..tcp + 40].copy_from_slice(options);
    }
    let sum = checksum(
        pseudo + u32::from(proto::TCP) + u32::from(segment_len) + words_in(hdr, tcp, th) + payload_sum,
    );
    hdr[tcp + 16..tcp + 18].copy_from_slice(&sum);
    let l3 = flow.l3 & 0x3f;
    let headers = (ip_len + th) as u32;
    if !(resize(ctx, l3 + ip_len + th + payload) && store(ctx, 0, &l2)) {
        return false;
    }
    // Constant lengths: an older verifier cannot bound a computed one away from zero.
    let stored = match headers {
        40 => store_prefix::<40>(ctx, l3, hdr),
        60 => store_prefix::<60>(ctx, l3, hdr),
        _ => store_prefix::<80>(ctx, l3, hdr),
    };
    if !stored {
        return false;
    }
    if response {
        // SAFETY: RESPONSE is a static of GATE_RESPONSE_LEN bytes; the helper
        // bounds-checks the frame.
        let stored = unsafe {
            helpers::bpf_xdp_store_bytes(
                ctx.ctx,
                l3 as u32 + headers,
                RESPONSE.as_ptr() as *mut _,
                GATE_RESPONSE_LEN as u32,
            )
        };
        return stored == 0;
    }
    true
}

/// Writes the first `N` bytes of `hdr` at `offset` into the frame.
#[inline(always)]
fn store_prefix<const N: usize>(ctx: &XdpContext, offset: usize, hdr: &mut [u8; 80]) -> bool {
    // SAFETY: `hdr` is a map value of 80 bytes and N at most 80; the helper
    // bounds-checks the frame.
    unsafe {
        helpers::bpf_xdp_store_bytes(ctx.ctx, offset as u32, hdr.as_mut_ptr().cast(), N.min(80) as u32) == 0
    }
}

/// Big-endian 16-bit words of `bytes[at..at + len]`, summed without folding.
#[inline(always)]
fn words_in(bytes: &[u8; 80], at: usize, len: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < len && i < 80 {
        if let (Some(&hi), Some(&lo)) = (bytes.get(at + i), bytes.get(at + i + 1)) {
            sum += (u32::from(hi) << 8) | u32::from(lo);
        }
        i += 2;
    }
    sum
}

/// Makes the frame `len` bytes long: shrinks at the tail, grows at the tail
/// where the buffer has room and otherwise into the headroom (a driver may
/// hand over a buffer with no tailroom; XDP always has 256 bytes of headroom).
/// Every byte is rewritten afterwards, so where it grows does not matter.
#[inline(always)]
fn resize(ctx: &XdpContext, len: usize) -> bool {
    let current = ctx.data_end() - ctx.data();
    let delta = len as i32 - current as i32;
    if delta == 0 {
        return true;
    }
    // SAFETY: the helpers check the new length against the buffer; no packet
    // pointer is used after them.
    unsafe {
        if helpers::bpf_xdp_adjust_tail(ctx.ctx, delta) == 0 {
            return true;
        }
        delta > 0 && helpers::bpf_xdp_adjust_head(ctx.ctx, -delta) == 0
    }
}

/// Writes `bytes` at `offset` into the frame.
#[inline(always)]
fn store<const N: usize>(ctx: &XdpContext, offset: usize, bytes: &[u8; N]) -> bool {
    // SAFETY: `bytes` is an initialised stack buffer of N bytes; the helper
    // bounds-checks the frame.
    unsafe { helpers::bpf_xdp_store_bytes(ctx.ctx, offset as u32, bytes.as_ptr() as *mut _, N as u32) == 0 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
