//! The IPv4 list tables the XDP program reads, derived from the ACL trie
//! (which stays the record of every entry).
//!
//! Each IPv4 list generation that has entries owns one table in
//! `PC_ACL4_TABLES`: 2 bits per /24 ([`table_bits`]), 4 MiB in all, so a
//! lookup is one array read whatever the list's size (DIR-24-8). A /24 that
//! holds prefixes longer than /24 has its 256 addresses in `PC_ACL4_LONG`,
//! read only for such a /24. A table is filled before its generation is
//! published; in-place edits write the long map before the bit that points
//! to it, and clear the bit before the entry goes.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::maps::{Array, MapData, MapError, lpm_trie::Key};
use ipnet::Ipv4Net;
use portcullis_common::{
    Acl4Long, AclKind, AclScope, AclV4, TABLE_WORDS, list_slot, map_names, table_bits, table_position,
};

use super::{
    Maps, XdpError,
    maps::{found, map_err},
};

/// Ranges of more /24s than this are recomputed from a scan of the list
/// rather than one trie lookup per /24.
const LOOKUP_LIMIT: u32 = 1 << 16;

/// One IPv4 list generation: its trie scope and its table slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListGen {
    pub(crate) scope: AclScope,
    pub(crate) slot: u32,
}

impl ListGen {
    /// The list generation a trie scope names.
    pub(crate) fn of(scope: AclScope) -> Self {
        let raw = u32::from_be_bytes(scope.0);
        let kind = match raw >> 30 {
            0 => AclKind::GlobalDeny,
            1 => AclKind::Deny,
            _ => AclKind::Allow,
        };
        Self {
            scope,
            slot: list_slot(kind, (raw >> 29) & 1, raw & 0x1fff_ffff),
        }
    }
}

/// The /24s a prefix of length ≤ 24 covers, or the /24 and the host range of a longer one.
enum Span {
    Nets { first: u32, count: u32 },
    Hosts { net24: u32, first: u32, count: u32 },
}

fn span(net: Ipv4Net) -> Span {
    let addr = u32::from(net.network());
    let len = u32::from(net.prefix_len());
    if len <= 24 {
        Span::Nets {
            first: addr >> 8,
            count: 1 << (24 - len),
        }
    } else {
        Span::Hosts {
            net24: addr >> 8,
            first: addr & 0xff,
            count: 1 << (32 - len),
        }
    }
}

fn set_hosts(long: &mut [u64; 4], first: u32, count: u32, on: bool) {
    for host in first..first + count {
        let (word, bit) = ((host >> 6) as usize, host & 63);
        if on {
            long[word] |= 1 << bit;
        } else {
            long[word] &= !(1 << bit);
        }
    }
}

/// What a whole set of prefixes makes of a table: its non-zero words and its long /24s.
#[derive(Default)]
struct Built {
    words: BTreeMap<u32, u64>,
    long: HashMap<u32, [u64; 4]>,
}

impl Built {
    fn of<'a>(nets: impl IntoIterator<Item = &'a Ipv4Net>) -> Self {
        let mut built = Self::default();
        for net in nets {
            match span(*net) {
                Span::Nets { first, count } => {
                    for net24 in first..first + count {
                        built.mark(net24, table_bits::FULL);
                    }
                }
                Span::Hosts { net24, first, count } => {
                    set_hosts(built.long.entry(net24).or_default(), first, count, true);
                    built.mark(net24, table_bits::LONG);
                }
            }
        }
        built
    }

    fn mark(&mut self, net24: u32, bits: u64) {
        let (word, shift) = table_position(net24);
        *self.words.entry(word).or_default() |= bits << shift;
    }

    fn state(&self, net24: u32) -> u64 {
        let (word, shift) = table_position(net24);
        self.words.get(&word).map_or(0, |w| (w >> shift) & 3)
    }
}

fn tables_err(op: &'static str) -> impl FnOnce(MapError) -> XdpError {
    map_err(map_names::ACL4_TABLES, op)
}

/// Empties one slot of an array of maps (aya has no call for it).
fn delete_slot(map: BorrowedFd<'_>, slot: u32) -> std::io::Result<()> {
    /// `union bpf_attr` as `BPF_MAP_DELETE_ELEM` reads it.
    #[repr(C)]
    struct DeleteAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = DeleteAttr {
        map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
        pad: 0,
        key: std::ptr::from_ref(&slot) as u64,
        value: 0,
        flags: 0,
    };
    #[expect(unsafe_code, reason = "the bpf(2) call aya does not wrap for arrays of maps")]
    // SAFETY: attr is a live, initialised bpf_attr prefix of the size passed,
    // and its key points at a u32 that outlives the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<DeleteAttr>(),
        )
    };
    if result == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        Ok(())
    } else {
        Err(error)
    }
}

