//! A hostile HTTP/2 client no one here wrote the framing of: Python's
//! `hyperframe` and `hpack` (Debian's python3-h2 and its dependencies, run by
//! Debian's own `/usr/bin/python3`), sending exactly the frames a case names
//! over cleartext (h2c) and reporting what the gateway did: the first
//! `goaway CODE`, `rst CODE` or `status N` it sent, or `closed`.

use std::path::Path;

use anyhow::Context;

use crate::NetNs;

/// The cases: floods (`ping-flood`, `settings-flood`, `window-update-flood`, `rapid-reset`,
/// `empty-data`, `continuation`, `hpack-bomb`, `streams`) and conformance
/// cases named by their RFC 9113 section, each printing one line.
pub const SCRIPT: &str = r#"
import socket, sys, time
from hyperframe.frame import (Frame, DataFrame, HeadersFrame, RstStreamFrame, SettingsFrame,
    PingFrame, GoAwayFrame, WindowUpdateFrame, ContinuationFrame, PriorityFrame)
from hpack import Encoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HOST, PORT = sys.argv[2], int(sys.argv[3])
ARG = int(sys.argv[4]) if len(sys.argv) > 4 else 0
enc = Encoder()

def block(path="/hello", method="GET", extra=(), raw=None):
    if raw is not None:
        return raw
    fields = [(":method", method), (":scheme", "http"), (":authority", HOST), (":path", path)]
    return enc.encode(fields + list(extra))

def headers(sid, path="/hello", end=True, **kw):
    f = HeadersFrame(sid, block(path, **kw))
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()

def raw_frame(kind, flags, sid, payload):
    n = len(payload)
    return bytes([n >> 16 & 255, n >> 8 & 255, n & 255, kind, flags]) + sid.to_bytes(4, "big") + payload

def connect():
    s = socket.create_connection((HOST, PORT), timeout=10)
    s.sendall(PREFACE + SettingsFrame(0).serialize())
    return s

def read_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out

def frames(s, deadline=10):
    """Yields the gateway's frames until it closes or goes quiet."""
    s.settimeout(deadline)
    try:
        while True:
            head = read_exact(s, 9)
            frame, length = Frame.parse_frame_header(head)
            frame.parse_body(memoryview(read_exact(s, length)))
            yield frame
    except (EOFError, socket.timeout, ConnectionResetError):
        return

def outcome(s, stream=None):
    """The first refusal (or response) the gateway sends, for `stream` if given."""
    from hpack import Decoder
    dec = Decoder()
    for f in frames(s):
        if isinstance(f, GoAwayFrame):
            return "goaway %d" % f.error_code
        if isinstance(f, RstStreamFrame) and stream in (None, f.stream_id):
            return "rst %d" % f.error_code
        if isinstance(f, HeadersFrame):
            fields = dict(dec.decode(f.data))
            if stream in (None, f.stream_id):
                return "status %s" % fields.get(":status")
    return "closed"

def flood(payload_frames, stream=None):
    s = connect()
    try:
        s.sendall(b"".join(payload_frames))
    except (BrokenPipeError, ConnectionResetError):
        pass
    return outcome(s, stream)

def ping_flood():
    return flood(PingFrame(0, b"12345678").serialize() for _ in range(ARG))

def window_update_flood():
    return flood(WindowUpdateFrame(0, window_increment=1).serialize() for _ in range(ARG))

def settings_flood():
    return flood(SettingsFrame(0).serialize() for _ in range(ARG))

def rapid_reset():
    out = []
    for i in range(ARG):
        sid = 1 + 2 * i
        out.append(headers(sid))
        out.append(RstStreamFrame(sid, error_code=8).serialize())
    return flood(out)

def reset_after_accept():
    """ARG slow requests, reset once the gateway took them; then one more request."""
    s = connect()
    s.sendall(b"".join(headers(1 + 2 * i, "/slow/3000") for i in range(ARG)))
    time.sleep(0.5)
    s.sendall(b"".join(RstStreamFrame(1 + 2 * i, error_code=8).serialize() for i in range(ARG)))
    last = 1 + 2 * ARG
    s.sendall(headers(last))
    return outcome(s, last)

def empty_data():
    return flood([headers(1, "/sink", end=False, method="POST")] +
                 [DataFrame(1, b"").serialize() for _ in range(ARG)])

def continuation():
    first = HeadersFrame(1, block())
    out = [first.serialize()]
    filler = enc.encode([("x-filler", "a" * 8000)])
    for _ in range(ARG):
        out.append(ContinuationFrame(1, filler).serialize())
    return flood(out, stream=1)

