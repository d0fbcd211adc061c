//! WebSocket peers no one here wrote: Python `websockets` (Debian's
//! python3-websockets, run by Debian's own `/usr/bin/python3`) as the echo
//! server and the clients of the tests and the demo.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use anyhow::{Context, bail};

use crate::NetNs;

/// The echo server (`serve [PORT]`, 9000 by default) and the clients
/// (`PART URI [CA [HOST]]`), one script; the first argument picks the part.
pub const SCRIPT: &str = r#"
import asyncio, os, ssl, sys, time
import websockets

def context(ca):
    """Trusts `ca`; checks the name only when the client is given one (HOST)."""
    if not ca:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = HOST is not None
    return ctx

async def serve(port):
    count = 0
    # With WS_TAG, quiet: a handshake without that header (one the policies
    # did not tag) is closed with 4403, which the soak client counts.
    tag = os.environ.get("WS_TAG")
    async def echo(ws, path=None):
        nonlocal count
        count += 1
        if tag:
            if ws.request_headers.get(tag) is None:
                await ws.close(4403, "untagged")
                return
        else:
            print(f"connection {count} {ws.request_headers.get('x-forwarded-for', '-')}", flush=True)
        try:
            async for message in ws:
                await ws.send(message)
        except websockets.ConnectionClosed:
            pass
    async with websockets.serve(echo, "127.0.0.1", port, max_size=None, ping_interval=None):
        print("ready", flush=True)
        await asyncio.Future()

async def echo(uri, ca):
    # Without permessage-deflate, so the bytes carried are the message's own.
    async with websockets.connect(uri, ssl=context(ca), server_hostname=HOST if ca else None, max_size=None, ping_interval=None, compression=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        big = os.urandom(1 << 20)
        await ws.send(big)
        assert await ws.recv() == big, "1 MiB binary echoed whole"
    print("ok", flush=True)

async def status(uri, ca):
    try:
        async with websockets.connect(uri, ssl=context(ca), server_hostname=HOST if ca else None, ping_interval=None):
            print("opened", flush=True)
    except websockets.InvalidStatusCode as e:
        print(f"status {e.status_code}", flush=True)

async def idle(uri, ca):
    async with websockets.connect(uri, ssl=context(ca), server_hostname=HOST if ca else None, ping_interval=None) as ws:
        await ws.send("once")
        await ws.recv()
        started = time.monotonic()
        try:
            await asyncio.wait_for(ws.recv(), 20)
            print("message", flush=True)
        except websockets.ConnectionClosed:
            print(f"closed after {time.monotonic() - started:.1f}", flush=True)

async def busy(uri, ca):
    async with websockets.connect(uri, ssl=context(ca), server_hostname=HOST if ca else None, ping_interval=None) as ws:
        started = time.monotonic()
        try:
            while time.monotonic() - started < 20:
                await ws.send("tick")
                await ws.recv()
                await asyncio.sleep(0.2)
            print("still open", flush=True)
        except websockets.ConnectionClosed:
            print(f"closed after {time.monotonic() - started:.1f}", flush=True)

async def hold(uri, ca):
    async with websockets.connect(uri, ssl=context(ca), server_hostname=HOST if ca else None, ping_interval=None) as ws:
        await ws.send("first")
        await ws.recv()
        print("open", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        try:
            await ws.send("after")
            print("echoed" if await asyncio.wait_for(ws.recv(), 5) == "after" else "wrong", flush=True)
        except websockets.ConnectionClosed:
            print("closed", flush=True)

async def soak(uri, seconds):
    # Connect, echo three messages, close; again until SECONDS pass. Basic
    # credentials from WS_AUTH. Prints `ok N failed N untagged N`.
    ok = failed = untagged = 0
    headers = {"Authorization": "Basic " + os.environ["WS_AUTH"]} if os.environ.get("WS_AUTH") else {}
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        try:
            async with websockets.connect(uri, extra_headers=headers, ping_interval=None, open_timeout=3, close_timeout=2) as ws:
                for i in range(3):
                    await ws.send(f"m{i}")
                    if await asyncio.wait_for(ws.recv(), 3) != f"m{i}":
                        raise ValueError("echoed wrong")
            ok += 1
        except websockets.ConnectionClosed as e:
            if e.code == 4403:
                untagged += 1
            else:
                failed += 1
            await asyncio.sleep(0.05)
        except Exception:
            failed += 1
            await asyncio.sleep(0.05)
    print(f"ok {ok} failed {failed} untagged {untagged}", flush=True)

part = sys.argv[1]
args = sys.argv[2:] + [None] * 3
HOST = args[2]
asyncio.run(serve(int(args[0] or 9000)) if part == "serve" else globals()[part](args[0], args[1]))
"#;

/// A Python process in the namespace, killed (by its pid) on drop.
#[derive(Debug)]
pub struct Py {
    child: Child,
    out: BufReader<ChildStdout>,
    stdin: Option<ChildStdin>,
}

impl Py {
    /// Runs the script's `args[0]` part in `ns`, from a copy of the script in `dir`.
    pub fn start(ns: &NetNs, dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let script = dir.join("ws.py");
        std::fs::write(&script, SCRIPT)?;
        Self::start_script(ns, &script, args)
    }

    /// Runs `script` with `args` in `ns`.
    pub fn start_script(ns: &NetNs, script: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_script_env(ns, script, args, &[])
    }

    /// Like [`Py::start_script`], with environment variables `env` set.
    pub fn start_script_env(
        ns: &NetNs,
        script: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = ns
            .command("/usr/bin/python3")
            .arg(script)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting /usr/bin/python3 (Debian's, with the python3- packages the tests install)")?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        let stdin = child.stdin.take();
        Ok(Self { child, out, stdin })
    }

    /// The next line it prints; an error if it exits first.
    pub fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.out.read_line(&mut line)? == 0 {
            bail!("python exited: {:?}", self.child.wait()?);
        }
        Ok(line.trim_end().to_owned())
    }

    /// Lets a `hold` client go on.
    pub fn tell(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one client part (`echo`, `status`, `idle`, `busy`) to its first line.
pub fn client(
    ns: &NetNs,
    dir: &Path,
    part: &str,
    uri: &str,
    tls: Option<(&str, Option<&str>)>,
) -> anyhow::Result<String> {
    let mut args = vec![part, uri];
    if let Some((ca, host)) = tls {
        args.push(ca);
        args.extend(host);
    }
    Py::start(ns, dir, &args)?.line()
}
