//! Map keys and values shared by the XDP program (`portcullis-xdp`) and the
//! gateway's `xdp` module.
//!
//! Both sides compile these exact types, so a layout change is a change of
//! [`ABI_VERSION`]. Every type is `#[repr(C)]`, has explicit padding, holds no
//! `bool`, and its size is checked at compile time. Multi-byte fields that the
//! XDP program compares with packet bytes are kept in network byte order.
#![no_std]

/// Version of the map layout; pinned maps of another version are refused.
pub const ABI_VERSION: u32 = 5;

/// Most listeners one gateway instance guards; listener ids are `1..=MAX_LISTENERS`.
pub const MAX_LISTENERS: u32 = 4096;
/// Counter slot for traffic that cannot be attributed to a listener.
pub const UNATTRIBUTED: u32 = 0;

/// Default capacity of each ACL trie (IPv4 and IPv6), overridable at attach.
pub const DEFAULT_ACL_CAPACITY: u32 = 1 << 21;

/// Names of the maps, as pinned under `/sys/fs/bpf/portcullis/<instance>/`.
pub mod map_names {
    /// `HashMap<ListenerKey, ListenerValue>`.
    pub const LISTENERS: &str = "PC_LISTENERS";
    /// `LpmTrie<AclV4, u32>`: every IPv4 ACL entry, scoped by [`super::AclScope`],
    /// valued by its prefix length. The record of the IPv4 lists; XDP reads the
    /// tables derived from it ([`ACL4_TABLES`], [`ACL4_LONG`]).
    pub const ACL_V4: &str = "PC_ACL_V4";
    /// `LpmTrie<AclV6, u32>`: every IPv6 ACL entry, scoped by [`super::AclScope`].
    pub const ACL_V6: &str = "PC_ACL_V6";
    /// `Array<u32>`: global settings, indexed by [`super::config_slot`].
    pub const CONFIG: &str = "PC_CONFIG";
    /// `PerCpuArray<Counters>`: indexed by listener id, slot 0 unattributed.
    pub const COUNTERS: &str = "PC_COUNTERS";
    /// `Array<u64>`: the proxy's heartbeat, indexed by [`super::heartbeat_slot`].
    pub const HEARTBEAT: &str = "PC_HEARTBEAT";
    /// `Array<PortEntry>` (mmapable): the listeners of every port, indexed by
    /// [`super::port_slot`].
    pub const PORTS: &str = "PC_PORTS";
    /// `Array<ListenerValue>` (mmapable), indexed by listener id: what XDP
    /// reads of a listener it found through [`PORTS`].
    pub const VALUES: &str = "PC_VALUES";
    /// `ArrayOfMaps<Array<u64>>`, indexed by [`super::list_slot`]: each IPv4
    /// list's table of 2 bits per /24 ([`super::table_bits`]).
    pub const ACL4_TABLES: &str = "PC_ACL4_TABLES";
    /// `HashMap<Acl4Long, [u64; 4]>`: for a /24 holding prefixes longer than
    /// /24, the 256 addresses they cover.
    pub const ACL4_LONG: &str = "PC_ACL4_LONG";
    /// `Array<SynLimit>`, indexed by listener id: each listener's per-source SYN rate.
    pub const SYN_LIMITS: &str = "PC_SYN_LIMITS";
    /// `LruPerCpuHashMap<SynKey, SynBucket>`: the SYN token bucket of each recent source.
    pub const SYN_RATE: &str = "PC_SYN_RATE";
    /// `PerCpuArray<SynCounters>`, indexed by listener id.
    pub const SYN_COUNTERS: &str = "PC_SYN_COUNTERS";
    /// `PerCpuArray<SynBucket>`, indexed by listener id: each listener's SYN
    /// budget on this CPU, above which XDP answers SYNs with cookies.
    pub const SYN_BUDGET: &str = "PC_SYN_BUDGET";
    /// Every map, for pin management.
    pub const ALL: [&str; 14] = [
        LISTENERS,
        ACL_V4,
        ACL_V6,
        CONFIG,
        COUNTERS,
        HEARTBEAT,
        PORTS,
        ACL4_TABLES,
        ACL4_LONG,
        VALUES,
        SYN_LIMITS,
        SYN_RATE,
        SYN_COUNTERS,
        SYN_BUDGET,
    ];
}

