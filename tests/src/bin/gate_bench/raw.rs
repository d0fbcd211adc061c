//! A light HTTP client for the 503 rate: it speaks TCP itself over an
//! `AF_PACKET` socket (frames batched with `recvmmsg`/`sendmmsg`), from
//! source addresses the client kernel does not own, so no client socket,
//! connect or TCP state machine is paid per request and more of the two
//! shared cores is left to the side being measured. Each flow: SYN, then the request
//! with the handshake's ACK, ACKs of the answer, and a FIN once the answer's
//! FIN arrives. Flows are never reused within a run (one 4-tuple each).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use portcullis_common::sum16;

const ETH_P_IP: u16 = 0x0800;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const RST: u8 = 0x04;
const REQUEST: &[u8] = b"GET /orders/hello HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n";

#[expect(
    unsafe_code,
    reason = "AF_PACKET sockets through libc; nothing else in the bench is unsafe"
)]
mod packet {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    /// One `mmsghdr` per buffer, for `sendmmsg` and `recvmmsg`.
    fn message_headers(iovecs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
        iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: msghdr is plain data; zero is a valid start.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = std::ptr::from_mut(iov);
                msg.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: msg,
                    msg_len: 0,
                }
            })
            .collect()
    }

    /// An `AF_PACKET` socket bound to one interface, for IPv4 frames.
    pub struct Socket(OwnedFd);

    impl Socket {
        pub fn bind(ifindex: i32) -> std::io::Result<Self> {
            let proto = super::ETH_P_IP.to_be();
            // SAFETY: plain socket(2); the descriptor is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    i32::from(proto),
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zero is a valid start.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex;
            let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
            // SAFETY: addr lives across the call and len is its size.
            let bound = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) };
            if bound < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self(fd))
        }

        /// Takes only IPv4 frames whose destination address ends in `lo..=hi`,
        /// and a receive buffer large enough for a burst.
        pub fn only(&self, lo: u8, hi: u8) -> std::io::Result<()> {
            // ld [33] (last byte of the IPv4 destination); jge lo; jgt hi; accept; drop.
            let code = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
                code: u16::try_from(code).unwrap_or(0),
                jt,
                jf,
                k,
            };
            let mut filter = [
                code(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 33),
                code(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, 0, 2, u32::from(lo)),
                code(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K, 1, 0, u32::from(hi)),
                code(libc::BPF_RET | libc::BPF_K, 0, 0, 0xffff),
                code(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
            ];
            let program = libc::sock_fprog {
                len: 5,
                filter: filter.as_mut_ptr(),
            };
            let size = |n: usize| u32::try_from(n).unwrap_or(0);
            // SAFETY: program and its filter live across the call; the size is the struct's.
            let attached = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    std::ptr::from_ref(&program).cast(),
                    size(std::mem::size_of::<libc::sock_fprog>()),
                )
            };
            if attached < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let buffer: i32 = 8 << 20;
            // SAFETY: an int option, valid during the call.
            let sized = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    std::ptr::from_ref(&buffer).cast(),
                    size(std::mem::size_of::<i32>()),
                )
            };
            if sized < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }

        /// Sends `frames` with one `sendmmsg`; returns how many left (the rest
        /// met a full device queue or socket buffer and are lost, as on a wire).
        pub fn send_batch(&self, frames: &[Vec<u8>]) -> std::io::Result<usize> {
            if frames.is_empty() {
                return Ok(0);
            }
            let mut iovecs: Vec<libc::iovec> = frames
                .iter()
                .map(|f| libc::iovec {
                    iov_base: f.as_ptr().cast_mut().cast(),
                    iov_len: f.len(),
                })
                .collect();
            let mut headers = message_headers(&mut iovecs);
            let count = u32::try_from(headers.len()).unwrap_or(u32::MAX);
            // SAFETY: headers, iovecs and frames outlive the call; count is their number.
            let sent = unsafe { libc::sendmmsg(self.0.as_raw_fd(), headers.as_mut_ptr(), count, 0) };
            if sent < 0 {
                let e = std::io::Error::last_os_error();
                return if e.raw_os_error() == Some(libc::ENOBUFS)
                    || e.kind() == std::io::ErrorKind::WouldBlock
                {
                    Ok(0)
                } else {
                    Err(e)
                };
            }
            Ok(usize::try_from(sent).unwrap_or(0))
        }

        /// Up to `bufs.len()` frames with one `recvmmsg`, their lengths in `lens`; 0 when none is queued.
        pub fn recv_batch(&self, bufs: &mut [Vec<u8>], lens: &mut [usize]) -> std::io::Result<usize> {
            let mut iovecs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            let mut headers = message_headers(&mut iovecs);
            let count = u32::try_from(headers.len()).unwrap_or(u32::MAX);
            // SAFETY: headers, iovecs and buffers outlive the call; count is their number.
            let got = unsafe {
                libc::recvmmsg(
                    self.0.as_raw_fd(),
                    headers.as_mut_ptr(),
                    count,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if got < 0 {
                let e = std::io::Error::last_os_error();
                return if e.kind() == std::io::ErrorKind::WouldBlock {
                    Ok(0)
                } else {
                    Err(e)
                };
            }
            let got = usize::try_from(got).unwrap_or(0);
            for (len, header) in lens.iter_mut().zip(&headers).take(got) {
                *len = usize::try_from(header.msg_len).unwrap_or(0);
            }
            Ok(got)
        }

        pub fn wait(&self, timeout_ms: i32) {
            let mut fds = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid during the call.
            let _ = unsafe { libc::poll(&raw mut fds, 1, timeout_ms) };
        }
    }
}

