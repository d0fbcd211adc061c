//! `cargo xtask bench xdp`: ns per packet of the ACL program, measured in the
//! kernel with BPF_PROG_TEST_RUN and a repeat count, at 1k, 100k and 1M
//! prefixes per list, on the allow path and the deny path. The same program
//! with empty lists is measured in the same run as the baseline.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, ensure};
use ipnet::{IpNet, Ipv4Net};
use portcullis::xdp::{AclList, Instance, ListenerAddr, Loaded};
use portcullis_tests::{
    frames::{Frame, arp},
    remove_pins, unique_name,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const REPEAT: u32 = 2_000_000;
const SAMPLES: usize = 5;

/// Deterministic pseudo-random prefixes with a realistic spread of lengths.
struct Prefixes(u64);

impl Prefixes {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        u32::try_from(self.0 >> 32).expect("shifted")
    }

    fn take(&mut self, n: usize) -> Vec<IpNet> {
        (0..n)
            .map(|_| {
                let len = match self.next_u32() % 10 {
                    0..=5 => 24,
                    6 | 7 => 32,
                    8 => 16,
                    _ => 20 + self.next_u32() % 9,
                };
                let net =
                    Ipv4Net::new(self.next_u32().into(), u8::try_from(len).expect("≤ 32")).expect("valid");
                IpNet::V4(net.trunc())
            })
            .collect()
    }
}

fn median_ns(loaded: &mut Loaded, frame: &[u8], expected: u32) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (action, per_run) = loaded.test_run(frame, REPEAT)?;
        ensure!(action == expected, "verdict {action}, expected {expected}");
        samples.push(per_run);
    }
    samples.sort();
    Ok(duration_ns(samples[SAMPLES / 2]))
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

struct Row {
    prefixes: usize,
    path: &'static str,
    ns: f64,
}

fn bench(prefixes: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let name = unique_name("b");
    let result = bench_in(&name, prefixes, rows);
    remove_pins(&name);
    result
}

fn bench_in(name: &str, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let instance = Instance::new(name)?;
    let capacity = u32::try_from(2 * n + 4096).context("capacity")?;
    let mut loaded = instance.load(capacity)?;
    let mut maps = instance.maps()?;
    let listener: ListenerAddr = "10.0.0.1:80".parse().map_err(anyhow::Error::msg)?;
    maps.add_listener(&listener)?;
    let dst: IpAddr = "10.0.0.1".parse()?;
    let syn = |src: IpAddr| Frame::syn(src, dst, 80).bytes();

    if n == 0 {
        let ns = median_ns(&mut loaded, &arp(), XDP_PASS)?;
        rows.push(Row {
            prefixes: 0,
            path: "non-IP frame (test-run floor + Ethernet parse)",
            ns,
        });
        let ns = median_ns(&mut loaded, &syn("192.0.2.1".parse()?), XDP_PASS)?;
        rows.push(Row {
            prefixes: 0,
            path: "listener, empty lists (baseline)",
            ns,
        });
        let ns = median_ns(
            &mut loaded,
            &Frame::syn("192.0.2.1".parse()?, dst, 81).bytes(),
            XDP_PASS,
        )?;
        rows.push(Row {
            prefixes: 0,
            path: "not a listener",
            ns,
        });
        return Ok(());
    }

    let mut prefixes = Prefixes(0x5eed ^ n as u64);
    let deny = prefixes.take(n);
    let allow = prefixes.take(n);
    let started = std::time::Instant::now();
    maps.acl_replace(&AclList::Deny(listener), &deny)?;
    maps.acl_replace(&AclList::Allow(listener), &allow)?;
    eprintln!(
        "xdp-bench: {n} deny + {n} allow prefixes loaded in {:.1?}",
        started.elapsed()
    );

    // An allowed source: inside an allow prefix and not denied.
    let mut allowed = None;
    for net in &allow {
        let frame = syn(net.network());
        if loaded.test_run(&frame, 1)?.0 == XDP_PASS {
            allowed = Some(frame);
            break;
        }
    }
    let allowed = allowed.context("no allow prefix outside the deny list")?;
    let denied = syn(deny[0].network());
    rows.push(Row {
        prefixes: n,
        path: "allow (deny miss + allow hit)",
        ns: median_ns(&mut loaded, &allowed, XDP_PASS)?,
    });
    rows.push(Row {
        prefixes: n,
        path: "deny (deny hit)",
        ns: median_ns(&mut loaded, &denied, XDP_DROP)?,
    });
    let stranger = syn("192.0.2.1".parse()?);
    let ns = median_ns(&mut loaded, &stranger, XDP_DROP)?;
    rows.push(Row {
        prefixes: n,
        path: "not allowed (deny miss + allow miss)",
        ns,
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for n in [0, 1_000, 100_000, 1_000_000] {
        bench(n, &mut rows)?;
    }
    let baseline = rows[1].ns;
    println!();
    println!(
        "XDP ACL program, BPF_PROG_TEST_RUN, repeat {REPEAT}, median of {SAMPLES}; each list holds N prefixes"
    );
    println!();
    println!("| prefixes per list | path | ns/packet | vs. empty lists |");
    println!("| ---: | --- | ---: | ---: |");
    for row in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2}× |",
            row.prefixes,
            row.path,
            row.ns,
            row.ns / baseline
        );
    }
    let worst = rows
        .iter()
        .filter(|r| r.prefixes == 1_000_000)
        .map(|r| r.ns)
        .fold(0.0, f64::max);
    println!();
    println!("worst path at 1M prefixes: {worst:.1} ns/packet (target ≤ 60)");
    Ok(())
}
