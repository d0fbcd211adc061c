//! Secret sources end to end: the `portcullis secret` commands, systemd
//! credentials, and no secret ever in logs or metrics.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, request, status_of};
use portcullis_tests::{NetNs, portcullis_bin};

const REDIS_PASSWORD: &str = "redis-password-1f6e0a";
const CLIENT_SECRET: &str = "client-secret-93b2c7";
const PLAIN_IN_BROKEN_RELOAD: &str = "plain-secret-in-a-broken-reload-5d1e";

fn encrypt(key: &Path, value: &str) -> anyhow::Result<String> {
    let mut child = Command::new(portcullis_bin())
        .args(["secret", "encrypt", "--key-file"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("stdin")?,
        format!("{value}\n").as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "encrypt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// A config directory whose secrets come from an encrypted value and a systemd credential.
fn config(dir: &TempDir, credentials: &Path) -> anyhow::Result<()> {
    let key = dir.0.join("secret.key");
    let out = Command::new(portcullis_bin())
        .args(["secret", "keygen", "--out"])
        .arg(&key)
        .output()?;
    ensure!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        std::fs::metadata(&key)?.permissions().mode() & 0o777 == 0o600,
        "the key file must be 0600"
    );
    let again = Command::new(portcullis_bin())
        .args(["secret", "keygen", "--out"])
        .arg(&key)
        .output()?;
    ensure!(!again.status.success(), "keygen must never overwrite a key");
    let sealed = encrypt(&key, REDIS_PASSWORD)?;
    ensure!(
        sealed.starts_with("${encrypted:v1:") && !sealed.contains(REDIS_PASSWORD),
        "{sealed}"
    );
    std::fs::create_dir_all(credentials)?;
    let cred = credentials.join("mobile-secret");
    std::fs::write(&cred, CLIENT_SECRET)?;
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600))?;
    dir.write(
        "gateway.yaml",
        &format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: gateway
spec:
  secrets:
    keyFile: secret.key
  sharedStorage:
    redis:
      address: 127.0.0.1:6379
      username: gateway
      password: {sealed}
  proxy:
    workers: 1
    admin: 127.0.0.1:9901
  logging:
    outputs:
      - name: file
        type: file
        parameters:
          file: {out}/outputs.log
      - name: json
        type: file
        parameters:
          file: {out}/outputs.json
          format: json
      - name: syslog
        type: syslog
        parameters:
          path: {out}/syslog.sock
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: orders
spec:
  address: http://127.0.0.1:8080/orders
  services:
    up:
      address: http://127.0.0.1:9000/
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Contract
metadata:
  name: mobile
spec:
  clientId: mobile
  clientSecret: ${{credential:mobile-secret}}
  apis: [orders]
",
            out = dir.0.display()
        ),
    )?;
    Ok(())
}

#[test]
fn encrypted_values_and_systemd_credentials_resolve() -> anyhow::Result<()> {
    let dir = TempDir::new("sec")?;
    let credentials = dir.0.join("credentials");
    config(&dir, &credentials)?;
    let check = |creds: Option<&Path>| {
        let mut cmd = Command::new(portcullis_bin());
        cmd.arg("check").arg(&dir.0).env_remove("CREDENTIALS_DIRECTORY");
        if let Some(c) = creds {
            cmd.env("CREDENTIALS_DIRECTORY", c);
        }
        cmd.output()
    };
    let out = check(Some(&credentials))?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = check(None)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("spec.clientSecret: credential `mobile-secret` was asked for but $CREDENTIALS_DIRECTORY is not set"), "{err}");
    // A loose credential file is refused like any secret file.
    std::fs::set_permissions(
        credentials.join("mobile-secret"),
        std::fs::Permissions::from_mode(0o640),
    )?;
    let out = check(Some(&credentials))?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("(mode 0640); run `chmod 600"),
        "{err}"
    );
    Ok(())
}

#[test]
fn secrets_never_reach_logs_metrics_or_errors() -> anyhow::Result<()> {
    let ns = NetNs::new("sc")?;
    let dir = TempDir::new("scc")?;
    let credentials = dir.0.join("credentials");
    config(&dir, &credentials)?;
    let syslog = std::os::unix::net::UnixDatagram::bind(dir.0.join("syslog.sock"))?;
    syslog.set_nonblocking(true)?;
    let _up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    let gw = GatewayProcess::start_env(
        &ns,
        &portcullis_bin(),
        &dir.0,
        "127.0.0.1:9901".parse()?,
        &[("CREDENTIALS_DIRECTORY", &credentials)],
    )?;
    let raw = request(
        &ns,
        "127.0.0.1:8080".parse()?,
        b"GET /orders/hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )?;
    ensure!(status_of(&raw) == Some(200));
    // A broken change that carries a plain-text secret is rejected and logged without it.
    let text = std::fs::read_to_string(dir.0.join("gateway.yaml"))?;
    let broken = text.replace(
        "clientSecret: ${credential:mobile-secret}",
        &format!("clientSecret: {PLAIN_IN_BROKEN_RELOAD}"),
    );
    dir.write("gateway.yaml", &broken)?;
    gw.reload()?;
    gw.wait_log("reload rejected", "no rejection logged")?;
    let metrics = request(
        &ns,
        "127.0.0.1:9901".parse()?,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )?;
    let out = Command::new(portcullis_bin())
        .arg("check")
        .arg(&dir.0)
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .output()?;
    // Every log output, the syslog datagrams included.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut outputs = String::new();
    for file in ["outputs.log", "outputs.json"] {
        outputs
            .push_str(&std::fs::read_to_string(dir.0.join(file)).with_context(|| format!("{file} written"))?);
    }
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = syslog.recv(&mut buf) {
        outputs.push_str(&String::from_utf8_lossy(&buf[..n]));
        outputs.push('\n');
    }
    ensure!(
        outputs.contains("reload rejected") && outputs.contains("path=/orders/hello"),
        "runtime and access lines in the outputs: {outputs}"
    );
    let everything = format!(
        "{outputs}\n{}\n{}\n{}\n{}",
        gw.log_text(),
        String::from_utf8_lossy(&metrics),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        everything.contains("spec.clientSecret: a secret is never written in plain text"),
        "{everything}"
    );
    for secret in [REDIS_PASSWORD, CLIENT_SECRET, PLAIN_IN_BROKEN_RELOAD] {
        ensure!(!everything.contains(secret), "{secret} leaked:\n{everything}");
    }
    Ok(())
}
