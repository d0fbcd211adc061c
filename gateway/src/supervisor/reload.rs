//! A reload: the source read again, validated whole, and put in force behind
//! the Gatekeeper, or rejected with what runs left in force.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Supervisor, lkg, source};
use crate::config::{self, ConfigErrors, GateLevel};
use crate::gatekeeper::{self, Gates};
use crate::proxy;
use crate::runtime::{Generation, NewListener};

/// Logs every policy that failed to build, with what the level makes of it.
pub(super) fn log_policy_errors(generation: &Generation) {
    let disabled = generation.config.gateway.gate_level == GateLevel::Disabled;
    for e in &generation.policy_errors {
        if disabled {
            tracing::error!(error = %e, "policy failed to build; the Gatekeeper is disabled, so its API instance is served WITHOUT it");
        } else {
            tracing::error!(error = %e, "policy failed to build; its API instance answers 503 until the policy is fixed or removed");
        }
    }
}

/// Logs every gate that changed from `old` to `new`.
pub(super) fn log_gates(old: &Gates, new: &Gates) {
    for (api, _, gate) in new.changes(old) {
        match gate.reason {
            None => tracing::info!(api, "gate open"),
            Some(reason) => tracing::warn!(
                api,
                state = gate.state.label(),
                reason = reason.label(),
                detail = %gate.detail,
                "gate closed: requests get 503"
            ),
        }
    }
}

fn rejected(errors: &ConfigErrors) {
    for e in &errors.0 {
        tracing::error!(error = %e, "configuration error");
    }
    tracing::error!(
        errors = errors.0.len(),
        "reload rejected: the running configuration stays in force; fix the errors above"
    );
}

impl Supervisor {
    /// Re-reads the source; applies it only if all of it is valid, else keeps
    /// what runs. A policy that fails is not a reason to keep the old one: its
    /// API instance is gated. With `block_edit`, an API instance whose policy
    /// configuration changed is gated (`applying`) until the new
    /// configuration is in force.
    pub(super) fn reload(&mut self) {
        let started = Instant::now();
        if self.remote.as_ref().is_some_and(|r| !r.has_snapshot()) {
            tracing::info!(
                "reload deferred: the control plane's first snapshot has not arrived; local changes apply with it"
            );
            return;
        }
        let (files, config) = match source::read_config(&self.dir, self.remote.as_deref()) {
            Ok(Some(read)) => read,
            Ok(None) => return,
            Err(e) => return rejected(&e),
        };
        let current = self.shared.current();
        let fixed = &self.shared.startup;
        if config.proxy.workers != fixed.workers
            || config.proxy.admin != fixed.admin
            || config.proxy.max_connections != fixed.max_connections
        {
            tracing::warn!(
                "workers, admin and maxConnections take effect at the next start; the running values stay"
            );
        }
        let engaged = self.engage_edits(&current, &config);
        // A change that is not applied leaves the gates as they were.
        let reopen = |this: &mut Self| {
            if engaged {
                this.publish(current.with_gates(current.gates.clone()));
            }
        };
        let generation = match Generation::build(config, Some(&current)) {
            Ok(g) => g,
            Err(e) => {
                reopen(self);
                return rejected(&e);
            }
        };
        let added: Vec<SocketAddr> = generation
            .listeners
            .keys()
            .filter(|a| !current.listeners.contains_key(a))
            .copied()
            .collect();
        let removed: Vec<SocketAddr> = current
            .listeners
            .keys()
            .filter(|a| !generation.listeners.contains_key(a))
            .copied()
            .collect();
        let bound = match self.bind_added(&added) {
            Ok(bound) => bound,
            Err(e) => {
                reopen(self);
                tracing::error!(error = %e, "reload rejected: the running configuration stays in force");
                return;
            }
        };
        let listeners = generation.listeners.len();
        let routes = generation.config.route_count();
        log_policy_errors(&generation);
        log_gates(&current.gates, &generation.gates);
        self.publish(generation);
        lkg::remember(self.cache.as_deref(), &self.dir, files, &self.shared.current());
        super::share(self.copy.as_ref(), self.remote.as_deref(), &self.shared.current());
        if let Ok(senders) = self.shared.new_listeners.lock() {
            for (sender, sockets) in senders.iter().zip(bound) {
                for socket in sockets {
                    let _ = sender.send(socket);
                }
            }
        }
        for addr in &removed {
            self.handles.close(addr);
        }
        tracing::info!(
            listeners,
            routes,
            added = ?added,
            removed = ?removed,
            took_ms = started.elapsed().as_millis(),
            "configuration reloaded"
        );
    }

    /// Gates (`applying`) every API instance that `config` redeploys or, with
    /// `block_edit`, whose policy configuration it edits; whether any was.
    fn engage_edits(&mut self, current: &Generation, config: &config::Config) -> bool {
        let gk = &config.gateway;
        if gk.gate_level == GateLevel::Disabled {
            return false;
        }
        let engaged = gatekeeper::engaged(&current.config, config, gk.block_edit);
        if engaged.is_empty() {
            return false;
        }
        let mut gates = current.gates.clone();
        for (api, reason) in &engaged {
            gates.engage(api, *reason);
        }
        self.publish(current.with_gates(gates));
        tracing::info!(apis = ?engaged.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(), "gate applying: policy configuration edited or API instance redeployed");
        true
    }

    /// Binds listeners a reload adds, once per worker, keeping duplicates in `handles`.
    fn bind_added(&mut self, added: &[SocketAddr]) -> std::io::Result<Vec<Vec<NewListener>>> {
        let mut bound = Vec::new();
        for _ in 0..self.shared.startup.workers {
            bound.push(proxy::bind_all(added)?);
        }
        for sockets in &bound {
            self.handles.keep(sockets)?;
        }
        Ok(bound)
    }
}
