//! Connection ACLs enforced by a real XDP attach on a veth pair between a
//! client namespace and a gateway namespace, driven through the real CLI.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portcullis_tests::{EchoServer, Exchange, Gateway, NetNs, Topology, exchange, exchange_here};

const PORT: u16 = 8080;
const SHORT: Duration = Duration::from_millis(700);

struct Setup {
    topo: Topology,
    gw: Gateway,
    server: EchoServer,
    listener: String,
}

fn setup(v6: bool) -> Setup {
    let topo = Topology::new().expect("namespaces");
    let gw = Gateway::new(&topo.gw);
    let attached = gw
        .cli(&["xdp", "attach", "--iface", &topo.veth.a])
        .expect("attach");
    assert!(
        attached.contains("Native"),
        "veth supports native XDP: {attached}"
    );
    let addr = SocketAddr::new(topo.gw_ip(v6), PORT);
    let server = EchoServer::start(&topo.gw, addr).expect("server");
    let listener = addr.to_string();
    gw.cli(&["listener", "add", &listener]).expect("listener add");
    Setup {
        topo,
        gw,
        server,
        listener,
    }
}

fn ask(s: &Setup, host: u8, v6: bool) -> Exchange {
    exchange(&s.topo.client, s.topo.client_ip(host, v6), s.server.addr, SHORT).expect("client runs")
}

fn counter(s: &Setup, name: &str) -> u64 {
    s.gw.listener_counters(&s.listener).expect("status")[name]
        .as_u64()
        .expect("number")
}

fn allowed_and_denied(v6: bool) {
    let s = setup(v6);
    let denied = s.topo.client_ip(3, v6).to_string();
    s.gw.cli(&["acl", "add", "--deny", "--listener", &s.listener, &denied])
        .expect("acl add");

    assert_eq!(
        ask(&s, 2, v6),
        Exchange::Completed,
        "allowed client completes the exchange"
    );
    assert_eq!(
        ask(&s, 3, v6),
        Exchange::TimedOut,
        "denied client's SYN is dropped"
    );
    assert_eq!(
        s.server.accepted(),
        1,
        "the kernel never handed over the denied connection"
    );
    assert!(counter(&s, "drop_listener_deny") >= 1);
    assert!(
        counter(&s, "passed") >= 3,
        "SYN, data and ACKs of the allowed client"
    );
}

#[test]
fn allowed_client_passes_denied_client_is_dropped_v4() {
    allowed_and_denied(false);
}

#[test]
fn allowed_client_passes_denied_client_is_dropped_v6() {
    allowed_and_denied(true);
}

#[test]
fn acl_changes_take_effect_without_reattach() {
    for v6 in [false, true] {
        let s = setup(v6);
        let (two, three) = (
            s.topo.client_ip(2, v6).to_string(),
            s.topo.client_ip(3, v6).to_string(),
        );
        assert_eq!(ask(&s, 3, v6), Exchange::Completed);

        s.gw.cli(&["acl", "add", "--deny", &three]).expect("global deny");
        assert_eq!(ask(&s, 3, v6), Exchange::TimedOut);
        assert_eq!(ask(&s, 2, v6), Exchange::Completed);
        assert!(counter(&s, "drop_global_deny") >= 1);

        s.gw.cli(&["acl", "del", "--deny", &three])
            .expect("global deny removed");
        assert_eq!(ask(&s, 3, v6), Exchange::Completed);

        s.gw.cli(&["acl", "add", "--allow", "--listener", &s.listener, &two])
            .expect("allow");
        assert_eq!(ask(&s, 2, v6), Exchange::Completed);
        assert_eq!(
            ask(&s, 3, v6),
            Exchange::TimedOut,
            "not in a non-empty allow list"
        );
        assert!(counter(&s, "drop_not_allowed") >= 1);

        s.gw.cli(&["acl", "replace", "--allow", "--listener", &s.listener, &three])
            .expect("replace");
        assert_eq!(ask(&s, 2, v6), Exchange::TimedOut);
        assert_eq!(ask(&s, 3, v6), Exchange::Completed);

        s.gw.cli(&["acl", "replace", "--allow", "--listener", &s.listener])
            .expect("empty");
        assert_eq!(ask(&s, 2, v6), Exchange::Completed);
        let attached = s.gw.status().expect("status")["attached"].clone();
        assert_eq!(
            attached,
            serde_json::json!([s.topo.veth.a]),
            "still the one original link"
        );
    }
}

/// Clients hammering the listener from inside the client namespace.
struct Hammer {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    attempts: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<anyhow::Result<()>>>,
}

