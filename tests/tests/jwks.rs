//! `jwt-validation` with keys from a JWKS URL: 503 until the first fetch,
//! key rotation picked up from an unknown `kid`, keys kept across a reload
//! while the JWKS service is down.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance, curl};
use portcullis_tests::{NetNs, wait_for};

/// Serves the JWKS document it holds; `None` answers 503.
struct JwksServer {
    doc: Arc<Mutex<Option<String>>>,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl JwksServer {
    fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        let doc: Arc<Mutex<Option<String>>> = Arc::default();
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, h, st) = (doc.clone(), hits.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.read(&mut buf);
                let answer = match d.lock().ok().and_then(|g| g.clone()) {
                    Some(body) => format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    ),
                    None => "HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_owned(),
                };
                let _ = conn.write_all(answer.as_bytes());
            }
        });
        Ok(Self { doc, hits, stop })
    }

    fn serve(&self, keys: &[(&str, &rcgen::KeyPair)]) {
        let keys: Vec<serde_json::Value> = keys.iter().map(|(kid, key)| jwk(kid, key)).collect();
        if let Ok(mut doc) = self.doc.lock() {
            *doc = Some(serde_json::json!({ "keys": keys }).to_string());
        }
    }

    fn down(&self) {
        if let Ok(mut doc) = self.doc.lock() {
            *doc = None;
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn b64url(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The public JWK of a P-256 key pair.
fn jwk(kid: &str, key: &rcgen::KeyPair) -> serde_json::Value {
    let raw = key.public_key_raw();
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65]),
    })
}

fn token(kid: &str, key: &rcgen::KeyPair) -> anyhow::Result<String> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    Ok(encode(
        &header,
        &serde_json::json!({ "sub": "alice", "exp": exp }),
        &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?,
    )?)
}

fn status(ns: &NetNs, token: &str) -> anyhow::Result<u16> {
    let auth = format!("Authorization: Bearer {token}");
    let (code, out, err) = curl(
        ns,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &auth,
            "http://127.0.0.1:8080/orders/hello",
        ],
    )?;
    ensure!(code == 0, "curl: {err}");
    Ok(out.trim().parse()?)
}

fn wait_status(ns: &NetNs, token: &str, want: u16) -> anyhow::Result<()> {
    wait_for(&format!("status {want}"), || Ok(status(ns, token)? == want))
}

#[test]
fn keys_come_from_a_jwks_url_and_follow_its_rotation() -> anyhow::Result<()> {
    let ns = NetNs::new("jw")?;
    let dir = TempDir::new("jw")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    let jwks = JwksServer::start(&ns, "127.0.0.1:7000".parse()?)?;
    let policy = "  policies:
    - policyRef:
        name: jwt-validation-flex
      config:
        signingMethod: es
        signingKeyLength: 256
        jwtKeyOrigin: jwks
        jwksUrl: http://127.0.0.1:7000/.well-known/jwks.json
        jwksServiceTimeToLive: 60
        jwksServiceConnectionTimeout: 1000
";
    let config = format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\nmetadata:\n  name: jw\nspec:\n  proxy:\n    workers: 2\n    admin: 127.0.0.1:9901\n---\n{}",
        api_instance(
            "orders",
            "http://127.0.0.1:8080/orders",
            "http://127.0.0.1:9000/",
            policy
        )
    );
    dir.write("gateway.yaml", &config)?;
    let (a, b) = (rcgen::KeyPair::generate()?, rcgen::KeyPair::generate()?);
    let (token_a, token_b) = (token("a", &a)?, token("b", &b)?);

    // The JWKS service is down at start: no key, so no token is accepted.
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    ensure!(status(&ns, &token_a)? == 503, "no keys yet: 503");
    let (_, metrics, _) = curl(&ns, &["-s", "http://127.0.0.1:9901/metrics"])?;
    ensure!(
        metrics.contains("portcullis_gate_rejections_total{api=\"orders\",reason=\"policy_not_ready\"} 1"),
        "the Gatekeeper answered for the policy that has no keys yet: {metrics}"
    );
    ensure!(up.requests() == 0);
    jwks.serve(&[("a", &a)]);
    wait_status(&ns, &token_a, 200)?;

    // A token from a key the set does not have yet: refused, and a refresh picks the rotation up.
    ensure!(status(&ns, &token_b)? == 401);
    jwks.serve(&[("a", &a), ("b", &b)]);
    wait_status(&ns, &token_b, 200)?;
    // Signed by b but claiming to be a: the signature does not verify.
    ensure!(status(&ns, &token("a", &b)?)? == 401);

    // The service goes down; a reload keeps the keys in hand.
    jwks.down();
    let fetches = jwks.hits.load(Ordering::SeqCst);
    gw.reload()?;
    gw.wait_log("configuration reloaded", "reload")?;
    ensure!(status(&ns, &token_a)? == 200 && status(&ns, &token_b)? == 200);
    ensure!(
        jwks.hits.load(Ordering::SeqCst) == fetches,
        "a reload does not refetch cached keys"
    );
    Ok(())
}