/// Words (`u64`) in one IPv4 list table: 2 bits for each of the 2^24 /24s (4 MiB).
pub const TABLE_WORDS: u32 = 1 << 19;
/// Slots of [`map_names::ACL4_TABLES`]: two generations of the global deny
/// list and of each listener's deny and allow lists.
pub const LIST_SLOTS: u32 = (MAX_LISTENERS + 1) * 4;
/// Slots of [`map_names::PORTS`]: TCP ports, then UDP ports.
pub const PORT_SLOTS: u32 = 2 << 16;

/// The two bits an IPv4 list table holds for one /24.
pub mod table_bits {
    /// A prefix of length ≤ 24 in the list covers the whole /24.
    pub const FULL: u64 = 1;
    /// The list holds prefixes longer than /24 inside this /24: see `PC_ACL4_LONG`.
    pub const LONG: u64 = 2;
}

/// Which listeners a port has, so that traffic for no listener costs one array read.
pub mod port_bits {
    /// An IPv4 wildcard listener (0.0.0.0).
    pub const WILDCARD_V4: u32 = 1 << 0;
    /// An IPv6 wildcard listener (::).
    pub const WILDCARD_V6: u32 = 1 << 1;
    /// An IPv4 listener on a specific address.
    pub const SPECIFIC_V4: u32 = 1 << 2;
    /// An IPv6 listener on a specific address.
    pub const SPECIFIC_V6: u32 = 1 << 3;
}

/// Index into [`map_names::PORTS`] of a protocol and port (host byte order).
#[inline]
pub const fn port_slot(protocol: u8, port: u16) -> u32 {
    let base = if protocol == proto::UDP { 1 << 16 } else { 0 };
    base | port as u32
}

/// Index into [`map_names::ACL4_TABLES`] of one list in one generation.
#[inline]
pub const fn list_slot(kind: AclKind, generation: u32, listener: u32) -> u32 {
    let kind = match kind {
        AclKind::GlobalDeny | AclKind::Deny => 0,
        AclKind::Allow => 2,
    };
    (listener % (MAX_LISTENERS + 1)) * 4 + kind + (generation & 1)
}