impl Hammer {
    fn start(ns: &NetNs, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let attempts = Arc::new(AtomicU64::new(0));
        let (st, done, tried) = (stop.clone(), completed.clone(), attempts.clone());
        let thread = ns.spawn(move || {
            while !st.load(Ordering::Relaxed) {
                tried.fetch_add(1, Ordering::Relaxed);
                if exchange_here(src, dst, timeout).expect("exchange") == Exchange::Completed {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            stop,
            completed,
            attempts,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("hammer thread").expect("hammer");
        }
        (
            self.attempts.load(Ordering::Relaxed),
            self.completed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn enforcement_is_uninterrupted_across_gateway_restarts() {
    for v6 in [false, true] {
        let s = setup(v6);
        let (two, three) = (s.topo.client_ip(2, v6), s.topo.client_ip(3, v6));
        let prefix = if v6 { "/128" } else { "/32" };
        let denied = format!("{three}{prefix}");
        s.gw.cli(&["acl", "add", "--deny", "--listener", &s.listener, &denied])
            .expect("deny");

        let bad = Hammer::start(&s.topo.client, three, s.server.addr, Duration::from_millis(150));
        let good = Hammer::start(&s.topo.client, two, s.server.addr, Duration::from_secs(2));
        let started = Instant::now();
        let drops_before = counter(&s, "drop_listener_deny");
        let mut replaced = 0;
        for round in 0..12 {
            // A new gateway process loads its program and swaps it into the
            // pinned link, reusing the pinned maps.
            let out =
                s.gw.cli(&["xdp", "attach", "--iface", &s.topo.veth.a])
                    .expect("re-attach");
            replaced += usize::from(out.contains("Replaced"));
            // One killed half-way through its start.
            let mut child =
                s.gw.command(&["xdp", "attach", "--iface", &s.topo.veth.a])
                    .spawn()
                    .expect("spawn");
            thread::sleep(Duration::from_millis(5 * (round % 4)));
            let _ = child.kill();
            let _ = child.wait();
            // Whole-list swaps that always keep the denied client denied.
            let other = if v6 {
                format!("fd77::{round}/128")
            } else {
                format!("10.77.0.{round}/32")
            };
            s.gw.cli(&[
                "acl",
                "replace",
                "--deny",
                "--listener",
                &s.listener,
                &denied,
                &other,
            ])
            .expect("replace");
        }
        thread::sleep(Duration::from_millis(300));
        let (bad_tries, bad_done) = bad.finish();
        let (good_tries, good_done) = good.finish();
        eprintln!(
            "restarts over {:?}: denied client {bad_done}/{bad_tries} completed, allowed {good_done}/{good_tries}",
            started.elapsed()
        );
        assert_eq!(
            replaced, 12,
            "every restart swapped the program into the existing link"
        );
        assert_eq!(bad_done, 0, "the denied client never got through");
        assert!(bad_tries > 3, "the denied client kept trying");
        assert!(
            good_done > 3 && good_done == good_tries,
            "the allowed client was never cut off"
        );
        assert_eq!(
            s.server.accepted(),
            good_done,
            "only the allowed client reached the server"
        );
        assert!(
            counter(&s, "drop_listener_deny") > drops_before,
            "counters survive restarts"
        );
        let status = s.gw.status().expect("status");
        assert_eq!(status["listeners"][0]["deny"], 2, "{status}");
    }
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let topo = Topology::new().expect("namespaces");
    let gw = Gateway::new(&topo.gw);

    let out = gw.try_cli(&["listener", "add", "10.0.0.1:80"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("run `portcullis xdp attach"),
        "{}",
        stderr_of(&out)
    );

    let out = gw.try_cli(&["xdp", "attach", "--iface", "nosuch0"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("unknown interface \"nosuch0\""),
        "{}",
        stderr_of(&out)
    );

    gw.cli(&["xdp", "attach", "--iface", &topo.veth.a])
        .expect("attach");
    gw.cli(&["listener", "add", "10.0.0.1:80"]).expect("listener");
    let out = gw.try_cli(&["listener", "add", "10.0.0.1:80"]);
    assert!(stderr_of(&out).contains("already exists"));

    for (args, needle) in [
        (
            vec!["acl", "add", "--deny", "10.0.0.0/33"],
            "invalid CIDR \"10.0.0.0/33\"",
        ),
        (
            vec!["acl", "add", "--deny", "10.1.0.0/16", "banana"],
            "invalid CIDR \"banana\"",
        ),
        (vec!["listener", "add", "10.0.0.1"], "expected ADDR:PORT"),
        (vec!["acl", "add", "--allow", "10.0.0.0/8"], "--listener"),
        (
            vec!["acl", "add", "--deny", "--listener", "10.0.0.1:81", "10.0.0.0/8"],
            "no listener 10.0.0.1:81",
        ),
        (
            vec!["acl", "add", "--deny", "--listener", "10.0.0.1:80", "fd00::/8"],
            "not of the same address family",
        ),
        (
            vec!["acl", "del", "--deny", "10.1.0.0/16"],
            "is not in the global deny list",
        ),
    ] {
        let out = gw.try_cli(&args);
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should mention {needle:?}"
        );
    }
    let out = Command::new(portcullis_tests::portcullis_bin())
        .args(["--instance", "../etc", "status"])
        .output()
        .expect("runs");
    assert!(
        stderr_of(&out).contains("invalid instance name"),
        "{}",
        stderr_of(&out)
    );

    // Nothing half-applied: the valid CIDR of a refused command is absent, and
    // a delete naming one missing entry removes nothing.
    gw.cli(&["acl", "add", "--deny", "10.2.0.0/16"]).expect("add");
    let out = gw.try_cli(&["acl", "del", "--deny", "10.2.0.0/16", "10.3.0.0/16"]);
    assert!(!out.status.success());
    let lists: serde_json::Value =
        serde_json::from_str(&gw.cli(&["acl", "list", "--json"]).expect("list")).expect("json");
    assert_eq!(lists[0]["entries"], serde_json::json!(["10.2.0.0/16"]), "{lists}");

    // No BPF permission: an unprivileged user gets the error and the hint.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(portcullis_tests::portcullis_bin())
        .args(["--instance", gw.instance(), "acl", "add", "--deny", "10.9.0.0/16"])
        .output()
        .expect("setpriv runs");
    let err = stderr_of(&out);
    assert!(!out.status.success());
    assert!(
        err.lines().next().is_some_and(|l| l.starts_with("error: ")),
        "{err}"
    );
    assert!(
        err.contains("run as root") || err.contains("Permission denied"),
        "{err}"
    );
}

#[test]
fn native_attach_falls_back_to_generic_where_unsupported() {
    let ns = NetNs::new("d").expect("namespace");
    // Loopback has no driver-mode XDP.
    let dummy = "lo";
    let gw = Gateway::new(&ns);

    let out = gw.try_cli(&["xdp", "attach", "--iface", dummy, "--mode", "native"]);
    assert!(!out.status.success(), "lo has no native XDP");
    assert!(stderr_of(&out).contains("hint: "), "{}", stderr_of(&out));

    let out = gw
        .command(&["xdp", "attach", "--iface", dummy])
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Generic"));
    assert!(
        stderr_of(&out).contains("falling back to generic"),
        "the fallback is logged"
    );
}

/// Like [`ask`], from a thread on CPU 0: SYN buckets are per CPU, and a
/// veth runs XDP on the sender's CPU.
fn ask_on_cpu0(s: &Setup, host: u8) -> Exchange {
    let (src, dst) = (s.topo.client_ip(host, false), s.server.addr);
    s.topo
        .client
        .run(move || {
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(0).expect("cpu 0");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("pinned to cpu 0");
            exchange_here(src, dst, SHORT)
        })
        .expect("client runs")
        .expect("exchange")
}

#[test]
fn a_source_over_its_syn_rate_is_dropped_at_the_nic() {
    let s = setup(false);
    let syn = |s: &Setup| s.gw.status().expect("status")["listeners"][0]["syn"].clone();
    assert_eq!(syn(&s)["rate"], 10_000, "limited by default");
    s.gw.cli(&[
        "listener",
        "syn-limit",
        &s.listener,
        "--rate",
        "1",
        "--burst",
        "3",
    ])
    .expect("limit set");
    // Connections in quick succession: the burst of 3 gets through, the
    // fourth times out (its SYN dropped; no retransmission within the timeout).
    let outcomes: Vec<Exchange> = (0..4).map(|_| ask_on_cpu0(&s, 2)).collect();
    assert_eq!(
        outcomes,
        [[Exchange::Completed; 3].as_slice(), &[Exchange::TimedOut]].concat()
    );
    assert_eq!(
        ask_on_cpu0(&s, 3),
        Exchange::Completed,
        "another source has its own bucket"
    );
    // 1/s: a token back a second after the dropped SYN.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(ask_on_cpu0(&s, 2), Exchange::Completed, "refilled at the rate");
    let counts = syn(&s);
    assert_eq!(
        (counts["within"].as_u64(), counts["over_rate"].as_u64()),
        (Some(5), Some(1)),
        "{counts}"
    );
    s.gw.cli(&["listener", "syn-limit", &s.listener, "--rate", "0"])
        .expect("limit off");
    assert_eq!(
        ask_on_cpu0(&s, 2),
        Exchange::Completed,
        "off: the source gets through at once"
    );
}