/// Where the client sends from and to.
#[derive(Debug, Clone)]
pub struct Path {
    /// Interface index of the client's end.
    pub ifindex: i32,
    /// MAC of the client's end.
    pub client_mac: [u8; 6],
    /// MAC of the gateway's end.
    pub gateway_mac: [u8; 6],
    /// Source addresses to use (not the client kernel's own).
    pub sources: Vec<Ipv4Addr>,
    /// The listener.
    pub server: Ipv4Addr,
    /// Its port.
    pub port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Free,
    SynSent,
    Requested,
}

#[derive(Clone, Copy)]
struct Flow {
    stage: Stage,
    isn: u32,
    started: Instant,
    answered: bool,
}

/// What a run got.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Exchanges that ended with a 503 and the server's FIN.
    pub completed: u64,
    /// Flows abandoned after a second without an answer.
    pub timed_out: u64,
    /// Answers that were not a 503.
    pub other: u64,
    /// Frames the client's device queue refused (ENOBUFS).
    pub lost: u64,
    /// Run time.
    pub elapsed: Duration,
}

impl Outcome {
    /// Completed exchanges per second.
    pub fn rate(&self) -> f64 {
        f64::from(u32::try_from(self.completed).unwrap_or(u32::MAX)) / self.elapsed.as_secs_f64()
    }
}

fn checksum(sum: u32) -> u16 {
    let mut s = sum;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !u16::try_from(s).unwrap_or(0)
}

