use std::{
    fmt,
    fs::{self, File},
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use aya::maps::{Array, ArrayOfMaps, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use nix::fcntl::{Flock, FlockArg};
use portcullis_common::{
    ABI_VERSION, Acl4Long, AclV4, AclV6, Counters, ListenerKey, ListenerValue, MAX_LISTENERS, PORT_SLOTS,
    PortEntry, SynBucket, SynCounters, SynKey, SynLimit, config_slot, family, map_names, port_bits,
    port_slot, proto,
};

use super::mmap::MappedArray;

/// The map layout before the IPv4 tables and the port array (ABI 2): its maps
/// are taken over, and what ABI 3 derives from them is built at load.
/// Older ABIs whose maps a load takes over: 2 (no port entries or IPv4
/// tables yet), 3 (no SYN limits yet) and 4 (SYN limits without a budget:
/// those two maps are made anew).
pub(crate) const UPGRADABLE_ABIS: [u32; 3] = [2, 3, 4];

use super::{Instance, LOCK_DIR, XdpError};

/// Transport protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (every HTTP listener).
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    const fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }
}

/// A listener's address, port and protocol; an unspecified address is the
/// wildcard of its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerAddr {
    /// Address and port.
    pub addr: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
}

impl ListenerAddr {
    /// A TCP listener.
    pub const fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            protocol: Protocol::Tcp,
        }
    }

    pub(crate) fn key(&self) -> ListenerKey {
        let mut addr = [0u8; 16];
        let fam = match self.addr.ip() {
            IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                family::V4
            }
            IpAddr::V6(v6) => {
                addr = v6.octets();
                family::V6
            }
        };
        ListenerKey {
            addr,
            port_be: self.addr.port().to_be(),
            proto: self.protocol.number(),
            family: fam,
            pad: 0,
        }
    }

    fn from_key(key: &ListenerKey) -> Self {
        let ip = if key.family == family::V4 {
            IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
        } else {
            IpAddr::from(key.addr)
        };
        Self {
            addr: SocketAddr::new(ip, u16::from_be(key.port_be)),
            protocol: if key.proto == proto::UDP {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
        }
    }

    pub(crate) fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for ListenerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Tcp => write!(f, "{}", self.addr),
            Protocol::Udp => write!(f, "udp:{}", self.addr),
        }
    }
}

impl FromStr for ListenerAddr {
    type Err = String;

    /// Parses `ADDR:PORT` (TCP), `[V6]:PORT`, or either prefixed with `udp:`/`tcp:`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (protocol, rest) = if let Some(rest) = s.strip_prefix("udp:") {
            (Protocol::Udp, rest)
        } else {
            (Protocol::Tcp, s.strip_prefix("tcp:").unwrap_or(s))
        };
        let addr: SocketAddr = rest.parse().map_err(|_| {
            format!("invalid listener {s:?}: expected ADDR:PORT, e.g. 10.0.0.1:443 or [2001:db8::1]:443")
        })?;
        if addr.port() == 0 {
            return Err(format!("invalid listener {s:?}: port 0 cannot be listened on"));
        }
        Ok(Self { addr, protocol })
    }
}

/// One listener as stored in the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// Address, port, protocol.
    pub addr: ListenerAddr,
    /// Listener id: its counters slot and ACL scope.
    pub id: u32,
    /// Entries in its allow list.
    pub allow_len: u32,
    /// Entries in its deny list.
    pub deny_len: u32,
    /// What XDP does while its gate is closed.
    pub gate_mode: super::GateMode,
    /// Whether the proxy holds its gate open.
    pub gate_open: bool,
}

/// Handles to an instance's pinned maps.
pub struct Maps {
    pub(crate) instance: Instance,
    pub(crate) listeners: HashMap<MapData, ListenerKey, ListenerValue>,
    pub(crate) acl_v4: LpmTrie<MapData, AclV4, u32>,
    pub(crate) acl_v6: LpmTrie<MapData, AclV6, u32>,
    pub(crate) config: Array<MapData, u32>,
    pub(crate) counters: PerCpuArray<MapData, Counters>,
    pub(crate) heartbeat: Array<MapData, u64>,
    pub(crate) ports: MappedArray,
    pub(crate) values: MappedArray,
    pub(crate) acl4_tables: ArrayOfMaps<MapData, Array<MapData, u64>>,
    /// The same map again, for the slot deletes aya does not offer.
    pub(crate) acl4_tables_fd: MapData,
    pub(crate) acl4_long: HashMap<MapData, Acl4Long, [u64; 4]>,
    pub(crate) syn_limits: Array<MapData, SynLimit>,
    pub(crate) syn_counters: PerCpuArray<MapData, SynCounters>,
    pub(crate) syn_budget: PerCpuArray<MapData, SynBucket>,
}

