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
    /// The SYN budgets last armed (or found unarmable), so that the synproxy
    /// table is written only when they change.
    budgets: Option<Vec<(ListenerAddr, u32)>>,
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
            budgets: None,
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
            if let Some(limit) = listener.syn_limit {
                self.maps.set_syn_rate(&key, limit.rate, limit.burst)?;
            }
            now.insert(key);
        }
        self.arm_budgets(generation)?;
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

    /// Arms every listener's SYN budget (the configuration's, else what the
    /// maps hold) with the synproxy table as its ACK path. A table that
    /// cannot be written leaves the budgets unarmed, and the gateway running:
    /// the kernel then takes every SYN, as it would without XDP.
    fn arm_budgets(&mut self, generation: &Generation) -> Result<(), XdpError> {
        let mut budgets = Vec::new();
        for l in self.maps.listeners()? {
            let named = generation
                .listeners
                .get(&l.addr.addr)
                .filter(|_| l.addr.protocol == crate::xdp::Protocol::Tcp)
                .and_then(|c| c.syn_limit)
                .and_then(|s| s.budget);
            let budget = match named {
                Some(b) => b,
                None => self.maps.syn_limit(l.id)?.budget,
            };
            budgets.push((l.addr, budget));
        }
        budgets.sort_unstable_by_key(|(l, _)| (l.addr, l.protocol));
        if self.budgets.as_ref() == Some(&budgets) {
            return Ok(());
        }
        match self.maps.set_syn_cookies(&budgets) {
            Ok(()) => tracing::info!(
                table = %crate::xdp::synproxy::table_name(&self.instance),
                armed = budgets.iter().filter(|(_, b)| *b > 0).count(),
                "SYN budgets armed at the NIC: SYNs over them are answered with SYN cookies"
            ),
            Err(e @ XdpError::Synproxy { .. }) => {
                tracing::warn!(error = %e, "SYN budgets left unarmed: the kernel takes every SYN");
            }
            Err(e) => return Err(e),
        }
        self.budgets = Some(budgets);
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
