use std::{fs, path::PathBuf, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::statfs,
};
use portcullis_common::{ABI_VERSION, DEFAULT_ACL_CAPACITY, PROGRAM_NAME, config_slot, map_names};
use tracing::{info, warn};

use super::{BPFFS, Instance, OBJECT, XdpError, maps::map_err};

/// The program loaded into the kernel, with its maps, not yet attached.
#[derive(Debug)]
pub struct Loaded {
    ebpf: Ebpf,
    floor_loaded: bool,
}

/// The object's empty program, the floor `cargo xtask bench xdp` measures against.
const FLOOR_PROGRAM: &str = "portcullis_floor";

impl Loaded {
    /// Runs the object's empty program (it passes everything) on `frame`
    /// `repeat` times: the cost of a test run itself, beside the program's.
    pub fn floor_run(&mut self, frame: &[u8], repeat: u32) -> Result<Duration, XdpError> {
        let program = named(&mut self.ebpf, FLOOR_PROGRAM)?;
        if !self.floor_loaded {
            program.load().map_err(|source| XdpError::Program { source })?;
            self.floor_loaded = true;
        }
        repeated(program, frame, repeat).map(|(_, took)| took)
    }

    fn program(&mut self) -> Result<&mut Xdp, XdpError> {
        named(&mut self.ebpf, PROGRAM_NAME)
    }

    /// Runs the program once on `frame` with `BPF_PROG_TEST_RUN`: returns the
    /// XDP action and the frame as the program left it (its reply, for `XDP_TX`).
    pub fn test_run_frame(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), XdpError> {
        let program = self.program()?;
        let mut out = vec![0u8; 4096];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = program
            .test_run(options)
            .map_err(|source| XdpError::Program { source })?;
        out.truncate(usize::try_from(result.data_size_out).unwrap_or(0));
        Ok((result.return_value, out))
    }

    /// Runs the program on one frame `repeat` times with `BPF_PROG_TEST_RUN`:
    /// returns the XDP action and the mean time per run.
    pub fn test_run(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, Duration), XdpError> {
        repeated(self.program()?, frame, repeat)
    }
}

fn named<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, XdpError> {
    ebpf.program_mut(name)
        .ok_or(XdpError::Program {
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| XdpError::Program { source })
}

/// One `BPF_PROG_TEST_RUN` of `repeat` runs: the action and the mean time per run.
fn repeated(program: &mut Xdp, frame: &[u8], repeat: u32) -> Result<(u32, Duration), XdpError> {
    let options = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    };
    let result = program
        .test_run(options)
        .map_err(|source| XdpError::Program { source })?;
    Ok((result.return_value, result.duration))
}

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to attach the XDP program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native mode only.
    Native,
    /// Generic (SKB) mode only: works everywhere, costs an skb per packet.
    Generic,
}

/// Options for [`Instance::attach`].
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions {
    /// Attach mode for a new link (an existing link keeps its mode).
    pub mode: AttachMode,
    /// Capacity of each ACL trie when the maps are first created.
    pub acl_capacity: u32,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            mode: AttachMode::Auto,
            acl_capacity: DEFAULT_ACL_CAPACITY,
        }
    }
}

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    /// A new link in native mode.
    Native,
    /// A new link in generic (SKB) mode.
    Generic,
    /// The program was swapped atomically into the interface's existing link.
    Replaced,
}

/// The result of [`Instance::attach`].
#[derive(Debug, Clone)]
pub struct Attached {
    /// The interface.
    pub iface: String,
    /// How it was attached.
    pub mode: AttachedMode,
    /// Where its link is pinned.
    pub link_pin: PathBuf,
}

/// Mounts bpffs at [`BPFFS`] if it is not mounted yet.
pub fn ensure_bpffs() -> Result<(), XdpError> {
    let mounted = statfs(BPFFS).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC);
    if mounted {
        return Ok(());
    }
    mount(Some("bpf"), BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(|source| XdpError::Bpffs {
        path: BPFFS.into(),
        source,
    })
}

impl Instance {
    /// Loads the program, creating the pinned maps (with `acl_capacity`
    /// entries per ACL trie) or reusing them, without attaching it.
    pub fn load(&self, acl_capacity: u32) -> Result<Loaded, XdpError> {
        ensure_bpffs()?;
        fs::create_dir_all(self.pin_dir()).map_err(|source| XdpError::PinDir {
            path: self.pin_dir().to_owned(),
            source,
        })?;
        super::maps::retire_abi4_maps(self)?;
        super::maps::check_layout(self)?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(self.pin_dir())
            .map_pin_path(map_names::ACL4_TABLES, self.map_pin(map_names::ACL4_TABLES))
            .map_max_entries(map_names::ACL_V4, acl_capacity)
            .map_max_entries(map_names::ACL_V6, acl_capacity)
            .map_max_entries(map_names::ACL4_LONG, acl_capacity)
            .load(OBJECT)
            .map_err(|source| XdpError::Load { source })?;
        let mut maps = self.maps()?;
        let abi = maps.config_get(config_slot::ABI)?;
        if abi == 2 {
            let _lock = maps.lock()?;
            maps.rebuild_ports()?;
            maps.rebuild_tables()?;
            info!(
                instance = self.name(),
                "maps of ABI {abi} taken over: port bits and IPv4 tables built"
            );
        }
        if super::maps::UPGRADABLE_ABIS.contains(&abi) {
            let _lock = maps.lock()?;
            maps.default_syn_limits()?;
            info!(
                instance = self.name(),
                "maps of ABI {abi} taken over: listeners given the default SYN limit"
            );
        }
        maps.config
            .set(config_slot::ABI, ABI_VERSION, 0)
            .map_err(map_err(map_names::CONFIG, "write ABI version"))?;
        let mut loaded = Loaded {
            ebpf,
            floor_loaded: false,
        };
        loaded
            .program()?
            .load()
            .map_err(|source| XdpError::Program { source })?;
        Ok(loaded)
    }