/// Where one /24's bit of a table lives: the word index and the bit shift.
#[inline]
pub const fn table_position(net24: u32) -> (u32, u32) {
    (net24 >> 5, (net24 & 31) * 2)
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "portcullis_xdp";

/// Slots of the `PC_CONFIG` array.
pub mod config_slot {
    /// [`super::ABI_VERSION`] of whoever created the maps.
    pub const ABI: u32 = 0;
    /// Flags of the global deny list: [`super::acl_flags`].
    pub const GLOBAL_ACL: u32 = 1;
    /// Entries in the global deny list in force (informational).
    pub const GLOBAL_DENY_LEN: u32 = 2;
    /// Number of slots.
    pub const LEN: u32 = 4;
}

/// Slots of the `PC_HEARTBEAT` array.
pub mod heartbeat_slot {
    /// `CLOCK_MONOTONIC` nanoseconds of the live proxy's last beat (0: never).
    pub const BEAT: u32 = 0;
    /// How old a beat may be before gated listeners count as unattended, ns.
    pub const TIMEOUT: u32 = 1;
    /// Pid of the proxy that owns the gates (informational; writers check it).
    pub const OWNER: u32 = 2;
    /// Number of slots.
    pub const LEN: u32 = 4;
}

/// What XDP does for a listener when its gate is closed (see docs/architecture.md, the Gatekeeper at the NIC).
pub mod gate_mode {
    /// Not gated at the NIC: only the ACLs apply (listeners managed by hand).
    pub const NONE: u32 = 0;
    /// Plain HTTP: answer the exchange statelessly with a SYN cookie and a canned 503.
    pub const HTTP_503: u32 = 1;
    /// Answer the SYN with a reset (TLS listeners: a 503 would need TLS).
    pub const RESET: u32 = 2;
    /// Drop the SYN.
    pub const DROP: u32 = 3;
}

/// The canned response XDP sends on a gated `503`-mode listener.
pub const GATE_RESPONSE: [u8; GATE_RESPONSE_LEN] = *b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 24\r\nConnection: close\r\n\r\n503 Service Unavailable\n";
/// Length of [`GATE_RESPONSE`].
pub const GATE_RESPONSE_LEN: usize = 156;
/// Ones'-complement sum of [`GATE_RESPONSE`] as 16-bit big-endian words, unfolded.
pub const GATE_RESPONSE_SUM: u32 = sum16(&GATE_RESPONSE);

/// Sums bytes as big-endian 16-bit words (an odd last byte padded with zero), unfolded.
pub const fn sum16(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    if i < bytes.len() {
        sum += (bytes[i] as u32) << 8;
    }
    sum
}

/// Bits describing one listener's (or the global) ACL state.
///
/// A list is looked up only when its `*_ACTIVE` bit is set, and in the
/// generation its `*_GEN` bit names: a whole list is replaced by writing the
/// other generation and then flipping the bit in one map update.
pub mod acl_flags {
    /// The deny list has entries.
    pub const DENY_ACTIVE: u32 = 1 << 0;
    /// The allow list has entries: everything else is dropped.
    pub const ALLOW_ACTIVE: u32 = 1 << 1;
    /// Generation of the deny list currently in force.
    pub const DENY_GEN: u32 = 1 << 2;
    /// Generation of the allow list currently in force.
    pub const ALLOW_GEN: u32 = 1 << 3;
}

/// IP protocol numbers a listener can be keyed on.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Address family tags used in [`ListenerKey::family`].
pub mod family {
    /// IPv4: the address is in the first four bytes of `addr`.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// A listener as the XDP program sees it: destination address, port and protocol.
///
/// An all-zero `addr` is the wildcard listener of its family (bound to any address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Destination address; IPv4 uses the first four bytes, the rest zero.
    pub addr: [u8; 16],
    /// Destination port, network byte order.
    pub port_be: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// Always zero.
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 24);

/// What the XDP program knows of one listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerValue {
    /// Listener id: the counters slot and the scope of its ACL entries.
    pub id: u32,
    /// [`acl_flags`] of this listener's allow and deny lists.
    pub acl: u32,
    /// Entries in the allow list in force (informational; XDP reads `acl`).
    pub allow_len: u32,
    /// Entries in the deny list in force (informational; XDP reads `acl`).
    pub deny_len: u32,
    /// [`gate_mode`]: what XDP does while the gate is closed.
    pub gate_mode: u32,
    /// 1 while the proxy holds the gate open (some route of the listener is open).
    pub gate_open: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerValue>() == 24);

/// Which list an ACL entry belongs to; packed into [`AclScope`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AclKind {
    /// The global deny list (listener id 0).
    GlobalDeny = 0,
    /// A listener's deny list.
    Deny = 1,
    /// A listener's allow list.
    Allow = 2,
}

/// The 32-bit scope that prefixes every ACL trie key, so one trie per family
/// holds every list: kind (2 bits), generation (1 bit), listener id (29 bits),
/// stored big-endian so that the trie's prefix match covers it first.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclScope(pub [u8; 4]);

impl AclScope {
    /// Bits of the trie prefix taken by the scope.
    pub const BITS: u32 = 32;

