//! The Gatekeeper at the NIC: each listener's gate (mode and open bit) and
//! the proxy's heartbeat. The gatekeeper decides; this module only writes
//! what it decided where the XDP program reads it.

use std::time::Duration;

use aya::maps::MapError;
use portcullis_common::{ListenerValue, gate_mode, heartbeat_slot, map_names};

use super::{ListenerAddr, Maps, XdpError, maps::map_err};

/// What XDP does for a listener while its gate is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateMode {
    /// Not gated at the NIC; only the ACLs apply.
    None,
    /// Answer the exchange with a SYN cookie and a canned 503 (plain HTTP).
    Http503,
    /// Answer the SYN with a reset (TLS).
    Reset,
    /// Drop the SYN.
    Drop,
}

impl GateMode {
    const fn raw(self) -> u32 {
        match self {
            Self::None => gate_mode::NONE,
            Self::Http503 => gate_mode::HTTP_503,
            Self::Reset => gate_mode::RESET,
            Self::Drop => gate_mode::DROP,
        }
    }

    pub(crate) const fn from_raw(raw: u32) -> Self {
        match raw {
            gate_mode::HTTP_503 => Self::Http503,
            gate_mode::RESET => Self::Reset,
            gate_mode::DROP => Self::Drop,
            _ => Self::None,
        }
    }

    /// Lowercase name for `portcullis status`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Http503 => "503",
            Self::Reset => "reset",
            Self::Drop => "drop",
        }
    }
}

/// The proxy's heartbeat as the XDP program sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time since the last beat; `None` if no proxy ever beat.
    pub age: Option<Duration>,
    /// Beats older than this leave gated listeners closed.
    pub timeout: Duration,
    /// Pid of the proxy that owns the gates (0: none).
    pub owner: u32,
}

impl Heartbeat {
    /// Whether a proxy beat within the timeout.
    pub fn live(&self) -> bool {
        self.age.is_some_and(|age| age <= self.timeout)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

impl Maps {
    /// Sets a listener's gate in one map update, keeping its ACL state.
    pub fn set_gate(&mut self, listener: &ListenerAddr, mode: GateMode, open: bool) -> Result<(), XdpError> {
        let _lock = self.lock()?;
        let value = self.listener_value(listener)?;
        let value = ListenerValue {
            gate_mode: mode.raw(),
            gate_open: u32::from(open),
            ..value
        };
        self.put_listener(listener, value)
    }

    /// A listener's gate: its mode and whether the proxy holds it open.
    pub fn gate(&self, listener: &ListenerAddr) -> Result<(GateMode, bool), XdpError> {
        let value = self.listener_value(listener)?;
        Ok((GateMode::from_raw(value.gate_mode), value.gate_open != 0))
    }

    /// Makes `owner` the proxy that holds the gates, with a first beat; its
    /// gates count as attended while its beats are younger than `timeout`.
    pub fn take_over(&mut self, owner: u32, timeout: Duration) -> Result<(), XdpError> {
        let _lock = self.lock()?;
        let timeout = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        self.write_beat(heartbeat_slot::TIMEOUT, timeout)?;
        self.write_beat(heartbeat_slot::OWNER, u64::from(owner))?;
        self.write_beat(heartbeat_slot::BEAT, monotonic_ns())
    }

    /// Beats for `owner` if it still holds the gates; `false` once another proxy took over.
    pub fn beat(&mut self, owner: u32) -> Result<bool, XdpError> {
        let _lock = self.lock()?;
        if self.heartbeat()?.owner != owner {
            return Ok(false);
        }
        self.write_beat(heartbeat_slot::BEAT, monotonic_ns())?;
        Ok(true)
    }

    fn write_beat(&mut self, slot: u32, value: u64) -> Result<(), XdpError> {
        self.heartbeat
            .set(slot, value, 0)
            .map_err(map_err(map_names::HEARTBEAT, "beat"))
    }

    /// Stops beating for `owner`, if it still owns the gates: listeners count
    /// as unattended at once.
    pub fn stop_beating(&mut self, owner: u32) -> Result<(), XdpError> {
        let _lock = self.lock()?;
        if self.heartbeat()?.owner != owner {
            return Ok(());
        }
        self.write_beat(heartbeat_slot::BEAT, 0)
    }

    /// The heartbeat as XDP sees it now.
    pub fn heartbeat(&self) -> Result<Heartbeat, XdpError> {
        let read = |slot: u32| match self.heartbeat.get(&slot, 0) {
            Ok(v) => Ok(v),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(map_err(map_names::HEARTBEAT, "read")(e)),
        };
        let beat = read(heartbeat_slot::BEAT)?;
        let age = (beat != 0).then(|| Duration::from_nanos(monotonic_ns().saturating_sub(beat)));
        Ok(Heartbeat {
            age,
            timeout: Duration::from_nanos(read(heartbeat_slot::TIMEOUT)?),
            owner: u32::try_from(read(heartbeat_slot::OWNER)?).unwrap_or(0),
        })
    }
}
