//! JWT parsing and verification (the `jwt-validation` policy, HS256 with a
//! secret the fuzzer does not know): no token panics it and none passes.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portcullis::http::{HeadLimits, parse_request};
use portcullis::policy::{self, Context, HeaderEdits, Policy, RequestView, Verdict};

fn policy() -> &'static Arc<dyn Policy> {
    static POLICY: OnceLock<Arc<dyn Policy>> = OnceLock::new();
    POLICY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portcullis-fuzz-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let key = dir.join("hmac.key");
        std::fs::write(&key, "a-secret-the-fuzzer-never-sees-7c1e").expect("the key written");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("0600");
        let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&format!(
            "signingMethod: hmac
signingKeyLength: 256
jwtKeyOrigin: text
keyFile: {}
validateAudClaim: true
supportedAudiences: orders
",
            key.display()
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
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
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
    let verdict = policy().on_request(&mut view);
    assert!(
        !matches!(verdict, Verdict::Continue),
        "a forged token passed: {token:?}"
    );
});
