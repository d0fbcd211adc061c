//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`.

use std::net::IpAddr;

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Transport header of a crafted frame.
#[derive(Debug, Clone)]
pub enum L4 {
    /// TCP with flags and a payload.
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    /// UDP with a payload.
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// Any other IP protocol number, with raw bytes after the IP header(s).
    Raw { proto: u8, bytes: Vec<u8> },
}

/// An IPv6 extension header to put before the transport header.
#[derive(Debug, Clone, Copy)]
pub enum Ext {
    /// Hop-by-hop options (8 bytes, padding only).
    HopByHop,
    /// Destination options of `units` × 8 bytes.
    DestOpts { units: u8 },
    /// Routing header (type 0 shape, no segments left).
    Routing,
    /// Fragment header with this offset (in 8-byte units) and more-fragments flag.
    Fragment { offset: u16, more: bool },
    /// Authentication header (12 bytes of ICV).
    Auth,
}

/// A frame to craft.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport.
    pub l4: L4,
    /// 802.1Q / 802.1ad tags, outermost first (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// IPv4 options bytes (padded to 4).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units, and more-fragments flag.
    pub ipv4_fragment: (u16, bool),
    /// IPv6 extension headers.
    pub ipv6_ext: Vec<Ext>,
    /// TCP data offset override (in 32-bit words), to craft bad headers.
    pub tcp_doff: Option<u8>,
    /// TCP options bytes (padded to 4 with end-of-list).
    pub tcp_options: Vec<u8>,
    /// IPv4 IHL override, to craft bad headers.
    pub ipv4_ihl: Option<u8>,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgement number.
    pub ack: u32,
}

impl Frame {
    /// A TCP SYN from `src` to `dst:dport`.
    pub fn syn(src: IpAddr, dst: IpAddr, dport: u16) -> Self {
        Self::tcp(src, dst, dport, tcp_flags::SYN, Vec::new())
    }

    /// A TCP segment.
    pub fn tcp(src: IpAddr, dst: IpAddr, dport: u16, flags: u8, payload: Vec<u8>) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport: 40000,
                dport,
                flags,
                payload,
            },
        )
    }

    /// A UDP datagram.
    pub fn udp(src: IpAddr, dst: IpAddr, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            L4::Udp {
                sport: 40000,
                dport,
                payload: b"hello".to_vec(),
            },
        )
    }

    /// A frame with the given transport.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            vlans: Vec::new(),
            ipv4_options: Vec::new(),
            ipv4_fragment: (0, false),
            ipv6_ext: Vec::new(),
            tcp_doff: None,
            tcp_options: Vec::new(),
            ipv4_ihl: None,
            seq: 1000,
            ack: 0,
        }
    }

    /// Sets the TCP sequence and acknowledgement numbers.
    #[must_use]
    pub fn seq_ack(mut self, seq: u32, ack: u32) -> Self {
        self.seq = seq;
        self.ack = ack;
        self
    }

    /// Sets the TCP options (padded to 4 bytes with end-of-list).
    #[must_use]
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        while !self.tcp_options.len().is_multiple_of(4) {
            self.tcp_options.push(0);
        }
        self
    }

    /// Adds a VLAN tag (outermost first).
    #[must_use]
    pub fn vlan(mut self, tpid: u16, id: u16) -> Self {
        self.vlans.push((tpid, id));
        self
    }

    /// Length of every header up to and including the transport header.
    pub fn header_len(&self) -> usize {
        self.bytes().len() - self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match &self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } => payload.len(),
            L4::Raw { bytes, .. } => bytes.len(),
        }
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                payload,
            } => {
                let mut b = Vec::with_capacity(60 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&self.seq.to_be_bytes());
                b.extend_from_slice(&self.ack.to_be_bytes());
                let doff = u8::try_from(5 + self.tcp_options.len() / 4).expect("small");
                b.push(self.tcp_doff.unwrap_or(doff) << 4);
                b.push(*flags);
                b.extend_from_slice(&65535u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
                b.extend_from_slice(&self.tcp_options);
                b.extend_from_slice(payload);
                (6, b)
            }
            L4::Udp {
                sport,
                dport,
                payload,
            } => {
                let mut b = Vec::with_capacity(8 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                let len = u16::try_from(8 + payload.len()).expect("small");
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                (17, b)
            }
            L4::Raw { proto, bytes } => (*proto, bytes.clone()),
        }
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
        for (tpid, id) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        let (proto, l4) = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut options = self.ipv4_options.clone();
                while !options.len().is_multiple_of(4) {
                    options.push(0);
                }
                let ihl = self
                    .ipv4_ihl
                    .unwrap_or(u8::try_from(5 + options.len() / 4).expect("small"));
                let total = u16::try_from(20 + options.len() + l4.len()).expect("small");
                let (offset, more) = self.ipv4_fragment;
                let frag = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
                f.push(0x40 | (ihl & 0x0f));
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64);
                f.push(proto);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                f.extend_from_slice(&options);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut ext = Vec::new();
                let codes: Vec<u8> = self
                    .ipv6_ext
                    .iter()
                    .map(|e| match e {
                        Ext::HopByHop => 0,
                        Ext::DestOpts { .. } => 60,
                        Ext::Routing => 43,
                        Ext::Fragment { .. } => 44,
                        Ext::Auth => 51,
                    })
                    .chain(std::iter::once(proto))
                    .collect();
                for (i, e) in self.ipv6_ext.iter().enumerate() {
                    let next = codes[i + 1];
                    match e {
                        Ext::HopByHop | Ext::Routing => {
                            ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                        }
                        Ext::DestOpts { units } => {
                            ext.extend_from_slice(&[next, units - 1]);
                            ext.extend(std::iter::repeat_n(0u8, usize::from(*units) * 8 - 2));
                        }
                        Ext::Fragment { offset, more } => {
                            let field = (offset << 3) | u16::from(*more);
                            ext.extend_from_slice(&[next, 0]);
                            ext.extend_from_slice(&field.to_be_bytes());
                            ext.extend_from_slice(&[0, 0, 0, 7]);
                        }
                        Ext::Auth => {
                            // 24 bytes: payload length field = 24/4 - 2 = 4.
                            ext.extend_from_slice(&[next, 4, 0, 0]);
                            ext.extend(std::iter::repeat_n(0u8, 20));
                        }
                    }
                }
                let payload_len = u16::try_from(ext.len() + l4.len()).expect("small");
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&payload_len.to_be_bytes());
                f.push(codes[0]);
                f.push(64);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                f.extend_from_slice(&ext);
            }
            _ => panic!("source and destination of different families"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// An ARP request frame (not IP).
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 0, 0, 2]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    f
}

