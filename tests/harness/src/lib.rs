//! Test harness shared by every integration test, the demo and the
//! benchmarks: uniquely named network namespaces joined by veth pairs,
//! processes and sockets inside them, the `portcullis` binary, and crafted
//! frames. Every guard removes what it created when dropped, also on panic.

pub mod frames;
pub mod grpc;
pub mod h2;
pub mod http;
pub mod ws;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::PathBuf,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name unique across concurrently running tests and test binaries:
/// `pc{pid}{tag}{n}`, short enough for an interface name (≤ 15 bytes).
pub fn unique_name(tag: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 1_000_000;
    format!("pc{pid}{tag}{n}")
}

/// The exposure score in `systemd-analyze security` output for `unit`
/// (`portcullis.service`), if it holds one.
pub fn exposure(text: &str, unit: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.split(&format!("Overall exposure level for {unit}: ")).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `systemd-analyze security --offline=true` of a unit file: its score and
/// the whole report.
pub fn offline_exposure(unit_file: &std::path::Path) -> anyhow::Result<(f64, String)> {
    use anyhow::Context as _;
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit_file)
        .output()
        .context("running systemd-analyze (systemd)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let name = unit_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let score = exposure(&text, &name).with_context(|| {
        format!(
            "no exposure level for {name}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((score, text))
}

/// How long [`wait_for`] waits.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `ok` every 10 ms until it says yes; fails after [`WAIT`], naming `what`.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    while !ok()? {
        if std::time::Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn sh(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    sh(Command::new("ip").args(args)).map(drop)
}

/// A network namespace that exists for the guard's lifetime.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a uniquely named namespace with its loopback up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = unique_name(tag);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name under /run/netns.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command run inside the namespace with `nsenter`, which (unlike
    /// `ip netns exec`) keeps the host's /sys and so its bpffs pins.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates
    /// belong to the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<anyhow::Result<T>> {
        let path = self.path();
        thread::spawn(move || {
            let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        self.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A veth pair joining two namespaces; its ends die with the namespaces, and
/// the guard deletes them if a test fails before moving them.
#[derive(Debug)]
pub struct Veth {
    /// The end in the first namespace.
    pub a: String,
    /// The end in the second namespace.
    pub b: String,
}

impl Veth {
    /// Creates a pair, moves one end into each namespace, assigns the
    /// addresses (`10.0.0.1/24`, `fd00::1/64`...) and brings both ends up.
    pub fn join(a: &NetNs, a_addrs: &[&str], b: &NetNs, b_addrs: &[&str]) -> anyhow::Result<Self> {
        let base = unique_name("v");
        let veth = Self {
            a: format!("{base}a"),
            b: format!("{base}b"),
        };
        ip(&["link", "add", &veth.a, "type", "veth", "peer", "name", &veth.b])?;
        ip(&["link", "set", &veth.a, "netns", a.name()])?;
        ip(&["link", "set", &veth.b, "netns", b.name()])?;
        for (ns, dev, addrs) in [(a, &veth.a, a_addrs), (b, &veth.b, b_addrs)] {
            for addr in addrs {
                let mut args = vec!["-n", ns.name(), "addr", "add", addr, "dev", dev];
                if addr.contains(':') {
                    args.push("nodad");
                }
                ip(&args)?;
            }
            ip(&["-n", ns.name(), "link", "set", dev, "up"])?;
        }
        Ok(veth)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Only still in the root namespace if the set-up failed half-way.
        let _ = Command::new("ip").args(["link", "del", &self.a]).output();
    }
}

/// The `portcullis` binary under test: `$PORTCULLIS_BIN`, or the debug build.
pub fn portcullis_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/portcullis"),
        PathBuf::from,
    )
}

/// One gateway instance's pins, used through the real CLI inside a namespace;
/// the pins and lock file are removed on drop.
#[derive(Debug)]
pub struct Gateway {
    ns_path: PathBuf,
    instance: String,
    bin: PathBuf,
}

impl Gateway {
    /// A fresh, uniquely named instance acting in `ns`.
    pub fn new(ns: &NetNs) -> Self {
        Self::with_bin(ns, portcullis_bin())
    }

    /// Like [`Gateway::new`], driving the given `portcullis` binary.
    pub fn with_bin(ns: &NetNs, bin: PathBuf) -> Self {
        Self {
            ns_path: ns.path(),
            instance: unique_name("i"),
            bin,
        }
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `portcullis --instance I ARGS...` inside the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .arg(&self.bin)
            .args(["--instance", &self.instance])
            .args(args);
        cmd
    }

    /// Runs the CLI and returns its output, whatever the exit code.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("portcullis runs")
    }

    /// Runs the CLI, failing with its stderr if it fails; returns stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.try_cli(args);
        if !out.status.success() {
            bail!(
                "portcullis {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `portcullis status --json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&["status", "--json"])?)?)
    }

    /// One listener's entry in `status --json` (its `counters`, `syn`...).
    pub fn listener_status(&self, listener: &str) -> anyhow::Result<serde_json::Value> {
        let status = self.status()?;
        status["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["listener"] == listener))
            .cloned()
            .with_context(|| format!("listener {listener} not in status {status}"))
    }

    /// The counters of one listener from `status --json`.
    pub fn listener_counters(&self, listener: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.listener_status(listener)?["counters"].clone())
    }

    /// Removes the instance's pins: detaches its links and drops its maps.
    pub fn purge(&self) {
        remove_pins(&self.instance);
    }
}

/// Removes the bpffs pins and lock file of an instance.
pub fn remove_pins(instance: &str) {
    let dir = PathBuf::from("/sys/fs/bpf/portcullis").join(instance);
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir(&dir);
    let _ = fs::remove_file(PathBuf::from("/run/portcullis").join(format!("{instance}.lock")));
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.purge();
    }
}

/// A TCP server inside a namespace that answers each line with `ok <line>`
/// (or a `GET` with a small HTTP response) and counts the connections the kernel handed it.
#[derive(Debug)]
pub struct EchoServer {
    /// Its address.
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl EchoServer {
    /// Binds `addr` inside `ns` and serves until dropped.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns.run(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let (acc, st) = (accepted.clone(), stop.clone());
        let thread = thread::spawn(move || -> anyhow::Result<()> {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        acc.fetch_add(1, Ordering::Relaxed);
                        thread::spawn(move || serve_echo(stream));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        Ok(Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Body of the HTTP answer the server gives to a `GET`.
pub const HTTP_BODY: &str = "hello from the upstream\n";

fn serve_echo(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.starts_with("GET ") {
            // Enough HTTP/1.1 for curl: skip the headers, answer, close.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let _ = writer.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HTTP_BODY}",
                    HTTP_BODY.len()
                )
                .as_bytes(),
            );
            return;
        }
        if writer.write_all(format!("ok {line}").as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Outcome of one client exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Connected and got the echo back.
    Completed,
    /// The SYN was never answered within the timeout.
    TimedOut,
    /// Refused or reset.
    Refused,
}

/// From inside `ns`, connects from `src` to `dst`, sends a line and reads the
/// echo: the full TCP exchange a client would make.
pub fn exchange(ns: &NetNs, src: IpAddr, dst: SocketAddr, timeout: Duration) -> anyhow::Result<Exchange> {
    ns.run(move || exchange_here(src, dst, timeout))?
}

/// [`exchange`] on a thread that is already inside the namespace.
pub fn exchange_here(src: IpAddr, dst: SocketAddr, timeout: Duration) -> anyhow::Result<Exchange> {
    use socket2::{Domain, Socket, Type};
    let domain = if dst.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(src, 0).into())?;
    match socket.connect_timeout(&dst.into(), timeout) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
            return Ok(Exchange::TimedOut);
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(Exchange::Refused),
        Err(e) => return Err(e.into()),
    }
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"ping\n")?;
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 8 {
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Ok(Exchange::TimedOut);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if &buf[..got] == b"ok ping\n" {
        Ok(Exchange::Completed)
    } else {
        Ok(Exchange::Refused)
    }
}

/// A client namespace and a gateway namespace joined by one veth pair, with
/// IPv4 and IPv6 addresses: the gateway is `.1`, clients `.2` and `.3`.
#[derive(Debug)]
pub struct Topology {
    /// The gateway's namespace.
    pub gw: NetNs,
    /// The clients' namespace.
    pub client: NetNs,
    /// The veth pair (`a` in the gateway namespace).
    pub veth: Veth,
    /// Second octet of the 10.x.0.0/24 subnet, unique per topology.
    pub subnet: u8,
}

impl Topology {
    /// Builds the two namespaces and the link.
    pub fn new() -> anyhow::Result<Self> {
        let gw = NetNs::new("g")?;
        let client = NetNs::new("c")?;
        let subnet = u8::try_from(NEXT_ID.fetch_add(1, Ordering::Relaxed) % 200 + 20).expect("< 256");
        let v4 = |h: u8| format!("10.{subnet}.0.{h}/24");
        let v6 = |h: u8| format!("fd00:{subnet}::{h}/64");
        let veth = Veth::join(&gw, &[&v4(1), &v6(1)], &client, &[&v4(2), &v4(3), &v6(2), &v6(3)])?;
        Ok(Self {
            gw,
            client,
            veth,
            subnet,
        })
    }

    /// Lets the client end receive frames the gateway's XDP program sends
    /// back with `XDP_TX`: a veth peer only takes them with an XDP program of
    /// its own (GRO alone is not enough on this kernel), so a pass-through
    /// instance (no listeners) is attached there. Keep the guard.
    pub fn accept_xdp_replies(&self) -> anyhow::Result<Gateway> {
        let pass = Gateway::new(&self.client);
        pass.cli(&["xdp", "attach", "--iface", &self.veth.b])?;
        Ok(pass)
    }

    /// The gateway's address (`v6` selects IPv6).
    pub fn gw_ip(&self, v6: bool) -> IpAddr {
        self.host(1, v6)
    }

    /// A client address: host 2 or 3.
    pub fn client_ip(&self, host: u8, v6: bool) -> IpAddr {
        self.host(host, v6)
    }

    fn host(&self, host: u8, v6: bool) -> IpAddr {
        if v6 {
            format!("fd00:{}::{host}", self.subnet).parse().expect("valid")
        } else {
            IpAddr::from([10, self.subnet, 0, host])
        }
    }
}

/// The pid, parent pid and user + system clock ticks of every process.
fn all_processes() -> Vec<(u32, u32, u64)> {
    let stat = |pid: u32| -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((ppid, ticks))
    };
    let mut procs = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some((ppid, ticks)) = stat(pid)
            {
                procs.push((pid, ppid, ticks));
            }
        }
    }
    procs
}

