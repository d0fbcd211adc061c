//! PROXY protocol v1 and v2 (HAProxy's specification) on listeners behind
//! an L4 load balancer: the header that opens each connection names the
//! real client, which the gateway then uses everywhere (IP lists, rate-limit
//! keys, `X-Forwarded-For`, the access log). Only trusted sources may
//! connect; anyone else is refused at accept.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::io::{Stream, Transport as _};

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// Neither a v1 nor a v2 header.
    #[error("the connection does not open with a PROXY protocol header")]
    Missing,
    /// A header that does not parse.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// The peer closed or stalled before the header was complete.
    #[error("the PROXY protocol header did not arrive in time")]
    Incomplete,
}

/// What a complete header says: the client's address, or `None` when the
/// sender speaks for itself (v1 `UNKNOWN`, v2 `LOCAL`, or a family other than TCP over IP).
pub type Source = Option<SocketAddr>;

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the source and the header's length.
pub fn parse(buf: &[u8]) -> Result<Option<(Source, usize)>, ProxyHeaderError> {
    let sig = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig] == V2_SIGNATURE[..sig] {
        return if sig < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let prefix = buf.len().min(6);
    if buf[..prefix] != b"PROXY "[..prefix] {
        return Err(ProxyHeaderError::Missing);
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::Malformed("v1 header longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyHeaderError::Malformed("v1 header longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[6..end])
        .map_err(|_| ProxyHeaderError::Malformed("v1 header is not ASCII"))?;
    let words: Vec<&str> = line.split(' ').collect();
    let source = match words.as_slice() {
        ["UNKNOWN", ..] => None,
        [family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(ProxyHeaderError::Malformed(
                    "v1 address does not match its family",
                ));
            }
            let port = parse_port(sport)?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyHeaderError::Malformed("v1 header fields")),
    };
    Ok(Some((source, end + 2)))
}

