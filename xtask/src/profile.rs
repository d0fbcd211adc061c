//! Where a proxy's CPU goes under wrk: `perf record` on its processes during
//! one run of a benchmark cell, each sample put in a bucket (the kernel's
//! TCP/IP, its event interface, system-call entry, the scheduler, the rest
//! of the kernel; the async runtime, the proxy's own code, libc) and the
//! shares turned into µs per request with the CPU time of the same run.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The buckets, in the order of the table's columns.
pub const BUCKETS: [&str; 8] = [
    "TCP/IP",
    "io_uring / epoll",
    "syscall entry",
    "scheduler",
    "other kernel",
    "runtime",
    "proxy code",
    "libc",
];

/// Kernel symbol prefixes of each kernel bucket but the last; anything else
/// in the kernel is "other kernel". Copies to and from user memory count
/// as TCP/IP: here they are a socket's payload.
const KERNEL: [(usize, &[&str]); 4] = [
    (
        0,
        &[
            "tcp",
            "__tcp",
            "ip_",
            "ip6",
            "__ip",
            "inet",
            "__inet",
            "sk_",
            "__sk_",
            "sock",
            "__sock",
            "skb",
            "__skb",
            "kfree_skb",
            "consume_skb",
            "alloc_skb",
            "__alloc_skb",
            "napi",
            "__napi",
            "net_rx",
            "__netif",
            "netif",
            "process_backlog",
            "loopback",
            "dev_",
            "__dev_",
            "nf_",
            "ipv4",
            "ipv6",
            "validate_xmit",
            "lock_sock",
            "release_sock",
            "__release_sock",
            "copy_user",
            "_copy_to_iter",
            "_copy_from_iter",
            "__copy_",
            "rep_movs",
            "skb_copy",
            "__kfree_skb",
            "kmalloc_reserve",
            "security_sock",
            "raw_v",
            "neigh",
            "eth_",
        ],
    ),
    (
        1,
        &[
            "io_",
            "__io_",
            "io_uring",
            "__x64_sys_io_uring",
            "ep_",
            "__ep_",
            "do_epoll",
            "__x64_sys_epoll",
            "eventfd",
            "tctx_task_work",
            "task_work_run",
        ],
    ),
    (
        2,
        &[
            "entry_SYSCALL",
            "do_syscall",
            "syscall_",
            "__x64_sys",
            "x64_sys_call",
            "exit_to_user",
            "syscall_exit",
            "switch_fpu",
            "fpregs",
            "__fdget",
            "fdget",
            "fput",
            "fget",
            "__fget",
            "restore_fpregs",
            "clear_bhb",
            "entry_",
            "srso_",
            "__pfx",
        ],
    ),
    (
        3,
        &[
            "schedule",
            "__schedule",
            "finish_task_switch",
            "pick_next",
            "enqueue_",
            "dequeue_",
            "update_curr",
            "update_load",
            "__update_load",
            "ttwu",
            "try_to_wake_up",
            "__wake_up",
            "wake_up",
            "select_task_rq",
            "psi_",
            "sched_",
            "__switch_to",
            "prepare_task_switch",
            "set_next_entity",
            "put_prev",
            "newidle_balance",
            "load_balance",
            "__enqueue",
            "__dequeue",
            "reweight",
            "update_rq",
            "check_preempt",
            "resched",
            "autoremove_wake",
            "default_wake",
        ],
    ),
];

/// Indices into [`BUCKETS`] of the buckets [`KERNEL`] does not name.
const OTHER_KERNEL: usize = 4;
const RUNTIME: usize = 5;
const PROXY_CODE: usize = 6;
const LIBC: usize = 7;

/// The bucket of a sample in `dso` at `symbol`.
pub fn bucket(dso: &str, symbol: &str, kernel: bool) -> usize {
    if kernel {
        return KERNEL
            .iter()
            .find(|(_, prefixes)| prefixes.iter().any(|p| symbol.starts_with(p)))
            .map_or(OTHER_KERNEL, |(b, _)| *b);
    }
    // A method's symbol starts `<crate::Type ...>`.
    let path = symbol.trim_start_matches('<');
    if dso.starts_with("libc") || dso.starts_with("ld-linux") {
        LIBC
    } else if ["tokio", "mio", "io_uring", "slab", "portcullis::proxy::io::ring"]
        .iter()
        .any(|r| path.starts_with(r))
    {
        RUNTIME
    } else {
        PROXY_CODE
    }
}

