//! Strict HTTP/1.1 message heads and body framing on top of `httparse`.
//!
//! Everything here is pure (no I/O), so every smuggling shape is unit-tested
//! byte for byte. A head is parsed once into a [`Head`] that keeps the raw
//! bytes and the index of each header, so forwarding copies slices, never
//! allocates per header.

use std::ops::Range;

mod error;

pub use error::HttpError;

/// Limits on what a client may send in a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Longest request line (method, target, version) in bytes.
    pub request_line: usize,
    /// Largest head (request line and all headers) in bytes.
    pub header_bytes: usize,
    /// Most header fields.
    pub headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            request_line: 8 * 1024,
            header_bytes: 32 * 1024,
            headers: 100,
        }
    }
}

/// HTTP version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: close unless `Connection: keep-alive`.
    Http10,
    /// HTTP/1.1: keep alive unless `Connection: close`.
    Http11,
    /// HTTP/2 (a stream of a multiplexed connection), forwarded as HTTP/1.1.
    Http2,
}

/// How a message body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the peer closes (responses only).
    UntilClose,
}

type Span = Range<u32>;

/// Header slots parsed on the stack; larger limits fall back to the heap.
const STACK_HEADERS: usize = 128;

/// A parsed request or response head: the raw bytes plus indices into them.
#[derive(Debug, Clone)]
pub struct Head {
    raw: Vec<u8>,
    /// Method (request) or reason phrase (response).
    first: Span,
    /// Target (request) or status code text (response).
    second: Span,
    headers: Vec<(Span, Span)>,
    /// Version of the message.
    pub version: Version,
    /// Status code (responses) or 0.
    pub status: u16,
    /// Body framing derived from the headers.
    pub framing: Framing,
    /// Whether the sender allows the connection to be reused afterwards.
    pub keep_alive: bool,
}

/// Where `part` lies in `base`. An empty part may not point into `base` at
/// all (httparse gives a static `""` for a reason phrase that is not UTF-8):
/// it is the empty span at the start.
fn span(base: &[u8], part: &[u8]) -> Span {
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    if part.is_empty() || start.checked_add(part.len()).is_none_or(|end| end > base.len()) {
        return 0..0;
    }
    u32::try_from(start).unwrap_or(u32::MAX)..u32::try_from(start + part.len()).unwrap_or(u32::MAX)
}

impl Head {
    fn slice(&self, s: &Span) -> &[u8] {
        &self.raw[s.start as usize..s.end as usize]
    }

    /// Request method.
    pub fn method(&self) -> &str {
        std::str::from_utf8(self.slice(&self.first)).unwrap_or("")
    }

    /// Request target as sent.
    pub fn target(&self) -> &str {
        std::str::from_utf8(self.slice(&self.second)).unwrap_or("")
    }

    /// Path of the request target, without the query string.
    pub fn path(&self) -> &str {
        let target = self.target();
        let target = strip_absolute_form(target);
        target.split_once('?').map_or(target, |(path, _)| path)
    }

