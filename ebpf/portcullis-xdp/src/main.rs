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
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use portcullis_common::{
    AclKind, AclScope, AclV4, AclV6, Counters, DEFAULT_ACL_CAPACITY, ListenerKey, ListenerValue,
    MAX_LISTENERS, UNATTRIBUTED, acl_flags, config_slot, family, proto,
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
    /// A TCP or UDP packet with its addresses and destination port.
    Flow(Flow),
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
}

enum Verdict {
    Pass,
    Drop,
}

/// Entry point: attached to every interface the gateway guards.
#[xdp]
pub fn portcullis_xdp(ctx: XdpContext) -> u32 {
    match judge(&ctx) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
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
        Parsed::Flow(flow) => judge_flow(&flow),
    }
}

#[inline(always)]
fn judge_flow(flow: &Flow) -> Verdict {
    let Some(listener) = find_listener(flow) else {
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
        if acl_match(addrs, AclScope::new(AclKind::Deny, generation, id)) {
            count(id, |c| c.drop_listener_deny += 1);
            return Verdict::Drop;
        }
    }
    if acl & acl_flags::ALLOW_ACTIVE != 0 {
        let generation = u32::from(acl & acl_flags::ALLOW_GEN != 0);
        if !acl_match(addrs, AclScope::new(AclKind::Allow, generation, id)) {
            count(id, |c| c.drop_not_allowed += 1);
            return Verdict::Drop;
        }
    }
    count(id, |c| c.passed += 1);
    Verdict::Pass
}

#[inline(always)]
fn find_listener(flow: &Flow) -> Option<ListenerValue> {
    let mut key = ListenerKey {
        addr: flow.addrs.dst,
        port_be: flow.dport_be,
        proto: flow.proto,
        family: flow.addrs.family,
        pad: 0,
    };
    if let Some(value) = PC_LISTENERS.get_ptr(&key) {
        // SAFETY: the pointer is into a live map element; the value is Copy
        // and read once.
        return Some(unsafe { *value });
    }
    key.addr = [0; 16];
    // SAFETY: as above.
    PC_LISTENERS.get_ptr(&key).map(|value| unsafe { *value })
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
    acl_match(addrs, AclScope::new(AclKind::GlobalDeny, generation, 0))
}

#[inline(always)]
fn acl_match(addrs: &Addrs, scope: AclScope) -> bool {
    if addrs.family == family::V4 {
        let addr = [addrs.src[0], addrs.src[1], addrs.src[2], addrs.src[3]];
        let key = Key::new(AclScope::BITS + 32, AclV4 { scope, addr });
        PC_ACL_V4.get(&key).is_some()
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
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&ip[12..16]);
    dst[..4].copy_from_slice(&ip[16..20]);
    let addrs = Addrs {
        family: family::V4,
        src,
        dst,
    };
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return Parsed::NoPorts(addrs);
    }
    parse_l4(ctx, offset + ihl * 4, ip[9], addrs)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(ip) = bytes::<40>(ctx, offset) else {
        return Parsed::Malformed;
    };
    if ip[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    let addrs = Addrs {
        family: family::V6,
        src,
        dst,
    };
    let mut next = ip[6];
    let mut cursor = offset + 40;
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
                    return Parsed::NoPorts(addrs);
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
            _ => return parse_l4(ctx, cursor, next, addrs),
        }
    }
    match next {
        0 | 43 | 44 | 50 | 51 | 60 => Parsed::NoPorts(addrs),
        _ => parse_l4(ctx, cursor, next, addrs),
    }
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, protocol: u8, addrs: Addrs) -> Parsed {
    match protocol {
        proto::TCP => {
            let Some(tcp) = bytes::<20>(ctx, offset) else {
                return Parsed::Malformed;
            };
            let header_len = usize::from(tcp[12] >> 4) * 4;
            if header_len < 20 || ptr_at::<u8>(ctx, offset + header_len - 1).is_none() {
                return Parsed::Malformed;
            }
            Parsed::Flow(Flow {
                addrs,
                proto: proto::TCP,
                dport_be: u16::from_ne_bytes([tcp[2], tcp[3]]),
            })
        }
        proto::UDP => {
            let Some(udp) = bytes::<8>(ctx, offset) else {
                return Parsed::Malformed;
            };
            Parsed::Flow(Flow {
                addrs,
                proto: proto::UDP,
                dport_be: u16::from_ne_bytes([udp[2], udp[3]]),
            })
        }
        // ESP hides its payload: no ports to judge.
        50 => Parsed::NoPorts(addrs),
        _ => Parsed::Other,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
