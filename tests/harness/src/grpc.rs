//! gRPC peers no one here wrote: Python `grpcio` (Debian's python3-grpcio,
//! run by Debian's own `/usr/bin/python3`) as the upstream server and the
//! client, with raw-bytes methods so no generated code is needed.

use std::path::Path;

use anyhow::{Context, ensure};

use crate::NetNs;
use crate::ws::Py;

/// `serve PORT [CERT KEY]` runs `demo.Echo` (Unary, ServerStream,
/// ClientStream, Bidi, Fail, Slow, Peer); `call TARGET CASE [CA NAME]` runs
/// one call and prints what came back.
pub const SCRIPT: &str = r#"
import sys, time
from concurrent import futures
import grpc

ident = lambda b: b

def unary(req, ctx):
    ctx.set_trailing_metadata((("x-echo-trailer", "seen"),))
    return b"echo:" + req

def server_stream(req, ctx):
    for i in range(int(req)):
        yield b"item %d" % i

def client_stream(reqs, ctx):
    return b"+".join(reqs)

def bidi(reqs, ctx):
    for r in reqs:
        yield b"re:" + r

def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such order")

def slow(req, ctx):
    time.sleep(2)
    return b"late"

def peer(req, ctx):
    md = dict(ctx.invocation_metadata())
    return ("%s|%s" % (md.get("x-forwarded-for", "-"), md.get("via", "-"))).encode()

def serve(port, cert=None, key=None):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, ident, ident),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, ident, ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, ident, ident),
        "Peer": grpc.unary_unary_rpc_method_handler(peer, ident, ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", handlers),))
    if cert:
        creds = grpc.ssl_server_credentials(((open(key, "rb").read(), open(cert, "rb").read()),))
        server.add_secure_port("127.0.0.1:%s" % port, creds)
    else:
        server.add_insecure_port("127.0.0.1:%s" % port)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()

def call(target, case, ca=None, name=None):
    if ca:
        opts = (("grpc.ssl_target_name_override", name),) if name else ()
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(open(ca, "rb").read()), opts)
    else:
        channel = grpc.insecure_channel(target)
    m = lambda kind, name: getattr(channel, kind)("/demo.Echo/" + name, request_serializer=ident, response_deserializer=ident)
    try:
        if case == "unary":
            resp, call = m("unary_unary", "Unary").with_call(b"hello", timeout=10)
            trailers = dict(call.trailing_metadata())
            return "%s %s" % (resp.decode(), trailers.get("x-echo-trailer"))
        if case == "server-stream":
            return ",".join(r.decode() for r in m("unary_stream", "ServerStream")(b"5", timeout=10))
        if case == "client-stream":
            return m("stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=10).decode()
        if case == "bidi":
            # Each reply must come back before the next message is sent: a
            # proxy that waits for the whole request body would hang here.
            import queue
            q = queue.Queue()
            def gen():
                for word in (b"one", b"two", b"three"):
                    yield word
                    got.append(q.get(timeout=5))
            got = []
            for r in m("stream_stream", "Bidi")(gen(), timeout=10):
                q.put(r)
            return ",".join(g.decode() for g in got)
        if case == "big":
            payload = bytes(range(256)) * 4096
            resp = m("unary_unary", "Unary")(payload, timeout=20)
            return "ok %d" % len(resp) if resp == b"echo:" + payload else "mismatch"
        if case == "fail":
            m("unary_unary", "Fail")(b"x", timeout=10)
        if case == "slow":
            m("unary_unary", "Slow")(b"x", timeout=0.5)
        if case == "peer":
            return m("unary_unary", "Peer")(b"x", timeout=10).decode()
        return "no error"
    except grpc.RpcError as e:
        return "status %d %s" % (e.code().value[0], e.details())

part = sys.argv[1]
if part == "serve":
    serve(*sys.argv[2:])
else:
    print(call(*sys.argv[2:]), flush=True)
"#;

/// Starts the `demo.Echo` server on `port` in `ns` (TLS with `cert` and `key`).
pub fn serve(ns: &NetNs, dir: &Path, port: u16, tls: Option<(&Path, &Path)>) -> anyhow::Result<Py> {
    let script = dir.join("grpc_peer.py");
    std::fs::write(&script, SCRIPT)?;
    let port = port.to_string();
    let mut args = vec!["serve".to_owned(), port];
    if let Some((cert, key)) = tls {
        args.push(cert.display().to_string());
        args.push(key.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Py::start_script(ns, &script, &args)?;
    let line = server.line()?;
    ensure!(line == "ready", "the gRPC server started: {line}");
    Ok(server)
}

/// Runs one call `case` against `target` in `ns` (TLS trusting `ca`, checking `name`); what came back.
pub fn call(
    ns: &NetNs,
    dir: &Path,
    target: &str,
    case: &str,
    tls: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    let script = dir.join("grpc_peer.py");
    std::fs::write(&script, SCRIPT)?;
    let mut cmd = ns.command("/usr/bin/python3");
    cmd.arg(&script).args(["call", target, case]);
    if let Some((ca, name)) = tls {
        cmd.args([ca, name]);
    }
    let out = cmd
        .output()
        .context("running /usr/bin/python3 (Debian's, with python3-grpcio)")?;
    ensure!(
        out.status.success(),
        "grpc call {case}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
