//! Portcullis, an API gateway appliance: an XDP program enforces connection
//! ACLs at the NIC from pinned eBPF maps, and an io_uring reverse proxy
//! terminates HTTP/1.1 and TLS and forwards to upstream services.
//!
//! A request's path reads from the module names: [`config`] says what is
//! served, [`tls`] holds the certificates, [`proxy`] accepts and routes,
//! [`gatekeeper`] says whether the route is open, [`policy`] applies its
//! policies, the proxy forwards, [`telemetry`] records it. [`xdp`] is the only module that touches
//! the kernel's BPF side.

pub mod config;
pub mod gatekeeper;
pub mod http;
pub mod policy;
pub mod proxy;
pub mod runtime;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod xdp;
