//! The memory guard: the gateway's cgroup memory in use against its limit,
//! read every 50 ms off the workers, so the proxy refuses new work before the
//! kernel's OOM killer ends the process (and every connection with it).
//!
//! "In use" is the working set, the usage less the inactive page cache in
//! `memory.stat` (as the kubelet counts it): cache the kernel reclaims before
//! it kills anything is not pressure. The limit is the lowest of the
//! gateway's cgroup and its ancestors, in the unified hierarchy (v2) or else
//! the v1 memory controller; without one the guard stays off. While it is
//! above normal, the allocator is asked every second to give freed memory
//! back, so the working set falls when load does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::telemetry::Metrics;

/// How often the guard reads the cgroup.
const POLL: Duration = Duration::from_millis(50);
/// Share of the limit (per mille) from which new connections are closed at accept.
const REFUSE_AT: u64 = 900;
/// Share of the limit (per mille) from which new requests are answered 503.
const SHED_AT: u64 = 950;
/// Share of the limit (per mille) under which the guard is back to normal.
const CLEAR_AT: u64 = 850;

/// What memory allows the proxy to take on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    /// Below the thresholds: everything is served.
    Normal = 0,
    /// New client connections are closed at accept; held ones are served.
    Refuse = 1,
    /// As `Refuse`, and new requests are answered 503 and their connection closed.
    Shed = 2,
}

impl Pressure {
    /// The pressure for `used` of `limit`, coming from `before` (it clears only under [`CLEAR_AT`]).
    pub fn of(used: u64, limit: u64, before: Self) -> Self {
        let per_mille = used.saturating_mul(1000) / limit.max(1);
        if per_mille >= SHED_AT {
            Self::Shed
        } else if per_mille >= REFUSE_AT {
            Self::Refuse.max(before)
        } else if per_mille >= CLEAR_AT {
            before
        } else {
            Self::Normal
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Normal,
            1 => Self::Refuse,
            _ => Self::Shed,
        }
    }

    /// The name logs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Refuse => "refusing connections",
            Self::Shed => "shedding requests",
        }
    }
}

/// The pressure the workers read on accept and on each request.
#[derive(Debug, Default)]
pub struct MemoryGuard(AtomicU8);

impl MemoryGuard {
    /// The pressure now.
    pub fn pressure(&self) -> Pressure {
        Pressure::from_u8(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, p: Pressure) {
        self.0.store(p as u8, Ordering::Relaxed);
    }
}

/// The files of one cgroup version's memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The unified hierarchy: `memory.max`, `memory.current`, `inactive_file`.
    V2,
    /// The v1 memory controller: `memory.limit_in_bytes`,
    /// `memory.usage_in_bytes`, `total_inactive_file`.
    V1,
}

impl Version {
    fn limit_file(self) -> &'static str {
        match self {
            Self::V2 => "memory.max",
            Self::V1 => "memory.limit_in_bytes",
        }
    }

    fn usage_file(self) -> &'static str {
        match self {
            Self::V2 => "memory.current",
            Self::V1 => "memory.usage_in_bytes",
        }
    }

    fn inactive_key(self) -> &'static str {
        match self {
            Self::V2 => "inactive_file ",
            Self::V1 => "total_inactive_file ",
        }
    }
}

/// The gateway's own cgroup with the memory controller, under its hierarchy's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    root: PathBuf,
    dir: PathBuf,
    version: Version,
}

/// The cgroup whose limit binds now, and that limit in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The directory whose usage and `memory.stat` are read.
    pub dir: PathBuf,
    /// Its limit.
    pub limit: u64,
}

impl Cgroup {
    /// This process's cgroup under `root` (`/sys/fs/cgroup`): the unified
    /// hierarchy's when it has the memory controller, else the v1 controller's.
    pub fn of_self(root: &Path) -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path_of = |controller: &str| {
            own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
                let found = if controller.is_empty() {
                    list.is_empty()
                } else {
                    list.split(',').any(|c| c == controller)
                };
                found.then(|| path.trim_start_matches('/').to_owned())
            })
        };
        let v2 = path_of("")
            .map(|p| Self {
                root: root.to_path_buf(),
                dir: root.join(p),
                version: Version::V2,
            })
            .filter(|c| c.dir.join("memory.current").exists());
        v2.or_else(|| {
            let v1 = root.join("memory");
            path_of("memory").map(|p| Self {
                dir: v1.join(p),
                root: v1,
                version: Version::V1,
            })
        })
        .filter(|c| c.dir.join(c.version.usage_file()).exists())
    }

    /// The lowest limit from this cgroup up to the root, and where it is set:
    /// read again at each look, as `systemctl set-property` can change it.
    pub fn binding(&self) -> Option<Binding> {
        let mut dir = self.dir.clone();
        let mut binding: Option<Binding> = None;
        loop {
            if let Some(limit) = read_limit(&dir.join(self.version.limit_file()))
                && binding.as_ref().is_none_or(|b| limit < b.limit)
            {
                binding = Some(Binding {
                    dir: dir.clone(),
                    limit,
                });
            }
            if dir == self.root || !dir.pop() || !dir.starts_with(&self.root) {
                return binding;
            }
        }
    }

    /// Bytes in use under `binding` that the kernel would not reclaim first.
    pub fn working_set(&self, binding: &Binding) -> Option<u64> {
        let current: u64 = std::fs::read_to_string(binding.dir.join(self.version.usage_file()))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(binding.dir.join("memory.stat")).ok()?;
        let inactive_file = stat
            .lines()
            .find_map(|l| l.strip_prefix(self.version.inactive_key()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Some(current.saturating_sub(inactive_file))
    }
}

/// A limit in bytes; `None` for none (v2's `max`, v1's page-rounded
/// `i64::MAX`) or an unreadable file.
fn read_limit(path: &Path) -> Option<u64> {
    let limit: u64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    (limit < 1 << 62).then_some(limit)
}

/// Starts the guard's thread, if the gateway's cgroup has the memory controller.
pub fn start(shared: Arc<crate::runtime::Shared>) {
    let Some(cgroup) = Cgroup::of_self(Path::new("/sys/fs/cgroup")) else {
        tracing::info!("no memory cgroup: the memory guard is off");
        return;
    };
    let limit = cgroup.binding().map(|b| b.limit);
    tracing::info!(
        cgroup = %cgroup.dir.display(),
        limit_bytes = limit,
        "memory guard: new connections refused from 90% of the cgroup limit, new requests shed from 95%"
    );
    let spawned = std::thread::Builder::new()
        .name("memory-guard".into())
        .spawn(move || watch(&cgroup, &shared.memory, &shared.metrics));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "memory guard thread not started: memory is not watched");
    }
}