impl Maps {
    fn table(&self, slot: u32) -> Result<Option<Array<MapData, u64>>, XdpError> {
        found(self.acl4_tables.get(&slot, 0)).map_err(tables_err("read"))
    }

    fn new_table(&mut self, list: ListGen, words: &BTreeMap<u32, u64>) -> Result<(), XdpError> {
        let mut table =
            Array::<MapData, u64>::create(TABLE_WORDS, 0).map_err(tables_err("create a table"))?;
        for (word, bits) in words {
            table.set(*word, bits, 0).map_err(tables_err("fill a table"))?;
        }
        self.acl4_tables
            .set(list.slot, &table, 0)
            .map_err(tables_err("publish a table"))
    }

    fn write_long(&mut self, list: ListGen, net24: u32, long: &[u64; 4]) -> Result<(), XdpError> {
        let key = Acl4Long {
            scope: list.scope,
            net24,
        };
        if long.iter().all(|w| *w == 0) {
            return found(self.acl4_long.remove(&key))
                .map(drop)
                .map_err(map_err(map_names::ACL4_LONG, "remove"));
        }
        self.acl4_long
            .insert(key, long, 0)
            .map_err(map_err(map_names::ACL4_LONG, "update"))
    }

    fn read_long(&self, list: ListGen, net24: u32) -> Result<[u64; 4], XdpError> {
        let key = Acl4Long {
            scope: list.scope,
            net24,
        };
        found(self.acl4_long.get(&key, 0))
            .map(|long| long.unwrap_or([0; 4]))
            .map_err(map_err(map_names::ACL4_LONG, "read"))
    }

    /// Rewrites the 2-bit states of `net24s` in a table, word by word.
    fn set_states(
        table: &mut Array<MapData, u64>,
        states: impl IntoIterator<Item = (u32, u64)>,
    ) -> Result<(), XdpError> {
        let mut words: BTreeMap<u32, Vec<(u32, u64)>> = BTreeMap::new();
        for (net24, state) in states {
            let (word, shift) = table_position(net24);
            words.entry(word).or_default().push((shift, state));
        }
        for (word, changes) in words {
            let old = table.get(&word, 0).map_err(tables_err("read a table"))?;
            let new = changes
                .iter()
                .fold(old, |w, (shift, state)| (w & !(3 << shift)) | (state << shift));
            if new != old {
                table.set(word, new, 0).map_err(tables_err("update a table"))?;
            }
        }
        Ok(())
    }

    /// IPv4 tables in use and /24s with a long-prefix map, over every list:
    /// the kernel memory the IPv4 lists hold (4 MiB a table, 40 B a /24).
    pub fn acl4_footprint(&self) -> Result<(u32, usize), XdpError> {
        let mut tables = 0;
        for slot in 0..portcullis_common::LIST_SLOTS {
            tables += u32::from(self.table(slot)?.is_some());
        }
        let mut long = 0;
        for key in self.acl4_long.keys() {
            key.map_err(map_err(map_names::ACL4_LONG, "iterate"))?;
            long += 1;
        }
        Ok((tables, long))
    }

