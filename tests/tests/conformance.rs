//! RFC 9110 / 9112 / 9113 as an intermediary: the MUSTs of
//! `docs/conformance.md` that no other test proves. Raw requests go through
//! `portcullis run` to a scripted upstream that records the bytes it received
//! and answers each path (`/r/NAME`) with a response written to break one
//! rule, so what the client gets shows whether the gateway kept it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use portcullis_tests::NetNs;
use portcullis_tests::http::{
    GatewayProcess, TempDir, api_instance, connect, curl, request_open, strict_settings,
};

/// What the scripted upstream answers to `/r/NAME`; anything else (`no-date`
/// among them) gets `200 ok` with no Date.
fn scripted(name: &str) -> &'static [u8] {
    match name {
        "repeated" => b"HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nx-multi: first\r\nset-cookie: b=2\r\nx-multi: second\r\ncontent-length: 2\r\n\r\nok",
        "space-before-colon" => b"HTTP/1.1 200 OK\r\nx-a : 1\r\ncontent-length: 2\r\n\r\nok",
        "folded" => b"HTTP/1.1 200 OK\r\nx-a: 1\r\n 2\r\ncontent-length: 2\r\n\r\nok",
        "bad-length" => b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok",
        "two-lengths" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        "short" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
        "no-content" => b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
        "not-modified" => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
        "head" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
        "chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n",
        "hints" => b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        "http10" => b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        "hop-by-hop" => b"HTTP/1.1 200 OK\r\nconnection: x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nupgrade: h2c\r\ncontent-length: 2\r\n\r\nok",
        "vanish" => b"",
        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    }
}

/// Each request head the upstream received, in order.
type Heads = Arc<Mutex<Vec<String>>>;

/// Reads one request (head, then a `Content-Length` or chunked body) from `conn`.
fn read_one(conn: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&pending[..end]).into_owned();
    pending.drain(..end);
    let lower = head.to_ascii_lowercase();
    let done = |p: &[u8]| -> Option<usize> {
        if lower.contains("transfer-encoding: chunked") {
            p.windows(5).position(|w| w == b"0\r\n\r\n").map(|at| at + 5)
        } else {
            let len = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            (p.len() >= len).then_some(len)
        }
    };
    loop {
        if let Some(n) = done(pending) {
            pending.drain(..n);
            return Some(head);
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// The scripted upstream on 127.0.0.1:9000 in `ns`.
fn upstream(ns: &NetNs) -> anyhow::Result<Heads> {
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:9000"))??;
    let heads: Heads = Arc::default();
    let record = heads.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let record = record.clone();
            std::thread::spawn(move || {
                let mut pending = Vec::new();
                while let Some(head) = read_one(&mut conn, &mut pending) {
                    let name = head
                        .split(' ')
                        .nth(1)
                        .and_then(|t| t.strip_prefix("/r/"))
                        .map(|t| t.split(['?', '/']).next().unwrap_or(t).to_owned())
                        .unwrap_or_default();
                    record.lock().expect("heads").push(head);
                    let answer = scripted(&name);
                    if answer.is_empty() || conn.write_all(answer).is_err() || name == "short" {
                        let _ = conn.shutdown(Shutdown::Both);
                        return;
                    }
                }
            });
        }
    });
    Ok(heads)
}

struct Scene {
    ns: NetNs,
    heads: Heads,
    _gw: GatewayProcess,
    _dir: TempDir,
}

impl Scene {
    fn start() -> anyhow::Result<Self> {
        let ns = NetNs::new("rfc")?;
        let dir = TempDir::new("rfc")?;
        let heads = upstream(&ns)?;
        dir.write(
            "gateway.yaml",
            &format!(
                "{}{}",
                strict_settings("rfc"),
                api_instance(
                    "any",
                    "http://127.0.0.1:8080/",
                    "http://127.0.0.1:9000/",
                    "  http2:\n    cleartext: true\n"
                )
            ),
        )?;
        let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
        Ok(Self {
            ns,
            heads,
            _gw: gw,
            _dir: dir,
        })
    }

    /// Sends `raw` on a new connection; what came back (read until the
    /// gateway closes or is quiet for half a second) and whether it closed.
    fn send(&self, raw: &str) -> anyhow::Result<(String, bool)> {
        let (got, closed) = request_open(
            &self.ns,
            "127.0.0.1:8080".parse()?,
            raw.as_bytes(),
            Duration::from_millis(500),
        )?;
        Ok((String::from_utf8_lossy(&got).into_owned(), closed))
    }