fn frame(path: &Path, src: Ipv4Addr, sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mss: &[u8] = if flags & SYN != 0 {
        &[2, 4, 0x05, 0xb4]
    } else {
        &[]
    };
    let tcp_len = 20 + mss.len() + payload.len();
    let mut f = Vec::with_capacity(14 + 20 + tcp_len);
    f.extend_from_slice(&path.gateway_mac);
    f.extend_from_slice(&path.client_mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let total = u16::try_from(20 + tcp_len).unwrap_or(u16::MAX);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&path.server.octets());
    let ip_sum = checksum(sum16(&ip));
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&path.port.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(u8::try_from((20 + mss.len()) / 4).unwrap_or(5) << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(mss);
    tcp.extend_from_slice(payload);
    let pseudo = sum16(&ip[12..20]) + 6 + u32::try_from(tcp_len).unwrap_or(0);
    let tcp_sum = checksum(pseudo + sum16(&tcp));
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

/// Runs flows against `path` for `duration`, `window` of them in flight,
/// starting at port `first_port` of each source.
pub fn run(path: &Path, duration: Duration, window: usize, first_port: u16) -> anyhow::Result<Outcome> {
    let socket = packet::Socket::bind(path.ifindex).context("AF_PACKET socket")?;
    let last = |a: &Ipv4Addr| a.octets()[3];
    let lo = path.sources.iter().map(last).min().context("no sources")?;
    let hi = path.sources.iter().map(last).max().context("no sources")?;
    socket.only(lo, hi).context("socket filter")?;
    let mut client = Client::new(path, first_port);
    let started = Instant::now();
    let mut bufs = vec![vec![0u8; 2048]; 64];
    let mut lens = vec![0usize; 64];
    let mut outbox: Vec<Vec<u8>> = Vec::with_capacity(256);
    while started.elapsed() < duration {
        client.open(window, &mut outbox)?;
        let got = socket.recv_batch(&mut bufs, &mut lens)?;
        for (buf, len) in bufs.iter().zip(&lens).take(got) {
            client.handle(&buf[..*len], &mut outbox);
        }
        let sent = socket.send_batch(&outbox)?;
        client.out.lost += u64::try_from(outbox.len() - sent).unwrap_or(0);
        outbox.clear();
        client.expire();
        if got == 0 {
            socket.wait(1);
        }
    }
    client.out.elapsed = started.elapsed();
    Ok(client.out)
}

/// Every flow of one run, and what it got.
struct Client<'p> {
    path: &'p Path,
    first_port: u16,
    ports: usize,
    flows: Vec<Flow>,
    next: usize,
    in_flight: std::collections::VecDeque<usize>,
    active: usize,
    out: Outcome,
}

impl<'p> Client<'p> {
    fn new(path: &'p Path, first_port: u16) -> Self {
        let ports = usize::from(u16::MAX - first_port);
        let flow = Flow {
            stage: Stage::Free,
            isn: 0,
            started: Instant::now(),
            answered: false,
        };
        Self {
            path,
            first_port,
            ports,
            flows: vec![flow; path.sources.len() * ports],
            next: 0,
            in_flight: std::collections::VecDeque::new(),
            active: 0,
            out: Outcome::default(),
        }
    }

    fn addr_of(&self, slot: usize) -> (Ipv4Addr, u16) {
        (
            self.path.sources[slot / self.ports],
            self.first_port + u16::try_from(slot % self.ports).unwrap_or(0),
        )
    }

    fn slot_of(&self, src: Ipv4Addr, port: u16) -> Option<usize> {
        let i = self.path.sources.iter().position(|s| *s == src)?;
        let p = usize::from(port.checked_sub(self.first_port)?);
        (p < self.ports).then_some(i * self.ports + p)
    }

    /// Starts flows until `window` are in flight.
    fn open(&mut self, window: usize, outbox: &mut Vec<Vec<u8>>) -> anyhow::Result<()> {
        while self.active < window {
            if self.next >= self.flows.len() {
                bail!("out of 4-tuples: give more sources");
            }
            let slot = self.next;
            self.next += 1;
            let isn = u32::try_from(slot).unwrap_or(0).wrapping_mul(2_654_435_761);
            self.flows[slot] = Flow {
                stage: Stage::SynSent,
                isn,
                started: Instant::now(),
                answered: false,
            };
            let (src, port) = self.addr_of(slot);
            outbox.push(frame(self.path, src, port, isn, 0, SYN, &[]));
            self.in_flight.push_back(slot);
            self.active += 1;
        }
        Ok(())
    }

    /// Takes one frame from the gateway.
    fn handle(&mut self, f: &[u8], outbox: &mut Vec<Vec<u8>>) {
        if f.len() < 54 || f[12..14] != ETH_P_IP.to_be_bytes() || f[23] != 6 {
            return;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
        let tcp = &f[(14 + ihl).min(f.len())..(14 + total).min(f.len())];
        if tcp.len() < 20 || u16::from_be_bytes([tcp[0], tcp[1]]) != self.path.port {
            return;
        }
        let Some(slot) = self.slot_of(dst, u16::from_be_bytes([tcp[2], tcp[3]])) else {
            return;
        };
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let flags = tcp[13];
        let payload = &tcp[(usize::from(tcp[12] >> 4) * 4).min(tcp.len())..];
        let (src, port) = self.addr_of(slot);
        let request_len = u32::try_from(REQUEST.len()).unwrap_or(0);
        let flow = &mut self.flows[slot];
        match flow.stage {
            Stage::SynSent if flags & (SYN | ACK) == SYN | ACK => {
                flow.stage = Stage::Requested;
                let (ours, theirs) = (flow.isn.wrapping_add(1), seq.wrapping_add(1));
                outbox.push(frame(self.path, src, port, ours, theirs, ACK | PSH, REQUEST));
            }
            Stage::Requested | Stage::SynSent if flags & RST != 0 => {
                flow.stage = Stage::Free;
                self.active -= 1;
            }
            Stage::Requested if !payload.is_empty() || flags & FIN != 0 => {
                if !payload.is_empty() && !flow.answered {
                    flow.answered = true;
                    if !payload.starts_with(b"HTTP/1.1 503") {
                        self.out.other += 1;
                    }
                }
                let fin = u32::from(flags & FIN != 0);
                let len = u32::try_from(payload.len()).unwrap_or(0);
                let theirs = seq.wrapping_add(len).wrapping_add(fin);
                let ours = flow.isn.wrapping_add(1).wrapping_add(request_len);
                if fin == 1 {
                    outbox.push(frame(self.path, src, port, ours, theirs, FIN | ACK, &[]));
                    flow.stage = Stage::Free;
                    self.active -= 1;
                    self.out.completed += 1;
                } else {
                    outbox.push(frame(self.path, src, port, ours, theirs, ACK, &[]));
                }
            }
            _ => {}
        }
    }

    /// Gives up on flows unanswered for a second.
    fn expire(&mut self) {
        while let Some(&slot) = self.in_flight.front() {
            let flow = &mut self.flows[slot];
            if flow.stage == Stage::Free {
                self.in_flight.pop_front();
            } else if flow.started.elapsed() > Duration::from_secs(1) {
                flow.stage = Stage::Free;
                self.active -= 1;
                self.out.timed_out += 1;
                self.in_flight.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Spoofed SYNs to `path`'s listener from random sources in 198.18.0.0/15
/// (RFC 2544's benchmark range), random ports and sequence numbers, in
/// batches of 64 per `sendmmsg`, until `stop`: the frames offered to the
/// gateway's end, and those its device queue refused.
pub fn flood(path: &Path, stop: &std::sync::atomic::AtomicBool) -> anyhow::Result<(u64, u64)> {
    let socket = packet::Socket::bind(path.ifindex).context("AF_PACKET socket")?;
    // xorshift64*: fast and good enough to spread sources over a /15.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let (mut sent, mut refused) = (0u64, 0u64);
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(64);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        batch.clear();
        for _ in 0..64 {
            let r = next();
            let host = u32::try_from(r & 0x1_ffff).unwrap_or(0);
            let src = Ipv4Addr::from(0xc612_0000 | host);
            let sport = u16::try_from((r >> 17) & 0xffff).unwrap_or(0) | 1024;
            let seq = u32::try_from(r >> 32).unwrap_or(0);
            batch.push(frame(path, src, sport, seq, 0, SYN, &[]));
        }
        let n = socket.send_batch(&batch)?;
        sent += u64::try_from(n).unwrap_or(0);
        refused += u64::try_from(batch.len() - n).unwrap_or(0);
    }
    Ok((sent, refused))
}
