//! Gatekeeper: whether a request for an API instance may reach its policies at all.
//!
//! Every API instance has a gate, decided each time a configuration is applied:
//!
//! ```text
//!            policies built, needed contracts loaded
//!   blocked ───────────────────────────────────────────► open
//!      ▲  ▲                                               │
//!      │  └── a policy fails, contracts gone ◄────────────┤
//!      │                                                  │ policy edit (block_edit)
//!      └────────────── the edit fails ◄─── applying ◄─────┘
//!                                             └── edit applied ──► open
//! ```
//!
//! A gate that is not open answers `503` with `Retry-After`. The gatekeeper
//! says *what* each gate is and decides every admission ([`Gates::admit`]);
//! the proxy answers for it, and the supervisor has the `xdp` module mirror
//! it per listener at the NIC. Traffic that matches no API instance is not
//! gated.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::config::{Config, GateLevel, RouteConfig};
use crate::policy::Chain;

/// Where an API instance's gate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests get 503: a policy failed, contracts are missing, or the source is unreachable.
    Blocked,
    /// Requests get 503 while an edited policy configuration is put in force.
    Applying,
    /// Requests reach the policies.
    Open,
}

impl State {
    /// Lowercase name for logs, metrics and `portcullis status`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Applying => "applying",
            Self::Open => "open",
        }
    }
}

/// Why a gate is not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A policy could not be built from its configuration.
    PolicyFailed,
    /// A policy needs contracts and none for this API instance are loaded.
    ContractsMissing,
    /// The configuration source cannot be read and the level is `strict`.
    SourceUnreachable,
    /// An edited policy configuration is being applied.
    PolicyEdit,
    /// The API instance was redeployed (listener, paths or service changed) and its policies are being applied.
    Redeploy,
    /// A policy cannot decide yet (jwt-validation before its first JWKS keys).
    PolicyNotReady,
}

impl Reason {
    /// Snake-case name for logs and metric labels.
    pub const fn label(self) -> &'static str {
        match self {
            Self::PolicyFailed => "policy_failed",
            Self::ContractsMissing => "contracts_missing",
            Self::SourceUnreachable => "source_unreachable",
            Self::PolicyEdit => "policy_edit",
            Self::Redeploy => "redeploy",
            Self::PolicyNotReady => "policy_not_ready",
        }
    }
}

/// One API instance's gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// Where it stands.
    pub state: State,
    /// Why it is not open.
    pub reason: Option<Reason>,
    /// What an operator needs to fix (the failing policy and its error), empty when open.
    pub detail: String,
    /// When it entered this state.
    pub since: SystemTime,
}

impl Gate {
    /// An open gate.
    pub fn open() -> Self {
        Self {
            state: State::Open,
            reason: None,
            detail: String::new(),
            since: SystemTime::now(),
        }
    }

    /// A gate that answers 503 for `reason`.
    pub fn closed(state: State, reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            state,
            reason: Some(reason),
            detail: detail.into(),
            since: SystemTime::now(),
        }
    }

    /// Whether requests may reach the policies.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    fn same_as(&self, other: &Self) -> bool {
        self.state == other.state && self.reason == other.reason
    }
}

/// How one API instance's policies came out of building.
#[derive(Debug, Clone, Copy)]
pub struct Built<'a> {
    /// `policy: error` for every policy that failed.
    pub failures: &'a [String],
    /// Whether a policy that did build needs contracts.
    pub needs_contracts: bool,
    /// Whether any contract for this API instance is loaded.
    pub has_contracts: bool,
}

/// Decides a gate from how its policies built, at `level`.
pub fn decide(level: GateLevel, built: Built<'_>) -> Gate {
    if level == GateLevel::Disabled {
        return Gate::open();
    }
    if !built.failures.is_empty() {
        return Gate::closed(State::Blocked, Reason::PolicyFailed, built.failures.join("; "));
    }
    if built.needs_contracts && !built.has_contracts {
        return Gate::closed(
            State::Blocked,
            Reason::ContractsMissing,
            "a policy needs contracts and no Contract names this API instance yet",
        );
    }
    Gate::open()
}

/// Every API instance's gate, at the configuration's Gatekeeper level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gates {
    gates: HashMap<String, Gate>,
    level: GateLevel,
}

impl Gates {
    /// No gates yet, at `level`.
    pub fn new(level: GateLevel) -> Self {
        Self {
            gates: HashMap::new(),
            level,
        }
    }

