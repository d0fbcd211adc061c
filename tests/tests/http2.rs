//! HTTP/2 to clients end to end, with clients no one here wrote: curl
//! (`--http2` by ALPN over TLS, `--http2-prior-knowledge` for h2c), h2load
//! (nghttp2) for many streams over few connections, and Python's hyperframe
//! and hpack for the floods and the conformance cases, through
//! `portcullis run` in a fresh namespace, to an HTTP/1.1 upstream.

use anyhow::{Context, ensure};
use portcullis_tests::NetNs;
use portcullis_tests::h2::{self, CONFORMANCE};
use portcullis_tests::http::{
    GatewayProcess, Pki, TempDir, Upstream, api_instance, curl, strict_settings, tls_binding,
};

const H2C: &str = "  http2:\n    cleartext: true\n";

/// A namespace with the upstream on :9000 and the gateway running `resources`.
struct Scene {
    ns: NetNs,
    dir: TempDir,
    up: Upstream,
    gw: GatewayProcess,
    _pki_dir: TempDir,
    ca: String,
}

fn scene(resources: impl FnOnce(&Pki) -> anyhow::Result<String>) -> anyhow::Result<Scene> {
    let ns = NetNs::new("h2")?;
    let dir = TempDir::new("h2")?;
    let pki_dir = TempDir::new("h2p")?;
    let pki = Pki::new(&pki_dir.0, "h2")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!("{}{}", strict_settings("h2"), resources(&pki)?),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    Ok(Scene {
        ns,
        dir,
        up,
        gw,
        ca: pki.ca.display().to_string(),
        _pki_dir: pki_dir,
    })
}

fn api(name: &str, address: &str, extra: &str) -> String {
    api_instance(name, address, "http://127.0.0.1:9000/", extra)
}

impl Scene {
    /// curl over TLS to h2.test:8443 with `args`; its output.
    fn tls(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["--cacert", &self.ca, "--resolve", "h2.test:8443:127.0.0.1"];
        all.extend_from_slice(args);
        let (code, out, err) = curl(&self.ns, &all)?;
        ensure!(code == 0, "curl {args:?}: {code} {err}");
        Ok(out)
    }

    fn metrics(&self) -> anyhow::Result<String> {
        Ok(curl(&self.ns, &["http://127.0.0.1:9901/metrics"])?.1)
    }

    fn case(&self, name: &str, arg: u64) -> anyhow::Result<String> {
        h2::case(&self.ns, &self.dir.0, name, "127.0.0.1", 8080, arg)
    }
}

const SHOW: &str = "%{http_version} %{http_code} %{size_download}\\n";

fn standard() -> anyhow::Result<Scene> {
    let locked = "  policies:\n    - policyRef:\n        name: ip-blocklist-flex\n      config:\n        ips: [127.0.0.1]\n";
    let gated = "  policies:\n    - policyRef:\n        name: client-id-enforcement-flex\n";
    scene(|pki| {
        let leaf = pki.issue("gw", &["h2.test"], false)?;
        Ok(format!(
            "{}{}{}{}{}",
            api("orders", "https://0.0.0.0:8443/", ""),
            api("locked", "https://0.0.0.0:8443/locked", locked),
            api("gated", "https://0.0.0.0:8443/gated", gated),
            api("plain", "http://127.0.0.1:8080/", H2C),
            tls_binding("orders", &[&leaf], ""),
        ))
    })
}

