//! Differential framing, in the spirit of HTTP Garden: request heads and
//! bodies a smuggler would send (conflicting `Content-Length` and
//! `Transfer-Encoding`, odd chunk sizes, bare line ends, folded fields) and
//! seeded random mutations of them go through `portcullis run`, each
//! followed on the same connection by a canary request. An upstream that
//! records the raw bytes it receives parses them strictly. Whatever the
//! client sent, the upstream's bytes split into whole, well-framed requests
//! (no leftover, no parse error) and never contain a request that was hidden
//! in a body: the gateway either refused the input or framed it as it read it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use portcullis_tests::http::{GatewayProcess, TempDir, api_instance, connect, strict_settings};
use portcullis_tests::{NetNs, Rng};

/// What the upstream made of its bytes: request paths, and the streams it could not frame.
#[derive(Debug, Default)]
struct Seen {
    paths: Vec<String>,
    desyncs: Vec<String>,
}

/// Whether a `Transfer-Encoding` is registered codings ending in one `chunked`
/// (RFC 9112 §6.1), as the gateway sends it: lowercase, one space apart.
fn chunked_last(te: &str) -> bool {
    let codings: Vec<&str> = te.split(',').map(str::trim).collect();
    codings.last() == Some(&"chunked")
        && codings.iter().filter(|c| **c == "chunked").count() == 1
        && codings
            .iter()
            .all(|c| ["chunked", "gzip", "x-gzip", "deflate", "compress", "x-compress"].contains(c))
}