    /// Builds the scope of one list in one generation.
    #[inline]
    pub const fn new(kind: AclKind, generation: u32, listener: u32) -> Self {
        let raw = ((kind as u32) << 30) | ((generation & 1) << 29) | (listener & 0x1fff_ffff);
        Self(raw.to_be_bytes())
    }
}

/// Data part of an IPv4 ACL trie key; the trie's prefix length is
/// `AclScope::BITS + cidr_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclV4 {
    /// Scope of the list this entry belongs to.
    pub scope: AclScope,
    /// Source address, network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AclV4>() == 8);

/// Data part of an IPv6 ACL trie key; the trie's prefix length is
/// `AclScope::BITS + cidr_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclV6 {
    /// Scope of the list this entry belongs to.
    pub scope: AclScope,
    /// Source address, network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AclV6>() == 20);

/// What XDP knows of one port's listeners without a hash lookup.
///
/// Userspace writes each field with one atomic 32-bit store through the
/// map's mmap, in an order that never shows an id without its address, and
/// XDP reads `one_v4` on both sides of `one_v4_addr` to see a matched pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortEntry {
    /// [`port_bits`] of the port.
    pub bits: u32,
    /// Id of the IPv4 wildcard listener (0: none).
    pub wildcard_v4: u32,
    /// Id of the IPv6 wildcard listener (0: none).
    pub wildcard_v6: u32,
    /// Id of the port's only specific-address IPv4 listener (0: none, or
    /// several, found through the hash).
    pub one_v4: u32,
    /// That listener's address, network byte order.
    pub one_v4_addr: [u8; 4],
    /// Always zero.
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<PortEntry>() == 24);

/// Key of [`map_names::ACL4_LONG`]: one list's /24.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Acl4Long {
    /// Scope of the list this /24 belongs to.
    pub scope: AclScope,
    /// The /24: the address's top 24 bits, host byte order.
    pub net24: u32,
}
const _: () = assert!(core::mem::size_of::<Acl4Long>() == 8);

/// Sources (a /32 or a /64) whose SYN buckets are kept, per CPU; the least
/// recently seen give way.
pub const SYN_SOURCES: u32 = 1 << 16;

/// A listener's SYN limits: a per-source token bucket of `burst` SYNs
/// refilled at `rate` per second (per source and per CPU that receives its
/// SYNs), and a listener-wide `budget` of SYNs per second per CPU that reach
/// the kernel, above which XDP answers SYNs itself with SYN cookies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynLimit {
    /// SYNs per second per source; 0 turns the limit off.
    pub rate: u32,
    /// SYNs a source may send at once.
    pub burst: u32,
    /// SYNs per second per CPU the kernel's own handshake takes; 0: all of them.
    pub budget: u32,
    /// The MSS a cookie SYN-ACK offers.
    pub mss: u16,
    /// The window scale a cookie SYN-ACK offers: the one the kernel gives the
    /// listener's connections, so that the synproxy's handshake agrees with it.
    pub wscale: u8,
    /// 1 once the cookies' ACK path (the nftables synproxy) is in place:
    /// only then does XDP answer SYNs over `budget`; otherwise they pass.
    pub cookies: u8,
}
const _: () = assert!(core::mem::size_of::<SynLimit>() == 16);

impl SynLimit {
    /// On by default: above what an L4 load balancer or a large NAT in front
    /// opens from one address, far below what one flooding source sends; a
    /// budget well within what a listener's SYN queue drains on one CPU.
    pub const DEFAULT: Self = Self {
        rate: 10_000,
        burst: 20_000,
        budget: 20_000,
        mss: 1460,
        wscale: 7,
        cookies: 0,
    };
    /// Highest `rate` and `burst`, so the bucket arithmetic stays in 64 bits.
    pub const MAX: u32 = 1_000_000;
}