    /// Header fields in order, as `(name, value)` byte slices.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers.iter().map(|(n, v)| (self.slice(n), self.slice(v)))
    }

    /// First value of a header, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// `Host` of a request: the header, or the authority of an absolute-form target.
    pub fn host(&self) -> Option<&str> {
        let target = self.target();
        if let Some(rest) = target
            .strip_prefix("http://")
            .or_else(|| target.strip_prefix("https://"))
        {
            return Some(rest.split('/').next().unwrap_or(rest));
        }
        self.header("host").and_then(|h| std::str::from_utf8(h).ok())
    }

    /// Whether the request is `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` or `DELETE`.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    /// Whether the client sent `Expect: 100-continue`; ignored from HTTP/1.0 (RFC 9110 §10.1.1).
    pub fn expects_continue(&self) -> bool {
        self.version != Version::Http10
            && self
                .header("expect")
                .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
    }

    /// Whether a comma-separated header `name` lists `token` (case-insensitive), in any of its fields.
    pub fn lists_token(&self, name: &str, token: &str) -> bool {
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .flat_map(|(_, v)| v.split(|b| *b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    /// Whether this request opens a WebSocket (RFC 6455 §4.1): a `GET` over
    /// HTTP/1.1 without a body, with `Upgrade: websocket` and `Connection:
    /// upgrade` (or the head an HTTP/2 extended CONNECT stands for, RFC 8441).
    pub fn is_websocket_upgrade(&self) -> bool {
        self.method() == "GET"
            && self.version != Version::Http10
            && matches!(self.framing, Framing::Empty | Framing::Length(0))
            && self.lists_token("upgrade", "websocket")
            && self.lists_token("connection", "upgrade")
    }

    /// `Max-Forwards` of an `OPTIONS` or `TRACE` (RFC 9110 §7.6.2), the only
    /// methods it applies to; `None` without one or when it is not a number.
    pub fn max_forwards(&self) -> Option<u32> {
        if !matches!(self.method(), "OPTIONS" | "TRACE") {
            return None;
        }
        let value = self.header("max-forwards")?;
        std::str::from_utf8(value).ok()?.trim().parse().ok()
    }

    /// Whether `name` is hop-by-hop for this message (RFC 9110 §7.6.1).
    pub fn is_hop_by_hop(&self, name: &[u8]) -> bool {
        const FIXED: [&[u8]; 8] = [
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"transfer-encoding",
            b"upgrade",
            b"expect",
        ];
        if FIXED.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            return true;
        }
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
            .flat_map(|(_, v)| v.split(|b| *b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
    }

    /// Size of the head on the wire.
    pub fn wire_len(&self) -> usize {
        self.raw.len()
    }
}

fn strip_absolute_form(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    target
}

/// Finds the end of a head (`\r\n\r\n`) in `buf`, returning its length.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    memfind(buf, b"\r\n\r\n").map(|i| i + 4)
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Rejects bare CR, bare LF and obs-fold anywhere in a head.
fn check_line_endings(head: &[u8]) -> Result<(), HttpError> {
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Err(HttpError::BareLineFeed),
            b'\r' if head.get(i + 1) != Some(&b'\n') => return Err(HttpError::BareCarriageReturn),
            b'\n' if matches!(head.get(i + 1), Some(b' ' | b'\t')) => return Err(HttpError::ObsFold),
            0 => return Err(HttpError::NulInHead),
            _ => {}
        }
    }
    Ok(())
}

/// Checks the limits that can be judged before a head is complete.
pub fn check_partial_request(buf: &[u8], limits: &HeadLimits) -> Result<(), HttpError> {
    let line_end = memfind(buf, b"\r\n").unwrap_or(buf.len());
    if line_end > limits.request_line {
        return Err(HttpError::RequestLineTooLong {
            limit: limits.request_line,
        });
    }
    if buf.len() > limits.header_bytes {
        return Err(HttpError::HeadTooLarge {
            limit: limits.header_bytes,
        });
    }
    Ok(())
}

/// Parses a complete request head (`buf` ends with the blank line).
pub fn parse_request(buf: &[u8], limits: &HeadLimits) -> Result<Head, HttpError> {
    check_partial_request(buf, limits)?;
    check_line_endings(buf)?;
    let raw = buf.to_vec();
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut spill = Vec::new();
    let slots: &mut [httparse::Header<'_>] = if limits.headers <= STACK_HEADERS {
        &mut stack[..limits.headers]
    } else {
        spill.resize(limits.headers, httparse::EMPTY_HEADER);
        &mut spill
    };
    let mut req = httparse::Request::new(slots);
    match req.parse(&raw) {
        Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
        Ok(_) => return Err(HttpError::Malformed("head does not end where expected")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders {
                limit: limits.headers,
            });
        }
        Err(httparse::Error::Version) => return Err(HttpError::BadVersion),
        Err(httparse::Error::Token) => return Err(HttpError::BadMethod),
        Err(e) => return Err(HttpError::Parse(e)),
    }
    let method = req.method.ok_or(HttpError::BadMethod)?;
    let target = req.path.ok_or(HttpError::BadTarget)?;
    let version = if req.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    check_target(method, target)?;
    let first = span(&raw, method.as_bytes());
    let second = span(&raw, target.as_bytes());
    let headers: Vec<_> = req
        .headers
        .iter()
        .map(|h| (span(&raw, h.name.as_bytes()), span(&raw, h.value)))
        .collect();
    let mut head = Head {
        raw: Vec::new(),
        first,
        second,
        headers,
        version,
        status: 0,
        framing: Framing::Empty,
        keep_alive: false,
    };
    head.raw = raw;
    let hosts = head
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"host"))
        .count();
    if hosts > 1 || (hosts == 0 && version == Version::Http11) {
        return Err(HttpError::BadHost);
    }
    if let Some(host) = head.header("host")
        && (host.is_empty() && version == Version::Http11
            || host.iter().any(|b| matches!(b, b' ' | b'/' | b'@')))
    {
        return Err(HttpError::BadHost);
    }
    head.framing = match body_framing(&head)? {
        Some(framing) => framing,
        None => Framing::Empty,
    };
    head.keep_alive = keep_alive(&head);
    Ok(head)
}