impl fmt::Debug for Maps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maps")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

pub(crate) fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> XdpError {
    move |source| XdpError::Map { map, op, source }
}

/// A map operation's result with "no such element" (whichever way aya
/// reports it) turned into `None`.
pub(crate) fn found<T>(result: Result<T, MapError>) -> Result<Option<T>, MapError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(source),
    }
}

fn open_pinned(instance: &Instance, name: &'static str) -> Result<Map, XdpError> {
    let path = instance.map_pin(name);
    if !path.exists() {
        return Err(XdpError::NotLoaded {
            instance: instance.name().to_owned(),
            dir: instance.pin_dir().to_owned(),
        });
    }
    let data = MapData::from_pin(&path).map_err(map_err(name, "open pin"))?;
    Map::from_map_data(data).map_err(map_err(name, "open pin"))
}

fn mapped(
    instance: &Instance,
    name: &'static str,
    entries: u32,
    value_size: usize,
) -> Result<MappedArray, XdpError> {
    let data = MapData::from_pin(instance.map_pin(name)).map_err(map_err(name, "open pin"))?;
    MappedArray::open(std::os::fd::AsFd::as_fd(data.fd()), entries, value_size).map_err(|io_error| {
        map_err(name, "mmap")(MapError::SyscallError(aya::sys::SyscallError {
            call: "mmap",
            io_error,
        }))
    })
}

/// A listener's value with no lists and no gate: a new one, or what is left
/// in its id's slot once it is removed.
const fn unjudged(id: u32) -> ListenerValue {
    ListenerValue {
        id,
        acl: 0,
        allow_len: 0,
        deny_len: 0,
        gate_mode: portcullis_common::gate_mode::NONE,
        gate_open: 0,
    }
}

/// The key and value sizes each map must have in this build.
pub(crate) fn expected_layout(name: &str) -> (u32, u32) {
    use std::mem::size_of;
    let size = |n: usize| u32::try_from(n).expect("map types are small");
    match name {
        map_names::LISTENERS => (size(size_of::<ListenerKey>()), size(size_of::<ListenerValue>())),
        map_names::ACL_V4 => (size(4 + size_of::<AclV4>()), 4),
        map_names::ACL_V6 => (size(4 + size_of::<AclV6>()), 4),
        map_names::COUNTERS => (4, size(size_of::<Counters>())),
        map_names::HEARTBEAT => (4, 8),
        map_names::CONFIG | map_names::ACL4_TABLES => (4, 4),
        map_names::PORTS => (4, size(size_of::<PortEntry>())),
        map_names::VALUES => (4, size(size_of::<ListenerValue>())),
        map_names::ACL4_LONG => (size(size_of::<Acl4Long>()), 32),
        map_names::SYN_LIMITS => (4, size(size_of::<SynLimit>())),
        map_names::SYN_RATE => (size(size_of::<SynKey>()), size(size_of::<SynBucket>())),
        map_names::SYN_COUNTERS => (4, size(size_of::<SynCounters>())),
        map_names::SYN_BUDGET => (4, size(size_of::<SynBucket>())),
        _ => (0, 0),
    }
}

/// The ABI the pinned maps say they were made by (0: no maps yet).
fn pinned_abi(instance: &Instance) -> Result<u32, XdpError> {
    let config = instance.map_pin(map_names::CONFIG);
    if !config.exists() {
        return Ok(0);
    }
    let data = MapData::from_pin(&config).map_err(map_err(map_names::CONFIG, "open pin"))?;
    let array: Array<MapData, u32> =
        Array::try_from(Map::from_map_data(data).map_err(map_err(map_names::CONFIG, "open pin"))?)
            .map_err(map_err(map_names::CONFIG, "open pin"))?;
    array
        .get(&config_slot::ABI, 0)
        .map_err(map_err(map_names::CONFIG, "read ABI version"))
}

