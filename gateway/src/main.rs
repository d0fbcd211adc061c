//! The `portcullis` command: attaches the XDP program and manages listeners,
//! connection ACLs and status of one gateway instance.

use std::{io::Write as _, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use portcullis::supervisor::{self, report::GateReport};
use portcullis::xdp::{
    AclList, AttachMode, AttachOptions, Counters, DEFAULT_INSTANCE, GateMode, Instance, ListenerAddr, Maps,
    XdpError,
};
use serde_json::{Value, json};

mod commands;

#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about = "Portcullis API gateway")]
struct Cli {
    /// Gateway instance whose pins (under /sys/fs/bpf/portcullis/) are used.
    #[arg(long, global = true, env = "PORTCULLIS_INSTANCE", default_value = DEFAULT_INSTANCE)]
    instance: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway on the resources in a configuration directory.
    Run {
        /// Directory of YAML resources (ApiInstance, Service, PolicyBinding, Configuration).
        #[arg(long, env = "PORTCULLIS_CONFIG", default_value = "/etc/portcullis/conf.d")]
        config: std::path::PathBuf,
        /// Directory for the last-known-good cache.
        #[arg(long, env = "PORTCULLIS_STATE_DIR", default_value = "/var/lib/portcullis")]
        state_dir: std::path::PathBuf,
        /// Key file of the last-known-good cache (`portcullis secret keygen`); without it,
        /// the systemd credential `portcullis-cache-key`; without either, no cache.
        #[arg(long, env = "PORTCULLIS_CACHE_KEY")]
        cache_key: Option<std::path::PathBuf>,
    },
    /// Validate a configuration directory, TLS files included, without running.
    Check {
        /// Directory of YAML resources.
        dir: std::path::PathBuf,
        /// `text` (one `file:line:column: field: message` per line) or `json`.
        #[arg(long, value_enum, default_value_t = commands::Format::Text)]
        format: commands::Format,
    },
    /// Make keys and encrypted values for `${encrypted:v1:...}` secret fields.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Attach or detach the XDP program.
    #[command(subcommand)]
    Xdp(XdpCommand),
    /// Add or remove the listeners whose traffic XDP judges.
    #[command(subcommand)]
    Listener(ListenerCommand),
    /// Manage connection ACLs (global deny list, per-listener allow/deny lists).
    #[command(subcommand)]
    Acl(AclCommand),
    /// Run or administer the control plane of connected mode.
    #[command(subcommand, name = "control-plane")]
    ControlPlane(ControlPlaneCommand),
    /// Register this replica with a control plane: a key pair made here, a
    /// certificate from the control plane, and a registration file (all 0600).
    Register {
        /// `https://HOST:PORT` of the control plane.
        #[arg(long)]
        control_plane: String,
        /// The one-time token from `control-plane token create`.
        #[arg(long, env = "PORTCULLIS_REGISTRATION_TOKEN")]
        token: String,
        /// This replica's name.
        #[arg(long)]
        name: String,
        /// Where to write the registration (the configuration directory).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Read a registration file.
    #[command(subcommand)]
    Registration(RegistrationCommand),
    /// Show API instances with their gates, and what XDP holds: interfaces,
    /// listeners, gate modes, ACL sizes and counters. Works while the proxy is down.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Where `portcullis run` reports its gates.
        #[arg(long, env = "PORTCULLIS_STATE_DIR", default_value = "/var/lib/portcullis")]
        state_dir: std::path::PathBuf,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell the script is for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages, one per command, into DIR (the package does this).
    #[command(hide = true)]
    Manpages {
        /// Directory to write `portcullis.1`, `portcullis-run.1`, ... into.
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ControlPlaneCommand {
    /// Create the control plane's CA and server certificate in DIR.
    Init {
        /// The control plane's directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// A name or address replicas reach it by (besides localhost); repeatable.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Make one-time registration tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Refuse REPLICA's certificates from its next request on.
    Revoke {
        /// The control plane's directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The replica's name.
        replica: String,
    },
    /// Serve registrations and the snapshots of DIR/clusters/<cluster>/*.yaml.
    Serve {
        /// The control plane's directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Where to listen.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: std::net::SocketAddr,
        /// Lifetime of the replica certificates it issues (`30d`, `12h`, `20s`).
        #[arg(long, default_value = "30d", value_parser = parse_lifetime)]
        cert_lifetime: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new token for a cluster; it works once and never after it expires.
    Create {
        /// The control plane's directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The gateway cluster the registering replica joins.
        #[arg(long)]
        cluster: String,
        /// How long the token can be used (`24h`, `10m`).
        #[arg(long, default_value = "24h", value_parser = parse_lifetime)]
        ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum RegistrationCommand {
    /// Print the replica, cluster, control plane and certificate expiry of FILE.
    Inspect {
        /// A registration file (`registration.yaml`).
        file: std::path::PathBuf,
    },
}

fn parse_lifetime(s: &str) -> Result<std::time::Duration, String> {
    portcullis::config::parse_duration(s)
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Write a new random 256-bit key (base64) to a file created with mode 0600.
    Keygen {
        /// Where to write the key; must not exist yet.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Read a secret from stdin and print it as `${encrypted:v1:...}` for a config file.
    Encrypt {
        /// The key file (`portcullis secret keygen`).
        #[arg(long)]
        key_file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum XdpCommand {
    /// Load the program and attach it to an interface of this network namespace.
    Attach {
        /// Interface to guard.
        #[arg(long)]
        iface: String,
        /// Attach mode for a new link.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// Capacity of each ACL trie (IPv4, IPv6) when the maps are created.
        #[arg(long, default_value_t = portcullis::xdp::DEFAULT_ACL_CAPACITY)]
        acl_capacity: u32,
    },
    /// Detach the program from an interface (or from all of them).
    Detach {
        /// Interface to release.
        #[arg(long, required_unless_present = "all")]
        iface: Option<String>,
        /// Release every interface of the instance.
        #[arg(long, conflicts_with = "iface")]
        all: bool,
        /// Also remove the pinned maps: listeners, ACLs and counters are lost.
        #[arg(long, requires = "all")]
        purge: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Subcommand)]
enum ListenerCommand {
    /// Judge traffic to ADDR:PORT (prefix `udp:` for UDP; 0.0.0.0 or [::] for any address).
    Add { listener: ListenerAddr },
    /// Stop judging traffic to ADDR:PORT and drop its ACLs and counters.
    Del { listener: ListenerAddr },
    /// Set the per-source SYN limit: SYNs beyond RATE per second (BURST at
    /// once) from one /32 or /64 are dropped at the NIC, per receiving CPU.
    SynLimit {
        listener: ListenerAddr,
        /// SYNs per second per source; 0 turns the limit off.
        #[arg(long, default_value_t = portcullis::xdp::SynLimit::DEFAULT.rate)]
        rate: u32,
        /// SYNs a source may send at once.
        #[arg(long, default_value_t = portcullis::xdp::SynLimit::DEFAULT.burst)]
        burst: u32,
    },
    /// Set the SYN budget: SYNs beyond BUDGET per second per receiving CPU
    /// are answered at the NIC with SYN cookies, whose ACKs the instance's
    /// nftables synproxy table turns into connections (written by this command).
    SynBudget {
        listener: ListenerAddr,
        /// SYNs per second per CPU the kernel's own handshake takes; 0 turns cookies off.
        #[arg(long, default_value_t = portcullis::xdp::SynLimit::DEFAULT.budget)]
        budget: u32,
    },
}

#[derive(Debug, Args)]
struct AclSelector {
    /// The deny list (global without --listener).
    #[arg(long, conflicts_with = "allow", required_unless_present = "allow")]
    deny: bool,
    /// The allow list of a listener (non-empty means everything else is dropped).
    #[arg(long, requires = "listener")]
    allow: bool,
    /// The listener whose list is meant; without it, the global deny list.
    #[arg(long)]
    listener: Option<ListenerAddr>,
}

impl AclSelector {
    fn list(&self) -> AclList {
        match (self.allow, self.listener) {
            (true, Some(listener)) => AclList::Allow(listener),
            (_, Some(listener)) => AclList::Deny(listener),
            (_, None) => AclList::GlobalDeny,
        }
    }
}

#[derive(Debug, Subcommand)]
enum AclCommand {
    /// Add prefixes to a list.
    Add {
        #[command(flatten)]
        list: AclSelector,
        /// CIDRs (or single addresses) to add.
        #[arg(required = true, value_parser = parse_cidr)]
        cidrs: Vec<IpNet>,
    },
    /// Remove prefixes from a list.
    Del {
        #[command(flatten)]
        list: AclSelector,
        /// CIDRs (or single addresses) to remove.
        #[arg(required = true, value_parser = parse_cidr)]
        cidrs: Vec<IpNet>,
    },
    /// Replace a whole list atomically (no CIDR: empty it).
    Replace {
        #[command(flatten)]
        list: AclSelector,
        /// The new contents; `-` reads one CIDR per line from standard input.
        #[arg(value_parser = parse_cidr_or_stdin)]
        cidrs: Vec<CidrArg>,
    },
    /// Print every list.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone)]
enum CidrArg {
    Net(IpNet),
    Stdin,
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    portcullis::config::parse_net(s)
        .ok_or_else(|| format!("invalid CIDR {s:?}: expected e.g. 192.0.2.0/24, 2001:db8::/32 or 192.0.2.7"))
}

fn parse_cidr_or_stdin(s: &str) -> Result<CidrArg, String> {
    if s == "-" {
        Ok(CidrArg::Stdin)
    } else {
        parse_cidr(s).map(CidrArg::Net)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run { .. }) {
        // Before any thread exists (the log writer is one): every thread
        // inherits the mask, so only `run`'s sigwait ever sees these signals.
        if let Err(e) = supervisor::stop_signals().thread_block() {
            eprintln!("error: blocking signals: {e}");
            return ExitCode::FAILURE;
        }
    }
    let default_filter = if matches!(
        cli.command,
        Command::Run { .. } | Command::ControlPlane(ControlPlaneCommand::Serve { .. })
    ) {
        "info"
    } else {
        "warn"
    };
    // Log lines (the access log included) are written by a thread of their
    // own, so a slow terminal or disk never stalls a worker.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking(std::io::stderr());
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let env_set = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default_filter));
    let (filter, level_handle) = tracing_subscriber::reload::Layer::new(filter);
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .with(portcullis::telemetry::logs::layer())
            .init();
    }
    // RUST_LOG, when set, wins over the Configuration's logLevel.
    let set_level: supervisor::SetLevel = Box::new(move |level: &str| {
        if !env_set {
            let _ = level_handle.modify(|f| *f = tracing_subscriber::EnvFilter::new(level));
        }
    });
    match run(cli, &set_level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let causes: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", causes.join(": "));
            if let Some(hint) = error
                .chain()
                .find_map(|e| e.downcast_ref::<XdpError>())
                .and_then(XdpError::hint)
            {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `portcullis run`: every configuration error on its own line, then the failure.
fn serve(options: &supervisor::RunOptions, set_level: &supervisor::SetLevel) -> anyhow::Result<()> {
    supervisor::run(options, set_level).map_err(|e| {
        if let supervisor::SupervisorError::Config { errors, .. } = &e {
            for error in &errors.0 {
                eprintln!("{error}");
            }
        }
        e.into()
    })
}

fn run(cli: Cli, set_level: &supervisor::SetLevel) -> anyhow::Result<()> {
    let instance = Instance::new(&cli.instance)?;
    match cli.command {
        Command::Run {
            config,
            state_dir,
            cache_key,
        } => {
            let options = supervisor::RunOptions {
                config,
                state_dir,
                cache_key,
                instance: cli.instance.clone(),
            };
            serve(&options, set_level)?;
        }
        Command::Check { dir, format } => commands::check(&dir, format)?,
        Command::Completions { shell } => commands::completions(shell, Cli::command())?,
        Command::Manpages { dir } => commands::manpages(Cli::command(), &dir)?,
        Command::Secret(SecretCommand::Keygen { out }) => commands::keygen(&out)?,
        Command::Secret(SecretCommand::Encrypt { key_file }) => commands::encrypt(&key_file)?,
        Command::Xdp(XdpCommand::Attach {
            iface,
            mode,
            acl_capacity,
        }) => {
            let options = AttachOptions {
                mode: match mode {
                    Mode::Auto => AttachMode::Auto,
                    Mode::Native => AttachMode::Native,
                    Mode::Generic => AttachMode::Generic,
                },
                acl_capacity,
            };
            let attached = instance.attach(&iface, &options)?;
            println!(
                "attached instance {} to {} ({:?}), link pinned at {}",
                instance.name(),
                attached.iface,
                attached.mode,
                attached.link_pin.display()
            );
        }
        Command::Xdp(XdpCommand::Detach { iface, all, purge }) => {
            let ifaces = if all {
                instance.attached_interfaces()
            } else {
                iface.into_iter().collect()
            };
            for iface in &ifaces {
                instance.detach(iface)?;
                println!("detached instance {} from {iface}", instance.name());
            }
            if purge {
                instance.purge()?;
                println!("removed the pins of instance {}", instance.name());
            }
        }
        Command::Listener(command) => listener(&instance, &command)?,
        Command::Acl(command) => acl(&instance, command)?,
        Command::ControlPlane(command) => control_plane(command)?,
        Command::Register {
            control_plane,
            token,
            name,
            out,
        } => {
            let registered = portcullis::control::client::register(&control_plane, &token, &name, &out)?;
            println!(
                "registered replica {name} in cluster {} with {control_plane}; wrote {} (certificate expires at unix {})",
                registered.cluster,
                registered.file.display(),
                registered.expires_unix
            );
        }
        Command::Registration(RegistrationCommand::Inspect { file }) => {
            commands::inspect_registration(&file)?;
        }
        Command::Status { json, state_dir } => {
            let status = status(&instance, &state_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status)?;
            }
        }
    }
    Ok(())
}

fn control_plane(command: ControlPlaneCommand) -> anyhow::Result<()> {
    use portcullis::control::server;
    match command {
        ControlPlaneCommand::Init { dir, san } => {
            let fingerprint = server::init(&dir, &san)?;
            println!(
                "control plane CA created in {} (fingerprint sha256:{fingerprint})",
                dir.display()
            );
            println!(
                "desired state goes in {}/clusters/<cluster>/*.yaml",
                dir.display()
            );
        }
        ControlPlaneCommand::Token(TokenCommand::Create { dir, cluster, ttl }) => {
            println!("{}", server::create_token(&dir, &cluster, ttl)?);
        }
        ControlPlaneCommand::Revoke { dir, replica } => {
            server::revoke(&dir, &replica)?;
            println!("replica {replica} revoked: refused from its next request on");
        }
        ControlPlaneCommand::Serve {
            dir,
            listen,
            cert_lifetime,
        } => server::serve(&server::ServeOptions {
            dir,
            listen,
            cert_lifetime,
        })?,
    }
    Ok(())
}

fn acl(instance: &Instance, command: AclCommand) -> anyhow::Result<()> {
    let mut maps = instance.maps()?;
    match command {
        AclCommand::Add { list, cidrs } => {
            let list = list.list();
            let mut added = Vec::new();
            for cidr in &cidrs {
                match maps.acl_add(&list, *cidr) {
                    Ok(true) => added.push(*cidr),
                    Ok(false) => println!("{cidr} already in the {list}"),
                    Err(error) => {
                        // Nothing half-applied: undo what this command added.
                        for net in &added {
                            let _ = maps.acl_remove(&list, *net);
                        }
                        return Err(error).with_context(|| format!("adding {cidr} to the {list}"));
                    }
                }
            }
            for cidr in added {
                println!("{cidr} added to the {list}");
            }
        }
        AclCommand::Del { list, cidrs } => {
            let list = list.list();
            let present = maps.acl_entries(&list)?;
            if let Some(missing) = cidrs.iter().map(IpNet::trunc).find(|c| !present.contains(c)) {
                bail!("{missing} is not in the {list}; nothing was removed");
            }
            for cidr in cidrs {
                maps.acl_remove(&list, cidr)?;
                println!("{cidr} removed from the {list}");
            }
        }
        AclCommand::Replace { list, cidrs } => {
            let list = list.list();
            let mut nets = Vec::new();
            for arg in cidrs {
                match arg {
                    CidrArg::Net(net) => nets.push(net),
                    CidrArg::Stdin => {
                        for (n, line) in std::io::stdin().lines().enumerate() {
                            let line = line.context("reading CIDRs from standard input")?;
                            let line = line.trim();
                            if line.is_empty() || line.starts_with('#') {
                                continue;
                            }
                            nets.push(
                                parse_cidr(line).map_err(|e| anyhow::anyhow!("stdin line {}: {e}", n + 1))?,
                            );
                        }
                    }
                }
            }
            maps.acl_replace(&list, &nets)?;
            println!("{list} replaced: {} entries", maps.acl_entries(&list)?.len());
        }
        AclCommand::List { json } => {
            let mut lists = vec![(AclList::GlobalDeny, maps.acl_entries(&AclList::GlobalDeny)?)];
            for listener in maps.listeners()? {
                for list in [AclList::Allow(listener.addr), AclList::Deny(listener.addr)] {
                    let entries = maps.acl_entries(&list)?;
                    lists.push((list, entries));
                }
            }
            if json {
                let value: Vec<Value> = lists
                    .iter()
                    .map(|(list, entries)| {
                        let (kind, listener) = match list {
                            AclList::GlobalDeny => ("deny", None),
                            AclList::Deny(l) => ("deny", Some(l.to_string())),
                            AclList::Allow(l) => ("allow", Some(l.to_string())),
                        };
                        json!({
                            "list": kind,
                            "listener": listener,
                            "entries": entries.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                for (list, entries) in lists {
                    println!("{list}: {} entries", entries.len());
                    for entry in entries {
                        println!("  {entry}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn counters_json(c: &Counters) -> Value {
    json!({
        "passed": c.passed,
        "drop_global_deny": c.drop_global_deny,
        "drop_listener_deny": c.drop_listener_deny,
        "drop_not_allowed": c.drop_not_allowed,
        "malformed_passed": c.malformed_passed,
        "fragment_passed": c.fragment_passed,
        "gate_syn_ack": c.gate_syn_ack,
        "gate_503": c.gate_503,
        "gate_reset": c.gate_reset,
        "gate_drop": c.gate_drop,
        "gate_fin_ack": c.gate_fin_ack,
        "gate_absorbed": c.gate_absorbed,
        "gate_failed": c.gate_failed,
    })
}

fn listener(instance: &Instance, command: &ListenerCommand) -> anyhow::Result<()> {
    match command {
        ListenerCommand::Add { listener } => {
            let id = instance.maps()?.add_listener(listener)?;
            println!("listener {listener} added (id {id})");
        }
        ListenerCommand::Del { listener } => {
            instance.maps()?.remove_listener(listener)?;
            println!("listener {listener} removed");
        }
        ListenerCommand::SynLimit {
            listener,
            rate,
            burst,
        } => {
            instance.maps()?.set_syn_rate(listener, *rate, *burst)?;
            if *rate == 0 {
                println!("listener {listener}: no per-source SYN limit");
            } else {
                println!("listener {listener}: SYNs beyond {rate}/s (burst {burst}) per source dropped");
            }
        }
        ListenerCommand::SynBudget { listener, budget } => {
            let mut maps = instance.maps()?;
            let budgets = maps.syn_budgets_with(listener, *budget)?;
            maps.set_syn_cookies(&budgets)?;
            if *budget == 0 {
                println!("listener {listener}: no SYN budget, the kernel takes every SYN");
            } else {
                println!(
                    "listener {listener}: SYNs beyond {budget}/s per CPU answered with SYN cookies (nftables table inet {})",
                    portcullis::xdp::synproxy::table_name(instance)
                );
            }
        }
    }
    Ok(())
}

fn syn_json(limit: portcullis::xdp::SynLimit, c: &portcullis::xdp::SynCounters) -> Value {
    json!({
        "rate": limit.rate,
        "burst": limit.burst,
        "budget": limit.budget,
        "cookies_armed": limit.cookies != 0,
        "within": c.within,
        "over_rate": c.over_rate,
        "cookies": c.cookies,
        "cookie_failed": c.cookie_failed,
    })
}

/// The gates `portcullis run` last reported, and whether that proxy still runs.
fn gate_report(state_dir: &std::path::Path) -> Value {
    let Some((path, report)) = GateReport::read(state_dir) else {
        return Value::Null;
    };
    let running = report.proxy_running();
    let mut value = serde_json::to_value(report).unwrap_or(Value::Null);
    value["proxy_running"] = json!(running);
    value["path"] = json!(path.display().to_string());
    value
}

fn status(instance: &Instance, state_dir: &std::path::Path) -> anyhow::Result<Value> {
    let report = gate_report(state_dir);
    let maps: Maps = match instance.maps() {
        Ok(maps) => maps,
        Err(XdpError::NotLoaded { .. }) => {
            return Ok(json!({
                "instance": instance.name(),
                "xdp_loaded": false,
                "gates": report,
                "listeners": [],
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let heartbeat = maps.heartbeat()?;
    let mut listeners = Vec::new();
    for listener in maps.listeners()? {
        let gated = listener.gate_mode != GateMode::None && (!listener.gate_open || !heartbeat.live());
        listeners.push(json!({
            "listener": listener.addr.to_string(),
            "id": listener.id,
            "allow": listener.allow_len,
            "deny": listener.deny_len,
            "gate": {
                "mode": listener.gate_mode.label(),
                "open": listener.gate_open,
                "attended": heartbeat.live(),
                "gated": gated,
            },
            "counters": counters_json(&maps.counters(listener.id)?),
            "syn": syn_json(maps.syn_limit(listener.id)?, &maps.syn_counters(listener.id)?),
        }));
    }
    Ok(json!({
        "instance": instance.name(),
        "xdp_loaded": true,
        "gates": report,
        "pin_dir": instance.pin_dir().display().to_string(),
        "attached": instance.attached_interfaces(),
        "global_deny": maps.global_deny_len()?,
        "unattributed": counters_json(&maps.counters(portcullis::xdp::UNATTRIBUTED)?),
        "heartbeat": {
            "owner": heartbeat.owner,
            "live": heartbeat.live(),
            "age_ms": heartbeat.age.map(|a| a.as_millis()),
            "timeout_ms": heartbeat.timeout.as_millis(),
        },
        "listeners": listeners,
    }))
}

fn print_gates(out: &mut impl std::io::Write, report: &Value) -> anyhow::Result<()> {
    if report.is_null() {
        writeln!(
            out,
            "API instances: no gate report (has `portcullis run` run with this --state-dir?)"
        )?;
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = |v: &Value| now.saturating_sub(v.as_u64().unwrap_or(0));
    writeln!(
        out,
        "API instances (gatekeeper {}; reported by pid {} {} s ago; proxy {}):",
        report["level"].as_str().unwrap_or("?"),
        report["pid"],
        ago(&report["written_unix"]),
        if report["proxy_running"] == true {
            "running"
        } else {
            "DOWN: gated listeners are answered by XDP"
        }
    )?;
    if let Some(cp) = report["control_plane"].as_object() {
        let field = |k: &str| cp.get(k).cloned().unwrap_or(Value::Null);
        let version = field("snapshot_version").as_u64().unwrap_or(0);
        let expires = field("certificate_expires_unix").as_u64().unwrap_or(0);
        writeln!(
            out,
            "control plane {} (replica {}, cluster {}): {}; snapshot {}; certificate {}",
            field("url").as_str().unwrap_or("?"),
            field("replica").as_str().unwrap_or("?"),
            field("cluster").as_str().unwrap_or("?"),
            if field("connected") == true {
                "connected"
            } else {
                "NOT CONNECTED: what is applied stays in force"
            },
            if version == 0 {
                "none applied yet".to_owned()
            } else {
                format!(
                    "v{version}, published {} s ago",
                    ago(&field("snapshot_published_unix"))
                )
            },
            if expires > now {
                format!("expires in {} s", expires - now)
            } else {
                "EXPIRED: register again with a new token".to_owned()
            }
        )?;
    }
    writeln!(
        out,
        "  {:<24} {:<24} {:<9} {:<20} {:>10}",
        "api", "listener", "gate", "reason", "since"
    )?;
    for api in report["apis"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<24} {:<24} {:<9} {:<20} {:>8} s",
            api["api"].as_str().unwrap_or("?"),
            api["listener"].as_str().unwrap_or("-"),
            api["state"].as_str().unwrap_or("?"),
            api["reason"].as_str().unwrap_or("-"),
            ago(&api["since_unix"])
        )?;
        if let Some(detail) = api["detail"].as_str().filter(|d| !d.is_empty()) {
            writeln!(out, "      {detail}")?;
        }
    }
    print_endpoints(out, report)
}

fn print_endpoints(out: &mut impl std::io::Write, report: &Value) -> anyhow::Result<()> {
    let Some(endpoints) = report["endpoints"].as_array().filter(|e| !e.is_empty()) else {
        return Ok(());
    };
    writeln!(out, "Upstream endpoints:")?;
    writeln!(
        out,
        "  {:<32} {:<24} {:<10} checks",
        "service", "endpoint", "health"
    )?;
    for ep in endpoints {
        writeln!(
            out,
            "  {:<32} {:<24} {:<10} {}",
            ep["service"].as_str().unwrap_or("?"),
            ep["endpoint"].as_str().unwrap_or("?"),
            ep["health"].as_str().unwrap_or("?"),
            if ep["checked"] == true {
                "active"
            } else {
                "passive"
            }
        )?;
    }
    Ok(())
}

fn print_status(status: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    print_gates(&mut out, &status["gates"])?;
    if status["xdp_loaded"] != true {
        writeln!(
            out,
            "XDP: not loaded for instance {}",
            status["instance"].as_str().unwrap_or("?")
        )?;
        return Ok(());
    }
    let attached: Vec<&str> = status["attached"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    writeln!(
        out,
        "instance {} ({})",
        status["instance"].as_str().unwrap_or("?"),
        status["pin_dir"].as_str().unwrap_or("?")
    )?;
    writeln!(
        out,
        "attached to: {}",
        if attached.is_empty() {
            "nothing".to_owned()
        } else {
            attached.join(", ")
        }
    )?;
    writeln!(out, "global deny list: {} entries", status["global_deny"])?;
    writeln!(
        out,
        "{:<4} {:<28} {:>6} {:>6} {:>12} {:>12} {:>12} {:>12}",
        "id", "listener", "allow", "deny", "passed", "drop-global", "drop-deny", "drop-notallow"
    )?;
    for l in status["listeners"].as_array().into_iter().flatten() {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let c = &l["counters"];
        writeln!(
            out,
            "{:<4} {:<28} {:>6} {:>6} {:>12} {:>12} {:>12} {:>12}",
            n(&l["id"]),
            l["listener"].as_str().unwrap_or("?"),
            n(&l["allow"]),
            n(&l["deny"]),
            n(&c["passed"]),
            n(&c["drop_global_deny"]),
            n(&c["drop_listener_deny"]),
            n(&c["drop_not_allowed"])
        )?;
    }
    let hb = &status["heartbeat"];
    writeln!(
        out,
        "gates at the NIC (heartbeat of pid {}: {}):",
        hb["owner"],
        if hb["live"] == true {
            "live"
        } else {
            "stale: every gated listener is closed"
        }
    )?;
    writeln!(
        out,
        "  {:<28} {:<6} {:<8} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "listener", "mode", "gate", "503", "syn-ack", "reset", "drop", "failed"
    )?;
    for l in status["listeners"].as_array().into_iter().flatten() {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let (g, c) = (&l["gate"], &l["counters"]);
        let state = if g["mode"] == "none" {
            "-"
        } else if g["gated"] == true {
            "closed"
        } else {
            "open"
        };
        writeln!(
            out,
            "  {:<28} {:<6} {:<8} {:>10} {:>10} {:>10} {:>10} {:>8}",
            l["listener"].as_str().unwrap_or("?"),
            g["mode"].as_str().unwrap_or("?"),
            state,
            n(&c["gate_503"]),
            n(&c["gate_syn_ack"]),
            n(&c["gate_reset"]),
            n(&c["gate_drop"]),
            n(&c["gate_failed"])
        )?;
    }
    print_syn(&mut out, status)?;
    let u = &status["unattributed"];
    writeln!(
        out,
        "unattributed: malformed passed {}, fragments passed {}, dropped by global deny {}",
        u["malformed_passed"], u["fragment_passed"], u["drop_global_deny"]
    )?;
    Ok(())
}

fn print_syn(out: &mut impl std::io::Write, status: &Value) -> anyhow::Result<()> {
    writeln!(
        out,
        "SYNs at the NIC (rate and burst per source; budget per CPU, then SYN cookies):"
    )?;
    writeln!(
        out,
        "  {:<28} {:>8} {:>8} {:>8} {:>12} {:>12} {:>12} {:>8}",
        "listener", "rate/s", "burst", "budget", "within", "over rate", "cookies", "failed"
    )?;
    for l in status["listeners"].as_array().into_iter().flatten() {
        let syn = &l["syn"];
        let rate = match syn["rate"].as_u64() {
            Some(0) | None => "off".to_owned(),
            Some(r) => r.to_string(),
        };
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let budget = match (syn["budget"].as_u64(), syn["cookies_armed"].as_bool()) {
            (Some(0) | None, _) => "off".to_owned(),
            (Some(b), Some(true)) => b.to_string(),
            (Some(_), _) => "unarmed".to_owned(),
        };
        writeln!(
            out,
            "  {:<28} {:>8} {:>8} {:>8} {:>12} {:>12} {:>12} {:>8}",
            l["listener"].as_str().unwrap_or("?"),
            rate,
            n(&syn["burst"]),
            budget,
            n(&syn["within"]),
            n(&syn["over_rate"]),
            n(&syn["cookies"]),
            n(&syn["cookie_failed"])
        )?;
    }
    Ok(())
}
