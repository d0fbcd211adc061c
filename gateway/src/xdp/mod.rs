//! The only module that talks to the kernel's BPF side: loads and attaches the
//! XDP program, and reads and writes its pinned maps.
//!
//! Everything lives under one *instance* directory on bpffs
//! (`/sys/fs/bpf/portcullis/<instance>/`): the maps, pinned by name, and one
//! pinned link per guarded interface (`link-<iface>`). Because both maps and
//! links are pinned, enforcement does not depend on any process staying up: a
//! restarted gateway reopens the same maps and swaps its program into the same
//! links atomically.

mod acl;
mod attach;
mod error;
mod gate;
mod maps;
pub mod metrics;
mod mmap;
pub mod synproxy;
mod table;

use std::{
    fs,
    path::{Path, PathBuf},
};

pub use acl::AclList;
pub use attach::{
    AttachMode, AttachOptions, Attached, AttachedMode, Loaded, RunStats, enable_run_stats, ensure_bpffs,
};
pub use error::XdpError;
pub use gate::{GateMode, Heartbeat, monotonic_ns};
pub use maps::{CookieOffer, Listener, ListenerAddr, Maps, Protocol};
pub use portcullis_common::{Counters, DEFAULT_ACL_CAPACITY, SynCounters, SynLimit, UNATTRIBUTED};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Directory under bpffs that holds every instance's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/portcullis";
/// Instance used when none is named.
pub const DEFAULT_INSTANCE: &str = "default";
/// Directory of the per-instance lock files that serialise map writers.
pub const LOCK_DIR: &str = "/run/portcullis";

/// The embedded XDP object, built by `cargo xtask build-ebpf`.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis-xdp.o"));

/// One named set of pins: the maps and links of one gateway instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    name: String,
    dir: PathBuf,
}

impl Instance {
    /// Names an instance; the name becomes a directory, so it is restricted to
    /// 1–64 of `[A-Za-z0-9_.-]`, not starting with a dot.
    pub fn new(name: &str) -> Result<Self, XdpError> {
        Self::with_root(name, Path::new(PIN_ROOT))
    }

    /// Names an instance whose pins live under another bpffs directory.
    pub fn with_root(name: &str, root: &Path) -> Result<Self, XdpError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(XdpError::InvalidInstance {
                name: name.to_owned(),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            dir: root.join(name),
        })
    }

    /// The instance's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bpffs directory holding the instance's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn map_pin(&self, map: &str) -> PathBuf {
        self.dir.join(map)
    }

    pub(crate) fn link_pin(&self, iface: &str) -> PathBuf {
        self.dir.join(format!("link-{iface}"))
    }

    /// Opens the instance's pinned maps; fails if nothing was ever attached.
    pub fn maps(&self) -> Result<Maps, XdpError> {
        Maps::open(self)
    }

    /// Interfaces that have a pinned link of this instance.
    pub fn attached_interfaces(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                entry
                    .file_name()
                    .to_str()
                    .and_then(|name| name.strip_prefix("link-"))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        names
    }

    /// Removes every pin of the instance: links (detaching the program) and
    /// maps (dropping all listeners, ACLs and counters).
    pub fn purge(&self) -> Result<(), XdpError> {
        if !self.dir.exists() {
            return Ok(());
        }
        synproxy::remove_table(self)?;
        let entries = fs::read_dir(&self.dir).map_err(|source| XdpError::PinDir {
            path: self.dir.clone(),
            source,
        })?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|source| XdpError::PinDir { path, source })?;
        }
        fs::remove_dir(&self.dir).map_err(|source| XdpError::PinDir {
            path: self.dir.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_safe_directory_names() {
        for good in ["default", "gw-1", "edge_eu.2"] {
            let i = Instance::new(good).expect(good);
            assert_eq!(i.pin_dir(), Path::new(PIN_ROOT).join(good));
        }
        for bad in ["", ".", "..", "../etc", "a/b", "name with space", &"x".repeat(65)] {
            assert!(
                matches!(Instance::new(bad), Err(XdpError::InvalidInstance { .. })),
                "{bad:?}"
            );
        }
        let i = Instance::new("gw").expect("valid");
        assert_eq!(i.link_pin("eth0"), Path::new(PIN_ROOT).join("gw/link-eth0"));
    }
}