/// Unpins the maps whose layout ABI 4 had otherwise (the SYN limits and
/// their counters), so that a load makes them anew; the load then gives
/// every listener the default limits, and the proxy writes its own.
pub(crate) fn retire_abi4_maps(instance: &Instance) -> Result<(), XdpError> {
    if pinned_abi(instance)? != 4 {
        return Ok(());
    }
    for name in [map_names::SYN_LIMITS, map_names::SYN_COUNTERS] {
        let path = instance.map_pin(name);
        if let Err(source) = std::fs::remove_file(&path)
            && source.kind() != std::io::ErrorKind::NotFound
        {
            return Err(XdpError::PinDir { path, source });
        }
    }
    Ok(())
}

/// Refuses pinned maps whose layout differs from this build's.
pub(crate) fn check_layout(instance: &Instance) -> Result<(), XdpError> {
    for name in map_names::ALL {
        let path = instance.map_pin(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(name, "read info"))?;
        let (key, value) = expected_layout(name);
        if (info.key_size(), info.value_size()) != (key, value) {
            return Err(XdpError::Layout {
                instance: instance.name().to_owned(),
                dir: instance.pin_dir().to_owned(),
                map: name,
                expected: format!("key {key} B, value {value} B"),
                found: format!("key {} B, value {} B", info.key_size(), info.value_size()),
            });
        }
    }
    let abi = pinned_abi(instance)?;
    if abi != 0 && abi != ABI_VERSION && !UPGRADABLE_ABIS.contains(&abi) {
        return Err(XdpError::Layout {
            instance: instance.name().to_owned(),
            dir: instance.pin_dir().to_owned(),
            map: map_names::CONFIG,
            expected: format!("ABI {ABI_VERSION}"),
            found: format!("ABI {abi}"),
        });
    }
    Ok(())
}