def hpack_bomb():
    big = enc.encode([("x-bomb", "a" * 4000)])
    refs = bytes([0x80 | 62]) * ARG
    f = HeadersFrame(1, block() + big + refs)
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    return flood([f.serialize()], stream=1)

def streams():
    s = connect()
    s.sendall(b"".join(headers(1 + 2 * i, "/slow/1500") for i in range(ARG)))
    refused = answered = 0
    from hpack import Decoder
    dec = Decoder()
    for f in frames(s, 5):
        if isinstance(f, RstStreamFrame) and f.error_code == 7:
            refused += 1
        elif isinstance(f, HeadersFrame):
            dec.decode(f.data)
            answered += 1
        if refused + answered == ARG:
            break
    return "refused %d answered %d" % (refused, answered)

def websocket():
    """RFC 8441: a WebSocket over an extended CONNECT stream; one text message echoed."""
    import os
    from hpack import Decoder
    s = connect()
    path = sys.argv[5] if len(sys.argv) > 5 else "/"
    f = HeadersFrame(1, enc.encode([(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                                    (":path", path), (":authority", HOST), ("sec-websocket-version", "13")]))
    f.flags.add("END_HEADERS")
    dec = Decoder()
    enabled = False
    status = None
    got = b""
    sent = False
    message = b"hello over h2"
    for fr in frames(s, 5):
        if isinstance(fr, SettingsFrame) and 0x8 in fr.settings:
            enabled = fr.settings[0x8] == 1
        if isinstance(fr, SettingsFrame) and "ACK" not in fr.flags and not sent:
            s.sendall(SettingsFrame(0, flags=["ACK"]).serialize() + f.serialize())
            sent = True
        if isinstance(fr, HeadersFrame) and fr.stream_id == 1:
            status = dict(dec.decode(fr.data)).get(":status")
            if status != "200":
                break
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(message))
            s.sendall(DataFrame(1, bytes([0x81, 0x80 | len(message)]) + mask + payload).serialize())
        if isinstance(fr, DataFrame) and fr.stream_id == 1:
            got += fr.data
            if len(got) >= 2 + len(message):
                break
        if isinstance(fr, (RstStreamFrame, GoAwayFrame)):
            break
    echoed = got[2:2 + len(message)] == message and got[0] == 0x81
    return "connect-protocol %d status %s echo %s" % (enabled, status, "ok" if echoed else repr(got))

def huge(n):
    return b"a" * n

CASES = {
    "valid": lambda: flood([headers(1)], 1),
    "3.5-bad-preface": lambda: (lambda s: (s.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), outcome(s))[1])(
        socket.create_connection((HOST, PORT), timeout=10)),
    "4.2-data-over-max-frame-size": lambda: flood([headers(1, "/sink", end=False, method="POST"),
                                                    raw_frame(0, 0, 1, huge(16385))]),
    "5.1-data-on-idle-stream": lambda: flood([DataFrame(1, b"x").serialize()]),
    "5.1.1-even-stream-id": lambda: flood([headers(2)]),
    "5.1.1-decreasing-stream-id": lambda: flood([headers(5), headers(3)]),
    "6.1-data-on-stream-0": lambda: flood([raw_frame(0, 0, 0, b"x")]),
    "6.2-headers-on-stream-0": lambda: flood([raw_frame(1, 5, 0, block())]),
    "6.4-rst-on-stream-0": lambda: flood([raw_frame(3, 0, 0, b"\0\0\0\x08")]),
    "6.4-rst-bad-length": lambda: flood([headers(1, "/slow/1000"), raw_frame(3, 0, 1, b"\0\0\x08")]),
    "6.5-settings-ack-with-payload": lambda: flood([raw_frame(4, 1, 0, b"\0\x03\0\0\0\x01")]),
    "6.5-settings-on-stream-1": lambda: flood([raw_frame(4, 0, 1, b"")]),
    "6.5-settings-bad-length": lambda: flood([raw_frame(4, 0, 0, b"\0\x03\0")]),
    "6.5.2-enable-push-2": lambda: flood([raw_frame(4, 0, 0, b"\0\x02\0\0\0\x02")]),
    "6.5.2-initial-window-too-large": lambda: flood([raw_frame(4, 0, 0, b"\0\x04\x80\0\0\0")]),
    "6.5.2-max-frame-size-too-small": lambda: flood([raw_frame(4, 0, 0, b"\0\x05\0\0\x3f\xff")]),
    "6.7-ping-bad-length": lambda: flood([raw_frame(6, 0, 0, b"1234567")]),
    "6.7-ping-on-stream-1": lambda: flood([raw_frame(6, 0, 1, b"12345678")]),
    "6.8-goaway-on-stream-1": lambda: flood([raw_frame(7, 0, 1, b"\0\0\0\0\0\0\0\0")]),
    "6.9-window-update-0-on-connection": lambda: flood([raw_frame(8, 0, 0, b"\0\0\0\0")]),
    "6.9-window-update-0-on-stream": lambda: flood([headers(1, "/slow/1000"), raw_frame(8, 0, 1, b"\0\0\0\0")], 1),
    "6.9.1-connection-window-overflow": lambda: flood([raw_frame(8, 0, 0, b"\x7f\xff\xff\xff")] * 2),
    "6.10-continuation-without-headers": lambda: flood([raw_frame(9, 4, 1, block())]),
    "8.1.2-uppercase-field-name": lambda: flood([headers(1, extra=[("X-Upper", "1")])], 1),
    "8.1.2.1-unknown-pseudo-field": lambda: flood([headers(1, extra=[(":foo", "1")])], 1),
    "8.1.2.1-pseudo-after-regular": lambda: flood([headers(1, raw=enc.encode(
        [(":method", "GET"), (":scheme", "http"), ("x-a", "1"), (":path", "/hello"), (":authority", HOST)]))], 1),
    "8.1.2.2-connection-field": lambda: flood([headers(1, extra=[("connection", "keep-alive")])], 1),
    "8.1.2.2-te-not-trailers": lambda: flood([headers(1, extra=[("te", "gzip")])], 1),
    "8.1.2.3-no-method": lambda: flood([headers(1, raw=enc.encode(
        [(":scheme", "http"), (":path", "/hello"), (":authority", HOST)]))], 1),
    "8.1.2.3-empty-path": lambda: flood([headers(1, raw=enc.encode(
        [(":method", "GET"), (":scheme", "http"), (":path", ""), (":authority", HOST)]))], 1),
    "8.1.2.6-content-length-mismatch": lambda: flood([headers(1, "/sink", end=False, method="POST",
        extra=[("content-length", "10")]), raw_frame(0, 1, 1, b"12345")], 1),
}