/// One process tree's samples over one run.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Share of the samples in each of [`BUCKETS`], in percent.
    pub shares: [f64; BUCKETS.len()],
    /// The user-space symbols with the most samples, in percent.
    pub top: Vec<(f64, String)>,
}

/// Reads `perf report --stdio` lines (`12.34%  dso  [k] symbol`) into a profile.
pub fn parse_report(text: &str) -> Profile {
    let mut profile = Profile::default();
    let mut user = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(share), Some(dso), Some(mode)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Some(share) = share.strip_suffix('%').and_then(|s| s.parse::<f64>().ok()) else {
            continue;
        };
        let symbol = words.collect::<Vec<_>>().join(" ");
        let kernel = mode == "[k]";
        if !kernel && mode != "[.]" {
            continue;
        }
        profile.shares[bucket(dso, &symbol, kernel)] += share;
        if !kernel {
            user.push((share, symbol));
        }
    }
    user.sort_by(|a, b| b.0.total_cmp(&a.0));
    user.truncate(5);
    profile.top = user;
    profile
}

/// Starts sampling `pids` at 2 kHz for `seconds` into `file`; the running
/// recorder, which [`finish`] waits for and reads.
pub fn start(pids: &[u32], seconds: u32, file: &Path) -> anyhow::Result<std::process::Child> {
    let list = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "2000", "-p", &list, "-o"])
        .arg(file)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting perf record (package linux-perf)")
}

/// Waits for the recorder [`start`] returned and reads its samples.
pub fn finish(recorder: std::process::Child, file: &Path) -> anyhow::Result<Profile> {
    let out = recorder.wait_with_output()?;
    if !out.status.success() {
        bail!("perf record failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report = Command::new("perf")
        .args([
            "report",
            "-q",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,sym",
            "-i",
        ])
        .arg(file)
        .output()
        .context("running perf report")?;
    if !report.status.success() {
        bail!("perf report failed: {}", String::from_utf8_lossy(&report.stderr));
    }
    Ok(parse_report(&String::from_utf8_lossy(&report.stdout)))
}

/// The Markdown table of `rows` (cell, proxy, CPU µs per request, profile):
/// each bucket in µs per request.
pub fn table(rows: &[(String, &str, f64, Profile)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| cell | proxy | CPU µs/req | {} |", BUCKETS.join(" | "));
    let _ = writeln!(out, "| --- | --- | ---: |{}", " ---: |".repeat(BUCKETS.len()));
    for (cell, proxy, cpu_us, profile) in rows {
        let total: f64 = profile.shares.iter().sum::<f64>().max(1e-9);
        let cells: Vec<String> = profile
            .shares
            .iter()
            .map(|s| format!("{:.1}", cpu_us * s / total))
            .collect();
        let _ = writeln!(out, "| {cell} | {proxy} | {cpu_us:.1} | {} |", cells.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_lines_land_in_their_buckets() {
        let report = "    40.00%  [kernel.kallsyms]  [k] tcp_sendmsg_locked
    10.00%  [kernel.kallsyms]  [k] io_issue_sqe
     5.00%  [kernel.kallsyms]  [k] entry_SYSCALL_64
     5.00%  [kernel.kallsyms]  [k] __schedule
    10.00%  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore
     8.00%  portcullis         [.] tokio::runtime::task::raw::poll
     2.00%  portcullis         [.] <tokio_uring::runtime::driver::Handle>::tick
    12.00%  portcullis         [.] portcullis::http::parse::head
     8.00%  libc.so.6          [.] __memmove_avx_unaligned_erms
# a comment line
";
        let p = parse_report(report);
        let expected = [40.0, 10.0, 5.0, 5.0, 10.0, 10.0, 12.0, 8.0];
        assert!(
            p.shares.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-9),
            "{:?}",
            p.shares
        );
        assert_eq!(p.top[0].1, "portcullis::http::parse::head");
        assert_eq!(p.top.len(), 4);
        let t = table(&[("128 B c=50".into(), "portcullis", 20.0, p)]);
        assert!(
            t.contains("| 128 B c=50 | portcullis | 20.0 | 8.0 | 2.0 | 1.0 | 1.0 | 2.0 | 2.0 | 2.4 | 1.6 |"),
            "{t}"
        );
    }
}
