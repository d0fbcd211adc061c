//! `cargo xtask bench xdp`: ns per packet of the ACL program, measured in the
//! kernel with BPF_PROG_TEST_RUN at 1k, 100k and 1M IPv4 prefixes per list
//! (and 100k IPv6), on every path, two ways:
//!
//! - **warm**: one frame repeated 2M times (median of 5), the best case;
//! - **many sources**: 50,000 frames from different source addresses, each
//!   run once, the median less the median of the object's empty program run
//!   the same way, so caches see what a real spread of clients makes them see.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, ensure};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use portcullis::xdp::{AclList, Instance, ListenerAddr, Loaded};
use portcullis_tests::{
    Rng,
    frames::{Frame, arp},
    remove_pins, unique_name,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const REPEAT: u32 = 2_000_000;
const SAMPLES: usize = 5;
const SOURCES: usize = 50_000;

/// The lists and sources the benchmark draws, the same every run.
trait Draw {
    fn v4(&mut self, n: usize) -> Vec<IpNet>;
    fn v6(&mut self, n: usize) -> Vec<IpNet>;
    fn inside(&mut self, net: &IpNet) -> IpAddr;
}

impl Draw for Rng {
    /// IPv4 prefixes with a realistic spread of lengths.
    fn v4(&mut self, n: usize) -> Vec<IpNet> {
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

    /// IPv6 prefixes: mostly /48 and /64 sites, some /32s and single hosts.
    fn v6(&mut self, n: usize) -> Vec<IpNet> {
        (0..n)
            .map(|_| {
                let len = match self.next_u32() % 10 {
                    0..=3 => 48,
                    4..=7 => 64,
                    8 => 32,
                    _ => 128,
                };
                let addr = (0x2000u128 << 112) | (self.next_u128() >> 4);
                IpNet::V6(Ipv6Net::new(addr.into(), len).expect("valid").trunc())
            })
            .collect()
    }

    /// A random address inside `net`.
    fn inside(&mut self, net: &IpNet) -> IpAddr {
        match net {
            IpNet::V4(v4) => {
                let host = u64::from(!u32::from(v4.netmask()));
                let offset = u32::try_from(u64::from(self.next_u32()) % (host + 1)).expect("fits");
                IpAddr::from((u32::from(v4.network()) | offset).to_be_bytes())
            }
            IpNet::V6(v6) => {
                let host = !u128::from(v6.netmask());
                IpAddr::from((u128::from(v6.network()) | (self.next_u128() & host)).to_be_bytes())
            }
        }
    }
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn warm(loaded: &mut Loaded, frame: &[u8], expected: u32) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (action, per_run) = loaded.test_run(frame, REPEAT)?;
        ensure!(action == expected, "verdict {action}, expected {expected}");
        samples.push(ns(per_run));
    }
    Ok(median(samples))
}

/// Median ns of single runs over `frames` with the expected verdict, and of
/// the empty program over the same frames.
fn spread(loaded: &mut Loaded, frames: &[Vec<u8>], expected: u32) -> anyhow::Result<(f64, f64)> {
    let mut program = Vec::with_capacity(frames.len());
    let mut floor = Vec::with_capacity(frames.len());
    for frame in frames {
        let (action, took) = loaded.test_run(frame, 1)?;
        ensure!(action == expected, "verdict {action}, expected {expected}");
        program.push(ns(took));
        floor.push(ns(loaded.floor_run(frame, 1)?));
    }
    Ok((median(program), median(floor)))
}

struct Row {
    family: &'static str,
    prefixes: usize,
    path: &'static str,
    warm: f64,
    spread: f64,
    floor: f64,
}

struct Bench<'a> {
    loaded: Loaded,
    rows: &'a mut Vec<Row>,
    family: &'static str,
    prefixes: usize,
}

