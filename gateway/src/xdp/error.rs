use std::{error::Error as _, io, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    programs::{ProgramError, links::LinkError},
};

/// What went wrong while talking to the kernel's BPF side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdpError {
    /// The instance name cannot be used as a directory name.
    #[error("invalid instance name {name:?}: use 1-64 of A-Z a-z 0-9 _ . - (not starting with a dot)")]
    InvalidInstance {
        /// The refused name.
        name: String,
    },
    /// bpffs is not mounted and could not be mounted.
    #[error("bpffs is not mounted at {path} and mounting it failed: run `mount -t bpf bpf {path}`")]
    Bpffs {
        /// Where bpffs was expected.
        path: PathBuf,
        /// Why mounting failed.
        #[source]
        source: nix::Error,
    },
    /// A pin directory or file could not be created, read or removed.
    #[error("cannot use pin path {path}")]
    PinDir {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The instance has no pinned maps: nothing was attached yet.
    #[error(
        "instance {instance:?} has no pinned maps at {dir}: run `portcullis xdp attach --iface IFACE --instance {instance}` first"
    )]
    NotLoaded {
        /// The instance.
        instance: String,
        /// Its pin directory.
        dir: PathBuf,
    },
    /// Pinned maps exist but were created by an incompatible build.
    #[error(
        "pinned map {map} in {dir} has another layout ({found}) than this build expects ({expected}): \
         run `portcullis xdp detach --purge --instance {instance}` and attach again"
    )]
    Layout {
        /// The instance.
        instance: String,
        /// Its pin directory.
        dir: PathBuf,
        /// The map.
        map: &'static str,
        /// What this build expects.
        expected: String,
        /// What the pinned map has.
        found: String,
    },
    /// The object could not be loaded (maps created or program verified).
    #[error("loading the XDP object failed")]
    Load {
        /// The loader's error.
        #[source]
        source: EbpfError,
    },
    /// The kernel's BPF run-time statistics could not be turned on.
    #[error("cannot enable BPF run-time statistics (BPF_ENABLE_STATS)")]
    Stats {
        /// The syscall error.
        #[source]
        source: aya::sys::SyscallError,
    },
    /// The program could not be loaded or verified.
    #[error("the kernel refused the XDP program")]
    Program {
        /// The program error, with the verifier log if any.
        #[source]
        source: ProgramError,
    },
    /// No interface of that name in this network namespace.
    #[error("unknown interface {iface:?} in this network namespace: check `ip link`")]
    UnknownInterface {
        /// The name given.
        iface: String,
    },
    /// The program could not be attached to the interface.
    #[error("attaching XDP to {iface} failed")]
    Attach {
        /// The interface.
        iface: String,
        /// The attach error.
        #[source]
        source: ProgramError,
    },
    /// A pinned link could not be opened, converted or pinned.
    #[error("the XDP link pin {path} could not be used")]
    Link {
        /// The link pin path.
        path: PathBuf,
        /// The link error.
        #[source]
        source: LinkError,
    },
    /// A new link could not be pinned.
    #[error("pinning the XDP link at {path} failed")]
    LinkPin {
        /// The link pin path.
        path: PathBuf,
        /// The pin error.
        #[source]
        source: aya::pin::PinError,
    },
    /// The interface is not attached by this instance.
    #[error("instance {instance:?} is not attached to {iface}")]
    NotAttached {
        /// The instance.
        instance: String,
        /// The interface.
        iface: String,
    },
    /// A map operation failed.
    #[error("BPF map {map}: {op} failed")]
    Map {
        /// The map name.
        map: &'static str,
        /// What was being done.
        op: &'static str,
        /// The map error.
        #[source]
        source: MapError,
    },
    /// A listener is already present.
    #[error("listener {listener} already exists")]
    ListenerExists {
        /// The listener.
        listener: String,
    },
    /// A SYN limit out of range.
    #[error(
        "invalid SYN limit for {listener}: rate and burst must be at most {max}, and burst at least 1 while rate is set"
    )]
    SynLimit {
        /// The listener.
        listener: String,
        /// The largest rate and burst.
        max: u32,
    },
    /// The nftables synproxy table (the SYN cookies' ACK path) could not be written or removed.
    #[error(
        "the SYN cookies' ACK path (nftables table inet {table}) could not be {action}: {detail}; \
         install nftables (`apt install nftables`), or set the listener's SYN budget to 0"
    )]
    Synproxy {
        /// The nftables table.
        table: String,
        /// `written` or `removed`.
        action: &'static str,
        /// What `nft` said.
        detail: String,
    },
    /// No such listener.
    #[error("no listener {listener}: add it with `portcullis listener add {listener}`")]
    UnknownListener {
        /// The listener.
        listener: String,
    },
    /// Every listener id is taken.
    #[error("too many listeners: at most {max} per instance")]
    TooManyListeners {
        /// The limit.
        max: u32,
    },
    /// An ACL entry's family does not match its target's family.
    #[error("{cidr} is not of the same address family as listener {listener}")]
    FamilyMismatch {
        /// The entry.
        cidr: String,
        /// The listener.
        listener: String,
    },
    /// The entry to delete is not in the list.
    #[error("{cidr} is not in the {list}")]
    AclEntryMissing {
        /// The entry.
        cidr: String,
        /// The list.
        list: String,
    },
    /// The number of possible CPUs could not be read.
    #[error("cannot read the number of possible CPUs")]
    Cpus {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The lock file that serialises writers could not be taken.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl XdpError {
    /// A one-line hint on what to do, when the root cause is a common one.
    pub fn hint(&self) -> Option<&'static str> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = self.source();
        while let Some(error) = cause {
            if let Some(io) = error.downcast_ref::<io::Error>() {
                return match io.raw_os_error() {
                    Some(libc::EPERM | libc::EACCES) => Some(
                        "BPF needs privileges: run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON",
                    ),
                    Some(libc::ENOMEM | libc::E2BIG) => Some(
                        "the map is full or memory is short: raise --acl-capacity at attach, or remove entries",
                    ),
                    Some(libc::EOPNOTSUPP) => {
                        Some("this interface or kernel does not support XDP in that mode: try --mode generic")
                    }
                    Some(libc::EBUSY | libc::EEXIST) => Some(
                        "another XDP program is attached to this interface: remove it (`ip link set dev IFACE xdp off`) first",
                    ),
                    _ => None,
                };
            }
            cause = error.source();
        }
        None
    }
}