    /// Loads the program (creating or reusing the pinned maps) and attaches it
    /// to `iface`. If the interface already has this instance's pinned link,
    /// the new program replaces the old one atomically: enforcement never
    /// pauses. The link stays pinned after this process exits.
    pub fn attach(&self, iface: &str, options: &AttachOptions) -> Result<Attached, XdpError> {
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(XdpError::UnknownInterface {
                iface: iface.to_owned(),
            });
        }
        let mut loaded = self.load(options.acl_capacity)?;
        let program = loaded.program()?;
        let link_pin = self.link_pin(iface);
        if link_pin.exists() {
            match replace_in_link(program, &link_pin) {
                Ok(()) => {
                    info!(iface, pin = %link_pin.display(), "XDP program replaced in the pinned link");
                    return Ok(Attached {
                        iface: iface.to_owned(),
                        mode: AttachedMode::Replaced,
                        link_pin,
                    });
                }
                Err(error) => {
                    // The interface the link was made for is gone (deleted, or
                    // recreated under the same name): the pin is stale.
                    warn!(iface, pin = %link_pin.display(), %error, "stale XDP link pin removed");
                    fs::remove_file(&link_pin).map_err(|source| XdpError::PinDir {
                        path: link_pin.clone(),
                        source,
                    })?;
                }
            }
        }

        let (link_id, mode) = match options.mode {
            AttachMode::Native => (attach_as(program, iface, XdpMode::Driver)?, AttachedMode::Native),
            AttachMode::Generic => (attach_as(program, iface, XdpMode::Skb)?, AttachedMode::Generic),
            AttachMode::Auto => match attach_as(program, iface, XdpMode::Driver) {
                Ok(id) => (id, AttachedMode::Native),
                Err(error) => {
                    warn!(iface, %error, "native XDP attach failed, falling back to generic (SKB) mode");
                    (attach_as(program, iface, XdpMode::Skb)?, AttachedMode::Generic)
                }
            },
        };
        let link = program.take_link(link_id).map_err(|source| XdpError::Attach {
            iface: iface.to_owned(),
            source,
        })?;
        let link_err = |source| XdpError::Link {
            path: link_pin.clone(),
            source,
        };
        let fd_link: FdLink = link.try_into().map_err(link_err)?;
        fd_link.pin(&link_pin).map_err(|source| XdpError::LinkPin {
            path: link_pin.clone(),
            source,
        })?;
        info!(iface, ?mode, pin = %link_pin.display(), "XDP program attached");
        Ok(Attached {
            iface: iface.to_owned(),
            mode,
            link_pin,
        })
    }

    /// Detaches the instance's program from `iface` by removing its pinned link.
    pub fn detach(&self, iface: &str) -> Result<(), XdpError> {
        let link_pin = self.link_pin(iface);
        if !link_pin.exists() {
            return Err(XdpError::NotAttached {
                instance: self.name().to_owned(),
                iface: iface.to_owned(),
            });
        }
        fs::remove_file(&link_pin).map_err(|source| XdpError::PinDir {
            path: link_pin,
            source,
        })
    }
}

fn attach_as(
    program: &mut Xdp,
    iface: &str,
    mode: XdpMode,
) -> Result<aya::programs::xdp::XdpLinkId, XdpError> {
    program.attach(iface, mode).map_err(|source| match source {
        ProgramError::UnknownInterface { .. } => XdpError::UnknownInterface {
            iface: iface.to_owned(),
        },
        source => XdpError::Attach {
            iface: iface.to_owned(),
            source,
        },
    })
}

fn replace_in_link(program: &mut Xdp, link_pin: &std::path::Path) -> Result<(), XdpError> {
    let link_err = |source| XdpError::Link {
        path: link_pin.to_owned(),
        source,
    };
    let pinned = PinnedLink::from_pin(link_pin).map_err(link_err)?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
    program
        .attach_to_link(link)
        .map(drop)
        .map_err(|source| XdpError::Attach {
            iface: link_pin.display().to_string(),
            source,
        })
}

/// Time the kernel spent in an instance's XDP program, and how many times it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunStats {
    /// Total run time (counted only while [`enable_run_stats`] is held).
    pub run_time: Duration,
    /// Runs (packets).
    pub runs: u64,
}

/// Turns the kernel's BPF run-time statistics on until the returned descriptor is dropped.
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, XdpError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|source| XdpError::Stats { source })
}

impl Instance {
    /// Run statistics of every loaded program that uses this instance's maps
    /// (summed: a re-attach leaves the old program running until it is swapped).
    pub fn run_stats(&self) -> Result<RunStats, XdpError> {
        let pin = self.map_pin(map_names::LISTENERS);
        let listeners = aya::maps::MapInfo::from_pin(&pin)
            .map_err(map_err(map_names::LISTENERS, "read info"))?
            .id();
        let mut total = RunStats::default();
        for program in aya::programs::loaded_programs().flatten() {
            let ours = program
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&listeners));
            if ours {
                total.run_time += program.run_time();
                total.runs += program.run_count();
            }
        }
        Ok(total)
    }
}
