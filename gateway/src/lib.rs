//! Portcullis, an API gateway appliance: an XDP program enforces connection
//! ACLs at the NIC from pinned eBPF maps, and an io_uring reverse proxy
//! terminates HTTP/1.1 and TLS and forwards to upstream services.
//!
//! The modules are layers that point one way (docs/architecture.md; the
//! rule is checked by `tests/layers.rs`), lowest first: [`http`] (the codec),
//! [`xdp`] (the only module that touches the kernel's BPF side) and
//! [`telemetry`]; [`config`] says what is served; [`tls`] and [`store`];
//! [`policy`]; [`gatekeeper`] says whether a route is open; [`runtime`] holds
//! the generation in force; [`proxy`] is the data path over it; and
//! [`supervisor`] runs it all as `portcullis run`.

pub mod config;
pub mod control;
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