part = sys.argv[1]
fn = {"ping-flood": ping_flood, "settings-flood": settings_flood,
      "window-update-flood": window_update_flood, "rapid-reset": rapid_reset,
      "empty-data": empty_data, "continuation": continuation, "hpack-bomb": hpack_bomb,
      "streams": streams, "websocket": websocket, "reset-after-accept": reset_after_accept}.get(part) or CASES[part]
print(fn(), flush=True)
"#;

/// The conformance cases the script knows, in its order.
pub const CONFORMANCE: &[&str] = &[
    "valid",
    "3.5-bad-preface",
    "4.2-data-over-max-frame-size",
    "5.1-data-on-idle-stream",
    "5.1.1-even-stream-id",
    "5.1.1-decreasing-stream-id",
    "6.1-data-on-stream-0",
    "6.2-headers-on-stream-0",
    "6.4-rst-on-stream-0",
    "6.4-rst-bad-length",
    "6.5-settings-ack-with-payload",
    "6.5-settings-on-stream-1",
    "6.5-settings-bad-length",
    "6.5.2-enable-push-2",
    "6.5.2-initial-window-too-large",
    "6.5.2-max-frame-size-too-small",
    "6.7-ping-bad-length",
    "6.7-ping-on-stream-1",
    "6.8-goaway-on-stream-1",
    "6.9-window-update-0-on-connection",
    "6.9-window-update-0-on-stream",
    "6.9.1-connection-window-overflow",
    "6.10-continuation-without-headers",
    "8.1.2-uppercase-field-name",
    "8.1.2.1-unknown-pseudo-field",
    "8.1.2.1-pseudo-after-regular",
    "8.1.2.2-connection-field",
    "8.1.2.2-te-not-trailers",
    "8.1.2.3-no-method",
    "8.1.2.3-empty-path",
    "8.1.2.6-content-length-mismatch",
];

/// Runs one case against the h2c listener `host:port` in `ns`; what the gateway did.
pub fn case(ns: &NetNs, dir: &Path, name: &str, host: &str, port: u16, arg: u64) -> anyhow::Result<String> {
    case_on(ns, dir, name, (host, port), arg, "/")
}

/// Runs one case against `path` on the h2c listener `host:port` in `ns`.
pub fn case_on(
    ns: &NetNs,
    dir: &Path,
    name: &str,
    (host, port): (&str, u16),
    arg: u64,
    path: &str,
) -> anyhow::Result<String> {
    let script = dir.join("h2.py");
    std::fs::write(&script, SCRIPT)?;
    let out = ns
        .command("/usr/bin/python3")
        .arg(&script)
        .args([name, host, &port.to_string(), &arg.to_string(), path])
        .output()
        .context("running /usr/bin/python3 (Debian's, with python3-h2)")?;
    anyhow::ensure!(
        out.status.success(),
        "case {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