fn check_target(method: &str, target: &str) -> Result<(), HttpError> {
    let ok = if target == "*" {
        method == "OPTIONS"
    } else if target.starts_with('/') {
        !target.starts_with("//")
    } else {
        target.starts_with("http://") || target.starts_with("https://")
    };
    if !ok || method == "CONNECT" {
        return Err(HttpError::BadTarget);
    }
    if target.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
        return Err(HttpError::BadTarget);
    }
    Ok(())
}

/// A request that arrived as an HTTP/2 stream, as the head the rest of the
/// gateway reads: the same checks and limits as an HTTP/1.1 head, `Host`
/// from `:authority`, split `cookie` fields joined (RFC 9113 §8.2.3), and a
/// body without `content-length` framed as chunked towards the upstream.
pub fn h2_request<'a>(
    method: &str,
    target: &str,
    authority: Option<&str>,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    has_body: bool,
    limits: &HeadLimits,
) -> Result<Head, HttpError> {
    // RFC 9113 §8.3.1: `:path` is origin-form, or `*` for OPTIONS; an
    // absolute-form one would name a host beside `:authority`.
    if !(target.starts_with('/') || (target == "*" && method == "OPTIONS")) {
        return Err(HttpError::BadTarget);
    }
    // RFC 3986 §3.2: what an authority may hold; whitespace would be trimmed off a `Host`.
    let authority_byte = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@[]".contains(&b);
    if authority.is_some_and(|a| a.is_empty() || !a.bytes().all(authority_byte)) {
        return Err(HttpError::BadHost);
    }
    let mut raw = Vec::with_capacity(256);
    raw.extend_from_slice(method.as_bytes());
    raw.push(b' ');
    raw.extend_from_slice(target.as_bytes());
    raw.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host_seen = false;
    if let Some(authority) = authority {
        put_header(&mut raw, b"host", authority.as_bytes());
        host_seen = true;
    }
    let mut cookie: Option<Vec<u8>> = None;
    for (name, value) in fields {
        if name == b"host" {
            // `:authority` wins; a `host` beside it must name the same origin.
            if host_seen && authority.is_some_and(|a| !a.as_bytes().eq_ignore_ascii_case(value)) {
                return Err(HttpError::BadHost);
            }
            if host_seen {
                continue;
            }
            host_seen = true;
        }
        if name == b"cookie" {
            let joined = cookie.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(value);
            continue;
        }
        put_header(&mut raw, name, value);
    }
    if let Some(cookie) = cookie {
        put_header(&mut raw, b"cookie", &cookie);
    }
    raw.extend_from_slice(b"\r\n");
    let mut head = parse_request(&raw, limits)?;
    head.version = Version::Http2;
    if head.framing == Framing::Empty && has_body {
        head.framing = Framing::Chunked;
    }
    head.keep_alive = true;
    Ok(head)
}

/// A response that arrived on an HTTP/2 stream, as the head the response
/// policies and the relay read (its body delimited by the stream, so never
/// chunked here).
pub fn h2_response<'a>(
    status: u16,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    max_headers: usize,
) -> Result<Head, HttpError> {
    let mut raw = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for (name, value) in fields {
        put_header(&mut raw, name, value);
    }
    raw.extend_from_slice(b"\r\n");
    let mut head = parse_response(&raw, max_headers)?;
    head.version = Version::Http2;
    Ok(head)
}