/// An exclusive lock that serialises writers of one instance's maps.
#[derive(Debug)]
pub(crate) struct WriteLock(#[expect(dead_code, reason = "held for its Drop")] Flock<File>);

impl Maps {
    pub(crate) fn open(instance: &Instance) -> Result<Self, XdpError> {
        check_layout(instance)?;
        Ok(Self {
            instance: instance.clone(),
            listeners: HashMap::try_from(open_pinned(instance, map_names::LISTENERS)?)
                .map_err(map_err(map_names::LISTENERS, "open"))?,
            acl_v4: LpmTrie::try_from(open_pinned(instance, map_names::ACL_V4)?)
                .map_err(map_err(map_names::ACL_V4, "open"))?,
            acl_v6: LpmTrie::try_from(open_pinned(instance, map_names::ACL_V6)?)
                .map_err(map_err(map_names::ACL_V6, "open"))?,
            config: Array::try_from(open_pinned(instance, map_names::CONFIG)?)
                .map_err(map_err(map_names::CONFIG, "open"))?,
            counters: PerCpuArray::try_from(open_pinned(instance, map_names::COUNTERS)?)
                .map_err(map_err(map_names::COUNTERS, "open"))?,
            heartbeat: Array::try_from(open_pinned(instance, map_names::HEARTBEAT)?)
                .map_err(map_err(map_names::HEARTBEAT, "open"))?,
            ports: mapped(instance, map_names::PORTS, PORT_SLOTS, size_of::<PortEntry>())?,
            values: mapped(
                instance,
                map_names::VALUES,
                MAX_LISTENERS + 1,
                size_of::<ListenerValue>(),
            )?,
            acl4_tables: ArrayOfMaps::try_from(open_pinned(instance, map_names::ACL4_TABLES)?)
                .map_err(map_err(map_names::ACL4_TABLES, "open"))?,
            acl4_tables_fd: MapData::from_pin(instance.map_pin(map_names::ACL4_TABLES))
                .map_err(map_err(map_names::ACL4_TABLES, "open pin"))?,
            acl4_long: HashMap::try_from(open_pinned(instance, map_names::ACL4_LONG)?)
                .map_err(map_err(map_names::ACL4_LONG, "open"))?,
            syn_limits: Array::try_from(open_pinned(instance, map_names::SYN_LIMITS)?)
                .map_err(map_err(map_names::SYN_LIMITS, "open"))?,
            syn_counters: PerCpuArray::try_from(open_pinned(instance, map_names::SYN_COUNTERS)?)
                .map_err(map_err(map_names::SYN_COUNTERS, "open"))?,
            syn_budget: PerCpuArray::try_from(open_pinned(instance, map_names::SYN_BUDGET)?)
                .map_err(map_err(map_names::SYN_BUDGET, "open"))?,
        })
    }

    /// Writes a listener's value where the XDP program reads it by id, one
    /// atomic store per field (the hash keeps its copy for the ports with
    /// several specific listeners, and for enumeration).
    pub(crate) fn write_value(&self, value: &ListenerValue) {
        let fields = [
            value.id,
            value.acl,
            value.allow_len,
            value.deny_len,
            value.gate_mode,
            value.gate_open,
        ];
        for (word, field) in fields.into_iter().enumerate() {
            self.values.store(value.id, word, field);
        }
    }

    /// Stores a listener's value in the hash and by id.
    pub(crate) fn put_listener(
        &mut self,
        listener: &ListenerAddr,
        value: ListenerValue,
    ) -> Result<(), XdpError> {
        self.listeners
            .insert(listener.key(), value, 0)
            .map_err(map_err(map_names::LISTENERS, "update"))?;
        self.write_value(&value);
        Ok(())
    }

    /// Recomputes one port's entry from the listeners on it, after one was
    /// added or removed. Fields are stored one by one so that XDP never
    /// sees an id beside another listener's address: the single-listener
    /// id is cleared before its address changes and set after.
    fn refresh_port(&mut self, port: (Protocol, u16)) -> Result<(), XdpError> {
        let mut new = PortEntry::default();
        let mut specific_v4 = Vec::new();
        for listener in self.listeners()? {
            let addr = listener.addr;
            if (addr.protocol, addr.addr.port()) != port {
                continue;
            }
            match (addr.addr.ip(), addr.addr.ip().is_unspecified()) {
                (IpAddr::V4(_), true) => {
                    new.bits |= port_bits::WILDCARD_V4;
                    new.wildcard_v4 = listener.id;
                }
                (IpAddr::V4(ip), false) => {
                    new.bits |= port_bits::SPECIFIC_V4;
                    specific_v4.push((listener.id, ip.octets()));
                }
                (IpAddr::V6(_), true) => {
                    new.bits |= port_bits::WILDCARD_V6;
                    new.wildcard_v6 = listener.id;
                }
                (IpAddr::V6(_), false) => new.bits |= port_bits::SPECIFIC_V6,
            }
        }
        if let [(id, addr)] = specific_v4[..] {
            (new.one_v4, new.one_v4_addr) = (id, addr);
        }
        let slot = port_slot(port.0.number(), port.1);
        let ports = &self.ports;
        let (bits, wildcard_v4, wildcard_v6, one_v4, one_v4_addr) = (0, 1, 2, 3, 4);
        let old_one = ports.load(slot, one_v4);
        let old_addr = ports.load(slot, one_v4_addr);
        let new_addr = u32::from_ne_bytes(new.one_v4_addr);
        if old_one != new.one_v4 || old_addr != new_addr {
            ports.store(slot, one_v4, 0);
            ports.store(slot, one_v4_addr, new_addr);
        }
        ports.store(slot, wildcard_v4, new.wildcard_v4);
        ports.store(slot, wildcard_v6, new.wildcard_v6);
        ports.store(slot, one_v4, new.one_v4);
        ports.store(slot, bits, new.bits);
        Ok(())
    }

    /// Rebuilds every listener's value by id and every port's entry from the
    /// hash (taking over ABI 2 maps).
    pub(crate) fn rebuild_ports(&mut self) -> Result<(), XdpError> {
        let mut ports = std::collections::BTreeSet::new();
        for entry in &self.listeners {
            let (key, value) = entry.map_err(map_err(map_names::LISTENERS, "iterate"))?;
            self.write_value(&value);
            let addr = ListenerAddr::from_key(&key);
            ports.insert((addr.protocol, addr.addr.port()));
        }
        for port in ports {
            self.refresh_port(port)?;
        }
        Ok(())
    }

    /// The instance these maps belong to.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    pub(crate) fn lock(&self) -> Result<WriteLock, XdpError> {
        let path = std::path::Path::new(LOCK_DIR).join(format!("{}.lock", self.instance.name()));
        let lock_err = |source| XdpError::Lock {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(LOCK_DIR).map_err(lock_err)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map(WriteLock)
            .map_err(|(_, errno)| lock_err(errno.into()))
    }

    /// Every listener, sorted by address.
    pub fn listeners(&self) -> Result<Vec<Listener>, XdpError> {
        let mut out = Vec::new();
        for entry in &self.listeners {
            let (key, value) = entry.map_err(map_err(map_names::LISTENERS, "iterate"))?;
            out.push(Listener {
                addr: ListenerAddr::from_key(&key),
                id: value.id,
                allow_len: value.allow_len,
                deny_len: value.deny_len,
                gate_mode: super::GateMode::from_raw(value.gate_mode),
                gate_open: value.gate_open != 0,
            });
        }
        out.sort_by_key(|l| l.addr);
        Ok(out)
    }

    pub(crate) fn listener_value(&self, listener: &ListenerAddr) -> Result<ListenerValue, XdpError> {
        match self.listeners.get(&listener.key(), 0) {
            Ok(value) => Ok(value),
            Err(MapError::KeyNotFound) => Err(XdpError::UnknownListener {
                listener: listener.to_string(),
            }),
            Err(source) => Err(map_err(map_names::LISTENERS, "lookup")(source)),
        }
    }

    /// Adds a listener, so that its traffic is judged; returns its id.
    pub fn add_listener(&mut self, listener: &ListenerAddr) -> Result<u32, XdpError> {
        let _lock = self.lock()?;
        let key = listener.key();
        if self.listeners.get(&key, 0).is_ok() {
            return Err(XdpError::ListenerExists {
                listener: listener.to_string(),
            });
        }
        let taken: std::collections::HashSet<u32> = self.listeners()?.into_iter().map(|l| l.id).collect();
        let id = (1..=MAX_LISTENERS)
            .find(|id| !taken.contains(id))
            .ok_or(XdpError::TooManyListeners { max: MAX_LISTENERS })?;
        // A listener removed by a process that died half-way may have left
        // entries or counts under this id: start clean.
        self.purge_listener_scopes(id)?;
        self.reset_counters(id)?;
        self.write_syn_limit(id, SynLimit::DEFAULT)?;
        self.put_listener(listener, unjudged(id))?;
        self.refresh_port((listener.protocol, listener.addr.port()))?;
        Ok(id)
    }

    /// Removes a listener: its traffic is no longer judged, and its ACL
    /// entries and counters are dropped.
    pub fn remove_listener(&mut self, listener: &ListenerAddr) -> Result<(), XdpError> {
        let _lock = self.lock()?;
        let value = self.listener_value(listener)?;
        self.listeners
            .remove(&listener.key())
            .map_err(map_err(map_names::LISTENERS, "remove"))?;
        self.refresh_port((listener.protocol, listener.addr.port()))?;
        self.write_value(&unjudged(value.id));
        self.purge_listener_scopes(value.id)?;
        self.reset_counters(value.id)
    }

    fn reset_counters(&mut self, id: u32) -> Result<(), XdpError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| XdpError::Cpus { source })?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(|source| XdpError::Cpus { source })?;
        self.counters
            .set(id, zeros, 0)
            .map_err(map_err(map_names::COUNTERS, "reset"))?;
        let zeros = PerCpuValues::try_from(vec![SynCounters::default(); cpus])
            .map_err(|source| XdpError::Cpus { source })?;
        self.syn_counters
            .set(id, zeros, 0)
            .map_err(map_err(map_names::SYN_COUNTERS, "reset"))?;
        let full = PerCpuValues::try_from(vec![SynBucket::default(); cpus])
            .map_err(|source| XdpError::Cpus { source })?;
        self.syn_budget
            .set(id, full, 0)
            .map_err(map_err(map_names::SYN_BUDGET, "reset"))
    }
}

