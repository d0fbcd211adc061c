//! The data path in process: the real server, router, Gatekeeper, policies,
//! upstream client and pool, driven over in-memory connections by scripted
//! clients and upstreams. No root, no namespace, no socket: plain `cargo test`.
//! What needs the kernel (TCP, TLS on real sockets, XDP) stays in `tests/`.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::config::{self, MemSource};
use portcullis::proxy::io::mem::{self, MemConn, Network};
use portcullis::proxy::io::{self, Connector, Transport as _};
use portcullis::proxy::{Worker, server};
use portcullis::runtime::{Generation, Shared};
use portcullis::telemetry::Metrics;

const LISTENER: &str = "127.0.0.1:8080";
const UPSTREAM: &str = "127.0.0.1:9000";

const SETTINGS: &str = "apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata:
  name: inproc
spec:
  proxy:
    limits:
      requestLineBytes: 256
      headerBytes: 2048
      headers: 20
      maxBodyBytes: 64
    timeouts:
      requestHeaders: 1s
      idle: 2s
      upstreamConnect: 1s
      upstreamResponse: 30s
---
";

/// An API instance at `path` on the listener, to the scripted upstream, with `policies`.
fn api(name: &str, path: &str, policies: &str) -> String {
    let policies = if policies.is_empty() {
        String::new()
    } else {
        format!("  policies:\n{policies}")
    };
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata:
  name: {name}
spec:
  address: http://{LISTENER}{path}
  services:
    up:
      address: http://{UPSTREAM}/
{policies}---
"
    )
}

/// The access lines and warnings written while a test runs.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

/// Runs `test` on an io_uring worker thread's runtime, with logs captured.
fn run<F: Future<Output = ()>>(test: impl FnOnce(Log) -> F) {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, || io::start(test(log)));
}

/// A gateway worker over `resources`, its upstreams on an in-memory network.
struct Gateway {
    worker: Rc<Worker>,
    net: Network,
}

fn gateway(resources: &str) -> Gateway {
    gateway_in(&std::env::temp_dir(), resources)
}

/// A gateway whose relative file names resolve against `dir`.
fn gateway_in(dir: &std::path::Path, resources: &str) -> Gateway {
    let files = vec![("gateway.yaml".to_owned(), format!("{SETTINGS}{resources}"))];
    let config = config::load(&MemSource {
        files,
        base: dir.to_path_buf(),
    })
    .unwrap_or_else(|e| panic!("configuration: {e}"));
    let generation = Generation::build(config, None).unwrap_or_else(|e| panic!("generation: {e}"));
    let shared = Arc::new(Shared::new(generation, Arc::new(Metrics::default())));
    let net = Network::default();
    let worker = Rc::new(Worker::new(shared, Connector::Mem(net.clone())));
    Gateway { worker, net }
}

/// A client connection to the gateway's listener from `peer`.
struct Client(MemConn);

/// How long a client waits for more bytes before it takes a response as complete.
const QUIET: Duration = Duration::from_millis(100);

impl Gateway {
    fn connect_from(&self, peer: &str) -> Client {
        let addr: SocketAddr = LISTENER.parse().expect("listener address");
        let listener = self
            .worker
            .current()
            .listeners
            .get(&addr)
            .cloned()
            .expect("the listener");
        let (ours, theirs) = mem::pair();
        io::spawn(server::serve(
            server::OpenGuard::count(&self.worker),
            listener,
            theirs.into(),
            peer.parse().expect("peer address"),
        ));
        Client(ours)
    }

    fn connect(&self) -> Client {
        self.connect_from("198.51.100.7:40000")
    }

    /// One request on a new connection: the response, and whether the gateway closed.
    async fn send(&self, raw: &str) -> (String, bool) {
        self.connect().send(raw).await
    }

    fn metrics(&self) -> String {
        self.worker.shared.metrics.encode()
    }
}

impl Client {
    /// Sends `raw`, then reads until the gateway closes or goes quiet.
    async fn send(&self, raw: &str) -> (String, bool) {
        let (res, _) = self.0.write_all(raw.as_bytes().to_vec()).await;
        res.expect("the gateway reads");
        self.read().await
    }

    async fn read(&self) -> (String, bool) {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(QUIET, self.0.read(Vec::with_capacity(16 * 1024))).await {
                Ok((Ok(0) | Err(_), _)) => return (String::from_utf8_lossy(&got).into_owned(), true),
                Ok((Ok(_), buf)) => got.extend_from_slice(&buf),
                Err(_) if got.is_empty() => {}
                Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            }
        }
    }
}