impl Bench<'_> {
    /// Measures one path: `frames` (all with the `expected` verdict), the
    /// first of them for the warm figure and the rest for the many sources.
    fn path(&mut self, path: &'static str, frames: &[Vec<u8>], expected: u32) -> anyhow::Result<()> {
        self.path_with(path, frames, (expected, expected))
    }

    /// Like [`Bench::path`], with one verdict for the repeated frame and another for the many.
    fn path_with(
        &mut self,
        path: &'static str,
        frames: &[Vec<u8>],
        (warm_expected, spread_expected): (u32, u32),
    ) -> anyhow::Result<()> {
        let warm = warm(&mut self.loaded, &frames[0], warm_expected)?;
        // The warm frame's source has spent its SYN tokens by now.
        let (program, floor) = spread(&mut self.loaded, &frames[1..], spread_expected)?;
        println!(
            "xdp-bench: {} {:>7} {path:<40} warm {warm:5.1} ns, many sources {:5.1} ns (floor {floor:.1})",
            self.family,
            self.prefixes,
            program - floor
        );
        self.rows.push(Row {
            family: self.family,
            prefixes: self.prefixes,
            path,
            warm,
            spread: program - floor,
            floor,
        });
        Ok(())
    }

    /// Frames from sources drawn by `draw` that get `expected`, `SOURCES` of them.
    fn frames(
        &mut self,
        dst: IpAddr,
        expected: u32,
        mut draw: impl FnMut() -> IpAddr,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(SOURCES);
        let mut tries = 0;
        while out.len() < SOURCES {
            tries += 1;
            ensure!(tries < SOURCES * 20, "too few sources with verdict {expected}");
            let frame = Frame::syn(draw(), dst, 80).bytes();
            if self.loaded.test_run(&frame, 1)?.0 == expected {
                out.push(frame);
            }
        }
        Ok(out)
    }
}

fn measure(v6: bool, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let name = unique_name("b");
    let result = measure_in(&name, v6, n, rows);
    remove_pins(&name);
    result
}

fn measure_in(name: &str, v6: bool, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let instance = Instance::new(name)?;
    let capacity = u32::try_from(2 * n + 4096).context("capacity")?;
    let loaded = instance.load(capacity)?;
    let mut maps = instance.maps()?;
    let (listen, dst): (&str, IpAddr) = if v6 {
        ("[fd00::1]:80", "fd00::1".parse()?)
    } else {
        ("10.0.0.1:80", "10.0.0.1".parse()?)
    };
    let listener: ListenerAddr = listen.parse().map_err(anyhow::Error::msg)?;
    maps.add_listener(&listener)?;
    // The ACL paths alone: a frame repeated millions of times would be over any SYN rate.
    maps.set_syn_rate(&listener, 0, 0)?;
    let mut rng = Rng(0x5eed ^ n as u64 ^ u64::from(v6));
    let mut bench = Bench {
        loaded,
        rows,
        family: if v6 { "IPv6" } else { "IPv4" },
        prefixes: n,
    };
    let mut anywhere = Rng(0xa11);
    let mut random_source = move || {
        if v6 {
            IpAddr::from(((0x2000u128 << 112) | (anywhere.next_u128() >> 4)).to_be_bytes())
        } else {
            IpAddr::from(anywhere.next_u32().to_be_bytes())
        }
    };

    if n == 0 {
        let frames = vec![arp(); SOURCES];
        bench.path("non-IP frame (Ethernet parse)", &frames, XDP_PASS)?;
        let frames: Vec<Vec<u8>> = (0..SOURCES)
            .map(|_| Frame::syn(random_source(), dst, 81).bytes())
            .collect();
        bench.path("not a listener", &frames, XDP_PASS)?;
        let frames = bench.frames(dst, XDP_PASS, &mut random_source)?;
        bench.path("listener, empty lists", &frames, XDP_PASS)?;
        // Burst 2: choosing the frames spends one token per source, the run
        // the second; the repeated frame is over its rate at once.
        maps.set_syn_rate(&listener, 1, 2)?;
        let frames = bench.frames(dst, XDP_PASS, &mut random_source)?;
        bench.path_with(
            "SYN limit on: over rate (warm), in rate (many)",
            &frames,
            (XDP_DROP, XDP_PASS),
        )?;
        return Ok(());
    }

    let (deny, allow) = if v6 {
        (rng.v6(n), rng.v6(n))
    } else {
        (rng.v4(n), rng.v4(n))
    };
    let started = std::time::Instant::now();
    maps.acl_replace(&AclList::Deny(listener), &deny)?;
    maps.acl_replace(&AclList::Allow(listener), &allow)?;
    eprintln!(
        "xdp-bench: {n} deny + {n} allow {} prefixes loaded in {:.1?}",
        bench.family,
        started.elapsed()
    );
    let mut pick = Rng(0xb0b ^ n as u64);
    let frames = bench.frames(dst, XDP_PASS, || {
        let net = allow[pick.next_u32() as usize % allow.len()];
        pick.inside(&net)
    })?;
    bench.path("allow (deny miss + allow hit)", &frames, XDP_PASS)?;
    let frames = bench.frames(dst, XDP_DROP, || {
        let net = deny[pick.next_u32() as usize % deny.len()];
        pick.inside(&net)
    })?;
    bench.path("deny (deny hit)", &frames, XDP_DROP)?;
    let frames = bench.frames(dst, XDP_DROP, &mut random_source)?;
    bench.path("not allowed (deny miss + allow miss)", &frames, XDP_DROP)?;
    Ok(())
}