    fn clear_slot(&self, slot: u32) -> Result<(), XdpError> {
        delete_slot(self.acl4_tables_fd.fd().as_fd(), slot).map_err(|io_error| {
            tables_err("clear a slot")(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error,
            }))
        })
    }

    /// Builds the table of a generation about to be published.
    pub(crate) fn table_build(&mut self, list: ListGen, nets: &[Ipv4Net]) -> Result<(), XdpError> {
        self.clear_slot(list.slot)?;
        if nets.is_empty() {
            return Ok(());
        }
        let built = Built::of(nets);
        for (net24, long) in &built.long {
            self.write_long(list, *net24, long)?;
        }
        self.new_table(list, &built.words)
    }

    /// Drops a generation's table and long entries (`nets`: its IPv4 prefixes).
    pub(crate) fn table_drop(&mut self, list: ListGen, nets: &[Ipv4Net]) -> Result<(), XdpError> {
        self.clear_slot(list.slot)?;
        for net in nets {
            if let Span::Hosts { net24, .. } = span(*net) {
                self.write_long(list, net24, &[0; 4])?;
            }
        }
        Ok(())
    }

    /// Adds one prefix, already in the trie, to the table in force.
    pub(crate) fn table_add(&mut self, list: ListGen, net: Ipv4Net) -> Result<(), XdpError> {
        let Some(mut table) = self.table(list.slot)? else {
            return self.table_build(list, &[net]);
        };
        match span(net) {
            Span::Nets { first, count } => {
                let mut words: BTreeMap<u32, u64> = BTreeMap::new();
                for net24 in first..first + count {
                    let (word, shift) = table_position(net24);
                    *words.entry(word).or_default() |= table_bits::FULL << shift;
                }
                for (word, bits) in words {
                    let old = table.get(&word, 0).map_err(tables_err("read a table"))?;
                    if old | bits != old {
                        table
                            .set(word, old | bits, 0)
                            .map_err(tables_err("update a table"))?;
                    }
                }
            }
            Span::Hosts { net24, first, count } => {
                let mut long = self.read_long(list, net24)?;
                set_hosts(&mut long, first, count, true);
                self.write_long(list, net24, &long)?;
                let (word, shift) = table_position(net24);
                let old = table.get(&word, 0).map_err(tables_err("read a table"))?;
                let new = old | (table_bits::LONG << shift);
                if new != old {
                    table.set(word, new, 0).map_err(tables_err("update a table"))?;
                }
            }
        }
        Ok(())
    }

    /// Takes one prefix, already gone from the trie, out of the table in
    /// force: what it covered is recomputed from the entries that remain.
    pub(crate) fn table_remove(&mut self, list: ListGen, net: Ipv4Net) -> Result<(), XdpError> {
        let Some(mut table) = self.table(list.slot)? else {
            return Ok(());
        };
        match span(net) {
            Span::Nets { first, count } if count > LOOKUP_LIMIT => {
                let remaining: Vec<Ipv4Net> = self.v4_entries(list.scope)?;
                let built = Built::of(&remaining);
                let states: Vec<(u32, u64)> = (first..first + count).map(|n| (n, built.state(n))).collect();
                Self::set_states(&mut table, states)
            }
            Span::Nets { first, count } => {
                let mut states = Vec::with_capacity(count as usize);
                for net24 in first..first + count {
                    let full = self.v4_covering(list.scope, net24 << 8, 24)?.is_some();
                    let long = self.read_long(list, net24)?.iter().any(|w| *w != 0);
                    states.push((
                        net24,
                        (u64::from(full) * table_bits::FULL) | (u64::from(long) * table_bits::LONG),
                    ));
                }
                Self::set_states(&mut table, states)
            }
            Span::Hosts { net24, first, count } => {
                let mut long = self.read_long(list, net24)?;
                for host in first..first + count {
                    let still = self
                        .v4_covering(list.scope, (net24 << 8) | host, 32)?
                        .is_some_and(|len| len > 24);
                    set_hosts(&mut long, host, 1, still);
                }
                if long.iter().all(|w| *w == 0) {
                    let full = self.v4_covering(list.scope, net24 << 8, 24)?.is_some();
                    Self::set_states(&mut table, [(net24, u64::from(full) * table_bits::FULL)])?;
                }
                self.write_long(list, net24, &long)
            }
        }
    }

    /// The length of the longest prefix of a scope's trie entries that
    /// covers `addr/len`, if any.
    fn v4_covering(&self, scope: AclScope, addr: u32, len: u32) -> Result<Option<u32>, XdpError> {
        let key = Key::new(
            AclScope::BITS + len,
            AclV4 {
                scope,
                addr: addr.to_be_bytes(),
            },
        );
        found(self.acl_v4.get(&key, 0)).map_err(map_err(map_names::ACL_V4, "lookup"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("valid prefix")
    }

    #[test]
    fn a_built_table_marks_full_and_long_slash_24s() {
        let built = Built::of(&[net("10.1.0.0/23"), net("10.2.3.128/25"), net("10.2.3.7/32")]);
        let n = |s: &str| u32::from(s.parse::<std::net::Ipv4Addr>().expect("addr")) >> 8;
        assert_eq!(built.state(n("10.1.0.0")), table_bits::FULL);
        assert_eq!(built.state(n("10.1.1.0")), table_bits::FULL);
        assert_eq!(built.state(n("10.1.2.0")), 0);
        assert_eq!(built.state(n("10.2.3.0")), table_bits::LONG);
        let long = built.long[&n("10.2.3.0")];
        assert_eq!(long[0], 1 << 7, "10.2.3.7 only in the first 64 hosts");
        assert_eq!((long[1], long[2], long[3]), (0, u64::MAX, u64::MAX));
    }

    #[test]
    fn a_scope_names_its_table_slot() {
        for (kind, generation, listener) in [
            (AclKind::GlobalDeny, 1, 0),
            (AclKind::Deny, 0, 17),
            (AclKind::Allow, 1, 4096),
        ] {
            let list = ListGen::of(AclScope::new(kind, generation, listener));
            assert_eq!(list.slot, list_slot(kind, generation, listener));
        }
    }

    #[test]
    fn the_whole_space_is_one_full_run() {
        let built = Built::of(&[net("0.0.0.0/0")]);
        assert_eq!(built.words.len(), TABLE_WORDS as usize);
        assert!(built.words.values().all(|w| *w == 0x5555_5555_5555_5555));
    }
}
