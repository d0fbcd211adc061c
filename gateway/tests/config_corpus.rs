//! The configuration corpora: every file in `tests/config/broken/` must fail
//! with exactly the errors written at its end (`# expect: ...`), and every file
//! in `tests/config/valid/` must load, TLS material and secrets included.
//!
//! `@DIR@` stands for a directory of fixtures made per run (certificates,
//! keys, key files); `@ENC@` for a value encrypted with `@DIR@/secret.key`,
//! `@ENC_TAMPERED@` for the same value altered. Set `PORTCULLIS_BLESS=1` to
//! rewrite the expectations from what the loader says (then review the diff).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use portcullis::config::secret::SecretKey;
use portcullis::config::{self, MemSource};
use portcullis::runtime::Generation;

struct Fixtures {
    dir: PathBuf,
    encrypted: String,
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn fixtures(tag: &str) -> Fixtures {
    let dir = std::env::temp_dir().join(format!("pc-corpus-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_params = rcgen::CertificateParams::new(vec!["api.example.com".to_string()]).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let client_params = rcgen::CertificateParams::new(vec!["gateway.internal".to_string()]).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    write(&dir.join("ca.crt"), &ca.pem(), 0o644);
    write(&dir.join("server.crt"), &leaf.pem(), 0o644);
    write(&dir.join("server.key"), &leaf_key.serialize_pem(), 0o600);
    write(&dir.join("loose.key"), &leaf_key.serialize_pem(), 0o644);
    write(&dir.join("client.crt"), &client.pem(), 0o644);
    write(&dir.join("client.key"), &client_key.serialize_pem(), 0o600);
    write(&dir.join("secret.key"), &SecretKey::generate().unwrap(), 0o600);
    write(&dir.join("other.key"), &SecretKey::generate().unwrap(), 0o600);
    write(
        &dir.join("loose-secret.key"),
        &SecretKey::generate().unwrap(),
        0o644,
    );
    write(&dir.join("client.secret"), "client-secret-value", 0o600);
    write(&dir.join("redis.password"), "redis-password-value", 0o600);
    let key = SecretKey::from_file(&dir.join("secret.key")).unwrap();
    let encrypted = key.encrypt(b"redis-password-value").unwrap();
    Fixtures { dir, encrypted }
}

fn tampered(encrypted: &str) -> String {
    let mut bytes = encrypted.as_bytes().to_vec();
    let i = bytes.len() - 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config")
        .join(kind);
    let mut files: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// Every error the loader reports for one file, with the fixture directory written `@DIR@`.
fn errors_of(path: &Path, fx: &Fixtures) -> Vec<String> {
    let dir = fx.dir.display().to_string();
    let text = fs::read_to_string(path)
        .unwrap()
        .replace("@ENC_TAMPERED@", &tampered(&fx.encrypted))
        .replace("@ENC@", &fx.encrypted)
        .replace("@DIR@", &dir);
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let source = MemSource {
        files: vec![(name, text)],
        base: fx.dir.clone(),
    };
    let result = config::load(&source).and_then(|c| Generation::build_checked(c).map(drop));
    match result {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .0
            .iter()
            .map(|e| e.to_string().replace(&dir, "@DIR@"))
            .collect(),
    }
}

fn expected(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_broken_configuration_fails_with_its_exact_errors() {
    let fx = fixtures("broken");
    let files = corpus("broken");
    assert!(
        files.len() >= 40,
        "the broken corpus must hold at least 40 files, has {}",
        files.len()
    );
    let bless = std::env::var_os("PORTCULLIS_BLESS").is_some();
    let mut failures = Vec::new();
    for path in &files {
        let actual = errors_of(path, &fx);
        let text = fs::read_to_string(path).unwrap();
        if bless {
            let mut out = String::new();
            for line in text.lines().filter(|l| !l.starts_with("# expect: ")) {
                out.push_str(line);
                out.push('\n');
            }
            for e in &actual {
                out.push_str("# expect: ");
                out.push_str(e);
                out.push('\n');
            }
            fs::write(path, out).unwrap();
            continue;
        }
        let want = expected(&text);
        if want.is_empty() || actual.is_empty() || want != actual {
            failures.push(format!(
                "{}:\n  want {want:#?}\n  got  {actual:#?}",
                path.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} broken configurations differ:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn every_valid_configuration_loads() {
    let fx = fixtures("valid");
    let files = corpus("valid");
    assert!(!files.is_empty());
    for path in &files {
        let errors = errors_of(path, &fx);
        assert!(
            errors.is_empty(),
            "{} must load:\n{}",
            path.display(),
            errors.join("\n")
        );
    }
}

#[test]
fn secrets_never_show_in_debug_output() {
    let fx = fixtures("debug");
    let dir = fx.dir.display().to_string();
    let text =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid/05-secrets.yaml"))
            .unwrap()
            .replace("@ENC@", &fx.encrypted)
            .replace("@DIR@", &dir);
    let source = MemSource {
        files: vec![("secrets.yaml".into(), text)],
        base: fx.dir.clone(),
    };
    let config = config::load(&source).unwrap();
    let shown = format!("{config:?}");
    for secret in ["redis-password-value", "client-secret-value", "PRIVATE KEY"] {
        assert!(!shown.contains(secret), "Debug output leaks {secret}");
    }
    assert!(shown.contains("Secret(<redacted>)"));
}