    /// Whether a request for `api` may reach `chain`: the one decision behind
    /// every 503 of a route. A closed gate refuses with its reason; so does a
    /// chain that cannot decide yet, unless the Gatekeeper is disabled (the
    /// policy itself then fails closed).
    pub fn admit(&self, api: &str, chain: &Chain) -> Result<(), Reason> {
        match self.gates.get(api) {
            Some(gate) if !gate.is_open() => Err(gate.reason.unwrap_or(Reason::PolicyFailed)),
            _ if self.level != GateLevel::Disabled && !chain.ready() => Err(Reason::PolicyNotReady),
            _ => Ok(()),
        }
    }

    /// Gates `api` while a change of it is put in force (`Applying`, for a
    /// redeploy or a policy edit).
    pub fn engage(&mut self, api: &str, reason: Reason) {
        let detail = match reason {
            Reason::Redeploy => "redeployed: applying its policies",
            _ => "applying an edited policy configuration",
        };
        self.insert(api, Gate::closed(State::Applying, reason, detail));
    }

    /// Closes every gate because the configuration source cannot be read
    /// under `strict` (what a start from the last-known-good cache does).
    pub fn close_unreachable(&mut self) {
        self.close_all(
            Reason::SourceUnreachable,
            "strict: 503 until the configuration source can be read again",
        );
    }

    /// Sets one API instance's gate.
    pub fn insert(&mut self, api: &str, gate: Gate) {
        self.gates.insert(api.to_owned(), gate);
    }

    /// The gate of `api`; `None` for traffic that is not an API instance's.
    pub fn get(&self, api: &str) -> Option<&Gate> {
        self.gates.get(api)
    }

    /// Every gate, sorted by API instance name.
    pub fn sorted(&self) -> Vec<(&str, &Gate)> {
        let mut all: Vec<(&str, &Gate)> = self.gates.iter().map(|(k, v)| (k.as_str(), v)).collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }

    /// Keeps the `since` of every gate whose state and reason did not change from `previous`.
    pub fn carry_since(&mut self, previous: &Self) {
        for (api, gate) in &mut self.gates {
            if let Some(old) = previous.gates.get(api)
                && old.same_as(gate)
            {
                gate.since = old.since;
            }
        }
    }

    /// Closes every gate with `reason`.
    fn close_all(&mut self, reason: Reason, detail: &str) {
        for gate in self.gates.values_mut() {
            *gate = Gate::closed(State::Blocked, reason, detail);
        }
    }

    /// Whether every gate in `apis` is closed (an empty list counts as closed:
    /// a listener with no API instance has nothing to open).
    pub fn all_closed<'a>(&self, mut apis: impl Iterator<Item = &'a str>) -> bool {
        apis.all(|api| self.gates.get(api).is_none_or(|g| !g.is_open()))
    }

    /// `(api, old, new)` for every gate that changed state or reason, or appeared.
    pub fn changes<'a>(&'a self, previous: &'a Self) -> Vec<(&'a str, Option<&'a Gate>, &'a Gate)> {
        let mut out: Vec<_> = self
            .gates
            .iter()
            .filter_map(|(api, gate)| {
                let old = previous.gates.get(api);
                (!old.is_some_and(|o| o.same_as(gate))).then_some((api.as_str(), old, gate))
            })
            .collect();
        out.sort_by_key(|(api, _, _)| *api);
        out
    }
}

/// The policies of a route as a comparable set: name, configuration and rules, order ignored.
fn policy_set(route: &RouteConfig) -> Vec<(String, String, String)> {
    let mut set: Vec<(String, String, String)> = route
        .policies
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                serde_yaml_ng::to_string(&p.config).unwrap_or_default(),
                format!("{:?}", p.rules),
            )
        })
        .collect();
    set.sort();
    set
}

/// Everything of a route but its policies: what a redeploy changes.
fn deployment<'a>(
    config: &'a Config,
    addr: std::net::SocketAddr,
    route: &'a RouteConfig,
) -> impl PartialEq + 'a {
    let upstreams: Vec<_> = route
        .upstreams
        .iter()
        .map(|u| {
            let to: Vec<_> = u
                .destinations
                .iter()
                .map(|d| (&d.path, d.weight, config.services.get(d.service)))
                .collect();
            (&u.rules, to)
        })
        .collect();
    (addr, &route.hosts, &route.base_path, route.max_body, upstreams)
}

