//! JWT parsing and verification (the `jwt-validation` policy: HS256 with a
//! secret the fuzzer does not know, RS256, ES256 and EdDSA with keys whose
//! private halves no longer exist): no token panics it and none passes.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portcullis::http::{HeadLimits, parse_request};
use portcullis::policy::{self, Context, HeaderEdits, Policy, RequestView, Verdict};

/// Public keys whose private halves were thrown away when they were made:
/// no token can be signed for them, so none may pass.
const RSA: &str = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqIyMdq3UsbrPtqTjkTDT\nNaMS3T6QeUIv90Wn9noMnJ+IO1GIrmRPYxYlg1kvKaLZDnK1X42SqUBlxQx3YDNt\n2ORVvEo7/dg3tYEkXlaO0LhKDgPPjkygb1hIhSsm4gfnJs+QSdt66ig9Jq6fNVBR\ne3X6kmNNR7M1P6qgLXtwQvnj6hYEjR95yR8lwVN56C2LKLXXyOCiEMgNRFa4YEfk\ny9CjCiQtVRSrU9CNCgIQTBTWcvSVO0A7vyixuZZ5M+L0ihKkuXF1L/7mqalKQxou\nExmjta3Bu1Uno6FWShECbAX15EYcXLvxmGY8cCA7nvw8GBNz1w1EJhYJmcYDueUd\nLQIDAQAB\n-----END PUBLIC KEY-----";
const EC: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEkA9fQECghDGS6krec9IZ4vJilTf9\nAF7VX9/PDncZAFl9wnf7eZshCug0NIUMoYiP6AH9zEJuOZJSGRW4t2uVmg==\n-----END PUBLIC KEY-----";
const ED25519: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAt4qLleQSnIprUTKdFxRtOEa9n9pj51gUEu0zqmMABUM=\n-----END PUBLIC KEY-----";

/// The policy the token meets: HMAC with a secret the fuzzer never sees, or
/// RSA, ECDSA or EdDSA with a key only its public half of which exists.
fn policy(which: u8) -> &'static Arc<dyn Policy> {
    static POLICIES: OnceLock<Vec<Arc<dyn Policy>>> = OnceLock::new();
    let all = POLICIES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portcullis-fuzz-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let key = dir.join("hmac.key");
        std::fs::write(&key, "a-secret-the-fuzzer-never-sees-7c1e").expect("the key written");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("0600");
        let text_key = |method: &str, pem: &str| {
            let indented: String = pem.lines().map(|l| format!("  {l}\n")).collect();
            format!(
                "signingMethod: {method}\nsigningKeyLength: 256\njwtKeyOrigin: text\ntextKey: |\n{indented}"
            )
        };
        let configs = [
            format!(
                "signingMethod: hmac\nsigningKeyLength: 256\njwtKeyOrigin: text\nkeyFile: {}\n",
                key.display()
            ),
            text_key("rsa", RSA),
            text_key("es", EC),
            text_key("eddsa", ED25519),
        ];
        let policies = configs
            .iter()
            .map(|c| {
                let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&format!(
                    "{c}validateAudClaim: true\nsupportedAudiences: orders\n"
                ))
                .expect("YAML");
                let ctx = Context {
                    api: "fuzz",
                    contracts: &[],
                    shared_storage: false,
                    base: Path::new("/"),
                    cluster: "fuzz",
                };
                policy::build("jwt-validation", &config, ctx).expect("the policy builds")
            })
            .collect();
        // The policy read its key when it was built; the file is not needed again.
        let _ = std::fs::remove_dir_all(&dir);
        policies
    });
    &all[usize::from(which) % all.len()]
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the policy; the rest is the token.
    let Some((&which, token)) = data.split_first() else {
        return;
    };
    let Ok(token) = std::str::from_utf8(token) else {
        return;
    };
    let raw = format!("GET /orders HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {token}\r\n\r\n");
    let Ok(head) = parse_request(raw.as_bytes(), &HeadLimits::default()) else {
        return;
    };
    let mut view = RequestView {
        client: IpAddr::V4(Ipv4Addr::LOCALHOST),
        head: &head,
        api_path: "/orders",
        host: "a",
        edits: HeaderEdits::default(),
        response_add: Vec::new(),
        client_id: None,
    };
    let verdict = policy(which).on_request(&mut view);
    assert!(
        !matches!(verdict, Verdict::Continue),
        "a forged token passed: {token:?}"
    );
});