/// What a cookie SYN-ACK offers the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieOffer {
    /// The MSS.
    pub mss: u16,
    /// The window scale: the one the kernel gives the listener's own connections.
    pub wscale: u8,
}

impl Maps {
    fn write_syn_limit(&mut self, id: u32, limit: SynLimit) -> Result<(), XdpError> {
        self.syn_limits
            .set(id, limit, 0)
            .map_err(map_err(map_names::SYN_LIMITS, "write"))
    }

    /// Sets a listener's SYN limits whole.
    pub fn set_syn_limit(&mut self, listener: &ListenerAddr, limit: SynLimit) -> Result<(), XdpError> {
        let bad = |n: u32| n > SynLimit::MAX;
        if bad(limit.rate) || bad(limit.burst) || bad(limit.budget) || (limit.rate > 0 && limit.burst == 0) {
            return Err(XdpError::SynLimit {
                listener: listener.to_string(),
                max: SynLimit::MAX,
            });
        }
        let _lock = self.lock()?;
        let id = self.listener_value(listener)?.id;
        self.write_syn_limit(id, limit)
    }

    /// Sets a listener's per-source SYN limit (`rate` 0 turns it off), keeping its budget.
    pub fn set_syn_rate(&mut self, listener: &ListenerAddr, rate: u32, burst: u32) -> Result<(), XdpError> {
        let id = self.listener_value(listener)?.id;
        let limit = self.syn_limit(id)?;
        self.set_syn_limit(listener, SynLimit { rate, burst, ..limit })
    }

