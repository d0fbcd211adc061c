//! The heads the gateway forwards: the request head sent upstream and the
//! response head sent to the client, each with hop-by-hop headers removed,
//! the policies' edits applied and the forwarding headers set as configured.

use std::net::IpAddr;

use super::exchange::Exchange;
use crate::config::{HostHeader, XffMode};
use crate::http::{self, Framing, Head, Version};
use crate::policy::HeaderEdits;
use crate::runtime::service::Upstream;

/// `Via` with this hop appended to what an earlier hop wrote.
fn via(earlier: Option<Vec<u8>>, version: Version) -> Vec<u8> {
    let mut v = earlier.map_or_else(Vec::new, |mut v| {
        v.extend_from_slice(b", ");
        v
    });
    v.extend_from_slice(match version {
        Version::Http10 => b"1.0 portcullis",
        Version::Http11 => b"1.1 portcullis",
        Version::Http2 => b"2 portcullis",
    });
    v
}

/// Appends `value` to a comma-separated list being collected.
fn append(list: &mut Vec<u8>, value: &[u8]) {
    if !list.is_empty() {
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(value);
}

/// The `Host` (or `:authority`) sent to `endpoint` of `upstream`.
pub(super) fn upstream_host<'a>(ex: &'a Exchange<'_>, upstream: &'a Upstream, endpoint: usize) -> &'a str {
    let client_host = ex.head().host().unwrap_or("");
    match &upstream.cfg.host_header {
        HostHeader::Preserve if !client_host.is_empty() => client_host,
        HostHeader::Preserve | HostHeader::Upstream => &upstream.cfg.endpoints[endpoint].authority,
        HostHeader::Fixed(h) => h,
    }
}

/// The request head sent to `endpoint` of `upstream` over HTTP/1.1, from a
/// client at `client` (over TLS when `tls`).
pub(super) fn upstream_request(
    ex: &Exchange<'_>,
    upstream: &Upstream,
    endpoint: usize,
    client: IpAddr,
    tls: bool,
) -> Vec<u8> {
    let head = ex.head();
    let mut out = Vec::with_capacity(head.wire_len() + 128);
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(ex.upstream_target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    http::put_header(
        &mut out,
        b"host",
        upstream_host(ex, upstream, endpoint).as_bytes(),
    );
    request_fields(ex, client, tls, |name, value| {
        http::put_header(&mut out, name, value);
    });
    if head.framing == Framing::Chunked {
        let mut te: Option<Vec<u8>> = None;
        for (_, value) in head
            .headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"transfer-encoding"))
        {
            append(te.get_or_insert_with(Vec::new), value);
        }
        // Lowercase and one space apart: the codings as every upstream reads them.
        let codings = te.map_or_else(
            || b"chunked".to_vec(),
            |t| {
                let list: Vec<Vec<u8>> = t
                    .split(|b| *b == b',')
                    .map(|c| c.trim_ascii().to_ascii_lowercase())
                    .collect();
                list.join(&b", "[..])
            },
        );
        http::put_header(&mut out, b"transfer-encoding", &codings);
    }
    if ex.websocket {
        http::put_header(&mut out, b"connection", b"upgrade");
        http::put_header(&mut out, b"upgrade", b"websocket");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The end-to-end request fields sent upstream, whatever the protocol: hop-by-hop
/// ones and `Host` removed, the request policies' edits applied, and the
/// forwarding fields set as configured.
pub(super) fn request_fields(
    ex: &Exchange<'_>,
    client: IpAddr,
    tls: bool,
    mut put: impl FnMut(&[u8], &[u8]),
) {
    let head = ex.head();
    let edits = &ex.request.edits;
    let fwd = ex.generation.settings.forwarded;
    let client_host = head.host().unwrap_or("");
    let mut xff: Option<Vec<u8>> = None;
    let mut earlier_via: Option<Vec<u8>> = None;
    for (name, value) in head.headers() {
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"host")
            || head.is_hop_by_hop(name)
            || edits.removes(name)
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") && fwd.xff != XffMode::Off {
            if fwd.xff == XffMode::Append {
                append(xff.get_or_insert_with(Vec::new), value);
            }
            continue;
        }
        if (name.eq_ignore_ascii_case(b"x-forwarded-proto") && fwd.proto)
            || (name.eq_ignore_ascii_case(b"x-forwarded-host") && fwd.host)
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"via") && fwd.via {
            earlier_via = Some(value.to_vec());
            continue;
        }
        // Ours replaces the caller's: the upstream's parent is this request's span.
        if ex.trace.is_some() && name.eq_ignore_ascii_case(b"traceparent") {
            continue;
        }
        if name.eq_ignore_ascii_case(b"max-forwards")
            && let Some(n) = head.max_forwards()
        {
            put(name, n.saturating_sub(1).to_string().as_bytes());
            continue;
        }
        put(name, value);
    }
    if let Some(trace) = &ex.trace {
        put(b"traceparent", trace.traceparent().as_bytes());
    }
    if fwd.xff != XffMode::Off {
        let mut x = xff.unwrap_or_default();
        append(&mut x, client.to_string().as_bytes());
        put(b"x-forwarded-for", &x);
    }
    for (name, value) in &edits.add {
        put(name.as_bytes(), value.as_bytes());
    }
    if fwd.proto {
        put(b"x-forwarded-proto", if tls { b"https" } else { b"http" });
    }
    if fwd.host && !client_host.is_empty() {
        put(b"x-forwarded-host", client_host.as_bytes());
    }
    if fwd.via {
        put(b"via", &via(earlier_via, head.version));
    }
}

