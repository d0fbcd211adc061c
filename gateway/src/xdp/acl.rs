//! Connection ACLs: one LPM trie per address family holds every list, each
//! entry keyed by its list's [`AclScope`] followed by the source prefix and
//! valued by its prefix length. The XDP program reads the IPv6 trie directly
//! and, for IPv4, the tables derived from the trie (see `table.rs`).
//!
//! Single entries are added and removed in place. A whole list is replaced
//! atomically: the new entries are written under the list's other generation,
//! then one map update flips the generation bit the XDP program reads, then the
//! old generation is deleted. A packet sees the old list or the new one, never
//! a mix.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use aya::maps::{MapError, lpm_trie::Key};
use ipnet::IpNet;
use portcullis_common::{AclKind, AclScope, AclV4, AclV6, ListenerValue, acl_flags, config_slot, map_names};

use super::{
    ListenerAddr, Maps, XdpError,
    maps::{found, map_err},
    table::ListGen,
};

/// `BPF_NOEXIST`: insert only if the exact prefix is absent.
const BPF_NOEXIST: u64 = 1;

/// One ACL list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AclList {
    /// Sources dropped on every listener.
    GlobalDeny,
    /// Sources dropped on one listener.
    Deny(ListenerAddr),
    /// The only sources accepted on one listener (when non-empty).
    Allow(ListenerAddr),
}

impl fmt::Display for AclList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::GlobalDeny => f.write_str("global deny list"),
            Self::Deny(l) => write!(f, "deny list of {l}"),
            Self::Allow(l) => write!(f, "allow list of {l}"),
        }
    }
}

/// The state of one list as the XDP program reads it.
#[derive(Debug, Clone, Copy)]
struct ListState {
    active: bool,
    generation: u32,
    len: u32,
}

impl AclList {
    const fn kind(&self) -> AclKind {
        match self {
            Self::GlobalDeny => AclKind::GlobalDeny,
            Self::Deny(_) => AclKind::Deny,
            Self::Allow(_) => AclKind::Allow,
        }
    }

    const fn bits(&self) -> (u32, u32) {
        match self {
            Self::GlobalDeny | Self::Deny(_) => (acl_flags::DENY_ACTIVE, acl_flags::DENY_GEN),
            Self::Allow(_) => (acl_flags::ALLOW_ACTIVE, acl_flags::ALLOW_GEN),
        }
    }

    const fn listener(&self) -> Option<&ListenerAddr> {
        match self {
            Self::GlobalDeny => None,
            Self::Deny(l) | Self::Allow(l) => Some(l),
        }
    }
}

impl Maps {
    fn list_state(&self, list: &AclList) -> Result<(ListState, Option<ListenerValue>), XdpError> {
        let (active_bit, gen_bit) = list.bits();
        let (flags, len, value) = match list.listener() {
            None => {
                let flags = self.config_get(config_slot::GLOBAL_ACL)?;
                let len = self.config_get(config_slot::GLOBAL_DENY_LEN)?;
                (flags, len, None)
            }
            Some(listener) => {
                let value = self.listener_value(listener)?;
                let len = match list {
                    AclList::Allow(_) => value.allow_len,
                    _ => value.deny_len,
                };
                (value.acl, len, Some(value))
            }
        };
        Ok((
            ListState {
                active: flags & active_bit != 0,
                generation: u32::from(flags & gen_bit != 0),
                len,
            },
            value,
        ))
    }

    /// Publishes a list's state: for a listener, in one atomic map update.
    fn set_list_state(
        &mut self,
        list: &AclList,
        value: Option<ListenerValue>,
        state: ListState,
    ) -> Result<(), XdpError> {
        let (active_bit, gen_bit) = list.bits();
        let apply = |flags: u32| {
            let flags = if state.active {
                flags | active_bit
            } else {
                flags & !active_bit
            };
            if state.generation == 1 {
                flags | gen_bit
            } else {
                flags & !gen_bit
            }
        };
        if let (Some(listener), Some(mut value)) = (list.listener(), value) {
            value.acl = apply(value.acl);
            match list {
                AclList::Allow(_) => value.allow_len = state.len,
                _ => value.deny_len = state.len,
            }
            self.put_listener(listener, value)
        } else {
            let flags = apply(self.config_get(config_slot::GLOBAL_ACL)?);
            self.config
                .set(config_slot::GLOBAL_ACL, flags, 0)
                .map_err(map_err(map_names::CONFIG, "update"))?;
            self.config
                .set(config_slot::GLOBAL_DENY_LEN, state.len, 0)
                .map_err(map_err(map_names::CONFIG, "update"))
        }
    }

    pub(crate) fn config_get(&self, slot: u32) -> Result<u32, XdpError> {
        self.config
            .get(&slot, 0)
            .map_err(map_err(map_names::CONFIG, "read"))
    }