/// A process and all its descendants, each with its user + system clock
/// ticks; an error if the process is gone.
fn tree_ticks(root: u32) -> std::io::Result<Vec<(u32, u64)>> {
    let procs = all_processes();
    if !procs.iter().any(|(pid, _, _)| *pid == root) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("process {root} is gone: no CPU time to read"),
        ));
    }
    let mut todo = vec![root];
    let mut tree = Vec::new();
    while let Some(pid) = todo.pop() {
        for (child, ppid, t) in &procs {
            if *child == pid {
                tree.push((pid, *t));
            }
            if *ppid == pid {
                todo.push(*child);
            }
        }
    }
    Ok(tree)
}

/// A process and all its descendants (nginx's master and workers); an
/// error if the process is gone.
pub fn process_tree(root: u32) -> std::io::Result<Vec<u32>> {
    Ok(tree_ticks(root)?.into_iter().map(|(pid, _)| pid).collect())
}

/// User + system CPU seconds of a process and all its descendants (nginx's
/// master and workers, every thread of the others); an error if the
/// process is gone.
pub fn cpu_seconds(root: u32) -> std::io::Result<f64> {
    let ticks: u64 = tree_ticks(root)?.iter().map(|(_, t)| t).sum();
    // USER_HZ is 100 for every Linux user space.
    Ok(f64::from(u32::try_from(ticks).unwrap_or(u32::MAX)) / 100.0)
}

#[cfg(test)]
mod cpu_tests {
    #[test]
    fn cpu_time_is_read_for_a_live_process_and_refused_for_a_gone_one() {
        // Spin until a clock tick (10 ms of CPU) is counted, or give up after 5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut own = 0.0;
        while own == 0.0 && std::time::Instant::now() < deadline {
            own = super::cpu_seconds(std::process::id()).expect("this process");
        }
        assert!(own > 0.0, "no CPU time counted for this busy process");
        let gone = super::cpu_seconds(u32::MAX).expect_err("no such pid");
        assert!(gone.to_string().contains("is gone"), "{gone}");
    }
}
