//! The admin listener: `/healthz`, `/readyz` and Prometheus `/metrics`, loopback by default.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::io::{self, Listener, TcpConn, Transport as _};
use crate::http::{self, HeadLimits};
use crate::runtime::Shared;

/// Serves the admin endpoints on the current thread until the process exits.
pub fn run(socket: std::net::TcpListener, shared: Arc<Shared>, workers: usize) {
    io::start(async move {
        let listener = Listener::from_std(socket);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            io::spawn(serve(tcp, shared.clone(), workers));
        }
    });
}

async fn serve(tcp: TcpConn, shared: Arc<Shared>, workers: usize) {
    let limits = HeadLimits::default();
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head = loop {
            if let Some(end) = http::head_end(&buf) {
                let parsed = http::parse_request(&buf[..end], &limits);
                buf.drain(..end);
                break parsed.ok();
            }
            if buf.len() > limits.header_bytes {
                break None;
            }
            match tokio::time::timeout(Duration::from_secs(30), tcp.read(buf)).await {
                Ok((Ok(n), b)) if n > 0 => buf = b,
                _ => return,
            }
        };
        let Some(head) = head else {
            let _ = tcp
                .write_all(http::simple_response(
                    400,
                    &[],
                    "text/plain",
                    b"bad request\n",
                    http::Version::Http11,
                    false,
                ))
                .await;
            return;
        };
        let ready =
            shared.started.load(Ordering::Acquire) && shared.ready_workers.load(Ordering::SeqCst) >= workers;
        let (status, ctype, body) = match (head.method(), head.path()) {
            ("GET" | "HEAD", "/healthz") => (200, "text/plain", b"ok\n".to_vec()),
            ("GET" | "HEAD", "/readyz") if ready => (200, "text/plain", b"ready\n".to_vec()),
            ("GET" | "HEAD", "/readyz") => (503, "text/plain", b"starting\n".to_vec()),
            ("GET" | "HEAD", "/metrics") => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                shared
                    .metrics
                    .encode_with(&|out| {
                        crate::runtime::health::write_metrics(&shared.current(), out);
                        crate::telemetry::trace::write_metrics(out);
                    })
                    .into_bytes(),
            ),
            ("GET" | "HEAD", _) => (404, "text/plain", b"not found\n".to_vec()),
            _ => (405, "text/plain", b"method not allowed\n".to_vec()),
        };
        let mut response = http::simple_response(status, &[], ctype, &body, head.version, head.keep_alive);
        if head.method() == "HEAD" {
            response.truncate(response.len() - body.len());
        }
        let (res, _) = tcp.write_all(response).await;
        if res.is_err() || !head.keep_alive {
            return;
        }
    }
}
