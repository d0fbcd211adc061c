//! Routing rules and several upstreams through `portcullis run`: one
//! ApiInstance whose services' routes pick an upstream by path, method,
//! header and host, a `route-weighted` canary whose split is counted at the
//! upstreams over 10,000 requests, and policies that apply only to the
//! requests their rules take.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::ensure;
use portcullis_tests::NetNs;
use portcullis_tests::http::{
    GatewayProcess, TempDir, Upstream, connect, curl, read_response, strict_settings,
};

const SHOP: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: shop
spec:
  address: http://127.0.0.1:8080/shop
  services:
    catalog:
      address: http://127.0.0.1:9001/
      routes:
        - rules:
            - pathPrefix: /items
              methods: GET|POST
          config:
            destinationPath: /headers/catalog
    beta:
      address: http://127.0.0.1:9002/
      routes:
        - rules:
            - headers:
                x-beta: \"1|true\"
          config:
            destinationPath: /headers/beta
    admin:
      address: http://127.0.0.1:9003/
      routes:
        - rules:
            - host: admin\\.shop\\.test
              path: /(users|roles)(/.*)?
          config:
            destinationPath: /headers/admin
  policies:
    - policyRef:
        name: header-injection
      rules:
        - methods: POST
      config:
        inboundHeaders:
          - key: x-write
            value: \"yes\"
    - policyRef:
        name: ip-blocklist
      rules:
        - pathPrefix: /items/secret
      config:
        ips: [127.0.0.1]
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: cart-stable
spec:
  address: http://127.0.0.1:9004
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata:
  name: cart-canary
spec:
  address: http://127.0.0.1:9005
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata:
  name: cart-split
spec:
  targetRef:
    name: shop
  policyRef:
    name: route-weighted
  rules:
    - pathPrefix: /cart
  config:
    routes:
      - weight: 70
        destinationPath: /hello
        destinationRef:
          name: cart-stable
      - weight: 30
        destinationPath: /hello
        destinationRef:
          name: cart-canary
";

/// `curl -i` from inside `ns` with `args`; the response as text.
fn get(ns: &NetNs, args: &[&str]) -> anyhow::Result<String> {
    let (code, out, err) = curl(ns, &[&["-i"], args].concat())?;
    ensure!(code == 0, "curl {args:?}: {code} {err}");
    Ok(out)
}

#[test]
fn rules_pick_the_upstream_weights_split_the_traffic_and_policies_keep_to_their_rules() -> anyhow::Result<()>
{
    let ns = NetNs::new("rt")?;
    let dir = TempDir::new("rt")?;
    let ups: Vec<Upstream> = (9001..=9005)
        .map(|port| Upstream::start(&ns, SocketAddr::from(([127, 0, 0, 1], port))))
        .collect::<anyhow::Result<_>>()?;
    dir.write("gateway.yaml", &format!("{}{SHOP}", strict_settings("rt")))?;
    let _gw = GatewayProcess::start(&ns, &dir.0, "127.0.0.1:9901".parse()?)?;

    // Path and method: GET and POST under /items go to the catalog, the base
    // path replaced by the route's destinationPath; a POST also gets the
    // header its scoped policy injects, a GET does not.
    let head = get(&ns, &["http://127.0.0.1:8080/shop/items/7?x=1"])?;
    ensure!(
        head.contains("GET /headers/catalog/items/7?x=1 HTTP/1.1"),
        "{head}"
    );
    ensure!(!head.contains("x-write"), "a GET is not the policy's: {head}");
    let head = get(
        &ns,
        &["-X", "POST", "-d", "{}", "http://127.0.0.1:8080/shop/items/7"],
    )?;
    ensure!(
        head.contains("POST /headers/catalog/items/7 HTTP/1.1") && head.contains("x-write: yes"),
        "{head}"
    );
    // A header rule; then host and path together (the host alone is not enough).
    let head = get(
        &ns,
        &["-H", "x-beta: true", "http://127.0.0.1:8080/shop/anything"],
    )?;
    ensure!(head.contains("GET /headers/beta/anything HTTP/1.1"), "{head}");
    let admin = ["-H", "Host: admin.shop.test"];
    let head = get(
        &ns,
        &[&admin[..], &["http://127.0.0.1:8080/shop/users/3"]].concat(),
    )?;
    ensure!(head.contains("GET /headers/admin/users/3 HTTP/1.1"), "{head}");
    let head = get(
        &ns,
        &[&admin[..], &["http://127.0.0.1:8080/shop/orders"]].concat(),
    )?;
    ensure!(head.starts_with("HTTP/1.1 404"), "no route takes it: {head}");
    // A scoped block list refuses only what its rules take.
    let head = get(&ns, &["http://127.0.0.1:8080/shop/items/secret/1"])?;
    ensure!(head.starts_with("HTTP/1.1 403"), "{head}");
    let served: Vec<u64> = ups.iter().map(Upstream::requests).collect();
    ensure!(
        served == [2, 1, 1, 0, 0],
        "each request reached its upstream once: {served:?}"
    );

    // The canary: 10,000 requests on keep-alive connections, counted where they land.
    let total = 10_000u64;
    let mut conn = connect(&ns, "127.0.0.1:8080".parse()?)?;
    let mut buf = Vec::new();
    for i in 0..total {
        if i % 1000 == 0 {
            conn = connect(&ns, "127.0.0.1:8080".parse()?)?;
            conn.set_nodelay(true)?;
        }
        // One write per request: a head split over writes waits on delayed ACKs.
        conn.write_all(format!("GET /shop/cart/{i} HTTP/1.1\r\nHost: shop.test\r\n\r\n").as_bytes())?;
        let status = read_response(&mut conn, &mut buf)?;
        ensure!(status == 200, "request {i}: {}", String::from_utf8_lossy(&buf));
    }
    let (stable, canary) = (ups[3].requests(), ups[4].requests());
    ensure!(stable + canary == total, "{stable} + {canary} != {total}");
    #[expect(clippy::cast_precision_loss, reason = "counts of 10,000")]
    let share = canary as f64 / total as f64;
    eprintln!("canary share over {total} requests: {share:.4} (configured 0.30)");
    ensure!(
        (share - 0.30).abs() <= 0.02,
        "canary got {share:.4} of the traffic, not 0.30 ± 0.02"
    );

    let (_, m, _) = curl(&ns, &["http://127.0.0.1:9901/metrics"])?;
    ensure!(
        m.contains("portcullis_requests_total{api=\"shop\",status=\"404\"} 1"),
        "a request no route takes is counted for its API: {m}"
    );
    Ok(())
}