fn watch(cgroup: &Cgroup, guard: &MemoryGuard, metrics: &Metrics) {
    let mut trimmed = std::time::Instant::now();
    loop {
        let bound = cgroup
            .binding()
            .and_then(|b| Some((cgroup.working_set(&b)?, b.limit)));
        let (used, limit) = bound.unwrap_or((0, u64::MAX));
        metrics
            .memory_working_set
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        metrics
            .memory_limit
            .set(bound.map_or(0, |(_, l)| i64::try_from(l).unwrap_or(i64::MAX)));
        let before = guard.pressure();
        let now = Pressure::of(used, limit, before);
        if now != before {
            guard.set(now);
            metrics.memory_pressure.set(now as i64);
            let (used_mib, limit_mib) = (used >> 20, limit >> 20);
            if now > before {
                tracing::warn!(
                    used_mib,
                    limit_mib,
                    pressure = now.name(),
                    "memory near its limit"
                );
            } else {
                tracing::info!(
                    used_mib,
                    limit_mib,
                    pressure = now.name(),
                    "memory pressure eased"
                );
            }
        }
        if now > Pressure::Normal && trimmed.elapsed() >= TRIM_EVERY {
            give_back();
            trimmed = std::time::Instant::now();
        }
        std::thread::sleep(POLL);
    }
}

/// How often, under pressure, the allocator is asked to return freed memory.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Returns the allocator's free pages to the kernel: glibc keeps what closed
/// connections freed, which would hold the working set up after load drops.
#[cfg(target_env = "gnu")]
#[expect(unsafe_code, reason = "malloc_trim(3), which no safe wrapper offers")]
pub fn give_back() {
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns the allocator's free pages to the kernel (glibc only).
#[cfg(not(target_env = "gnu"))]
pub fn give_back() {}

#[cfg(test)]
mod tests {
    use super::{Binding, Cgroup, Pressure, Version};

    #[test]
    fn pressure_rises_at_its_thresholds_and_clears_only_well_below() {
        let p = |used, before| Pressure::of(used, 1000, before);
        assert_eq!(p(899, Pressure::Normal), Pressure::Normal);
        assert_eq!(p(900, Pressure::Normal), Pressure::Refuse);
        assert_eq!(p(950, Pressure::Refuse), Pressure::Shed);
        assert_eq!(p(920, Pressure::Shed), Pressure::Shed, "no step down above 90%");
        assert_eq!(p(860, Pressure::Shed), Pressure::Shed, "hysteresis down to 85%");
        assert_eq!(p(849, Pressure::Shed), Pressure::Normal);
        assert_eq!(p(860, Pressure::Normal), Pressure::Normal);
    }

    #[test]
    fn the_lowest_limit_on_the_way_up_binds() -> std::io::Result<()> {
        let root = std::env::temp_dir().join(format!("pc-cgroup-{}", std::process::id()));
        let leaf = root.join("system.slice/portcullis.service");
        std::fs::create_dir_all(&leaf)?;
        let cgroup = |version| Cgroup {
            root: root.clone(),
            dir: leaf.clone(),
            version,
        };
        std::fs::write(leaf.join("memory.max"), "max\n")?;
        std::fs::write(root.join("system.slice/memory.max"), "1048576\n")?;
        std::fs::write(root.join("memory.max"), "2097152\n")?;
        let found = cgroup(Version::V2).binding();
        // v1 says "no limit" with a page-rounded i64::MAX.
        std::fs::write(leaf.join("memory.limit_in_bytes"), "9223372036854771712\n")?;
        let unlimited = cgroup(Version::V1).binding();
        std::fs::remove_dir_all(&root)?;
        assert_eq!(
            found,
            Some(Binding {
                dir: root.join("system.slice"),
                limit: 1_048_576,
            })
        );
        assert_eq!(unlimited, None);
        Ok(())
    }
}