/// Parses a complete response head from an upstream.
pub fn parse_response(buf: &[u8], max_headers: usize) -> Result<Head, HttpError> {
    check_line_endings(buf)?;
    let raw = buf.to_vec();
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut spill = Vec::new();
    let slots: &mut [httparse::Header<'_>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        spill.resize(max_headers, httparse::EMPTY_HEADER);
        &mut spill
    };
    let mut res = httparse::Response::new(slots);
    match res.parse(&raw) {
        Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
        Ok(_) => return Err(HttpError::Malformed("head does not end where expected")),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders { limit: max_headers }),
        Err(e) => return Err(HttpError::Parse(e)),
    }
    let status = res.code.ok_or(HttpError::Malformed("no status code"))?;
    // RFC 9110 §15: every valid status code is within 100 to 599.
    if !(100..=599).contains(&status) {
        return Err(HttpError::Malformed("status code outside 100-599"));
    }
    let reason = res.reason.unwrap_or("");
    let version = if res.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    let first = span(&raw, reason.as_bytes());
    let headers: Vec<_> = res
        .headers
        .iter()
        .map(|h| (span(&raw, h.name.as_bytes()), span(&raw, h.value)))
        .collect();
    let mut head = Head {
        raw: Vec::new(),
        first: first.clone(),
        second: first,
        headers,
        version,
        status,
        framing: Framing::Empty,
        keep_alive: false,
    };
    head.raw = raw;
    head.framing = body_framing(&head)?.unwrap_or(Framing::UntilClose);
    head.keep_alive = keep_alive(&head) && head.framing != Framing::UntilClose;
    Ok(head)
}

impl Head {
    /// Response reason phrase.
    pub fn reason(&self) -> &str {
        std::str::from_utf8(self.slice(&self.first)).unwrap_or("")
    }
}

/// Framing from `Content-Length` / `Transfer-Encoding`; `None` when neither is present.
fn body_framing(head: &Head) -> Result<Option<Framing>, HttpError> {
    let mut length: Option<u64> = None;
    let mut te: Option<Vec<u8>> = None;
    for (name, value) in head.headers() {
        if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() {
                return Err(HttpError::DuplicateContentLength);
            }
            length = Some(parse_content_length(value)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let all = te.get_or_insert_with(Vec::new);
            if !all.is_empty() {
                all.push(b',');
            }
            all.extend_from_slice(value);
        }
    }
    match (length, te) {
        (Some(_), Some(_)) => Err(HttpError::ContentLengthWithTransferEncoding),
        (None, Some(codings)) => {
            if head.version == Version::Http10 {
                return Err(HttpError::BadTransferEncoding);
            }
            let last = codings
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .next_back()
                .unwrap_or_default();
            let chunked_count = codings
                .split(|b| *b == b',')
                .filter(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
                .count();
            // Only registered codings under the final `chunked`: an upstream
            // that read `identity` (RFC 2616's, since removed) or an unknown
            // name otherwise would frame the body differently.
            let known = codings.split(|b| *b == b',').map(<[u8]>::trim_ascii).all(|c| {
                [
                    b"chunked".as_slice(),
                    b"gzip",
                    b"x-gzip",
                    b"deflate",
                    b"compress",
                    b"x-compress",
                ]
                .iter()
                .any(|k| c.eq_ignore_ascii_case(k))
            });
            if !last.eq_ignore_ascii_case(b"chunked") || chunked_count != 1 {
                return Err(HttpError::BadTransferEncoding);
            }
            if !known {
                return Err(HttpError::UnknownTransferCoding);
            }
            Ok(Some(Framing::Chunked))
        }
        (Some(0), None) => Ok(Some(Framing::Empty)),
        (Some(n), None) => Ok(Some(Framing::Length(n))),
        (None, None) => Ok(None),
    }
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::BadContentLength);
    }
    value
        .iter()
        .try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(HttpError::BadContentLength)
}

