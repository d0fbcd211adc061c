//! The gates at the NIC: each listener's gate mirrored into the XDP maps.
//!
//! A starting proxy takes the gates over and closes every one of its
//! listeners before it accepts; once its policies are applied it opens each
//! listener that has an open route, and beats every [`BEAT_EVERY`] so that
//! XDP keeps treating them as attended. A listener counts as gated at the NIC
//! when all its routes are gated, or when the beats stop for [`BEAT_TIMEOUT`]
//! (crash, kill, hang). A listener owned by one API instance also gets that
//! API's connection-address IP lists, so denied clients are dropped at the NIC.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::policy::NicAcl;
use crate::runtime::Generation;
use crate::xdp::{AclList, GateMode, Instance, ListenerAddr, Maps, XdpError};

/// How often the proxy beats.
pub const BEAT_EVERY: Duration = Duration::from_millis(100);
/// How old a beat may be before XDP treats the gates as unattended.
pub const BEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// This proxy's hold on one instance's gates.
#[derive(Debug)]
pub struct Nic {
    instance: Instance,
    maps: Maps,
    owner: u32,
    drop: bool,
    ours: HashSet<ListenerAddr>,
    pushed: HashMap<ListenerAddr, NicAcl>,
    beating: Arc<AtomicBool>,
}

impl Nic {
    /// The pinned maps of `instance`; `Ok(None)` when XDP was never loaded for it.
    pub fn open(instance: &str) -> Result<Option<Self>, XdpError> {
        let instance = Instance::new(instance)?;
        let maps = match instance.maps() {
            Ok(maps) => maps,
            Err(XdpError::NotLoaded { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(Self {
            instance,
            maps,
            owner: std::process::id(),
            drop: false,
            ours: HashSet::new(),
            pushed: HashMap::new(),
            beating: Arc::new(AtomicBool::new(true)),
        }))
    }

    /// The instance whose maps these are.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    const fn mode(&self, tls: bool) -> GateMode {
        if self.drop {
            GateMode::Drop
        } else if tls {
            GateMode::Reset
        } else {
            GateMode::Http503
        }
    }

    fn ensure(&mut self, listener: &ListenerAddr) -> Result<(), XdpError> {
        match self.maps.add_listener(listener) {
            Ok(_) | Err(XdpError::ListenerExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes the gates over and closes every listener of `generation` (its IP
    /// lists already in force): what a proxy does before it accepts its first connection.
    pub fn close_all(&mut self, generation: &Generation) -> Result<(), XdpError> {
        self.maps.take_over(self.owner, BEAT_TIMEOUT)?;
        self.write(generation, false)
    }

    /// Writes every listener's gate as `generation` has it, pushes the IP
    /// lists of API instances that own their listener, and releases
    /// listeners that are no longer configured.
    pub fn sync(&mut self, generation: &Generation) -> Result<(), XdpError> {
        self.write(generation, true)
    }

    /// [`Nic::sync`], with every gate closed unless `may_open`.
    fn write(&mut self, generation: &Generation, may_open: bool) -> Result<(), XdpError> {
        self.drop = generation.config.gateway.nic_drop;
        let mut now = HashSet::new();
        for (addr, listener) in &generation.listeners {
            let key = ListenerAddr::tcp(*addr);
            self.ensure(&key)?;
            self.push_acl(generation, &key, addr)?;
            let open = may_open && !generation.listener_gated(addr);
            self.maps
                .set_gate(&key, self.mode(listener.tls.is_some()), open)?;
            // Only a limit the configuration names is written: one set with
            // `portcullis listener syn-limit` stays until the configuration names one.
            if let Some((rate, burst)) = listener.syn_limit {
                self.maps.set_syn_rate(&key, rate, burst)?;
            }
            now.insert(key);
        }
        let gone: Vec<ListenerAddr> = self.ours.difference(&now).copied().collect();
        for key in gone {
            self.maps.set_gate(&key, GateMode::None, false)?;
            if self.pushed.remove(&key).is_some() {
                self.maps.acl_replace(&AclList::Allow(key), &[])?;
                self.maps.acl_replace(&AclList::Deny(key), &[])?;
            }
        }
        self.ours = now;
        Ok(())
    }

    fn push_acl(
        &mut self,
        generation: &Generation,
        key: &ListenerAddr,
        addr: &SocketAddr,
    ) -> Result<(), XdpError> {
        let routes = generation
            .config
            .listeners
            .iter()
            .find(|l| l.addr == *addr)
            .map_or(&[][..], |l| &l.routes[..]);
        let acl = match routes {
            [only] => generation
                .chains
                .get(&only.api)
                .map(|c| c.nic_acl())
                .unwrap_or_default(),
            _ => NicAcl::default(),
        };
        let before = self.pushed.get(key).cloned().unwrap_or_default();
        if acl.allow != before.allow {
            self.maps.acl_replace(&AclList::Allow(*key), &acl.allow)?;
        }
        if acl.deny != before.deny {
            self.maps.acl_replace(&AclList::Deny(*key), &acl.deny)?;
        }
        if acl == NicAcl::default() {
            self.pushed.remove(key);
        } else {
            self.pushed.insert(*key, acl);
        }
        Ok(())
    }

    /// Beats every [`BEAT_EVERY`] on a thread of its own, until [`Nic::stop`]
    /// or until another proxy takes the gates over.
    pub fn start_heartbeat(&self) -> std::io::Result<()> {
        let instance = self.instance.clone();
        let owner = self.owner;
        let beating = self.beating.clone();
        std::thread::Builder::new().name("nic-heartbeat".into()).spawn(move || {
            let mut maps = match instance.maps() {
                Ok(maps) => maps,
                Err(e) => {
                    tracing::error!(error = %e, "heartbeat: cannot open the XDP maps; gated listeners stay closed at the NIC");
                    return;
                }
            };
            while beating.load(Ordering::Acquire) {
                match maps.beat(owner) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!("another proxy took the gates at the NIC over; this one stops beating");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat not written"),
                }
                std::thread::sleep(BEAT_EVERY);
            }
        })?;
        Ok(())
    }

    /// The proxy stops: every gate it still holds closes now and its beats end.
    pub fn stop(&mut self) -> Result<(), XdpError> {
        self.beating.store(false, Ordering::Release);
        if self.maps.heartbeat()?.owner != self.owner {
            return Ok(());
        }
        let ours: Vec<ListenerAddr> = self.ours.iter().copied().collect();
        for key in ours {
            let (mode, _) = self.maps.gate(&key)?;
            self.maps.set_gate(&key, mode, false)?;
        }
        self.maps.stop_beating(self.owner)
    }
}

/// The instance's gates at the NIC, all closed, if XDP is loaded for it.
pub(super) fn open(instance: &str, generation: &Generation) -> Option<Nic> {
    let mut nic = match Nic::open(instance) {
        Ok(Some(nic)) => nic,
        Ok(None) => {
            tracing::info!(
                instance,
                "XDP is not loaded for this instance: gates are enforced by the proxy only (attach with `portcullis xdp attach`)"
            );
            return None;
        }
        Err(e) => {
            tracing::error!(instance, error = %e, "the XDP maps cannot be used: gates are enforced by the proxy only");
            return None;
        }
    };
    match nic.close_all(generation) {
        Ok(()) => {
            tracing::info!(instance, pins = %nic.instance().pin_dir().display(), "gates at the NIC closed until policies are applied");
            Some(nic)
        }
        Err(e) => {
            tracing::error!(instance, error = %e, "closing the gates at the NIC failed: gates are enforced by the proxy only");
            None
        }
    }
}
