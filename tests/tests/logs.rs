//! Log outputs through `portcullis run`: a plain file with runtime and
//! access lines, a JSON-lines file with access lines only, and RFC 5424
//! syslog on a Unix socket the test listens on; logrotate's move and
//! `SIGUSR1` reopen the file; no credential reaches any of them.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance, curl};
use portcullis_tests::{NetNs, wait_for};

const CREDENTIAL: &str = "Basic bW9iaWxlOnMzY3JldC1pbi1hLWhlYWRlcg==";

fn config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: logging
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
  logging:
    outputs:
      - name: everything
        type: file
        parameters:
          file: {d}/gateway-out.log
      - name: access-json
        type: file
        parameters:
          path: {d}
          file: access.json
          format: json
      - name: journal
        type: syslog
        parameters:
          path: {d}/syslog.sock
    runtimeLogs:
      logLevel: info
      outputs: [everything, journal]
    accessLogs:
      outputs: [everything, access-json, journal]
---
{}",
        api_instance(
            "orders",
            "http://127.0.0.1:8080/orders",
            "http://127.0.0.1:9000/",
            ""
        )
    )
}

fn get(ns: &NetNs, path: &str) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:8080{path}");
    let (code, out, err) = curl(
        ns,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("authorization: {CREDENTIAL}"),
            &url,
        ],
    )?;
    ensure!(code == 0 && out == "200", "{url}: {out} {err}");
    Ok(())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn files_json_lines_and_syslog_carry_what_they_are_routed_and_a_moved_file_is_reopened() -> anyhow::Result<()>
{
    let ns = NetNs::new("lg")?;
    let dir = TempDir::new("lg")?;
    let syslog = UnixDatagram::bind(dir.0.join("syslog.sock")).context("binding the syslog socket")?;
    syslog.set_read_timeout(Some(Duration::from_secs(10)))?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write("gateway.yaml", &config(&dir.0))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let (plain, json) = (dir.0.join("gateway-out.log"), dir.0.join("access.json"));
    for _ in 0..3 {
        get(&ns, "/orders/hello")?;
    }
    wait_for("three access lines in the file", || {
        Ok(read(&plain).matches("path=/orders/hello").count() == 3)
    })?;
    let text = read(&plain);
    ensure!(
        text.contains("INFO portcullis") && text.contains("portcullis running"),
        "runtime lines: {text}"
    );

    // JSON lines: access only, every line one object.
    wait_for("three JSON lines", || Ok(read(&json).lines().count() >= 3))?;
    for line in read(&json).lines() {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        ensure!(
            v["target"] == "access" && v["path"] == "/orders/hello" && v["status"] == "200",
            "{line}"
        );
        ensure!(
            v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }

    // Syslog: RFC 5424, facility daemon, message id access or runtime.
    let mut kinds = Vec::new();
    let mut buf = [0u8; 8192];
    while kinds.iter().filter(|k: &&String| *k == "access").count() < 3 {
        let n = syslog.recv(&mut buf).context("waiting for syslog messages")?;
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (pri, rest) = msg
            .strip_prefix('<')
            .and_then(|m| m.split_once(">1 "))
            .with_context(|| format!("not RFC 5424: {msg}"))?;
        let pri: u16 = pri.parse()?;
        ensure!(pri / 8 == 3, "facility daemon: {msg}");
        let fields: Vec<&str> = rest.splitn(7, ' ').collect();
        ensure!(
            fields.len() == 7 && fields[2] == "portcullis" && fields[5] == "-",
            "{msg}"
        );
        ensure!(
            fields[3] == gw.pid().to_string(),
            "PROCID is the gateway's pid: {msg}"
        );
        if fields[4] == "access" {
            ensure!(pri % 8 == 6 && fields[6].contains("path=/orders/hello"), "{msg}");
        }
        kinds.push(fields[4].to_owned());
    }
    ensure!(
        kinds.iter().any(|k| k == "runtime"),
        "runtime lines reach syslog too: {kinds:?}"
    );

    // logrotate moves the file and signals: new lines go to a new file.
    let rotated = dir.0.join("gateway-out.log.1");
    std::fs::rename(&plain, &rotated)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(gw.pid())?),
        nix::sys::signal::Signal::SIGUSR1,
    )?;
    wait_for("the file reopened", || Ok(plain.exists()))?;
    get(&ns, "/orders/after-rotation")?;
    wait_for("the new line in the new file", || {
        Ok(read(&plain).contains("path=/orders/after-rotation"))
    })?;
    ensure!(
        !read(&rotated).contains("after-rotation"),
        "the moved file is left alone"
    );

    let everything = [read(&plain), read(&rotated), read(&json), gw.log_text()].concat();
    ensure!(
        !everything.contains("s3cret") && !everything.contains(CREDENTIAL),
        "a credential reached a log"
    );
    Ok(())
}