/// What a scripted upstream does with one request.
enum Reply {
    /// Sends these bytes and keeps the connection.
    Send(&'static str),
    /// Sends these bytes and closes.
    SendClose(&'static str),
    /// Closes without answering.
    Close,
    /// Never answers.
    Hang,
}

/// What an upstream does: `script(connection, request on it, raw request)`.
type Script = Rc<dyn Fn(usize, usize, &str) -> Reply>;

/// A scripted upstream.
struct Upstream {
    seen: Rc<RefCell<Vec<String>>>,
    connections: Rc<Cell<usize>>,
}

const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

fn upstream(gw: &Gateway, script: impl Fn(usize, usize, &str) -> Reply + 'static) -> Upstream {
    let mut listener = gw.net.listen(UPSTREAM.parse().expect("upstream address"));
    let seen = Rc::new(RefCell::new(Vec::new()));
    let connections = Rc::new(Cell::new(0));
    let script: Script = Rc::new(script);
    let (log, count) = (seen.clone(), connections.clone());
    io::spawn(async move {
        while let Some(conn) = listener.accept().await {
            let n = count.get();
            count.set(n + 1);
            io::spawn(serve_upstream(conn, n, script.clone(), log.clone()));
        }
    });
    Upstream { seen, connections }
}

fn ok_upstream(gw: &Gateway) -> Upstream {
    upstream(gw, |_, _, _| Reply::Send(OK))
}

async fn serve_upstream(conn: MemConn, n: usize, script: Script, seen: Rc<RefCell<Vec<String>>>) {
    let mut buf = Vec::new();
    for k in 0.. {
        let Some(request) = read_request(&conn, &mut buf).await else {
            return;
        };
        seen.borrow_mut().push(request.clone());
        match script(n, k, &request) {
            Reply::Send(bytes) => drop(conn.write_all(bytes.as_bytes().to_vec()).await),
            Reply::SendClose(bytes) => {
                drop(conn.write_all(bytes.as_bytes().to_vec()).await);
                return;
            }
            Reply::Close => return,
            Reply::Hang => std::future::pending::<()>().await,
        }
    }
}

/// One request (head and a content-length or chunked body) from `conn`.
async fn read_request(conn: &MemConn, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        let text = String::from_utf8_lossy(buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n").map(|i| i + 4) {
            let head = text[..end].to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let complete = match length {
                Some(n) => (text.len() >= end + n).then_some(end + n),
                None if head.contains("transfer-encoding: chunked") => {
                    text[end..].find("0\r\n\r\n").map(|i| end + i + 5)
                }
                None => Some(end),
            };
            if let Some(at) = complete {
                buf.drain(..at);
                return Some(text[..at].to_owned());
            }
        }
        let (res, more) = conn.read(std::mem::take(buf)).await;
        *buf = more;
        if !matches!(res, Ok(n) if n > 0) {
            return None;
        }
    }
}

fn status(response: &str) -> u16 {
    response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn codec_edge_cases_get_their_status_and_close_when_framing_is_in_doubt() {
    run(|log| async move {
        let gw = gateway(&api("main", "/", ""));
        let up = ok_upstream(&gw);
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(300));
        let many_headers = format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X-A: 1\r\n".repeat(25));
        let cases: [(&str, &str, u16, bool); 15] = [
            ("plain GET", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200, false),
            (
                "GET with a body",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
                200,
                false,
            ),
            (
                "chunked body",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                200,
                false,
            ),
            (
                "CL and TE",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                true,
            ),
            (
                "two CLs",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
                400,
                true,
            ),
            (
                "bad CL",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nhi",
                400,
                true,
            ),
            (
                "obs-fold",
                "GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  2\r\n\r\n",
                400,
                true,
            ),
            ("bare LF", "GET / HTTP/1.1\nHost: a\r\n\r\n", 400, true),
            ("NUL", "GET / HTTP/1.1\r\nHost: a\r\nX-A: \0\r\n\r\n", 400, true),
            ("no Host", "GET / HTTP/1.1\r\n\r\n", 400, true),
            (
                "TE gzip",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
                400,
                true,
            ),
            (
                "TE unknown under chunked",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: br, chunked\r\n\r\n",
                501,
                true,
            ),
            (
                "bad chunk size",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                400,
                true,
            ),
            ("long request line", long_line.as_str(), 414, true),
            ("too many headers", many_headers.as_str(), 431, true),
        ];
        for (what, raw, want, closes) in cases {
            let (response, closed) = gw.send(raw).await;
            assert_eq!(status(&response), want, "{what}: {response}\n{}", log.text());
            assert_eq!(closed, closes, "{what}: closed");
        }
        assert!(
            up.seen
                .borrow()
                .iter()
                .all(|r| !r.contains("gzip") && !r.contains("X-A: 1\r\n  2")),
            "a refused head never reaches the upstream"
        );
    });
}

#[test]
fn interim_responses_are_passed_on_and_100_continue_is_sent_once() {
    run(|_| async move {
        let gw = gateway(&api("main", "/", ""));
        let _up = upstream(&gw, |_, _, request| {
            if request.starts_with("GET") {
                Reply::Send(
                    "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                )
            } else {
                Reply::Send("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            }
        });
        let (response, _) = gw.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let hints = response.find("HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n");
        let ok = response.find("HTTP/1.1 200 OK");
        assert!(hints.is_some() && ok > hints, "103 before 200: {response}");
        let client = gw.connect();
        let (first, _) = client
            .send("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .await;
        assert_eq!(
            first, "HTTP/1.1 100 Continue\r\n\r\n",
            "the gateway says continue itself"
        );
        let (rest, _) = client.send("hi").await;
        assert_eq!(status(&rest), 201, "{rest}");
        assert!(
            !rest.contains("100 Continue"),
            "the upstream's own 100 is not passed on again: {rest}"
        );
    });
}

#[test]
fn a_stale_pooled_connection_is_retried_only_when_nothing_can_repeat() {
    run(|log| async move {
        let gw = gateway(&api("main", "/", ""));
        // Every connection answers its first request and silently closes on its second.
        let up = upstream(&gw, |_, k, _| if k == 0 { Reply::Send(OK) } else { Reply::Close });
        let client = gw.connect();
        let (first, _) = client.send("GET /a HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(status(&first), 200, "{first}");
        let (second, _) = client.send("GET /b HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(
            status(&second),
            200,
            "a GET on a pooled connection that closed before answering is retried: {second}\n{}",
            log.text()
        );
        assert_eq!(up.connections.get(), 2);
        assert_eq!(up.seen.borrow().len(), 3, "GET /a, GET /b refused, GET /b again");
        let (post, closed) = client
            .send("POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
            .await;
        assert_eq!(status(&post), 502, "a POST is never sent twice: {post}");
        assert!(closed);
        let posts = up.seen.borrow().iter().filter(|r| r.starts_with("POST")).count();
        assert_eq!(posts, 1, "the upstream saw the POST once");
        assert!(log.text().contains("error=\"io\""), "{}", log.text());
    });
}

#[test]
fn bodies_that_end_at_close_are_rechunked_for_http11_and_raw_for_http10() {
    run(|_| async move {
        let gw = gateway(&api("main", "/", ""));
        let _up = upstream(&gw, |_, _, request| {
            if request.starts_with("GET /close") {
                Reply::SendClose("HTTP/1.1 200 OK\r\n\r\nabc")
            } else {
                Reply::Send("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n")
            }
        });
        let (response, closed) = gw.send("GET /close HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            response.contains("transfer-encoding: chunked\r\n")
                && response.ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            "{response}"
        );
        assert!(!closed, "a re-chunked response keeps the client's connection");
        let (response, closed) = gw.send("GET /close HTTP/1.0\r\n\r\n").await;
        assert!(response.ends_with("\r\n\r\nabc") && closed, "{response}");
        let (response, closed) = gw.send("GET /chunked HTTP/1.0\r\n\r\n").await;
        assert!(
            response.ends_with("\r\n\r\nxyz") && !response.contains("transfer-encoding") && closed,
            "an HTTP/1.0 client gets a chunked body raw: {response}"
        );
        let (response, closed) = gw.send("GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            response.ends_with("3\r\nxyz\r\n0\r\n\r\n") && !closed,
            "{response}"
        );
    });
}

#[test]
fn a_body_over_the_limit_gets_413_up_front_and_while_streaming() {
    run(|log| async move {
        let gw = gateway(&api("main", "/", ""));
        let up = ok_upstream(&gw);
        let (response, closed) = gw
            .send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
            .await;
        assert!(status(&response) == 413 && closed, "{response}");
        assert_eq!(
            up.connections.get(),
            0,
            "a declared body too large never reaches the upstream"
        );
        let chunk = format!("28\r\n{}\r\n", "x".repeat(40));
        let (response, closed) = gw
            .send(&format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
            ))
            .await;
        assert!(status(&response) == 413 && closed, "{response}");
        assert!(
            up.seen.borrow().is_empty(),
            "the upstream never got a whole request"
        );
        assert_eq!(
            log.text().matches("error=\"body_too_large\"").count(),
            2,
            "{}",
            log.text()
        );
    });
}

#[test]
fn the_gatekeeper_answers_503_and_untracked_traffic_404() {
    run(|log| async move {
        let enforce = "    - policyRef:\n        name: client-id-enforcement-flex\n";
        let gw = gateway(&format!(
            "{}{}",
            api("orders", "/orders", enforce),
            api("open", "/open", "")
        ));
        let up = ok_upstream(&gw);
        let (gated, closed) = gw.send("GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            status(&gated) == 503 && gated.contains("retry-after: 5\r\n") && !closed,
            "no contract yet: {gated}"
        );
        let (nothing, _) = gw.send("GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(status(&nothing), 404, "{nothing}");
        let (open, _) = gw.send("GET /open/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(status(&open), 200, "{open}");
        assert_eq!(
            up.seen.borrow().len(),
            1,
            "only the open route reached the upstream"
        );
        let metrics = gw.metrics();
        assert!(
            metrics
                .contains("portcullis_gate_rejections_total{api=\"orders\",reason=\"contracts_missing\"} 1"),
            "{metrics}"
        );
        let text = log.text();
        assert!(
            text.contains("error=\"contracts_missing\"") && text.contains("error=\"no_route\""),
            "{text}"
        );
    });
}

/// A contract for `apis` whose secret is `password`.
fn contract(id: &str, tier: &str, apis: &str) -> String {
    format!(
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Contract\nmetadata:\n  name: {id}\nspec:\n  clientId: {id}\n  clientSecretHash: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n  slaTier: {tier}\n  apis: [{apis}]\n---\n"
    )
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
}

#[test]
fn ip_filters_judge_the_client_address() {
    run(|log| async move {
        let allow =
            "    - policyRef:\n        name: ip-allowlist-flex\n      config:\n        ips: [10.0.0.0/8]\n";
        let block =
            "    - policyRef:\n        name: ip-blocklist-flex\n      config:\n        ips: [192.0.2.0/24]\n";
        let gw = gateway(&format!(
            "{}{}",
            api("inside", "/inside", allow),
            api("public", "/public", block)
        ));
        let _up = ok_upstream(&gw);
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        let inside = gw.connect_from("10.1.2.3:5000").send(&get("/inside")).await.0;
        let outside = gw.connect_from("192.0.2.9:5000").send(&get("/inside")).await.0;
        let blocked = gw.connect_from("192.0.2.9:5000").send(&get("/public")).await.0;
        let other = gw.connect_from("10.1.2.3:5000").send(&get("/public")).await.0;
        assert_eq!(
            [
                status(&inside),
                status(&outside),
                status(&blocked),
                status(&other)
            ],
            [200, 403, 403, 200]
        );
        let text = log.text();
        assert!(
            text.contains("error=\"not in ip-allowlist\"") && text.contains("error=\"in ip-blocklist\""),
            "{text}"
        );
    });
}

#[test]
fn cors_answers_preflights_itself_and_refuses_unknown_origins() {
    run(|log| async move {
        let cors = "    - policyRef:
        name: cors-flex
      config:
        publicResource: false
        originGroups:
          - origins: [\"https://app.example.com\"]
            allowedMethods:
              - methodName: PUT
                isAllowed: true
";
        let gw = gateway(&api("orders", "/orders", cors));
        let up = ok_upstream(&gw);
        let preflight = |origin: &str| {
            format!(
                "OPTIONS /orders/1 HTTP/1.1\r\nHost: a\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: PUT\r\n\r\n"
            )
        };
        let (ok, _) = gw.send(&preflight("https://app.example.com")).await;
        assert!(
            status(&ok) == 200 && ok.contains("access-control-allow-origin: https://app.example.com"),
            "{ok}"
        );
        let (refused, _) = gw.send(&preflight("https://evil.example.com")).await;
        assert_eq!(status(&refused), 403, "{refused}");
        let (actual, _) = gw
            .send("GET /orders/1 HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\n\r\n")
            .await;
        assert!(
            actual.contains("access-control-allow-origin: https://app.example.com"),
            "{actual}"
        );
        assert_eq!(up.seen.borrow().len(), 1, "preflights never reach the upstream");
        let text = log.text();
        assert!(
            text.contains("error=\"policy_response\"") && text.contains("error=\"cors: origin not allowed\""),
            "{text}"
        );
    });
}

#[test]
fn client_id_enforcement_needs_credentials_of_a_contract() {
    run(|log| async move {
        let enforce = "    - policyRef:\n        name: client-id-enforcement-flex\n";
        let gw = gateway(&format!(
            "{}{}{}{}",
            api("orders", "/orders", enforce),
            api("elsewhere", "/elsewhere", enforce),
            contract("app", "gold", "orders"),
            contract("other", "gold", "elsewhere")
        ));
        let _up = ok_upstream(&gw);
        let with =
            |auth: &str| format!("GET /orders/1 HTTP/1.1\r\nHost: a\r\nAuthorization: Basic {auth}\r\n\r\n");
        let (none, _) = gw.send("GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            status(&none) == 401 && none.contains("www-authenticate: Basic realm=\"portcullis\"\r\n"),
            "{none}"
        );
        assert_eq!(status(&gw.send(&with(&basic("app", "wrong"))).await.0), 401);
        let (foreign, _) = gw.send(&with(&basic("other", "password"))).await;
        assert_eq!(status(&foreign), 403, "a contract for another API: {foreign}");
        assert_eq!(status(&gw.send(&with(&basic("app", "password"))).await.0), 200);
        let text = log.text();
        assert_eq!(text.matches("error=\"unauthorized\"").count(), 2, "{text}");
        assert!(text.contains("error=\"no contract for this API\""), "{text}");
    });
}

#[test]
fn jwt_validation_admits_only_good_tokens() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    run(|log| async move {
        let key = rcgen::KeyPair::generate().expect("a key pair");
        let public = key.public_key_pem().replace('\n', "\n          ");
        let jwt = format!(
            "    - policyRef:
        name: jwt-validation-flex
      config:
        signingMethod: es
        signingKeyLength: 256
        jwtKeyOrigin: text
        textKey: |
          {public}
        mandatoryExpClaim: true
"
        );
        let gw = gateway(&api("orders", "/orders", &jwt));
        let up = ok_upstream(&gw);
        let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("an EC key");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let token = |exp: u64| {
            encode(
                &Header::new(Algorithm::ES256),
                &serde_json::json!({ "exp": exp }),
                &signing,
            )
            .expect("signed")
        };
        let with =
            |t: &str| format!("GET /orders/1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {t}\r\n\r\n");
        let (none, _) = gw.send("GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            status(&none) == 401 && none.contains("www-authenticate: Bearer\r\n"),
            "{none}"
        );
        let (expired, _) = gw.send(&with(&token(now - 600))).await;
        assert!(
            status(&expired) == 401 && expired.contains("error_description=\"expired\""),
            "{expired}"
        );
        let (garbage, _) = gw.send(&with("not.a.token")).await;
        assert_eq!(status(&garbage), 401, "{garbage}");
        let (good, _) = gw.send(&with(&token(now + 600))).await;
        assert_eq!(status(&good), 200, "{good}\n{}", log.text());
        assert_eq!(up.seen.borrow().len(), 1);
    });
}

#[test]
fn sla_tiers_and_spike_control_refuse_with_429() {
    run(|log| async move {
        let sla = "    - policyRef:
        name: rate-limiting-sla-based-flex
      config:
        clientIdExpression: \"#[attributes.headers['client_id']]\"
        clientSecretExpression: \"#[attributes.headers['client_secret']]\"
        tiers:
          - name: silver
            rateLimits:
              - maximumRequests: 2
                timePeriodInMilliseconds: 60000
";
        let spike = "    - policyRef:
        name: spike-control-flex
      config:
        maximumRequests: 1
        timePeriodInMilliseconds: 60000
        delayTimeInMillis: 10
        delayAttempts: 1
        queuingLimit: 0
";
        let gw = gateway(&format!(
            "{}{}{}",
            api("orders", "/orders", sla),
            api("burst", "/burst", spike),
            contract("app", "silver", "orders")
        ));
        let _up = ok_upstream(&gw);
        let as_app = "GET /orders/1 HTTP/1.1\r\nHost: a\r\nclient_id: app\r\nclient_secret: password\r\n\r\n";
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(status(&gw.send(as_app).await.0));
        }
        assert_eq!(statuses, [200, 200, 429], "{}", log.text());
        let (first, _) = gw.send("GET /burst/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let (second, _) = gw.send("GET /burst/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!((status(&first), status(&second)), (200, 429), "{second}");
        assert!(second.contains("retry-after: "), "{second}");
        assert_eq!(
            log.text().matches("error=\"rate_limited\"").count(),
            2,
            "{}",
            log.text()
        );
    });
}

#[test]
fn the_response_timeout_policy_tightens_the_service_timeout() {
    run(|log| async move {
        let timeout =
            "    - policyRef:\n        name: response-timeout-flex\n      config:\n        timeout: 0.1\n";
        let gw = gateway(&api("slow", "/slow", timeout));
        let _up = upstream(&gw, |_, _, _| Reply::Hang);
        let (response, _) = gw.send("GET /slow/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(
            status(&response),
            504,
            "the service waits 30 s, the policy 0.1 s: {response}"
        );
        assert!(log.text().contains("error=\"timeout\""), "{}", log.text());
    });
}

#[test]
fn header_policies_edit_both_heads() {
    run(|_| async move {
        let headers = "    - policyRef:
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
        inboundHeaders: [X-Debug]
        outboundHeaders: [x-upstream-secret]
";
        let gw = gateway(&api("main", "/", headers));
        let up = upstream(&gw, |_, _, _| {
            Reply::Send("HTTP/1.1 200 OK\r\nx-upstream-secret: s\r\ncontent-length: 2\r\n\r\nok")
        });
        let (response, _) = gw.send("GET / HTTP/1.1\r\nHost: a\r\nX-Debug: 1\r\n\r\n").await;
        assert!(
            response.contains("x-served-by: portcullis\r\n") && !response.contains("x-upstream-secret"),
            "{response}"
        );
        let seen = up.seen.borrow();
        assert!(
            seen[0].contains("x-gateway: portcullis\r\n")
                && !seen[0].to_ascii_lowercase().contains("x-debug"),
            "{}",
            seen[0]
        );
    });
}

#[test]
fn rate_limiting_counts_per_key() {
    run(|log| async move {
        let limit = "    - policyRef:
        name: rate-limiting-flex
      config:
        keySelector: \"#[attributes.remoteAddress]\"
        rateLimits:
          - maximumRequests: 2
            timePeriodInMilliseconds: 60000
";
        let gw = gateway(&api("orders", "/orders", limit));
        let _up = ok_upstream(&gw);
        let get = "GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(gw.connect_from("192.0.2.1:1000").send(get).await.0);
        }
        let other = gw.connect_from("192.0.2.2:1000").send(get).await.0;
        assert_eq!(
            first.iter().map(|r| status(r)).collect::<Vec<_>>(),
            [200, 200, 429],
            "{}",
            log.text()
        );
        assert!(first[0].contains("ratelimit-remaining: 1\r\n"), "{}", first[0]);
        assert!(first[2].contains("retry-after: "), "{}", first[2]);
        assert_eq!(status(&other), 200, "another client has its own count");
    });
}

#[test]
fn basic_authentication_checks_the_credentials_file() {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::env::temp_dir().join(format!("portcullis-basic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("users.txt"))
        .expect("the credentials file");
    std::io::Write::write_all(
        &mut file,
        b"alice:sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\n",
    )
    .expect("written");
    let policy = "    - policyRef:\n        name: http-basic-authentication-flex\n      config:\n        credentialsFile: users.txt\n";
    let gw = gateway_in(&dir, &api("orders", "/orders", policy));
    std::fs::remove_dir_all(&dir).expect("removed");
    run(|log| async move {
        let _up = ok_upstream(&gw);
        let with =
            |auth: &str| format!("GET /orders/1 HTTP/1.1\r\nHost: a\r\nAuthorization: Basic {auth}\r\n\r\n");
        let (none, _) = gw.send("GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            status(&none) == 401
                && none.contains("www-authenticate: Basic realm=\"portcullis\", charset=\"UTF-8\""),
            "{none}"
        );
        assert_eq!(status(&gw.send(&with(&basic("alice", "wrong"))).await.0), 401);
        assert_eq!(status(&gw.send(&with(&basic("bob", "password"))).await.0), 401);
        assert_eq!(status(&gw.send(&with(&basic("alice", "password"))).await.0), 200);
        assert_eq!(
            log.text().matches("error=\"unauthorized\"").count(),
            3,
            "{}",
            log.text()
        );
    });
}