/// One request read strictly from `r`: its path; `None` at the end of the
/// stream, or when the stream ends inside a body (the gateway gave up on a
/// request and closed: cut short, it is no request); or why the bytes are not
/// a well-framed request.
fn read_request(r: &mut BufReader<TcpStream>) -> Result<Option<String>, String> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(format!("closed mid-head: {head:?}"))
            };
        }
        if !line.ends_with(b"\r\n") {
            return Err(format!("a line without CRLF: {line:?}"));
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        other => {
            return Err(format!(
                "not one head ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ));
        }
    }
    let field = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    let value = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    if field("content-length") > 1 || field("transfer-encoding") > 1 {
        return Err("repeated framing fields".into());
    }
    match (value("content-length"), value("transfer-encoding")) {
        (Some(_), Some(_)) => return Err("both Content-Length and Transfer-Encoding".into()),
        (Some(n), None) => {
            let n: usize = n.parse().map_err(|_| format!("Content-Length {n:?}"))?;
            let mut body = vec![0u8; n];
            if r.read_exact(&mut body).is_err() {
                return Ok(None);
            }
        }
        (None, Some(te)) if chunked_last(&te) => loop {
            let mut size = String::new();
            if r.read_line(&mut size).map_err(|e| e.to_string())? == 0 || !size.ends_with('\n') {
                // The gateway gave up on the body mid-way and closed: a request cut short, never completed.
                return Ok(None);
            }
            let digits = size.strip_suffix("\r\n").ok_or("a chunk size without CRLF")?;
            let n = usize::from_str_radix(digits, 16).map_err(|_| format!("chunk size {digits:?}"))?;
            let mut chunk = vec![0u8; n + 2];
            if r.read_exact(&mut chunk).is_err() {
                return Ok(None);
            }
            if !chunk.ends_with(b"\r\n") {
                return Err("a chunk without CRLF".into());
            }
            if n == 0 {
                break;
            }
        },
        (None, Some(te)) => return Err(format!("Transfer-Encoding {te:?}")),
        (None, None) => {}
    }
    Ok(Some(req.path.unwrap_or("").to_owned()))
}

/// An upstream in `ns` that frames what it receives strictly and answers each request.
fn recording_upstream(ns: &NetNs) -> anyhow::Result<Arc<Mutex<Seen>>> {
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:9000"))??;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let record = record.clone();
            std::thread::spawn(move || {
                let Ok(mut out) = conn.try_clone() else { return };
                let mut r = BufReader::new(conn);
                loop {
                    match read_request(&mut r) {
                        Ok(Some(path)) => {
                            record.lock().expect("seen").paths.push(path);
                            if out
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(why) => {
                            record.lock().expect("seen").desyncs.push(why);
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(seen)
}

/// Requests a smuggler sends, each hiding `GET /smuggled` where a gateway that frames differently would find it.
fn smuggling_cases() -> Vec<Vec<u8>> {
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    // Each case's paths are made its own (`/m-N`, `/smuggled-N`) when it is sent.
    let framings = [
        "Content-Length: 6\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 6",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding:  chunked",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: identity, chunked",
        "Transfer-Encoding: Chunked",
        "Transfer-Encoding: chunked\t",
        "Transfer-Encoding:\r\n chunked",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: +5",
        "Content-Length: 5 ",
        "Content-Length: 0x5",
        "Content-Length: 5,5",
        "Content-Length: -1",
        "Content-Length: 99999999999999999999",
        "Content-Length:5",
        "Content-Length: 5\nX: y",
        "Content-Length: 5\rX: y",
        "X: a\0b\r\nContent-Length: 5",
    ];
    let mut cases: Vec<Vec<u8>> = framings
        .iter()
        .map(|f| format!("POST /m HTTP/1.1\r\nHost: a\r\n{f}\r\n\r\n0\r\n\r\n{hidden}").into_bytes())
        .collect();
    for size in [
        "6;ext=1",
        "0x6",
        " 6",
        "6 ",
        "00000006",
        "ffffffffffffffffffff",
        "6\n",
        "-6",
    ] {
        cases.push(
            format!("POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabcdef\r\n0\r\n\r\n{hidden}")
                .into_bytes(),
        );
    }
    cases.push(
        format!("POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: {hidden}\r\n\r\n")
            .into_bytes(),
    );
    cases.push(
        format!(
            "GET /m HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        )
        .into_bytes(),
    );
    cases.push(
        format!("POST /m HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}")
            .into_bytes(),
    );
    cases.push(
        format!(
            "POST /m HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody{hidden}"
        )
        .into_bytes(),
    );
    cases
}

/// `n` seeded mutations of the cases: bytes inserted, replaced or removed where framing is decided.
fn mutations(cases: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
    let alphabet = b"\r\n \t:0a;,\0-xX";
    let mut rng = Rng(0x5eed_f4a1);
    (0..n)
        .map(|i| {
            let mut case = cases[i % cases.len()].clone();
            for _ in 0..=rng.below(3) {
                let at = rng.below(u32::try_from(case.len()).unwrap_or(u32::MAX)) as usize;
                let byte = alphabet[rng.below(u32::try_from(alphabet.len()).unwrap_or(1)) as usize];
                match rng.below(3) {
                    0 => case.insert(at, byte),
                    1 => case[at] = byte,
                    _ => {
                        case.remove(at);
                    }
                }
            }
            case
        })
        .collect()
}

/// `case` with its paths made its own: `/m` → `/m-i`, `/smuggled` → `/smuggled-i`.
fn own_paths(case: &[u8], i: usize) -> Vec<u8> {
    String::from_utf8_lossy(case)
        .replace("/m ", &format!("/m-{i} "))
        .replace("/smuggled ", &format!("/smuggled-{i} "))
        .into_bytes()
}

/// Sends `case` and a canary on one connection; the bytes the gateway answered.
fn exchange(ns: &NetNs, case: &[u8], canary: &str) -> anyhow::Result<Vec<u8>> {
    let mut conn = connect(ns, "127.0.0.1:8080".parse()?)?;
    conn.set_nodelay(true)?;
    let mut sent = case.to_vec();
    sent.extend_from_slice(format!("GET {canary} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
    conn.write_all(&sent)?;
    conn.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(got)
}

#[test]
fn every_forwarded_request_is_one_well_framed_request_at_the_upstream() -> anyhow::Result<()> {
    let ns = NetNs::new("fr")?;
    let dir = TempDir::new("fr")?;
    let seen = recording_upstream(&ns)?;
    dir.write(
        "gateway.yaml",
        &format!(
            "{}{}",
            strict_settings("fr"),
            api_instance("any", "http://127.0.0.1:8080/", "http://127.0.0.1:9000/", "")
        ),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let cases = smuggling_cases();
    let mut all = cases.clone();
    all.extend(mutations(&cases, 150));
    let (mut refused, mut forwarded) = (0, 0);
    let mut upstream_saw: Vec<(usize, String)> = Vec::new();
    for (i, case) in all.iter().enumerate() {
        let case = own_paths(case, i);
        let before = seen.lock().map_or(0, |s| s.paths.len());
        let answer = exchange(&ns, &case, &format!("/canary-{i}"))?;
        let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        ensure!(
            s.desyncs.is_empty(),
            "case {i} {:?} reached the upstream badly framed: {:?}",
            String::from_utf8_lossy(&case),
            s.desyncs
        );
        let new = &s.paths[before..];
        if new.is_empty() {
            refused += 1;
            ensure!(
                // 4xx, or 501 for a transfer coding it does not know (RFC 9112 §6.1).
                answer.is_empty()
                    || [
                        b"HTTP/1.1 4".as_slice(),
                        b"HTTP/1.0 4",
                        b"HTTP/1.1 501",
                        b"HTTP/1.0 501"
                    ]
                    .iter()
                    .any(|p| answer.starts_with(p)),
                "case {i}: nothing forwarded, yet answered {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(80)])
            );
        } else {
            forwarded += 1;
        }
        upstream_saw.extend(new.iter().map(|p| (i, p.clone())));
    }
    // Every request the upstream read is one the gateway read and forwarded:
    // none was cut out of a body the gateway framed otherwise.
    std::thread::sleep(Duration::from_millis(500));
    let mut forwarded_paths: HashMap<String, usize> = HashMap::new();
    for line in gw
        .log_text()
        .lines()
        .filter(|l| l.contains(" access:") && l.contains("status=200"))
    {
        if let Some(path) = line.split(" path=").nth(1).and_then(|r| r.split(' ').next()) {
            *forwarded_paths
                .entry(path.trim_matches('"').to_owned())
                .or_default() += 1;
        }
    }
    for (i, path) in &upstream_saw {
        let left = forwarded_paths.get_mut(path).filter(|n| **n > 0);
        ensure!(
            left.is_some(),
            "case {i} {:?}: the upstream read {path}, which the gateway never forwarded",
            String::from_utf8_lossy(&own_paths(&all[*i], *i))
        );
        if let Some(n) = left {
            *n -= 1;
        }
    }
    eprintln!(
        "{} inputs: {forwarded} forwarded (framed as the gateway read them), {refused} refused",
        all.len()
    );
    Ok(())
}