#[test]
fn http2_requests_are_routed_policed_and_forwarded_like_http1() -> anyhow::Result<()> {
    let s = standard()?;
    let base = "https://h2.test:8443";
    let get = |path: &str, extra: &[&str]| -> anyhow::Result<String> {
        let url = format!("{base}{path}");
        let mut args = vec!["--http2", "-o", "/dev/null", "-w", SHOW];
        args.extend_from_slice(extra);
        args.push(&url);
        Ok(s.tls(&args)?.trim().to_owned())
    };
    ensure!(get("/hello", &[])? == "2 200 24", "ALPN h2 over TLS");
    ensure!(
        get("/hello", &["--http1.1"])? == "1.1 200 24",
        "HTTP/1.1 on the same port"
    );
    // The upstream sees one clean HTTP/1.1 request: Host from :authority, this hop in Via.
    let head = s.tls(&["--http2", &format!("{base}/headers")])?;
    for needle in [
        "GET /headers HTTP/1.1\r\n",
        "host: h2.test:8443\r\n",
        "x-forwarded-proto: https\r\n",
        "via: 2 portcullis\r\n",
        "x-forwarded-for: 127.0.0.1\r\n",
    ] {
        ensure!(head.contains(needle), "{needle:?} upstream:\n{head}");
    }
    ensure!(!head.contains("te:") && !head.contains("connection:"), "{head}");

    // Bodies streamed both ways, with and without a declared length.
    let big = s.dir.0.join("big");
    std::fs::write(&big, portcullis_tests::http::pattern(0, 3 << 20))?;
    let file = format!("@{}", big.display());
    let sized = s.tls(&["--http2", "--data-binary", &file, &format!("{base}/sink")])?;
    ensure!(
        sized.contains(&(3u64 << 20).to_string()),
        "content-length body: {sized}"
    );
    let upload = format!("{}", big.display());
    let streamed = s.tls(&[
        "--http2",
        "-X",
        "POST",
        "-T",
        &upload,
        "-H",
        "content-length:",
        &format!("{base}/sink"),
    ])?;
    ensure!(
        streamed.contains(&(3u64 << 20).to_string()),
        "streamed body: {streamed}"
    );
    ensure!(get("/bytes/5000000", &[])? == "2 200 5000000");
    ensure!(get("/chunked/2000000", &[])? == "2 200 2000000");
    let out = s.dir.0.join("down");
    s.tls(&[
        "--http2",
        "-o",
        &out.display().to_string(),
        &format!("{base}/bytes/1048576"),
    ])?;
    ensure!(
        std::fs::read(&out)? == portcullis_tests::http::pattern(0, 1 << 20),
        "the body arrives intact"
    );

    // Refusals come from the one answer path: never upstream.
    let before = s.up.requests();
    ensure!(get("/locked/x", &[])?.starts_with("2 403"));
    let gated = s.tls(&["--http2", "-i", &format!("{base}/gated/x")])?;
    ensure!(
        gated.starts_with("HTTP/2 503") && gated.contains("retry-after: 5"),
        "{gated}"
    );
    ensure!(s.up.requests() == before, "no refused request went upstream");

    let m = s.metrics()?;
    let count = |key: &str| -> anyhow::Result<u64> {
        let line = m.lines().find(|l| l.starts_with(key)).context(key.to_owned())?;
        Ok(line[key.len()..].trim().parse()?)
    };
    ensure!(count("portcullis_http2_connections_total ")? >= 8, "{m}");
    ensure!(
        count("portcullis_requests_total{api=\"orders\",status=\"200\"} ")? >= 8,
        "{m}"
    );
    ensure!(
        count("portcullis_requests_total{api=\"locked\",status=\"403\"} ")? == 1,
        "{m}"
    );
    ensure!(count("portcullis_http2_floods_total ")? == 0, "{m}");
    // Logged like any request.
    s.gw.wait_log("path=\"/sink\"", "the upload's access line")?;
    Ok(())
}

#[test]
fn h2c_beside_http1_and_many_streams_with_h2load() -> anyhow::Result<()> {
    let s = standard()?;
    // h2c with prior knowledge, and HTTP/1.1 beside it on the same port.
    let (_, h2c, _) = curl(
        &s.ns,
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            SHOW,
            "http://127.0.0.1:8080/hello",
        ],
    )?;
    ensure!(h2c.trim() == "2 200 24", "h2c: {h2c}");
    let (_, h1, _) = curl(
        &s.ns,
        &["-o", "/dev/null", "-w", SHOW, "http://127.0.0.1:8080/hello"],
    )?;
    ensure!(h1.trim() == "1.1 200 24", "HTTP/1.1 on the h2c port: {h1}");

    // Many streams over few connections (nghttp2's h2load), TLS and h2c.
    for url in ["https://127.0.0.1:8443/hello", "http://127.0.0.1:8080/hello"] {
        let out =
            s.ns.command("h2load")
                .args(["-n", "4000", "-c", "4", "-m", "25", url])
                .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("4000 succeeded, 0 failed, 0 errored") && text.contains("status codes: 4000 2xx"),
            "h2load {url}:\n{text}"
        );
    }

    ensure!(s.up.requests() == 8002, "every stream reached the upstream once");
    Ok(())
}