    /// Sets a listener's SYN budget (SYNs per second per CPU before cookies;
    /// 0 turns cookies off) and whether the cookies' ACK path is in place,
    /// with the MSS and window scale a cookie SYN-ACK offers; keeps its per-source limit.
    pub fn set_syn_budget(
        &mut self,
        listener: &ListenerAddr,
        budget: u32,
        cookies: Option<CookieOffer>,
    ) -> Result<(), XdpError> {
        let id = self.listener_value(listener)?.id;
        let limit = self.syn_limit(id)?;
        let offer = cookies.unwrap_or(CookieOffer {
            mss: limit.mss,
            wscale: limit.wscale,
        });
        self.set_syn_limit(
            listener,
            SynLimit {
                budget,
                mss: offer.mss,
                wscale: offer.wscale,
                cookies: u8::from(cookies.is_some()),
                ..limit
            },
        )
    }

    /// A listener's per-source SYN limit.
    pub fn syn_limit(&self, id: u32) -> Result<SynLimit, XdpError> {
        self.syn_limits
            .get(&id, 0)
            .map_err(map_err(map_names::SYN_LIMITS, "read"))
    }

    /// Gives every listener the default SYN limit (maps taken over from an
    /// ABI without one).
    pub(crate) fn default_syn_limits(&mut self) -> Result<(), XdpError> {
        for listener in self.listeners()? {
            self.write_syn_limit(listener.id, SynLimit::DEFAULT)?;
        }
        Ok(())
    }

    /// SYN verdicts of one listener, summed over CPUs.
    pub fn syn_counters(&self, id: u32) -> Result<SynCounters, XdpError> {
        let per_cpu = self
            .syn_counters
            .get(&id, 0)
            .map_err(map_err(map_names::SYN_COUNTERS, "read"))?;
        let mut total = SynCounters::default();
        for counters in per_cpu.iter() {
            total.accumulate(counters);
        }
        Ok(total)
    }

    /// Counters of one slot (a listener id, or 0 for unattributed traffic),
    /// summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<Counters, XdpError> {
        let per_cpu = self
            .counters
            .get(&slot, 0)
            .map_err(map_err(map_names::COUNTERS, "read"))?;
        let mut total = Counters::default();
        for counters in per_cpu.iter() {
            total.accumulate(counters);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_addresses_parse_and_key_in_network_order() {
        let l: ListenerAddr = "10.0.0.1:8080".parse().expect("valid");
        assert_eq!(l.protocol, Protocol::Tcp);
        let key = l.key();
        assert_eq!(&key.addr[..4], &[10, 0, 0, 1]);
        assert_eq!(key.addr[4..], [0; 12]);
        assert_eq!(
            key.port_be.to_ne_bytes(),
            [0x1f, 0x90],
            "port bytes as on the wire"
        );
        assert_eq!((key.proto, key.family), (proto::TCP, family::V4));
        assert_eq!(ListenerAddr::from_key(&key), l);

        let u: ListenerAddr = "udp:[2001:db8::1]:53".parse().expect("valid");
        assert_eq!(u.protocol, Protocol::Udp);
        assert_eq!(u.to_string(), "udp:[2001:db8::1]:53");
        assert_eq!(ListenerAddr::from_key(&u.key()), u);
        assert_eq!(
            "tcp:0.0.0.0:80"
                .parse::<ListenerAddr>()
                .expect("valid")
                .key()
                .addr,
            [0; 16]
        );
    }

    #[test]
    fn bad_listener_addresses_say_what_is_expected() {
        for bad in ["10.0.0.1", "10.0.0.1:0", "host:80", "udp:", "[::1]"] {
            let err = bad.parse::<ListenerAddr>().expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn map_layouts_match_the_shared_types() {
        assert_eq!(expected_layout(map_names::LISTENERS), (24, 24));
        assert_eq!(expected_layout(map_names::ACL_V4), (12, 4));
        assert_eq!(expected_layout(map_names::ACL_V6), (24, 4));
        assert_eq!(expected_layout(map_names::COUNTERS), (4, 104));
        assert_eq!(expected_layout(map_names::HEARTBEAT), (4, 8));
        assert_eq!(expected_layout(map_names::ACL4_LONG), (8, 32));
    }
}
