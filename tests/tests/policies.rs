//! Policies end to end: header injection and removal both ways, IP allow and
//! block lists, chain order, and a reload that changes a policy.

use std::time::Duration;

use anyhow::ensure;
use portcullis_tests::http::{GatewayProcess, TempDir, Upstream, api_instance, curl};
use portcullis_tests::{NetNs, wait_for};

const SETTINGS: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: proxy
spec:
  proxy:
    workers: 2
    admin: 127.0.0.1:9901
---
";

/// An API at `/{path}` on :8080, to the upstream on :9000, with these policies.
fn api(name: &str, path: &str, policies: &str) -> String {
    api_instance(
        name,
        &format!("http://127.0.0.1:8080/{path}"),
        "http://127.0.0.1:9000/",
        &format!("  policies:\n{policies}"),
    )
}

const HEADERS: &str = "    - policyRef:
        name: header-injection-flex
      config:
        inboundHeaders:
          - key: x-gateway
            value: portcullis
        outboundHeaders:
          - key: x-served-by
            value: portcullis
    - policyRef:
        name: header-removal-flex
      config:
        inboundHeaders: [X-Debug, \"X-Internal-.*\"]
        outboundHeaders: [x-upstream-secret]
";

fn ip_list(kind: &str, cidrs: &str) -> String {
    format!("    - policyRef:\n        name: {kind}\n      config:\n        ips: [{cidrs}]\n")
}

struct Scene {
    ns: NetNs,
    dir: TempDir,
    up: Upstream,
    gw: GatewayProcess,
}

fn scene(resources: &str) -> anyhow::Result<Scene> {
    let ns = NetNs::new("po")?;
    let dir = TempDir::new("poc")?;
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write("gateway.yaml", &format!("{SETTINGS}{resources}"))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    Ok(Scene { ns, dir, up, gw })
}

fn get(s: &Scene, path: &str, headers: &[&str]) -> anyhow::Result<(String, String)> {
    let mut args = vec!["-i".to_string()];
    for h in headers {
        args.push("-H".into());
        args.push((*h).to_string());
    }
    args.push(format!("http://127.0.0.1:8080{path}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = curl(&s.ns, &args)?;
    ensure!(code == 0, "curl {path}: {err}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((head.to_ascii_lowercase(), body.to_string()))
}

#[test]
fn headers_are_injected_and_removed_both_ways() -> anyhow::Result<()> {
    let s = scene(&api("orders", "orders", HEADERS))?;
    let (_, body) = get(
        &s,
        "/orders/headers",
        &["X-Debug: 1", "X-Internal-Trace: abc", "X-Keep: yes"],
    )?;
    let seen = body.to_ascii_lowercase();
    ensure!(
        seen.contains("x-gateway: portcullis") && seen.contains("x-keep: yes"),
        "{seen}"
    );
    ensure!(
        !seen.contains("x-debug") && !seen.contains("x-internal-trace"),
        "removed headers reached the upstream: {seen}"
    );
    let (head, body) = get(&s, "/orders/tagged", &[])?;
    ensure!(body == "tagged\n", "{body}");
    ensure!(
        head.contains("x-served-by: portcullis") && head.contains("x-keep: 1"),
        "{head}"
    );
    ensure!(
        !head.contains("x-upstream-secret"),
        "the response header must be removed: {head}"
    );
    let _ = (&s.dir, &s.up);
    Ok(())
}

#[test]
fn ip_lists_refuse_with_403_before_the_upstream() -> anyhow::Result<()> {
    let resources = format!(
        "{}{}{}",
        api(
            "office",
            "office",
            &ip_list("ip-allowlist-flex", "10.0.0.0/8, \"2001:db8::/32\"")
        ),
        api("open", "open", &ip_list("ip-allowlist-flex", "127.0.0.0/8")),
        api("blocked", "blocked", &ip_list("ip-blocklist", "127.0.0.1")),
    );
    let s = scene(&resources)?;
    let before = s.up.requests();
    for (path, want) in [
        ("/office/hello", "403"),
        ("/open/hello", "200"),
        ("/blocked/hello", "403"),
    ] {
        let (head, _) = get(&s, path, &[])?;
        ensure!(head.starts_with(&format!("http/1.1 {want}")), "{path}: {head}");
    }
    ensure!(
        s.up.requests() == before + 1,
        "refused requests must never reach the upstream"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = s.gw.log_text();
    ensure!(
        log.contains("status=403") && log.contains("error=\"not in ip-allowlist\""),
        "{log}"
    );
    Ok(())
}

#[test]
fn chain_order_and_a_policy_edit_by_reload() -> anyhow::Result<()> {
    // Inline policies run first, bound ones after by `order`: the blocklist
    // (order 1) refuses before the injection (order 2) would have run.
    let binding = |name: &str, order: u32, policy: &str, config: &str| {
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: {name}
spec:
  targetRef:
    name: orders
  policyRef:
    name: {policy}
  order: {order}
  config:
{config}---
"
        )
    };
    let inject = "    inboundHeaders:\n      - key: x-bound\n        value: yes\n";
    let resources = format!(
        "{}{}{}",
        api("orders", "orders", &ip_list("ip-blocklist-flex", "10.9.9.9")),
        binding("inject", 2, "header-injection-flex", inject),
        binding("block-local", 1, "ip-blocklist-flex", "    ips: [127.0.0.1]\n"),
    );
    let s = scene(&resources)?;
    let (head, _) = get(&s, "/orders/headers", &[])?;
    ensure!(head.starts_with("http/1.1 403"), "{head}");
    // Editing the binding (reload) opens the API and the injection runs.
    let edited = resources.replace("    ips: [127.0.0.1]\n", "    ips: [10.1.1.1]\n");
    s.dir.write("gateway.yaml", &format!("{SETTINGS}{edited}"))?;
    s.gw.reload()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (head, body) = get(&s, "/orders/headers", &[])?;
        if head.starts_with("http/1.1 200") {
            ensure!(body.to_ascii_lowercase().contains("x-bound: yes"), "{body}");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the edited policy never applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn cors_preflight_is_answered_by_the_gateway() -> anyhow::Result<()> {
    let cors = "    - policyRef:
        name: cors-flex
      config:
        publicResource: false
        supportCredentials: true
        originGroups:
          - origins: [\"https://app.example.com\"]
            accessControlMaxAge: 600
            allowedMethods:
              - methodName: GET
                isAllowed: true
              - methodName: PUT
                isAllowed: true
            headers: [x-token, content-type]
            exposedHeaders: [x-request-id]
";
    let s = scene(&api("orders", "orders", cors))?;
    let before = s.up.requests();
    let preflight = |origin: &str, method: &str, headers: &str| {
        let args = [
            "-i",
            "-X",
            "OPTIONS",
            "-H",
            &format!("Origin: {origin}"),
            "-H",
            &format!("Access-Control-Request-Method: {method}"),
            "-H",
            &format!("Access-Control-Request-Headers: {headers}"),
            "http://127.0.0.1:8080/orders/x",
        ]
        .map(String::from);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&s.ns, &args).map(|(_, out, _)| out.to_ascii_lowercase())
    };
    let ok = preflight("https://app.example.com", "PUT", "X-Token")?;
    for want in [
        "http/1.1 200",
        "access-control-allow-origin: https://app.example.com",
        "access-control-allow-methods: get, put",
        "access-control-max-age: 600",
        "access-control-allow-credentials: true",
        "access-control-allow-headers: x-token, content-type",
    ] {
        ensure!(ok.contains(want), "preflight lacks `{want}`: {ok}");
    }
    ensure!(
        preflight("https://evil.example.com", "GET", "")?.starts_with("http/1.1 403"),
        "an unknown origin is refused"
    );
    ensure!(
        preflight("https://app.example.com", "DELETE", "")?.starts_with("http/1.1 403"),
        "a method not allowed is refused"
    );
    ensure!(
        preflight("https://app.example.com", "GET", "X-Other")?.starts_with("http/1.1 403"),
        "a header not allowed is refused"
    );
    ensure!(s.up.requests() == before, "preflights never reach the upstream");
    let (head, _) = get(&s, "/orders/hello", &["Origin: https://app.example.com"])?;
    ensure!(
        head.contains("access-control-allow-origin: https://app.example.com")
            && head.contains("vary: origin"),
        "{head}"
    );
    ensure!(
        head.contains("access-control-expose-headers: x-request-id"),
        "{head}"
    );
    let (head, _) = get(&s, "/orders/hello", &["Origin: https://evil.example.com"])?;
    ensure!(
        head.starts_with("http/1.1 200") && !head.contains("access-control-allow-origin"),
        "{head}"
    );
    Ok(())
}

#[test]
fn response_timeout_gives_504() -> anyhow::Result<()> {
    let timeout =
        "    - policyRef:\n        name: response-timeout-flex\n      config:\n        timeout: 0.3\n";
    let s = scene(&api("orders", "orders", timeout))?;
    let (head, _) = get(&s, "/orders/slow/1500", &[])?;
    ensure!(head.starts_with("http/1.1 504"), "{head}");
    let (head, _) = get(&s, "/orders/slow/10", &[])?;
    ensure!(head.starts_with("http/1.1 200"), "{head}");
    Ok(())
}

#[test]
fn client_id_enforcement_against_contracts() -> anyhow::Result<()> {
    let ns = NetNs::new("ci")?;
    let dir = TempDir::new("cic")?;
    dir.write_private("mobile.secret", "s3cret-mobile")?;
    let enforce = "    - policyRef:\n        name: client-id-enforcement-flex\n";
    let custom = "    - policyRef:
        name: client-id-enforcement-flex
      config:
        credentialsOriginHasHttpBasicAuthenticationHeader: customExpression
        clientIdExpression: \"#[attributes.headers['client_id']]\"
        clientSecretExpression: \"#[attributes.queryParams['client_secret']]\"
";
    let contract = |name: &str, id: &str, secret: &str, apis: &str| {
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Contract\nmetadata:\n  name: {name}\nspec:\n  clientId: {id}\n  {secret}\n  apis: [{apis}]\n---\n"
        )
    };
    let resources = format!(
        "{}{}{}{}{}",
        api("orders", "orders", enforce),
        api("custom", "custom", custom),
        contract(
            "mobile",
            "mobile",
            "clientSecret: ${file:mobile.secret}",
            "orders, custom"
        ),
        contract(
            "partner",
            "partner",
            &format!(
                "clientSecretHash: sha256:{}",
                "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
            ),
            "custom"
        ),
        contract(
            "hashed",
            "hashed",
            &format!("clientSecretHash: \"{}\"", bcrypt::hash("hashed-pw", 4)?),
            "orders"
        ),
    );
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write("gateway.yaml", &format!("{SETTINGS}{resources}"))?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let s = Scene { ns, dir, up, gw };
    let status = |path: &str, headers: &[&str]| get(&s, path, headers).map(|(h, _)| h);
    let basic = |id: &str, secret: &str| {
        format!(
            "Authorization: Basic {}",
            base64_encode(&format!("{id}:{secret}"))
        )
    };
    let no_creds = status("/orders/hello", &[])?;
    ensure!(
        no_creds.starts_with("http/1.1 401") && no_creds.contains("www-authenticate: basic"),
        "{no_creds}"
    );
    ensure!(status("/orders/hello", &[&basic("mobile", "wrong")])?.starts_with("http/1.1 401"));
    ensure!(status("/orders/hello", &[&basic("nobody", "x")])?.starts_with("http/1.1 401"));
    ensure!(status("/orders/hello", &[&basic("mobile", "s3cret-mobile")])?.starts_with("http/1.1 200"));
    // partner's secret is "password" (sha256 given in the contract) but its contract does not cover orders.
    ensure!(status("/orders/hello", &[&basic("partner", "password")])?.starts_with("http/1.1 403"));
    ensure!(
        status("/custom/hello?client_secret=password", &["client_id: partner"])?.starts_with("http/1.1 200")
    );
    ensure!(status("/custom/hello?client_secret=nope", &["client_id: partner"])?.starts_with("http/1.1 401"));
    // A contract keeping a bcrypt hash: verified off the workers, then remembered.
    for _ in 0..2 {
        ensure!(status("/orders/hello", &[&basic("hashed", "hashed-pw")])?.starts_with("http/1.1 200"));
    }
    ensure!(status("/orders/hello", &[&basic("hashed", "nope")])?.starts_with("http/1.1 401"));
    std::thread::sleep(Duration::from_millis(200));
    let log = s.gw.log_text();
    ensure!(
        !log.contains("s3cret-mobile") && !log.contains("client_secret=password"),
        "credentials leaked into the log"
    );
    Ok(())
}

fn base64_encode(text: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = text.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, byte)| acc | (u32::from(*byte) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn rate_limiting_counts_across_workers_and_answers_429() -> anyhow::Result<()> {
    let limit = "    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: 5
            timePeriodInMilliseconds: 60000
        keySelector: \"#[attributes.headers['x-client']]\"
        clusterizable: false
";
    let s = scene(&api("orders", "orders", limit))?;
    let before = s.up.requests();
    let mut statuses = Vec::new();
    let mut last_ok = String::new();
    let mut refused = String::new();
    // Separate connections: the two workers both count against one limit.
    for _ in 0..8 {
        let (head, _) = get(&s, "/orders/hello", &["x-client: alice"])?;
        statuses.push(head[9..12].to_string());
        if head.starts_with("http/1.1 200") {
            last_ok = head;
        } else {
            refused = head;
        }
    }
    ensure!(
        statuses == ["200", "200", "200", "200", "200", "429", "429", "429"],
        "{statuses:?}"
    );
    ensure!(
        last_ok.contains("ratelimit-limit: 5") && last_ok.contains("ratelimit-remaining: 0"),
        "{last_ok}"
    );
    ensure!(
        refused.contains("retry-after: ") && refused.contains("ratelimit-remaining: 0"),
        "{refused}"
    );
    ensure!(
        s.up.requests() == before + 5,
        "refused requests must not reach the upstream"
    );
    // Another key has its own budget.
    let (head, _) = get(&s, "/orders/hello", &["x-client: bob"])?;
    ensure!(
        head.starts_with("http/1.1 200") && head.contains("ratelimit-remaining: 4"),
        "{head}"
    );
    Ok(())
}

#[test]
fn jwt_validation_with_test_vectors() -> anyhow::Result<()> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let ns = NetNs::new("jw")?;
    let dir = TempDir::new("jwc")?;
    let key = rcgen::KeyPair::generate()?;
    let rogue = rcgen::KeyPair::generate()?;
    dir.write_private("idp.pub.pem", &key.public_key_pem())?;
    let jwt = "    - policyRef:
        name: jwt-validation-flex
      config:
        signingMethod: es
        signingKeyLength: 256
        jwtKeyOrigin: text
        keyFile: idp.pub.pem
        validateAudClaim: true
        supportedAudiences: \"orders-api, other-api\"
        supportedIssuers: \"https://idp.test\"
        mandatoryExpClaim: true
        validateCustomClaim: true
        mandatoryCustomClaims:
          - key: scope
            value: orders
";
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!("{SETTINGS}{}", api("orders", "orders", jwt)),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let s = Scene { ns, dir, up, gw };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = |exp: u64, aud: &str, scope: &str| serde_json::json!({"sub": "alice", "iss": "https://idp.test", "aud": aud, "exp": exp, "scope": scope});
    let es = |claims: &serde_json::Value, signer: &rcgen::KeyPair| -> anyhow::Result<String> {
        Ok(encode(
            &Header::new(Algorithm::ES256),
            claims,
            &EncodingKey::from_ec_pem(signer.serialize_pem().as_bytes())?,
        )?)
    };
    let b64 = |v: &serde_json::Value| base64_url(&v.to_string());
    let status = |token: Option<&str>| -> anyhow::Result<String> {
        let header = token.map(|t| format!("Authorization: Bearer {t}"));
        let headers: Vec<&str> = header.iter().map(String::as_str).collect();
        get(&s, "/orders/hello", &headers).map(|(h, _)| h)
    };
    let good = claims(now + 300, "orders-api", "orders");
    ensure!(
        status(Some(&es(&good, &key)?))?.starts_with("http/1.1 200"),
        "a valid token passes"
    );
    let none = status(None)?;
    ensure!(
        none.starts_with("http/1.1 401") && none.contains("www-authenticate: bearer"),
        "{none}"
    );
    let vectors = [
        ("expired", es(&claims(now - 10, "orders-api", "orders"), &key)?),
        (
            "wrong audience",
            es(&claims(now + 300, "billing-api", "orders"), &key)?,
        ),
        (
            "custom claim",
            es(&claims(now + 300, "orders-api", "admin"), &key)?,
        ),
        ("another key", es(&good, &rogue)?),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
        ),
        (
            "key confusion: HS256 with the public key as secret",
            encode(
                &Header::new(Algorithm::HS256),
                &good,
                &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
            )?,
        ),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, token) in &vectors {
        let head = status(Some(token))?;
        ensure!(
            head.starts_with("http/1.1 401") && head.contains("invalid_token"),
            "{what}: {head}"
        );
    }
    ensure!(s.up.requests() == 1, "only the valid token reached the upstream");
    Ok(())
}

fn base64_url(text: &str) -> String {
    base64_encode(text)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

#[test]
fn sla_tiers_limit_each_client_by_its_contract() -> anyhow::Result<()> {
    let sla = "    - policyRef:
        name: rate-limiting-sla-based-flex
      config:
        clientIdExpression: \"#[attributes.headers['client_id']]\"
        clientSecretExpression: \"#[attributes.headers['client_secret']]\"
        clusterizable: false
        tiers:
          - name: gold
            rateLimits:
              - maximumRequests: 5
                timePeriodInMilliseconds: 60000
          - name: silver
            rateLimits:
              - maximumRequests: 2
                timePeriodInMilliseconds: 60000
";
    let contract = |id: &str, tier: &str| {
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Contract\nmetadata:\n  name: {id}\nspec:\n  clientId: {id}\n  clientSecretHash: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n  slaTier: {tier}\n  apis: [orders]\n---\n"
        )
    };
    let s = scene(&format!(
        "{}{}{}",
        api("orders", "orders", sla),
        contract("goldapp", "gold"),
        contract("silverapp", "silver")
    ))?;
    let run = |id: &str, n: usize| -> anyhow::Result<Vec<String>> {
        (0..n)
            .map(|_| {
                get(
                    &s,
                    "/orders/hello",
                    &[&format!("client_id: {id}"), "client_secret: password"],
                )
                .map(|(h, _)| h[9..12].to_string())
            })
            .collect()
    };
    ensure!(
        run("goldapp", 7)? == ["200", "200", "200", "200", "200", "429", "429"],
        "gold tier"
    );
    ensure!(
        run("silverapp", 4)? == ["200", "200", "429", "429"],
        "silver tier"
    );
    let (head, _) = get(
        &s,
        "/orders/hello",
        &["client_id: goldapp", "client_secret: wrong"],
    )?;
    ensure!(head.starts_with("http/1.1 401"), "{head}");
    let (head, _) = get(&s, "/orders/hello", &[])?;
    ensure!(head.starts_with("http/1.1 401"), "{head}");
    Ok(())
}

#[test]
fn rate_limits_keyed_by_the_authenticated_client() -> anyhow::Result<()> {
    let chain = "    - policyRef:
        name: client-id-enforcement-flex
    - policyRef:
        name: rate-limiting-flex
      config:
        rateLimits:
          - maximumRequests: 2
            timePeriodInMilliseconds: 60000
        keySelector: \"#[authentication.clientId]\"
        clusterizable: false
";
    let contract = |id: &str| {
        format!(
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Contract\nmetadata:\n  name: {id}\nspec:\n  clientId: {id}\n  clientSecretHash: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n  apis: [orders]\n---\n"
        )
    };
    let s = scene(&format!(
        "{}{}{}",
        api("orders", "orders", chain),
        contract("one"),
        contract("two")
    ))?;
    let basic = |id: &str| {
        format!(
            "Authorization: Basic {}",
            base64_encode(&format!("{id}:password"))
        )
    };
    let run = |id: &str| -> anyhow::Result<Vec<String>> {
        (0..3)
            .map(|_| get(&s, "/orders/hello", &[&basic(id)]).map(|(h, _)| h[9..12].to_string()))
            .collect()
    };
    ensure!(run("one")? == ["200", "200", "429"], "client one");
    ensure!(
        run("two")? == ["200", "200", "429"],
        "client two has its own budget"
    );
    Ok(())
}

#[test]
fn ip_lists_behind_a_trusted_proxy_use_forwarded_for() -> anyhow::Result<()> {
    let list = "    - policyRef:
        name: ip-allowlist-flex
      config:
        ips: [203.0.113.0/24]
        ipExpression: \"#[attributes.headers['x-forwarded-for']]\"
        trustedHops: 1
";
    let s = scene(&api("orders", "orders", list))?;
    let status = |xff: Option<&str>| -> anyhow::Result<String> {
        let h = xff.map(|x| format!("X-Forwarded-For: {x}"));
        let headers: Vec<&str> = h.iter().map(String::as_str).collect();
        get(&s, "/orders/hello", &headers).map(|(head, _)| head[9..12].to_string())
    };
    ensure!(
        status(Some("203.0.113.7"))? == "200",
        "the entry the trusted proxy appended is in the list"
    );
    ensure!(
        status(Some("203.0.113.7, 198.51.100.9"))? == "403",
        "a spoofed leftmost entry is not trusted"
    );
    ensure!(
        status(None)? == "403",
        "no forwarded address: the allowlist cannot admit"
    );
    Ok(())
}

#[test]
fn spike_control_queues_then_refuses() -> anyhow::Result<()> {
    let spike = "    - policyRef:
        name: spike-control-flex
      config:
        maximumRequests: 2
        timePeriodInMilliseconds: 500
        delayTimeInMillis: 300
        delayAttempts: 3
        queuingLimit: 2
";
    let s = scene(&api("orders", "orders", spike))?;
    let started = std::time::Instant::now();
    let results: Vec<(String, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..5)
            .map(|_| {
                let s = &s;
                scope.spawn(move || {
                    let t = std::time::Instant::now();
                    get(s, "/orders/hello", &[]).map(|(h, _)| (h[9..12].to_string(), t.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let ok = results.iter().filter(|(st, _)| st == "200").count();
    let refused = results.iter().filter(|(st, _)| st == "429").count();
    ensure!(
        ok == 4 && refused == 1,
        "2 at once, 2 after waiting in the queue, 1 refused: {results:?}"
    );
    let waited = results
        .iter()
        .filter(|(st, d)| st == "200" && *d >= Duration::from_millis(250))
        .count();
    ensure!(
        waited >= 2,
        "two requests were delayed, not refused: {results:?} ({:?} total)",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn basic_authentication_from_a_hash_file() -> anyhow::Result<()> {
    let ns = NetNs::new("ba")?;
    let dir = TempDir::new("bac")?;
    let users = format!(
        "# user:hash\nalice:{}\nbob:sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n",
        bcrypt::hash("alice-pw", 4)?
    );
    let file = dir.write_private("users.txt", &users)?;
    let policy = "    - policyRef:\n        name: http-basic-authentication-flex\n      config:\n        credentialsFile: users.txt\n";
    let up = Upstream::start(&ns, "127.0.0.1:9000".parse()?)?;
    dir.write(
        "gateway.yaml",
        &format!("{SETTINGS}{}", api("orders", "orders", policy)),
    )?;
    let gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;
    let s = Scene { ns, dir, up, gw };
    let basic =
        |user: &str, pw: &str| format!("Authorization: Basic {}", base64_encode(&format!("{user}:{pw}")));
    let status = |headers: &[&str]| get(&s, "/orders/hello", headers).map(|(h, _)| h);
    for _ in 0..2 {
        // The second time, alice's verification comes from the cache.
        ensure!(status(&[&basic("alice", "alice-pw")])?.starts_with("http/1.1 200"));
    }
    ensure!(status(&[&basic("bob", "password")])?.starts_with("http/1.1 200"));
    for (user, pw) in [("alice", "wrong"), ("bob", "wrong"), ("carol", "x")] {
        let head = status(&[&basic(user, pw)])?;
        ensure!(
            head.starts_with("http/1.1 401") && head.contains("www-authenticate: basic"),
            "{user}: {head}"
        );
    }
    ensure!(status(&[])?.starts_with("http/1.1 401"));
    // Loose permissions on the credentials file fail the policy: the API is
    // gated (503) until the file is fixed, never served without its check.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    s.gw.reload()?;
    s.gw.wait_log(
        "answers 503 until the policy is fixed",
        "a loose credentials file must fail the policy",
    )?;
    ensure!(
        s.gw.log_text().contains("(mode 0644); run `chmod 600"),
        "{}",
        s.gw.log_text()
    );
    let head = status(&[&basic("alice", "alice-pw")])?;
    ensure!(
        head.starts_with("http/1.1 503") && head.contains("retry-after:"),
        "{head}"
    );
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    s.gw.reload()?;
    wait_for("the fixed file to reopen the gate", || {
        Ok(status(&[&basic("alice", "alice-pw")])?.starts_with("http/1.1 200"))
    })?;
    Ok(())
}

#[test]
fn jwt_client_id_claim_must_have_a_contract() -> anyhow::Result<()> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let key = rcgen::KeyPair::generate()?;
    let jwt = "    - policyRef:
        name: jwt-validation-flex
      config:
        signingMethod: es
        signingKeyLength: 256
        textKey: |
__PEM__
        skipClientIdValidation: false
        clientIdExpression: \"#[vars.claimSet.azp]\"
";
    let mut pem = String::new();
    for line in key.public_key_pem().lines() {
        pem.push_str("          ");
        pem.push_str(line);
        pem.push('\n');
    }
    let jwt = jwt.replace("__PEM__\n", &pem);
    let contract = "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Contract\nmetadata:\n  name: mobile\nspec:\n  clientId: mobile\n  apis: [orders]\n---\n";
    let s = scene(&format!("{}{contract}", api("orders", "orders", &jwt)))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let token = |azp: Option<&str>| -> anyhow::Result<String> {
        let mut claims = serde_json::json!({"sub": "alice", "exp": now + 300});
        if let Some(a) = azp {
            claims["azp"] = serde_json::Value::String(a.into());
        }
        Ok(encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?,
        )?)
    };
    let status = |t: &str| {
        get(&s, "/orders/hello", &[&format!("Authorization: Bearer {t}")]).map(|(h, _)| h[9..12].to_string())
    };
    ensure!(
        status(&token(Some("mobile"))?)? == "200",
        "a client with a contract passes"
    );
    ensure!(
        status(&token(Some("stranger"))?)? == "403",
        "a client without a contract for this API is refused"
    );
    ensure!(
        status(&token(None)?)? == "401",
        "a token without the client id claim is refused"
    );
    Ok(())
}