    /// The heads the upstream received since `from`.
    fn received(&self, from: usize) -> Vec<String> {
        self.heads
            .lock()
            .map(|h| h[from.min(h.len())..].to_vec())
            .unwrap_or_default()
    }

    fn seen(&self) -> usize {
        self.heads.lock().map_or(0, |h| h.len())
    }
}

/// The status code and the lowercase head of the first response in `text`.
fn first(text: &str) -> (u16, String) {
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head)
}

fn field_lines<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}:");
    head.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::trim)
        .collect()
}

/// Requests the gateway must refuse with 400 before anything reaches the upstream.
#[test]
fn malformed_requests_are_refused_with_400_and_reach_no_upstream() -> anyhow::Result<()> {
    let s = Scene::start()?;
    let cases = [
        // RFC 9112 §2.2: whitespace between the start line and the first field line.
        (
            "whitespace before the first field",
            "GET /r/a HTTP/1.1\r\n Host: a\r\n\r\n",
        ),
        // RFC 9112 §3.2: no Host, two Hosts, an invalid Host.
        ("no Host", "GET /r/a HTTP/1.1\r\n\r\n"),
        ("two Hosts", "GET /r/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("an invalid Host", "GET /r/a HTTP/1.1\r\nHost: a b\r\n\r\n"),
        // RFC 9112 §5.1: whitespace between a field name and the colon.
        ("space before a colon", "GET /r/a HTTP/1.1\r\nHost : a\r\n\r\n"),
        // RFC 9112 §5.2: obs-fold in a request.
        (
            "a folded field",
            "GET /r/a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
        ),
        // RFC 9110 §5.5: CR, LF or NUL inside a field value.
        (
            "a NUL in a value",
            "GET /r/a HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n",
        ),
        (
            "a bare CR in a value",
            "GET /r/a HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n",
        ),
        // RFC 9112 §6.1: chunked not last in a request.
        (
            "chunked not last",
            "POST /r/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        // RFC 9112 §6.3: an invalid Content-Length.
        (
            "two Content-Lengths",
            "POST /r/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        // RFC 9113 §8.2.2 / RFC 9112 §3: a request line that is not one.
        ("a bad request line", "GET  /r/a HTTP/1.1\r\nHost: a\r\n\r\n"),
    ];
    let mut failed = Vec::new();
    for (what, raw) in cases {
        let before = s.seen();
        let (text, closed) = s.send(raw)?;
        let (status, _) = first(&text);
        let reached = s.received(before);
        if status != 400 || !closed || !reached.is_empty() {
            failed.push(format!(
                "{what}: status {status}, closed {closed}, upstream saw {reached:?}"
            ));
        }
    }
    ensure!(failed.is_empty(), "{failed:#?}");
    Ok(())
}

/// What the gateway forwards: its own version, Via, Host from an
/// absolute-form target, field order, Max-Forwards, and no retry of a
/// non-idempotent request.
#[test]
fn forwarded_requests_carry_what_an_intermediary_must_send() -> anyhow::Result<()> {
    let s = Scene::start()?;

    // RFC 9110 §6.2 and §7.6.3: our own HTTP version, and Via with the version received.
    let before = s.seen();
    let (text, _) = s.send("GET /r/a HTTP/1.0\r\nHost: a\r\n\r\n")?;
    ensure!(first(&text).0 == 200, "{text}");
    let up = s.received(before).concat().to_ascii_lowercase();
    ensure!(
        up.starts_with("get /r/a http/1.1\r\n"),
        "the upstream gets our version: {up}"
    );
    ensure!(
        field_lines(&up, "via") == ["1.0 portcullis"],
        "Via names the version received: {up}"
    );

    // RFC 9112 §3.2.2: absolute-form; the target's authority replaces Host.
    let before = s.seen();
    let (text, _) =
        s.send("GET http://api.test/r/abs?q=1 HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")?;
    ensure!(first(&text).0 == 200, "{text}");
    let up = s.received(before).concat().to_ascii_lowercase();
    ensure!(
        up.starts_with("get /r/abs?q=1 http/1.1\r\n"),
        "origin-form upstream: {up}"
    );
    ensure!(
        field_lines(&up, "host") == ["api.test"],
        "Host from the target: {up}"
    );

    // RFC 9110 §5.3: field lines of one name keep their order.
    let before = s.seen();
    s.send("GET /r/a HTTP/1.1\r\nHost: a\r\nX-Multi: first\r\nX-Other: 1\r\nX-Multi: second\r\nConnection: close\r\n\r\n")?;
    let up = s.received(before).concat().to_ascii_lowercase();
    let multi = field_lines(&up, "x-multi").join(", ");
    ensure!(multi == "first, second", "order kept: {up}");

    // RFC 9110 §7.6.2: Max-Forwards on OPTIONS and TRACE.
    let before = s.seen();
    let (text, _) =
        s.send("OPTIONS /r/a HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n")?;
    ensure!(
        first(&text).0 == 200,
        "Max-Forwards 0: answered as the final recipient: {text}"
    );
    ensure!(
        field_lines(&first(&text).1, "date").len() == 1,
        "the gateway's own answer has a Date: {text}"
    );
    ensure!(s.received(before).is_empty(), "and not forwarded");
    let before = s.seen();
    s.send("OPTIONS /r/a HTTP/1.1\r\nHost: a\r\nMax-Forwards: 3\r\nConnection: close\r\n\r\n")?;
    let up = s.received(before).concat().to_ascii_lowercase();
    ensure!(field_lines(&up, "max-forwards") == ["2"], "decremented: {up}");

    // TRACE is never forwarded (it would reflect credentials and injected headers): 501.
    let before = s.seen();
    let (text, closed) = s.send("TRACE /r/a HTTP/1.1\r\nHost: a\r\nCookie: secret=1\r\n\r\n")?;
    ensure!(first(&text).0 == 501 && !text.contains("secret"), "TRACE: {text}");
    ensure!(!closed || text.contains("connection: close"), "{text}");
    ensure!(s.received(before).is_empty(), "TRACE reached the upstream");

    // CONNECT over HTTP/1.1 is no tunnel here (RFC 9110 §9.3.6): refused, not forwarded.
    let before = s.seen();
    let (text, _) = s.send("CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")?;
    let status = first(&text).0;
    ensure!((400..=501).contains(&status) && status != 200, "CONNECT: {text}");
    ensure!(s.received(before).is_empty(), "CONNECT reached the upstream");

    // RFC 9112 §3.2.4: OPTIONS * reaches the origin server as `*`.
    let before = s.seen();
    let (text, _) = s.send("OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")?;
    ensure!(first(&text).0 == 200, "OPTIONS *: {text}");
    let up = s.received(before).concat();
    ensure!(
        up.starts_with("OPTIONS * HTTP/1.1\r\n"),
        "OPTIONS * upstream: {up}"
    );

    // RFC 9112 §9.6: after `Connection: close`, no further request is processed.
    let before = s.seen();
    let (text, closed) = s.send(
        "GET /r/first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /r/second HTTP/1.1\r\nHost: a\r\n\r\n",
    )?;
    ensure!(closed && text.matches("HTTP/1.1 200").count() == 1, "{text}");
    let up = s.received(before);
    ensure!(up.len() == 1 && up[0].contains("/r/first"), "{up:?}");

    // RFC 9110 §9.2.2 / RFC 9112 §9.3.1: a POST the upstream dropped is not sent again.
    let before = s.seen();
    let (text, _) =
        s.send("POST /r/vanish HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")?;
    ensure!(first(&text).0 == 502, "{text}");
    ensure!(
        s.received(before).len() == 1,
        "the POST was retried: {:?}",
        s.received(before)
    );
    Ok(())
}

/// HTTP/1.0 clients: no 1xx, no chunked, Expect and Upgrade ignored (RFC 9110 §10.1.1, §15.2, §7.8; RFC 9112 §6.1).
#[test]
fn an_http10_client_gets_only_what_http10_can_read() -> anyhow::Result<()> {
    let s = Scene::start()?;
    let (text, _) = s.send("GET /r/hints HTTP/1.0\r\nHost: a\r\n\r\n")?;
    ensure!(
        !text.contains(" 103 ") && first(&text).0 == 200,
        "no 1xx to HTTP/1.0: {text}"
    );

    let (text, closed) = s.send("GET /r/chunked HTTP/1.0\r\nHost: a\r\n\r\n")?;
    let (status, head) = first(&text);
    ensure!(
        status == 200 && !head.contains("transfer-encoding"),
        "no Transfer-Encoding to HTTP/1.0: {text}"
    );
    ensure!(
        text.ends_with("\r\n\r\nok!!!") && closed,
        "the body de-chunked: {text:?}"
    );

    let (text, _) =
        s.send("POST /r/a HTTP/1.0\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")?;
    ensure!(
        !text.contains("100 Continue") && first(&text).0 == 200,
        "Expect ignored: {text}"
    );

    let before = s.seen();
    let (text, _) = s.send("GET /r/a HTTP/1.0\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")?;
    ensure!(first(&text).0 == 200, "{text}");
    let up = s.received(before).concat().to_ascii_lowercase();
    ensure!(!up.contains("upgrade"), "Upgrade from HTTP/1.0 ignored: {up}");
    Ok(())
}

/// Responses that break a rule, and what the client must get instead (RFC 9110 §5.3, §6.6.1, §15.2; RFC 9112 §5.1, §5.2, §6.3; RFC 9113 §8.2.2).
#[test]
fn upstream_responses_are_relayed_as_the_rfcs_require() -> anyhow::Result<()> {
    let s = Scene::start()?;
    let get = |name: &str| {
        s.send(&format!(
            "GET /r/{name} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ))
    };

    let (text, _) = get("no-date")?;
    let (_, head) = first(&text);
    ensure!(field_lines(&head, "date").len() == 1, "a Date added: {text}");

    let (text, _) = get("repeated")?;
    let (_, head) = first(&text);
    ensure!(
        field_lines(&head, "set-cookie") == ["a=1", "b=2"],
        "Set-Cookie lines kept apart: {text}"
    );
    ensure!(
        field_lines(&head, "x-multi").join(", ") == "first, second",
        "order kept: {text}"
    );

    let mut bad = HashMap::new();
    for name in ["space-before-colon", "folded"] {
        let (text, _) = get(name)?;
        let (status, head) = first(&text);
        let relayed_clean = status == 200 && !head.contains("x-a :") && !head.contains("\n 2");
        if status != 502 && !relayed_clean {
            bad.insert(name, text);
        }
    }
    for name in ["bad-length", "two-lengths"] {
        let (text, _) = get(name)?;
        if first(&text).0 != 502 {
            bad.insert(name, text);
        }
    }
    ensure!(bad.is_empty(), "{bad:#?}");

    // RFC 9112 §6.3: a body cut short is an incomplete message: the client's connection closes before it is whole.
    let (text, closed) = s.send("GET /r/short HTTP/1.1\r\nHost: a\r\n\r\n")?;
    ensure!(closed, "the client's connection closed");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    ensure!(
        first(&text).0 == 502 || body.len() < 100,
        "never a whole message: {text:?}"
    );

    // RFC 9110 §8.6, §15.3.5, §15.4.5, §9.3.2: no content after 204, 304 or a HEAD response; the next response follows at once.
    for (first_req, name) in [("GET", "no-content"), ("GET", "not-modified"), ("HEAD", "head")] {
        let mut conn = connect(&s.ns, "127.0.0.1:8080".parse()?)?;
        conn.write_all(
            format!("{first_req} /r/{name} HTTP/1.1\r\nHost: a\r\n\r\nGET /r/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        let parts: Vec<&str> = text.split("\r\n\r\n").collect();
        ensure!(
            parts.len() == 3 && parts[1].starts_with("HTTP/1.1 200") && parts[2] == "ok",
            "{name}: two responses, the first without content: {text:?}"
        );
        if name == "no-content" {
            ensure!(
                !parts[0].to_ascii_lowercase().contains("content-length"),
                "no Content-Length on 204: {text:?}"
            );
        }
    }

    // RFC 9110 §6.2: our own version to the client.
    let (text, _) = get("http10")?;
    ensure!(text.starts_with("HTTP/1.1 200"), "{text}");

    // RFC 9110 §7.6.1: the upstream's connection options and hop-by-hop fields stay on its hop.
    let (text, _) = get("hop-by-hop")?;
    let (_, head) = first(&text);
    for gone in ["x-hop", "keep-alive:", "proxy-connection", "upgrade"] {
        ensure!(!head.contains(gone), "{gone} relayed: {text}");
    }
    // RFC 9113 §8.2.2: and an HTTP/2 client gets the response without them.
    let (code, out, err) = curl(
        &s.ns,
        &[
            "--http2-prior-knowledge",
            "-i",
            "http://127.0.0.1:8080/r/hop-by-hop",
        ],
    )?;
    ensure!(
        code == 0 && out.starts_with("HTTP/2 200") && out.ends_with("ok"),
        "h2: {code} {out} {err}"
    );
    Ok(())
}