fn keep_alive(head: &Head) -> bool {
    let mut close = false;
    let mut keep = false;
    for (_, value) in head
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
    {
        for token in value.split(|b| *b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    match head.version {
        Version::Http11 | Version::Http2 => !close,
        Version::Http10 => keep && !close,
    }
}

/// Appends `name: value\r\n`.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Says how a response leaves the connection: `close` when it will not carry
/// another request, `keep-alive` to an HTTP/1.0 client it will (HTTP/1.0
/// closes by default, so a client that asked to keep it must be told).
pub fn put_connection(out: &mut Vec<u8>, version: Version, keep_alive: bool) {
    if !keep_alive {
        put_header(out, b"connection", b"close");
    } else if version == Version::Http10 {
        put_header(out, b"connection", b"keep-alive");
    }
}

/// Writes a small complete response (the gateway's own answers, admin endpoints)
/// to a request of `version`.
pub fn simple_response(
    status: u16,
    extra: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
    version: Version,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    put_header(&mut out, b"content-type", content_type.as_bytes());
    put_header(&mut out, b"content-length", body.len().to_string().as_bytes());
    put_header(&mut out, b"date", &date());
    for (name, value) in extra {
        put_header(&mut out, name.as_bytes(), value.as_bytes());
    }
    put_connection(&mut out, version, keep_alive);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// The current time as an IMF-fixdate (RFC 9110 §5.6.7), for the `Date` an
/// origin server or a forwarding recipient with a clock must send; made once a
/// second per thread.
pub fn date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static MADE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    MADE.with(|made| match made.get() {
        (at, text) if at == now => text,
        _ => {
            let text = imf_fixdate(now);
            made.set((now, text));
            text
        }
    })
}

/// `secs` after the Unix epoch as an IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn imf_fixdate(secs: u64) -> [u8; 29] {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let line = format!(
        "{:.3}, {:02} {:.3} {:04} {:02}:{:02}:{:02} GMT",
        t.weekday().to_string(),
        t.day(),
        t.month().to_string(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let mut text = [b' '; 29];
    let n = line.len().min(29);
    text[..n].copy_from_slice(&line.as_bytes()[..n]);
    text
}

/// Canonical reason phrase for the statuses the gateway itself produces.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Largest chunk-size line (size, extensions, CRLF) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    SizeLine,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Incremental `chunked` decoder that re-encodes into fresh chunks as it goes.
///
/// Trailers are validated and dropped: the gateway never forwards trailer
/// fields, in either direction, because intermediaries cannot vouch for them.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
    trailer_bytes: usize,
    /// Decoded payload bytes so far.
    pub payload: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::SizeLine,
            line: Vec::new(),
            trailer_bytes: 0,
            payload: 0,
        }
    }
}

/// What [`ChunkedDecoder::feed`] should emit for decoded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reencode {
    /// Write payload as new chunks, and the terminating `0\r\n\r\n`.
    Chunked,
    /// Write the raw payload only (to an HTTP/1.0 peer that reads until close).
    Raw,
}