    fn check_family(list: &AclList, net: &IpNet) -> Result<(), XdpError> {
        match list.listener() {
            Some(listener) if listener.is_v4() != matches!(net, IpNet::V4(_)) => {
                Err(XdpError::FamilyMismatch {
                    cidr: net.to_string(),
                    listener: listener.to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    fn scope(list: &AclList, generation: u32, value: Option<&ListenerValue>) -> AclScope {
        AclScope::new(list.kind(), generation, value.map_or(0, |v| v.id))
    }

    /// Inserts one prefix under a scope; `Ok(false)` if it was already there.
    fn insert_entry(&mut self, scope: AclScope, net: &IpNet) -> Result<bool, XdpError> {
        let len = u32::from(net.prefix_len());
        let result = match net {
            IpNet::V4(v4) => self.acl_v4.insert(&key_v4(scope, *v4), len, BPF_NOEXIST),
            IpNet::V6(v6) => self.acl_v6.insert(&key_v6(scope, v6), len, BPF_NOEXIST),
        };
        match result {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(source) => Err(map_err(acl_map(net), "insert")(source)),
        }
    }

    /// Removes one prefix under a scope; `Ok(false)` if it was not there.
    fn remove_entry(&mut self, scope: AclScope, net: &IpNet) -> Result<bool, XdpError> {
        let result = match net {
            IpNet::V4(v4) => self.acl_v4.remove(&key_v4(scope, *v4)),
            IpNet::V6(v6) => self.acl_v6.remove(&key_v6(scope, v6)),
        };
        found(result)
            .map(|removed| removed.is_some())
            .map_err(map_err(acl_map(net), "remove"))
    }

    /// Every prefix stored under scopes accepted by `keep`.
    fn scan(&self, keep: impl Fn(AclScope) -> bool) -> Result<Vec<(AclScope, IpNet)>, XdpError> {
        let mut out = Vec::new();
        for key in self.acl_v4.keys() {
            let key = key.map_err(map_err(map_names::ACL_V4, "iterate"))?;
            let data = key.data();
            if keep(data.scope) {
                let prefix = u8::try_from(key.prefix_len().saturating_sub(AclScope::BITS)).unwrap_or(32);
                if let Ok(net) = IpNet::new(IpAddr::from(data.addr), prefix) {
                    out.push((data.scope, net));
                }
            }
        }
        for key in self.acl_v6.keys() {
            let key = key.map_err(map_err(map_names::ACL_V6, "iterate"))?;
            let data = key.data();
            if keep(data.scope) {
                let prefix = u8::try_from(key.prefix_len().saturating_sub(AclScope::BITS)).unwrap_or(128);
                if let Ok(net) = IpNet::new(IpAddr::from(data.addr), prefix) {
                    out.push((data.scope, net));
                }
            }
        }
        Ok(out)
    }

    /// The IPv4 prefixes stored under one scope.
    pub(crate) fn v4_entries(&self, scope: AclScope) -> Result<Vec<ipnet::Ipv4Net>, XdpError> {
        Ok(v4_only(&self.scan(|s| s == scope)?))
    }

    /// Deletes every entry under the scopes `keep` accepts, their IPv4 tables first.
    fn delete_scopes(&mut self, keep: impl Fn(AclScope) -> bool) -> Result<usize, XdpError> {
        let stale = self.scan(keep)?;
        let mut by_scope: std::collections::BTreeMap<[u8; 4], Vec<(AclScope, IpNet)>> =
            std::collections::BTreeMap::new();
        for entry in &stale {
            by_scope.entry(entry.0.0).or_default().push(*entry);
        }
        for entries in by_scope.values() {
            self.table_drop(ListGen::of(entries[0].0), &v4_only(entries))?;
        }
        for (scope, net) in &stale {
            self.remove_entry(*scope, net)?;
        }
        Ok(stale.len())
    }

    /// Builds every IPv4 table from the trie, its values rewritten as prefix
    /// lengths: taking over maps an ABI 2 program made.
    pub(crate) fn rebuild_tables(&mut self) -> Result<(), XdpError> {
        let mut by_scope: std::collections::BTreeMap<[u8; 4], Vec<ipnet::Ipv4Net>> =
            std::collections::BTreeMap::new();
        for (scope, net) in self.scan(|_| true)? {
            if let IpNet::V4(v4) = net {
                self.acl_v4
                    .insert(&key_v4(scope, v4), u32::from(v4.prefix_len()), 0)
                    .map_err(map_err(map_names::ACL_V4, "update"))?;
                by_scope.entry(scope.0).or_default().push(v4);
            }
        }
        for (scope, nets) in by_scope {
            self.table_build(ListGen::of(AclScope(scope)), &nets)?;
        }
        Ok(())
    }

    pub(crate) fn purge_listener_scopes(&mut self, id: u32) -> Result<(), XdpError> {
        let mine: Vec<AclScope> = [AclKind::Deny, AclKind::Allow]
            .into_iter()
            .flat_map(|kind| [AclScope::new(kind, 0, id), AclScope::new(kind, 1, id)])
            .collect();
        self.delete_scopes(|scope| mine.contains(&scope)).map(drop)
    }

    /// Adds one prefix to a list, in place; `Ok(false)` if it was already there.
    pub fn acl_add(&mut self, list: &AclList, net: IpNet) -> Result<bool, XdpError> {
        let net = net.trunc();
        Self::check_family(list, &net)?;
        let _lock = self.lock()?;
        let (mut state, value) = self.list_state(list)?;
        let scope = Self::scope(list, state.generation, value.as_ref());
        if !self.insert_entry(scope, &net)? {
            return Ok(false);
        }
        if let IpNet::V4(v4) = net {
            self.table_add(ListGen::of(scope), v4)?;
        }
        state.len = state.len.saturating_add(1);
        state.active = true;
        self.set_list_state(list, value, state)?;
        Ok(true)
    }

    /// Removes one prefix from a list, in place.
    pub fn acl_remove(&mut self, list: &AclList, net: IpNet) -> Result<(), XdpError> {
        let net = net.trunc();
        let _lock = self.lock()?;
        let (mut state, value) = self.list_state(list)?;
        let scope = Self::scope(list, state.generation, value.as_ref());
        if !self.remove_entry(scope, &net)? {
            return Err(XdpError::AclEntryMissing {
                cidr: net.to_string(),
                list: list.to_string(),
            });
        }
        if let IpNet::V4(v4) = net {
            self.table_remove(ListGen::of(scope), v4)?;
        }
        state.len = state.len.saturating_sub(1);
        if state.len == 0 {
            // The count is a cache; before declaring a list empty (which, for
            // an allow list, opens the listener) make sure it really is.
            state.len = u32::try_from(self.scan(|s| s == scope)?.len()).unwrap_or(u32::MAX);
        }
        state.active = state.len > 0;
        self.set_list_state(list, value, state)
    }

    /// Replaces a whole list atomically (see the module docs).
    pub fn acl_replace(&mut self, list: &AclList, nets: &[IpNet]) -> Result<(), XdpError> {
        let nets: BTreeSet<IpNet> = nets.iter().map(IpNet::trunc).collect();
        for net in &nets {
            Self::check_family(list, net)?;
        }
        let _lock = self.lock()?;
        let (state, value) = self.list_state(list)?;
        let old_scope = Self::scope(list, state.generation, value.as_ref());
        let next_generation = 1 - state.generation;
        let new_scope = Self::scope(list, next_generation, value.as_ref());
        // Left over by a replace that died half-way.
        self.delete_scopes(|s| s == new_scope)?;
        for net in &nets {
            self.insert_entry(new_scope, net)?;
        }
        let v4: Vec<ipnet::Ipv4Net> = nets
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(v4) => Some(*v4),
                IpNet::V6(_) => None,
            })
            .collect();
        self.table_build(ListGen::of(new_scope), &v4)?;
        let len = u32::try_from(nets.len()).unwrap_or(u32::MAX);
        self.set_list_state(
            list,
            value,
            ListState {
                active: len > 0,
                generation: next_generation,
                len,
            },
        )?;
        self.delete_scopes(|s| s == old_scope).map(drop)
    }

    /// The prefixes of a list currently in force, sorted.
    pub fn acl_entries(&self, list: &AclList) -> Result<Vec<IpNet>, XdpError> {
        let (state, value) = self.list_state(list)?;
        let scope = Self::scope(list, state.generation, value.as_ref());
        let mut nets: Vec<IpNet> = self.scan(|s| s == scope)?.into_iter().map(|(_, n)| n).collect();
        nets.sort();
        Ok(nets)
    }

    /// Entries in the global deny list.
    pub fn global_deny_len(&self) -> Result<u32, XdpError> {
        self.config_get(config_slot::GLOBAL_DENY_LEN)
    }
}

fn v4_only(entries: &[(AclScope, IpNet)]) -> Vec<ipnet::Ipv4Net> {
    entries
        .iter()
        .filter_map(|(_, net)| match net {
            IpNet::V4(v4) => Some(*v4),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// The trie holding entries of `net`'s family.
fn acl_map(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => map_names::ACL_V4,
        IpNet::V6(_) => map_names::ACL_V6,
    }
}

fn key_v4(scope: AclScope, net: ipnet::Ipv4Net) -> Key<AclV4> {
    Key::new(
        AclScope::BITS + u32::from(net.prefix_len()),
        AclV4 {
            scope,
            addr: net.network().octets(),
        },
    )
}

fn key_v6(scope: AclScope, net: &ipnet::Ipv6Net) -> Key<AclV6> {
    Key::new(
        AclScope::BITS + u32::from(net.prefix_len()),
        AclV6 {
            scope,
            addr: net.network().octets(),
        },
    )
}