#[test]
fn http2_floods_are_cut_off_and_never_reach_the_upstream() -> anyhow::Result<()> {
    let s = scene(|_| Ok(api("plain", "http://127.0.0.1:8080/", H2C)))?;
    // GOAWAY ENHANCE_YOUR_CALM (11) from the control-frame budget or h2's own limits.
    for (case, n) in [
        ("ping-flood", 20_000),
        ("settings-flood", 20_000),
        ("window-update-flood", 20_000),
        ("empty-data", 20_000),
        ("continuation", 1_000),
        ("hpack-bomb", 1_000),
    ] {
        let got = s.case(case, n)?;
        ensure!(got == "goaway 11", "{case}: {got}");
    }
    ensure!(s.up.requests() == 0, "no flood reached the upstream");
    let got = s.case("rapid-reset", 10_000)?;
    ensure!(got == "goaway 11", "rapid reset: {got}");
    ensure!(
        s.up.requests() < 2_100,
        "rapid reset cut off early: {} requests upstream",
        s.up.requests()
    );
    // Streams reset after the gateway accepted them drop their exchanges
    // (and upstream requests) at once; the connection carries on.
    let resets = || -> anyhow::Result<u64> {
        let m = s.metrics()?;
        let line = m
            .lines()
            .find(|l| l.starts_with("portcullis_http2_resets_total "))
            .context("the resets counter")?;
        Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
    };
    let before = resets()?;
    let got = s.case("reset-after-accept", 20)?;
    ensure!(got == "status 200", "after resets: {got}");
    ensure!(resets()? == before + 20, "each reset counted");
    // Streams beyond SETTINGS_MAX_CONCURRENT_STREAMS (100) are refused, the rest answered.
    let got = s.case("streams", 150)?;
    ensure!(got == "refused 50 answered 100", "concurrent streams: {got}");
    // The gateway still serves.
    ensure!(s.case("valid", 0)? == "status 200");
    let m = s.metrics()?;
    ensure!(
        m.lines()
            .any(|l| l.starts_with("portcullis_http2_floods_total ") && !l.ends_with(" 0")),
        "floods counted:\n{m}"
    );
    Ok(())
}

/// RFC 9113's requirements on a server, case by case as h2spec words them;
/// where the `h2` crate closes the connection with a different error code
/// than the RFC names, the case says so (every such peer is refused either way).
#[test]
fn http2_conformance_cases() -> anyhow::Result<()> {
    let s = scene(|_| Ok(api("plain", "http://127.0.0.1:8080/", H2C)))?;
    let expected = |case: &str| -> &[&str] {
        match case {
            "valid" => &["status 200"],
            // h2 closes without a GOAWAY when the preface is wrong (RFC: MAY omit it).
            "3.5-bad-preface" => &["closed", "goaway 1"],
            "4.2-data-over-max-frame-size" => &["goaway 6"],
            // The RFC names FRAME_SIZE_ERROR; h2 sends PROTOCOL_ERROR for every undecodable frame.
            "6.4-rst-bad-length"
            | "6.5-settings-ack-with-payload"
            | "6.5-settings-bad-length"
            | "6.7-ping-bad-length" => &["goaway 6", "goaway 1"],
            // The RFC names FLOW_CONTROL_ERROR; h2 sends PROTOCOL_ERROR for an invalid setting.
            "6.5.2-initial-window-too-large" => &["goaway 3", "goaway 1"],
            "6.9.1-connection-window-overflow" => &["goaway 3"],
            // Stream errors; RFC 9113 §5.4.1 lets a server treat them as connection errors, as h2 does for these.
            "6.9-window-update-0-on-stream"
            | "8.1.2-uppercase-field-name"
            | "8.1.2.1-unknown-pseudo-field"
            | "8.1.2.1-pseudo-after-regular"
            | "8.1.2.2-connection-field"
            | "8.1.2.2-te-not-trailers"
            | "8.1.2.3-no-method"
            | "8.1.2.3-empty-path"
            | "8.1.2.6-content-length-mismatch" => &["rst 1", "goaway 1"],
            _ => &["goaway 1"],
        }
    };
    let mut failed = Vec::new();
    for case in CONFORMANCE {
        let got = s.case(case, 0)?;
        if !expected(case).contains(&got.as_str()) {
            failed.push(format!("{case}: got {got}, want one of {:?}", expected(case)));
        }
    }
    ensure!(failed.is_empty(), "{failed:#?}");
    ensure!(
        s.up.requests() == 1,
        "only the valid request reached the upstream: {}",
        s.up.requests()
    );
    Ok(())
}