impl ChunkedDecoder {
    /// Whether the terminating chunk and trailer section have been consumed.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes bytes from `input`, appending re-encoded output to `out`; returns bytes consumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, mode: Reencode) -> Result<usize, HttpError> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                ChunkState::SizeLine | ChunkState::DataEnd | ChunkState::Trailers => {
                    let Some(nl) = input[pos..].iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(&input[pos..]);
                        self.check_line_len()?;
                        return Ok(input.len());
                    };
                    self.line.extend_from_slice(&input[pos..=pos + nl]);
                    pos += nl + 1;
                    self.check_line_len()?;
                    let line = std::mem::take(&mut self.line);
                    self.on_line(&line, out, mode)?;
                }
                ChunkState::Data(remaining) => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - pos);
                    if mode == Reencode::Chunked {
                        out.extend_from_slice(format!("{take:x}\r\n").as_bytes());
                    }
                    out.extend_from_slice(&input[pos..pos + take]);
                    if mode == Reencode::Chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                    pos += take;
                    self.payload += take as u64;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::Done => break,
            }
        }
        Ok(pos)
    }

    fn check_line_len(&self) -> Result<(), HttpError> {
        let limit = if self.state == ChunkState::Trailers {
            MAX_TRAILERS - self.trailer_bytes
        } else {
            MAX_CHUNK_LINE
        };
        if self.line.len() > limit {
            Err(HttpError::BadChunk("chunk line or trailers too long"))
        } else {
            Ok(())
        }
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<u8>, mode: Reencode) -> Result<(), HttpError> {
        let Some(body) = line.strip_suffix(b"\r\n") else {
            return Err(HttpError::BadChunk("line not ended by CRLF"));
        };
        if body.contains(&b'\r') {
            return Err(HttpError::BadChunk("bare CR"));
        }
        match self.state {
            ChunkState::SizeLine => {
                let size = parse_chunk_size(body)?;
                if size == 0 {
                    self.state = ChunkState::Trailers;
                } else {
                    self.state = ChunkState::Data(size);
                }
            }
            ChunkState::DataEnd => {
                if !body.is_empty() {
                    return Err(HttpError::BadChunk("chunk data longer than its size"));
                }
                self.state = ChunkState::SizeLine;
            }
            ChunkState::Trailers => {
                if body.is_empty() {
                    self.state = ChunkState::Done;
                    if mode == Reencode::Chunked {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                } else {
                    self.trailer_bytes += line.len();
                    check_trailer(body)?;
                }
            }
            ChunkState::Data(_) | ChunkState::Done => unreachable!("on_line is only called for line states"),
        }
        Ok(())
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(HttpError::BadChunk("chunk size is not 1-15 hex digits"));
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && (rest[0] != b';' || rest.iter().any(|b| b.is_ascii_control() && *b != b'\t')) {
        return Err(HttpError::BadChunk("junk after chunk size"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| HttpError::BadChunk("chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| HttpError::BadChunk("chunk size overflows"))
}

fn check_trailer(line: &[u8]) -> Result<(), HttpError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(HttpError::ObsFold);
    }
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return Err(HttpError::BadChunk("trailer field without a colon"));
    };
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
        return Err(HttpError::BadChunk("trailer field name"));
    }
    Ok(())
}

/// Whether `b` may appear in a token such as a header name (RFC 9110 `tchar`).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Head, HttpError> {
        parse_request(text.as_bytes(), &HeadLimits::default())
    }

    #[test]
    fn a_reason_phrase_that_is_not_utf8_reads_as_empty() {
        // Found by the http_response fuzz target: the span of httparse's static "" underflowed.
        let head = parse_response(b"HTTP/1.1 101 \xd3witching\r\nConnection: Upgrade\r\n\r\n", 100).unwrap();
        assert_eq!((head.status, head.method()), (101, ""));
        let bare = parse_response(b"HTTP/1.1 204\r\n\r\n", 100).unwrap();
        assert_eq!((bare.status, bare.method()), (204, ""));
        // Also found by it: httparse reads `041` as status 41.
        for status in ["041", "099", "600", "999"] {
            let raw = format!("HTTP/1.1 {status} X\r\n\r\n");
            assert!(parse_response(raw.as_bytes(), 100).is_err(), "{status}");
        }
    }

    #[test]
    fn split_h2_cookies_are_joined_for_http11() {
        let fields: [(&[u8], &[u8]); 3] = [(b"cookie", b"a=1"), (b"x-other", b"y"), (b"cookie", b"b=2")];
        let head = h2_request(
            "GET",
            "/",
            Some("a.example"),
            fields.into_iter(),
            false,
            &HeadLimits::default(),
        )
        .unwrap();
        assert_eq!(head.header("cookie"), Some(&b"a=1; b=2"[..]));
        assert_eq!(head.headers().filter(|(n, _)| n == b"cookie").count(), 1);
    }

    #[test]
    fn an_h2_path_is_origin_form_never_absolute() {
        let h2 = |method, target| {
            h2_request(
                method,
                target,
                Some("a.example"),
                std::iter::empty(),
                false,
                &HeadLimits::default(),
            )
        };
        assert_eq!(h2("GET", "/orders?x=1").unwrap().host(), Some("a.example"));
        assert!(h2("OPTIONS", "*").is_ok());
        // Found by the h2_request fuzz target: the host came from an absolute-form path, not `:authority`.
        assert!(matches!(
            h2("GET", "http://evil.example/"),
            Err(HttpError::BadTarget)
        ));
        assert!(matches!(h2("GET", "*"), Err(HttpError::BadTarget)));
        let with = |authority| {
            h2_request(
                "GET",
                "/",
                Some(authority),
                std::iter::empty(),
                false,
                &HeadLimits::default(),
            )
        };
        assert!(
            matches!(with("\tevil.example"), Err(HttpError::BadHost)),
            "whitespace in :authority"
        );
        assert!(matches!(with(""), Err(HttpError::BadHost)));
        assert_eq!(with("[::1]:8443").unwrap().host(), Some("[::1]:8443"));
    }

    #[test]
    fn websocket_handshakes_are_told_apart() {
        let ws = |text: &str| req(text).unwrap().is_websocket_upgrade();
        assert!(ws(
            "GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\r\n"
        ));
        assert!(
            !ws("GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"),
            "no Connection: upgrade"
        );
        assert!(
            !ws("GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"),
            "another protocol"
        );
        assert!(
            !ws(
                "POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
            ),
            "not a GET, and a body"
        );
        assert!(
            !ws("GET /chat HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            "HTTP/1.0"
        );
    }

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(1_798_761_600), b"Fri, 01 Jan 2027 00:00:00 GMT");
        assert_eq!(date().len(), 29);
    }

    #[test]
    fn plain_get_keeps_alive() {
        let head = req("GET /orders/1?x=secret HTTP/1.1\r\nHost: api\r\n\r\n").unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.path(), "/orders/1");
        assert_eq!(head.host(), Some("api"));
        assert_eq!(head.framing, Framing::Empty);
        assert!(head.keep_alive);
    }

    #[test]
    fn http10_closes_unless_asked() {
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(
            !req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn smuggling_shapes_are_rejected() {
        let cases: &[(&str, HttpError)] = &[
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::ContentLengthWithTransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                HttpError::DuplicateContentLength,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                HttpError::DuplicateContentLength,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
                HttpError::BadTransferEncoding,
            ),
            // Found by the differential framing test: forwarded, these framed otherwise upstream.
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
                HttpError::UnknownTransferCoding,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: foo, chunked\r\n\r\n",
                HttpError::UnknownTransferCoding,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::BadTransferEncoding,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
                HttpError::ObsFold,
            ),
            ("GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", HttpError::BareLineFeed),
            (
                "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
                HttpError::BareCarriageReturn,
            ),
            ("GET / HTTP/1.1\r\n\r\n", HttpError::BadHost),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HttpError::BadHost),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", HttpError::BadVersion),
            ("GET x HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", HttpError::BadTarget),
        ];
        for (text, want) in cases {
            assert_eq!(req(text).unwrap_err(), *want, "{text:?}");
        }
        assert!(req("G(T / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\nBad Name: b\r\n\r\n").is_err());
    }

    #[test]
    fn final_chunked_after_other_codings_is_accepted() {
        let head = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap();
        assert_eq!(head.framing, Framing::Chunked);
    }

    #[test]
    fn limits() {
        let limits = HeadLimits {
            request_line: 20,
            header_bytes: 64,
            headers: 2,
        };
        let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(30));
        assert_eq!(
            check_partial_request(long_line.as_bytes(), &limits),
            Err(HttpError::RequestLineTooLong { limit: 20 })
        );
        let many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(
            parse_request(many.as_bytes(), &limits).unwrap_err(),
            HttpError::TooManyHeaders { limit: 2 }
        );
        let big = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", "a".repeat(60));
        assert_eq!(
            parse_request(big.as_bytes(), &limits).unwrap_err(),
            HttpError::HeadTooLarge { limit: 64 }
        );
    }

    #[test]
    fn hop_by_hop_includes_connection_tokens() {
        let head = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret, close\r\n\r\n").unwrap();
        assert!(head.is_hop_by_hop(b"X-Secret"));
        assert!(head.is_hop_by_hop(b"keep-alive"));
        assert!(!head.is_hop_by_hop(b"accept"));
    }

    #[test]
    fn responses_without_length_read_until_close() {
        let head = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", 10).unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.keep_alive);
        let head = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 10).unwrap();
        assert_eq!(
            (head.status, head.framing, head.keep_alive),
            (200, Framing::Length(5), true)
        );
    }

    fn decode(input: &[u8], split: usize) -> Result<(Vec<u8>, bool), HttpError> {
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        let (a, b) = input.split_at(split);
        let used = dec.feed(a, &mut out, Reencode::Raw)?;
        assert_eq!(used, a.len());
        dec.feed(b, &mut out, Reencode::Raw)?;
        Ok((out, dec.is_done()))
    }

    #[test]
    fn chunked_decodes_across_every_split() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
        for split in 0..wire.len() {
            assert_eq!(
                decode(wire, split).unwrap(),
                (b"hello world".to_vec(), true),
                "split {split}"
            );
        }
    }

    #[test]
    fn chunked_reencodes_without_trailers() {
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        dec.feed(b"3\r\nabc\r\n0\r\nX: y\r\n\r\n", &mut out, Reencode::Chunked)
            .unwrap();
        assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
    }

    #[test]
    fn bad_chunks_are_rejected() {
        for bad in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
            b"0\r\n bad\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
        ] {
            assert!(decode(bad, 0).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
