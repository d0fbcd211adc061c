//! The commands that work on files without running the gateway: `check`,
//! `secret keygen` / `secret encrypt` and the man pages; what they print is
//! the binary's job.

use std::path::Path;

use anyhow::{Context as _, bail};
use portcullis::config::{self, ConfigErrors};
use portcullis::runtime::Generation;

/// Output format of `portcullis check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One `file:line:column: field: message` line per problem.
    Text,
    /// One JSON document: `{"ok", "errors", "warnings", "summary"}`.
    Json,
}

fn located(e: &config::ConfigError) -> serde_json::Value {
    serde_json::json!({"file": e.file, "line": e.line, "column": e.column, "field": e.field, "message": e.message})
}

/// Validates `dir` (resources, secrets and TLS files) and reports every problem.
pub fn check(dir: &Path, format: Format) -> anyhow::Result<()> {
    let loaded = config::load_dir(dir).and_then(|c| {
        let warnings = c.warnings.clone();
        Generation::build_checked(c).map(|g| (g, warnings))
    });
    match (loaded, format) {
        (Ok((generation, warnings)), Format::Text) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            let config = &generation.config;
            println!(
                "{}: {} listener(s), {} route(s), {} service(s), {} contract(s): OK",
                dir.display(),
                config.listeners.len(),
                config.route_count(),
                config.services.len(),
                config.contracts.len()
            );
            Ok(())
        }
        (Ok((generation, warnings)), Format::Json) => {
            let config = &generation.config;
            let out = serde_json::json!({
                "ok": true,
                "errors": [],
                "warnings": warnings.iter().map(located).collect::<Vec<_>>(),
                "summary": {
                    "listeners": config.listeners.len(),
                    "routes": config.route_count(),
                    "services": config.services.len(),
                    "contracts": config.contracts.len(),
                },
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        (Err(errors), Format::Text) => Err(report(dir, &errors)),
        (Err(errors), Format::Json) => {
            let out = serde_json::json!({
                "ok": false,
                "errors": errors.0.iter().map(located).collect::<Vec<_>>(),
                "warnings": [],
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            bail!("{} configuration error(s) in {}", errors.0.len(), dir.display())
        }
    }
}

/// `portcullis secret keygen`: a new key file, mode 0600, never overwriting.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = config::secret::SecretKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    writeln!(file, "{key}")?;
    println!("wrote a new key to {} (mode 0600)", out.display());
    Ok(())
}

/// `portcullis secret encrypt`: stdin in, `${encrypted:v1:...}` out.
pub fn encrypt(key_file: &Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    let key = config::secret::SecretKey::from_file(key_file)?;
    let mut plain = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin().read_to_end(&mut plain)?;
    // A trailing newline from `echo` or a heredoc is not part of the secret.
    while plain.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        plain.pop();
    }
    if plain.is_empty() {
        bail!("nothing on stdin to encrypt");
    }
    println!("{}", key.encrypt(&plain)?);
    Ok(())
}

fn report(dir: &Path, errors: &ConfigErrors) -> anyhow::Error {
    for e in &errors.0 {
        eprintln!("{e}");
    }
    anyhow::anyhow!("{} configuration error(s) in {}", errors.0.len(), dir.display())
}

/// `portcullis registration inspect`: who the replica is and until when.
pub fn inspect_registration(file: &Path) -> anyhow::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("a registration file name")?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let config = config::load(&config::MemSource {
        files: vec![(name, text)],
        base: dir.to_path_buf(),
    })
    .map_err(|e| report(dir, &e))?;
    let registration = config
        .registration
        .with_context(|| format!("{} holds no Registration", file.display()))?;
    let cert = std::fs::read(&registration.certificate)
        .with_context(|| format!("reading {}", registration.certificate.display()))?;
    let expires = portcullis::control::ca::expiry(&cert).context("the certificate's expiry")?;
    let now = portcullis::control::now_unix();
    println!("replica:       {}", registration.replica);
    println!("cluster:       {}", registration.cluster);
    println!("control plane: {}", registration.control_plane);
    println!(
        "certificate:   {} (expires at unix {expires}, {})",
        registration.certificate.display(),
        if expires > now {
            format!("in {} s", expires - now)
        } else {
            "EXPIRED: register again with a new token".to_owned()
        }
    );
    Ok(())
}

/// Writes one man page per command of `cli` into `dir`: `portcullis.1`,
/// `portcullis-run.1`, `portcullis-xdp-attach.1`, ...
pub fn manpages(cli: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cli = cli.version(env!("CARGO_PKG_VERSION"));
    clap_mangen::generate_to(cli, dir)
        .with_context(|| format!("writing the man pages into {}", dir.display()))
}

/// Prints the completion script of `cli` for `shell`.
pub fn completions(shell: clap_complete::Shell, mut cli: clap::Command) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cli, "portcullis", &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("writing the completion script")
}
