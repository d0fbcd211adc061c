//! Portcullis, an API gateway appliance: an XDP program enforces connection
//! ACLs at the NIC from pinned eBPF maps, and the userspace gateway keeps those
//! maps current.
//!
//! Modules follow the path of a packet: [`xdp`] is the only one that touches
//! the kernel's BPF side.

pub mod xdp;