/// Whose SYN bucket: a listener and a source network (/32 or /64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SynKey {
    /// Listener id.
    pub id: u32,
    /// [`family`] of the source.
    pub family: u32,
    /// The source's first 4 (IPv4) or 8 (IPv6) bytes, the rest zero.
    pub net: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<SynKey>() == 16);

/// A source's SYN token bucket, in nanotokens (10^9 per SYN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynBucket {
    /// Tokens left, times 10^9.
    pub tokens: u64,
    /// When it was last refilled (`bpf_ktime_get_ns`).
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SynBucket>() == 16);

/// Per-CPU SYN verdicts of one listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynCounters {
    /// SYNs within their source's limit.
    pub within: u64,
    /// SYNs dropped: their source was over the listener's limit.
    pub over_rate: u64,
    /// SYNs over the listener's budget answered by XDP with a cookie SYN-ACK.
    pub cookies: u64,
    /// SYNs over the budget whose SYN-ACK could not be written, dropped.
    pub cookie_failed: u64,
}
const _: () = assert!(core::mem::size_of::<SynCounters>() == 32);

impl SynCounters {
    /// Adds another CPU's counters to these.
    pub fn accumulate(&mut self, other: &Self) {
        self.within = self.within.wrapping_add(other.within);
        self.over_rate = self.over_rate.wrapping_add(other.over_rate);
        self.cookies = self.cookies.wrapping_add(other.cookies);
        self.cookie_failed = self.cookie_failed.wrapping_add(other.cookie_failed);
    }
}

/// Per-CPU verdict counters of one listener (slot 0: unattributed traffic).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Packets passed to the kernel after every check.
    pub passed: u64,
    /// Packets dropped by the global deny list.
    pub drop_global_deny: u64,
    /// Packets dropped by the listener's deny list.
    pub drop_listener_deny: u64,
    /// Packets dropped because the listener's allow list did not match.
    pub drop_not_allowed: u64,
    /// Frames that could not be parsed, passed untouched (slot 0).
    pub malformed_passed: u64,
    /// Non-first IP fragments, passed untouched (slot 0): they carry no ports.
    pub fragment_passed: u64,
    /// Gated `503` listeners: SYNs answered with a SYN-ACK carrying a cookie.
    pub gate_syn_ack: u64,
    /// Gated `503` listeners: requests (data with a valid cookie) answered with the canned 503 + FIN.
    pub gate_503: u64,
    /// Gated `reset` listeners: SYNs answered with a RST.
    pub gate_reset: u64,
    /// Gated `drop` listeners: SYNs dropped.
    pub gate_drop: u64,
    /// Gated `503` listeners: FINs acknowledged.
    pub gate_fin_ack: u64,
    /// Gated `503` listeners: ACKs of the XDP-held exchange absorbed (never reach the kernel).
    pub gate_absorbed: u64,
    /// Gated listeners: replies that could not be written (the frame could not be resized), dropped.
    pub gate_failed: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 104);

impl Counters {
    /// Adds another CPU's counters to these.
    pub fn accumulate(&mut self, other: &Self) {
        self.passed = self.passed.wrapping_add(other.passed);
        self.drop_global_deny = self.drop_global_deny.wrapping_add(other.drop_global_deny);
        self.drop_listener_deny = self.drop_listener_deny.wrapping_add(other.drop_listener_deny);
        self.drop_not_allowed = self.drop_not_allowed.wrapping_add(other.drop_not_allowed);
        self.malformed_passed = self.malformed_passed.wrapping_add(other.malformed_passed);
        self.fragment_passed = self.fragment_passed.wrapping_add(other.fragment_passed);
        self.gate_syn_ack = self.gate_syn_ack.wrapping_add(other.gate_syn_ack);
        self.gate_503 = self.gate_503.wrapping_add(other.gate_503);
        self.gate_reset = self.gate_reset.wrapping_add(other.gate_reset);
        self.gate_drop = self.gate_drop.wrapping_add(other.gate_drop);
        self.gate_fin_ack = self.gate_fin_ack.wrapping_add(other.gate_fin_ack);
        self.gate_absorbed = self.gate_absorbed.wrapping_add(other.gate_absorbed);
        self.gate_failed = self.gate_failed.wrapping_add(other.gate_failed);
    }