/// A segment XDP sent back, as the client would parse it.
#[derive(Debug)]
pub struct Reply {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// TCP flags.
    pub flags: u8,
    /// TCP options bytes.
    pub options: Vec<u8>,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Ones'-complement sum of big-endian 16-bit words, unfolded.
fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(w[0]) << 8 | u32::from(w.get(1).copied().unwrap_or(0)))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    u16::try_from(s).expect("folded")
}

/// Parses a reply frame sent back to `request`, checking MACs, lengths and checksums.
pub fn parse_reply(request: &[u8], frame: &[u8]) -> Reply {
    assert_eq!(&frame[..6], &request[6..12], "destination MAC is the sender's");
    assert_eq!(&frame[6..12], &request[..6], "source MAC is ours");
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, tcp, pseudo) = if ethertype == 0x0800 {
        let ipv4 = &frame[14..34];
        assert_eq!(ipv4[0], 0x45);
        assert_eq!(fold(sum(ipv4)), 0xffff, "IPv4 header checksum");
        let total = usize::from(u16::from_be_bytes([ipv4[2], ipv4[3]]));
        assert_eq!(total + 14, frame.len(), "IPv4 total length");
        let tcp = &frame[34..];
        let pseudo = sum(&ipv4[12..20]) + 6 + u32::try_from(tcp.len()).expect("small");
        let src: [u8; 4] = ipv4[12..16].try_into().expect("4");
        let dst: [u8; 4] = ipv4[16..20].try_into().expect("4");
        (IpAddr::from(src), IpAddr::from(dst), tcp, pseudo)
    } else {
        assert_eq!(ethertype, 0x86dd);
        let ipv6 = &frame[14..54];
        let payload = usize::from(u16::from_be_bytes([ipv6[4], ipv6[5]]));
        assert_eq!(payload + 54, frame.len(), "IPv6 payload length");
        assert_eq!(ipv6[6], 6, "no extension headers");
        let tcp = &frame[54..];
        let pseudo = sum(&ipv6[8..40]) + 6 + u32::try_from(tcp.len()).expect("small");
        let src: [u8; 16] = ipv6[8..24].try_into().expect("16");
        let dst: [u8; 16] = ipv6[24..40].try_into().expect("16");
        (IpAddr::from(src), IpAddr::from(dst), tcp, pseudo)
    };
    assert_eq!(fold(pseudo + sum(tcp)), 0xffff, "TCP checksum");
    let header = usize::from(tcp[12] >> 4) * 4;
    let be32 = |at: usize| u32::from_be_bytes(tcp[at..at + 4].try_into().expect("4"));
    Reply {
        src,
        dst,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: be32(4),
        ack: be32(8),
        flags: tcp[13],
        options: tcp[20..header].to_vec(),
        payload: tcp[header..].to_vec(),
    }
}