/// How a response is sent on to the client.
#[derive(Debug, Clone, Copy)]
pub(super) struct Relay {
    /// The framing of what follows the head.
    pub framing: Framing,
    /// Whether the body is re-chunked (chunked or until-close, to an HTTP/1.1 client).
    pub rechunk: bool,
    /// Whether the client connection may carry another request.
    pub keep_alive: bool,
    /// Whether this is the `101` that turns the connection into a WebSocket tunnel.
    pub upgrade: bool,
}

impl Relay {
    /// How `response` to `request` is relayed (`draining`: no further request).
    pub fn of(request: &Head, response: &Head, draining: bool) -> Self {
        let no_body = request.method() == "HEAD" || response.status == 204 || response.status == 304;
        let framing = if no_body { Framing::Empty } else { response.framing };
        let open_ended = matches!(framing, Framing::Chunked | Framing::UntilClose);
        // An HTTP/1.0 client cannot read chunks: it gets raw bytes and a close.
        let rechunk = request.version == Version::Http11 && open_ended;
        let delimited = !open_ended || rechunk;
        Self {
            framing,
            rechunk,
            keep_alive: request.keep_alive && delimited && !draining,
            upgrade: false,
        }
    }

    /// How the upstream's `101` to a WebSocket handshake is relayed.
    pub fn upgrade() -> Self {
        Self {
            framing: Framing::Empty,
            rechunk: false,
            keep_alive: false,
            upgrade: true,
        }
    }
}

/// The end-to-end fields of `response` as the client gets them, whatever
/// its protocol: hop-by-hop ones removed, the response policies' `edits`
/// and the request phase's additions applied, this hop added to `Via`.
pub(super) fn response_fields(
    ex: &Exchange<'_>,
    response: &Head,
    edits: &HeaderEdits,
    mut put: impl FnMut(&[u8], &[u8]),
) {
    let fwd_via = ex.generation.settings.forwarded.via;
    let mut earlier_via: Option<Vec<u8>> = None;
    let mut dated = false;
    // No Content-Length on a 204 (RFC 9110 §8.6), whatever the upstream sent.
    let no_length = response.status == 204;
    for (name, value) in response.headers() {
        if response.is_hop_by_hop(name)
            || edits.removes(name)
            || (no_length && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        if name.eq_ignore_ascii_case(b"via") && fwd_via {
            earlier_via = Some(value.to_vec());
            continue;
        }
        put(name, value);
    }
    for (name, value) in edits.add.iter().chain(&ex.request.response_add) {
        put(name.as_bytes(), value.as_bytes());
    }
    // A recipient with a clock adds the Date a response came without (RFC 9110 §6.6.1).
    if !dated && response.status >= 200 {
        put(b"date", &http::date());
    }
    if fwd_via {
        put(b"via", &via(earlier_via, response.version));
    }
}

/// The response head sent to an HTTP/1 client, with the response policies' `edits`.
pub(super) fn client_response(
    ex: &Exchange<'_>,
    response: &Head,
    edits: &HeaderEdits,
    relay: Relay,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(response.wire_len() + 64);
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", response.status, response.reason()).as_bytes());
    response_fields(ex, response, edits, |name, value| {
        http::put_header(&mut out, name, value);
    });
    if relay.rechunk {
        http::put_header(&mut out, b"transfer-encoding", b"chunked");
    }
    if relay.upgrade {
        http::put_header(&mut out, b"connection", b"upgrade");
        http::put_header(&mut out, b"upgrade", b"websocket");
    } else {
        http::put_connection(&mut out, ex.head().version, relay.keep_alive);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An interim (1xx) response, passed on as it came.
pub(super) fn interim(response: &Head) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason()).into_bytes();
    for (n, v) in response.headers() {
        http::put_header(&mut out, n, v);
    }
    out.extend_from_slice(b"\r\n");
    out
}