    /// Every dropped packet, whatever the reason.
    pub const fn dropped(&self) -> u64 {
        self.drop_global_deny + self.drop_listener_deny + self.drop_not_allowed
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is #[repr(C)], Copy, has explicit padding and no
    // invalid bit patterns, as aya::Pod requires.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    mod pod {
        use super::super::{
            Acl4Long, AclV4, AclV6, Counters, ListenerKey, ListenerValue, PortEntry, SynBucket, SynCounters,
            SynKey, SynLimit,
        };
        unsafe impl aya::Pod for SynLimit {}
        unsafe impl aya::Pod for SynKey {}
        unsafe impl aya::Pod for SynBucket {}
        unsafe impl aya::Pod for SynCounters {}
        unsafe impl aya::Pod for Acl4Long {}
        unsafe impl aya::Pod for PortEntry {}
        unsafe impl aya::Pod for ListenerKey {}
        unsafe impl aya::Pod for ListenerValue {}
        unsafe impl aya::Pod for AclV4 {}
        unsafe impl aya::Pod for AclV6 {}
        unsafe impl aya::Pod for Counters {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_packs_kind_generation_and_listener_big_endian() {
        assert_eq!(AclScope::new(AclKind::GlobalDeny, 0, 0).0, [0, 0, 0, 0]);
        assert_eq!(AclScope::new(AclKind::Deny, 1, 7).0, [0x60, 0, 0, 7]);
        assert_eq!(AclScope::new(AclKind::Allow, 0, 0x1234).0, [0x80, 0, 0x12, 0x34]);
        // Listener ids beyond 29 bits cannot bleed into kind or generation.
        assert_eq!(
            AclScope::new(AclKind::Deny, 0, u32::MAX).0,
            [0x5f, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn slots_keep_lists_ports_and_tables_apart() {
        assert_eq!(list_slot(AclKind::GlobalDeny, 0, 0), 0);
        assert_eq!(list_slot(AclKind::GlobalDeny, 1, 0), 1);
        assert_eq!(list_slot(AclKind::Deny, 0, 1), 4);
        assert_eq!(list_slot(AclKind::Allow, 1, 1), 7);
        assert_eq!(list_slot(AclKind::Allow, 1, MAX_LISTENERS), LIST_SLOTS - 1);
        assert_eq!(port_slot(proto::TCP, 80), 80);
        assert_eq!(port_slot(proto::UDP, 65535), PORT_SLOTS - 1);
        assert_eq!(table_position(0x00_0000), (0, 0));
        assert_eq!(table_position(0x00_0021), (1, 2));
        assert_eq!(table_position(0xff_ffff), (TABLE_WORDS - 1, 62));
    }

    #[test]
    fn counters_add_up() {
        let mut total = Counters::default();
        let one = Counters {
            passed: 1,
            drop_global_deny: 2,
            drop_listener_deny: 3,
            drop_not_allowed: 4,
            malformed_passed: 5,
            fragment_passed: 6,
            gate_503: 7,
            ..Counters::default()
        };
        total.accumulate(&one);
        total.accumulate(&one);
        assert_eq!(
            (
                total.passed,
                total.fragment_passed,
                total.dropped(),
                total.gate_503
            ),
            (2, 12, 18, 14)
        );
    }

    #[test]
    fn the_canned_response_is_what_its_length_and_sum_say() {
        let text = core::str::from_utf8(&GATE_RESPONSE).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 ") && head.contains("\r\nRetry-After: 5"));
        assert!(head.contains("Content-Length: 24") && body.len() == 24);
        assert_eq!(sum16(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }
}