/// API instances present in both configurations that a change engages the
/// Gatekeeper for, with why: a redeploy (listener, paths, limits or service
/// changed), or — with `block_edit` — an edit of the policy configuration.
/// A change of policy order alone engages nothing.
pub fn engaged(old: &Config, new: &Config, block_edit: bool) -> Vec<(String, Reason)> {
    let before: HashMap<&str, (std::net::SocketAddr, &RouteConfig)> = old
        .listeners
        .iter()
        .flat_map(|l| l.routes.iter().map(move |r| (r.api.as_str(), (l.addr, r))))
        .collect();
    let mut out: Vec<(String, Reason)> = Vec::new();
    for listener in &new.listeners {
        for route in &listener.routes {
            let Some((old_addr, old_route)) = before.get(route.api.as_str()) else {
                continue;
            };
            let reason = if deployment(old, *old_addr, old_route) != deployment(new, listener.addr, route) {
                Reason::Redeploy
            } else if block_edit && policy_set(old_route) != policy_set(route) {
                Reason::PolicyEdit
            } else {
                continue;
            };
            out.push((route.api.clone(), reason));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(failures: &[String], needs: bool, has: bool) -> Built<'_> {
        Built {
            failures,
            needs_contracts: needs,
            has_contracts: has,
        }
    }

    #[test]
    fn a_failed_policy_blocks_unless_the_gatekeeper_is_disabled() {
        let failures = ["rate-limiting: bad".to_string()];
        for level in [GateLevel::Strict, GateLevel::Flexible] {
            let gate = decide(level, built(&failures, false, false));
            assert_eq!(
                (gate.state, gate.reason, gate.detail.as_str()),
                (State::Blocked, Some(Reason::PolicyFailed), "rate-limiting: bad")
            );
        }
        assert!(decide(GateLevel::Disabled, built(&failures, true, false)).is_open());
    }

    #[test]
    fn missing_contracts_block_only_a_chain_that_needs_them() {
        let gate = decide(GateLevel::Flexible, built(&[], true, false));
        assert_eq!(gate.reason, Some(Reason::ContractsMissing));
        assert!(decide(GateLevel::Flexible, built(&[], true, true)).is_open());
        assert!(decide(GateLevel::Strict, built(&[], false, false)).is_open());
    }

    fn config(policy_value: &str, upstream: &str, order_swapped: bool) -> Config {
        let a = format!(
            "    - policyRef:\n        name: header-injection-flex\n      config:\n        inboundHeaders:\n          - key: x-a\n            value: \"{policy_value}\"\n"
        );
        let b = "    - policyRef:\n        name: header-removal-flex\n      config:\n        inboundHeaders: [x-b]\n";
        let policies = if order_swapped {
            format!("{b}{a}")
        } else {
            format!("{a}{b}")
        };
        let text = format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\nmetadata:\n  name: orders\nspec:\n  address: http://127.0.0.1:8080/orders\n  services:\n    up:\n      address: {upstream}\n  policies:\n{policies}"
        );
        crate::config::load(&crate::config::MemSource {
            files: vec![("api.yaml".into(), text)],
            base: std::path::PathBuf::from("/"),
        })
        .expect("valid configuration")
    }

    #[test]
    fn edits_and_redeploys_engage_and_order_alone_does_not() {
        let base = config("1", "http://127.0.0.1:9000/", false);
        let swapped = config("1", "http://127.0.0.1:9000/", true);
        assert!(engaged(&base, &swapped, true).is_empty(), "order alone");
        let edited = config("2", "http://127.0.0.1:9000/", false);
        assert_eq!(
            engaged(&base, &edited, true),
            vec![("orders".to_string(), Reason::PolicyEdit)]
        );
        assert!(engaged(&base, &edited, false).is_empty(), "block_edit off");
        let moved = config("1", "http://127.0.0.1:9001/", false);
        assert_eq!(
            engaged(&base, &moved, false),
            vec![("orders".to_string(), Reason::Redeploy)]
        );
    }

    #[test]
    fn since_is_kept_while_state_and_reason_stay() {
        let mut old = Gates::default();
        let mut first = Gate::open();
        first.since = SystemTime::UNIX_EPOCH;
        old.insert("a", first);
        old.insert("b", Gate::open());
        let mut new = Gates::default();
        new.insert("a", Gate::open());
        new.insert("b", Gate::closed(State::Blocked, Reason::PolicyFailed, "x"));
        new.carry_since(&old);
        assert_eq!(new.get("a").map(|g| g.since), Some(SystemTime::UNIX_EPOCH));
        let changes = new.changes(&old);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, "b");
        assert!(new.all_closed(["b"].into_iter()));
        assert!(!new.all_closed(["a", "b"].into_iter()));
        assert!(new.all_closed(std::iter::empty()));
    }
}