/// The empty program on one frame, repeated: the warm column's floor.
fn floor_warm() -> anyhow::Result<f64> {
    let name = unique_name("b");
    let result = (|| -> anyhow::Result<f64> {
        let mut loaded = Instance::new(&name)?.load(4096)?;
        let frame = Frame::syn("192.0.2.1".parse()?, "10.0.0.1".parse()?, 80).bytes();
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            samples.push(ns(loaded.floor_run(&frame, REPEAT)?));
        }
        Ok(median(samples))
    })();
    remove_pins(&name);
    result
}

fn main() -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let warm_floor = floor_warm()?;
    for n in [0, 1_000, 100_000, 1_000_000] {
        measure(false, n, &mut rows)?;
    }
    measure(true, 100_000, &mut rows)?;
    println!();
    println!(
        "XDP ACL program, BPF_PROG_TEST_RUN. warm: one frame, repeat {REPEAT}, median of {SAMPLES}; the empty program costs {warm_floor:.1} ns this way. many sources: {SOURCES} frames from different sources run once each, median less the empty program's median over the same frames (floor)"
    );
    println!();
    println!("| family | prefixes per list | path | warm ns/packet | many sources ns/packet | floor ns |");
    println!("| --- | ---: | --- | ---: | ---: | ---: |");
    for row in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            row.family, row.prefixes, row.path, row.warm, row.spread, row.floor
        );
    }
    let worst = |pred: &dyn Fn(&Row) -> bool| {
        let chosen: Vec<&Row> = rows.iter().filter(|r| pred(r)).collect();
        let warm = chosen.iter().map(|r| r.warm).fold(0.0, f64::max);
        let spread = chosen.iter().map(|r| r.spread).fold(0.0, f64::max);
        format!(
            "warm {warm:.1} ns ({:.1} above the empty program), many sources {spread:.1} ns",
            warm - warm_floor
        )
    };
    println!();
    println!(
        "IPv4 at 1M prefixes, worst path: {} (target ≤ 60)",
        worst(&|r| r.family == "IPv4" && r.prefixes == 1_000_000)
    );
    println!(
        "not a listener: {} (target ≤ 30)",
        worst(&|r| r.path == "not a listener")
    );
    println!(
        "listener with empty lists: {} (target ≤ 40)",
        worst(&|r| r.path == "listener, empty lists")
    );
    Ok(())
}