fn parse_port(text: &str) -> Result<u16, ProxyHeaderError> {
    if text.is_empty()
        || text.len() > 5
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return Err(ProxyHeaderError::Malformed("v1 port"));
    }
    text.parse().map_err(|_| ProxyHeaderError::Malformed("v1 port"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Source, usize)>, ProxyHeaderError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let source = match (command, buf[13]) {
        (0x1, 0x11) => {
            let a = body
                .get(..12)
                .ok_or(ProxyHeaderError::Malformed("v2 IPv4 addresses"))?;
            let ip = IpAddr::from([a[0], a[1], a[2], a[3]]);
            Some(SocketAddr::new(ip, u16::from_be_bytes([a[8], a[9]])))
        }
        (0x1, 0x21) => {
            let a = body
                .get(..36)
                .ok_or(ProxyHeaderError::Malformed("v2 IPv6 addresses"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(
                IpAddr::from(octets),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // LOCAL (the balancer's own connection, a health check), or UNSPEC,
        // UDP or a Unix socket: the connection's own address stands.
        (0x0 | 0x1, _) => None,
        _ => return Err(ProxyHeaderError::Malformed("v2 command")),
    };
    Ok(Some((source, 16 + len)))
}

/// The header an upstream connection opens with (`version` 1 or 2): `client`
/// connected to the gateway at `local`. Addresses of different families
/// (which a dual-stack listener could pair) are sent as unknown.
pub fn encode(version: u8, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = (
        SocketAddr::new(client.ip().to_canonical(), client.port()),
        SocketAddr::new(local.ip().to_canonical(), local.port()),
    );
    let same_family = client.is_ipv4() == local.is_ipv4();
    if version == 1 {
        if !same_family {
            return b"PROXY UNKNOWN\r\n".to_vec();
        }
        let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
        return format!(
            "PROXY {family} {} {} {} {}\r\n",
            client.ip(),
            local.ip(),
            client.port(),
            local.port()
        )
        .into_bytes();
    }
    let mut out = V2_SIGNATURE.to_vec();
    let mut body = Vec::with_capacity(36);
    match (client.ip(), local.ip()) {
        (IpAddr::V4(c), IpAddr::V4(l)) => {
            out.extend_from_slice(&[0x21, 0x11]);
            body.extend_from_slice(&c.octets());
            body.extend_from_slice(&l.octets());
        }
        (IpAddr::V6(c), IpAddr::V6(l)) => {
            out.extend_from_slice(&[0x21, 0x21]);
            body.extend_from_slice(&c.octets());
            body.extend_from_slice(&l.octets());
        }
        // LOCAL: the receiver keeps the connection's own addresses.
        _ => out.extend_from_slice(&[0x20, 0x00]),
    }
    if !body.is_empty() {
        body.extend_from_slice(&client.port().to_be_bytes());
        body.extend_from_slice(&local.port().to_be_bytes());
    }
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads the header off `stream` without reading past it (the bytes after it
/// belong to TLS or HTTP): the client it names, if any.
pub(super) async fn read(stream: &Stream, wait: Duration) -> Result<Source, ProxyHeaderError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::with_capacity(V1_MAX + 232);
    // The first 16 bytes are part of any header (a v1 header is at least
    // "PROXY UNKNOWN\r\n", 15, so it is read a byte at a time after 8).
    let mut needed = 8;
    loop {
        while buf.len() < needed {
            let chunk = Vec::with_capacity(needed - buf.len());
            let (res, chunk) = tokio::time::timeout_at(deadline, stream.read(chunk))
                .await
                .map_err(|_| ProxyHeaderError::Incomplete)?;
            match res {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk),
                _ => return Err(ProxyHeaderError::Incomplete),
            }
        }
        match parse(&buf)? {
            Some((source, len)) if len == buf.len() => return Ok(source),
            Some(_) => return Err(ProxyHeaderError::Malformed("header length")),
            None if buf.starts_with(&V2_SIGNATURE[..8]) => {
                needed = if buf.len() < 16 {
                    16
                } else {
                    16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
                };
            }
            None => needed = buf.len() + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v1_headers_name_the_client() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET /";
        assert_eq!(
            parse(line),
            Ok(Some((Some("192.0.2.7:51000".parse().expect("addr")), 41)))
        );
        let six = b"PROXY TCP6 2001:db8::5 2001:db8::1 4000 80\r\n";
        assert_eq!(
            parse(six).expect("valid").expect("complete").0,
            Some("[2001:db8::5]:4000".parse().expect("addr"))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((None, 15))));
        assert_eq!(parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 51"), Ok(None), "incomplete");
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
        for bad in [
            &b"PROXY TCP4 2001:db8::5 10.0.0.1 1 2\r\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 099 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 70000 2\r\n",
            b"PROXY TCP4 192.0.2.7\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyHeaderError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(20)),
            Err(ProxyHeaderError::Malformed(_))
        ));
    }

    #[test]
    fn headers_made_for_upstreams_read_back() {
        let local: SocketAddr = "10.0.0.1:443".parse().expect("addr");
        for client in ["192.0.2.7:51000", "[2001:db8::5]:4000", "[::ffff:192.0.2.9]:80"] {
            let client: SocketAddr = client.parse().expect("addr");
            for version in [1, 2] {
                let header = encode(version, client, local);
                let (source, len) = parse(&header).expect("valid").expect("complete");
                assert_eq!(len, header.len());
                let canonical = SocketAddr::new(client.ip().to_canonical(), client.port());
                let expected = canonical.is_ipv4().then_some(canonical);
                assert_eq!(source, expected, "v{version} {client}");
            }
        }
    }

    #[test]
    fn v2_headers_name_the_client_and_skip_their_tlvs() {
        let mut body = vec![198, 51, 100, 9, 10, 0, 0, 1, 0xc3, 0x50, 0x01, 0xbb];
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]); // a TLV (NOOP), skipped
        let header = v2(1, 0x11, &body);
        let mut wire = header.clone();
        wire.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse(&wire),
            Ok(Some((
                Some("198.51.100.9:50000".parse().expect("addr")),
                header.len()
            )))
        );
        let mut six = vec![0u8; 36];
        six[0] = 0x20;
        six[1] = 0x01;
        six[32] = 0x1f;
        six[33] = 0x90;
        assert_eq!(
            parse(&v2(1, 0x21, &six)).expect("valid").expect("complete").0,
            Some("[2001::]:8080".parse().expect("addr"))
        );
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Some((None, 16))), "LOCAL");
        assert_eq!(parse(&header[..20]), Ok(None), "incomplete");
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err(), "short addresses");
        let mut bad = header;
        bad[12] = 0x11;
        assert!(parse(&bad).is_err(), "version 1 in a v2 signature");
    }
}
