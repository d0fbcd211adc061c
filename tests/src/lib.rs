//! Integration tests, eBPF verdict tests and benchmarks of Portcullis; the
//! harness they share lives in `portcullis-harness` and is re-exported here.

pub use portcullis_harness::*;

pub mod control;
pub mod load;
pub mod vm;

use std::net::IpAddr;

use portcullis::xdp::{AclList, Counters, GateMode, Instance, ListenerAddr, Loaded, Maps};

/// The XDP program loaded with pinned maps of its own, for verdicts on
/// crafted frames with `BPF_PROG_TEST_RUN`; its pins are removed on drop.
pub struct Prog {
    name: String,
    loaded: Loaded,
    /// Its maps.
    pub maps: Maps,
}

impl std::fmt::Debug for Prog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prog")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Prog {
    /// Loads the program with ACL tries of `acl_capacity` entries.
    pub fn new(acl_capacity: u32) -> Self {
        let name = unique_name("x");
        let instance = Instance::new(&name).expect("valid name");
        let loaded = instance.load(acl_capacity).expect("program loads and verifies");
        let maps = instance.maps().expect("maps open");
        Self { name, loaded, maps }
    }

    /// Wraps a program the test loaded itself (its pins are the test's to remove).
    pub fn from_parts(loaded: Loaded, maps: Maps) -> Self {
        let name = maps.instance().name().to_owned();
        Self { name, loaded, maps }
    }

    /// Adds a listener; its address and id.
    pub fn listener(&mut self, addr: &str) -> (ListenerAddr, u32) {
        let listener: ListenerAddr = addr.parse().expect("listener");
        let id = self.maps.add_listener(&listener).expect("listener added");
        (listener, id)
    }

    /// Adds a listener whose gate is closed in `mode`.
    pub fn gated(&mut self, addr: &str, mode: GateMode) -> (ListenerAddr, u32) {
        let (listener, id) = self.listener(addr);
        self.maps.set_gate(&listener, mode, false).expect("gate set");
        (listener, id)
    }

    /// Adds `cidr` to `list`.
    pub fn acl(&mut self, list: AclList, cidr: &str) {
        let net = cidr.parse().expect("cidr");
        assert!(self.maps.acl_add(&list, net).expect("acl add"));
    }

    /// The XDP action for `frame`.
    pub fn run(&mut self, frame: &[u8]) -> u32 {
        self.reply(frame).0
    }

    /// The XDP action for `frame`, and the frame as the program left it.
    pub fn reply(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.loaded.test_run_frame(frame).expect("test run")
    }

    /// Counters of one slot, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Counters {
        self.maps.counters(slot).expect("counters")
    }
}

impl Drop for Prog {
    fn drop(&mut self) {
        remove_pins(&self.name);
    }
}

/// A seeded generator (PCG-style LCG), so a test or benchmark run repeats exactly.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        u32::try_from(self.0 >> 32).expect("shifted")
    }

    /// The next 128 random bits.
    pub fn next_u128(&mut self) -> u128 {
        (0..4).fold(0u128, |acc, _| (acc << 32) | u128::from(self.next_u32()))
    }

    /// A number below `n` (> 0).
    pub fn below(&mut self, n: u32) -> u32 {
        self.next_u32() % n
    }
}

/// An address from its text.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}
