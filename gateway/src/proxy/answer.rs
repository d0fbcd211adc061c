//! One answer path: every response the gateway makes itself (no route, a
//! closed gate, a policy's refusal, a body too large, an upstream that failed,
//! a timeout) is an [`Answer`], and its status, headers, body, keep-alive
//! decision and log label come from here alone, as Pingora's
//! `fail_to_proxy` and linkerd's rescue do.

use super::error::ProxyError;
use crate::gatekeeper::Reason;
use crate::http::{self, Framing, Head, Version};
use crate::policy::{Denial, Response};

/// Content type of the gateway's own answers.
pub const CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// `Retry-After` of a 503 for a closed gate, in seconds.
const GATED_RETRY_AFTER: &str = "5";

/// A response the gateway makes itself, instead of the upstream's.
#[derive(Debug)]
pub enum Answer {
    /// No API instance matches: 404, not gated, not policed, not counted per API.
    NoRoute,
    /// A reload removed the listener while the request was read: 404, and the connection closes.
    ListenerGone,
    /// The Gatekeeper refused: 503 with `Retry-After`.
    Gated(Reason),
    /// A policy refused.
    Denied(Denial),
    /// A policy answered itself (a CORS preflight).
    Policy(Response),
    /// The API already carries its `maxConnections` WebSocket tunnels: 503 with `Retry-After`.
    TunnelsFull,
    /// No endpoint of the service could be reached; nothing reached the upstream.
    Unreachable(ProxyError),
    /// The request or the exchange failed; the connection closes after the answer.
    Failed(ProxyError),
    /// `OPTIONS` or `TRACE` with `Max-Forwards: 0` (RFC 9110 §7.6.2): answered
    /// here as the final recipient, 200 with no content.
    LastHop,
    /// `TRACE`, never forwarded (it would reflect the credentials and the
    /// headers the policies added): 501.
    TraceRefused,
    /// Memory is near the cgroup limit: 503 with `Retry-After`, and the connection closes.
    Overloaded,
}

impl Answer {
    /// Status sent to the client.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoRoute | Self::ListenerGone => 404,
            Self::LastHop => 200,
            Self::TraceRefused => 501,
            Self::Gated(_) | Self::TunnelsFull | Self::Overloaded => 503,
            Self::Denied(d) => d.status(),
            Self::Policy(r) => r.status,
            Self::Unreachable(e) | Self::Failed(e) => e.status(),
        }
    }

    /// What the access log's `error` field and the metrics record.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::ListenerGone => "listener_removed",
            Self::Gated(reason) => reason.label(),
            Self::Denied(d) => d.reason(),
            Self::Policy(_) => "policy_response",
            Self::TunnelsFull => "websocket_limit",
            Self::LastHop => "max_forwards",
            Self::TraceRefused => "trace_refused",
            Self::Overloaded => "memory_pressure",
            Self::Unreachable(e) | Self::Failed(e) => e.kind(),
        }
    }

    /// The error behind the answer, if the exchange failed.
    pub fn error(&self) -> Option<&ProxyError> {
        match self {
            Self::Unreachable(e) | Self::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the client can still read an answer (not once its connection failed).
    pub fn sendable(&self) -> bool {
        !matches!(self, Self::Failed(ProxyError::ClientIo(_)))
    }

    /// Whether the connection may carry another request after this answer to
    /// `request`. A body the gateway did not read cannot be skipped reliably,
    /// so a request with one closes; so does every failed exchange.
    pub fn keeps_alive(&self, request: &Head, draining: bool) -> bool {
        !draining
            && !matches!(self, Self::ListenerGone | Self::Failed(_) | Self::Overloaded)
            && request.keep_alive
            && request.framing == Framing::Empty
    }

    /// The answer's own header fields (beside its content type and length) and its body.
    pub fn parts(&self) -> (Vec<(String, String)>, String) {
        let status = self.status();
        let mut headers: Vec<(String, String)> = match self {
            Self::Denied(d) => d.headers(),
            Self::Policy(r) => r.headers.clone(),
            _ => Vec::new(),
        };
        if matches!(
            self,
            Self::Gated(_)
                | Self::TunnelsFull
                | Self::Overloaded
                | Self::Unreachable(ProxyError::CircuitOpen { .. })
        ) {
            headers.push(("retry-after".into(), GATED_RETRY_AFTER.into()));
        }
        let body = match self {
            Self::Policy(r) => r.body.clone(),
            Self::LastHop => String::new(),
            Self::Unreachable(e @ ProxyError::CircuitOpen { .. }) => {
                format!("{status} {}: {e}\n", http::reason(status))
            }
            _ => format!("{status} {}\n", http::reason(status)),
        };
        (headers, body)
    }

    /// The answer on the wire, for an HTTP/1 request of `version`.
    pub fn encode(&self, version: Version, keep_alive: bool) -> Vec<u8> {
        let status = self.status();
        let (owned, body) = self.parts();
        let headers: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        http::simple_response(
            status,
            &headers,
            CONTENT_TYPE,
            body.as_bytes(),
            version,
            keep_alive,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HeadLimits, parse_request};

    fn head(text: &str) -> Head {
        parse_request(text.as_bytes(), &HeadLimits::default()).expect("a valid head")
    }

    #[test]
    fn each_answer_has_its_status_label_and_headers() {
        let unauthorized = Answer::Denied(Denial::unauthorized("Bearer"));
        let cases: [(Answer, u16, &str, &str); 7] = [
            (Answer::TunnelsFull, 503, "websocket_limit", "retry-after: 5\r\n"),
            (Answer::NoRoute, 404, "no_route", ""),
            (
                Answer::Gated(Reason::PolicyNotReady),
                503,
                "policy_not_ready",
                "retry-after: 5\r\n",
            ),
            (unauthorized, 401, "unauthorized", "www-authenticate: Bearer\r\n"),
            (
                Answer::Denied(Denial::RateLimited {
                    headers: vec![("retry-after".into(), "2".into())],
                }),
                429,
                "rate_limited",
                "retry-after: 2\r\n",
            ),
            (
                Answer::Denied(Denial::Forbidden("in ip-blocklist")),
                403,
                "in ip-blocklist",
                "",
            ),
            (
                Answer::Failed(ProxyError::BodyTooLarge { limit: 1 }),
                413,
                "body_too_large",
                "",
            ),
        ];
        for (answer, status, label, header) in cases {
            assert_eq!((answer.status(), answer.label()), (status, label));
            let text = String::from_utf8(answer.encode(Version::Http11, true)).expect("text");
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            assert!(text.contains(header), "{label}: {text}");
            assert!(
                text.ends_with(&format!("{status} {}\n", http::reason(status))),
                "{text}"
            );
        }
    }

    #[test]
    fn keep_alive_follows_the_request_and_its_body() {
        let get = head("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let post = head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n");
        let close = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let old = head("GET / HTTP/1.0\r\n\r\n");
        let old_keep = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(Answer::NoRoute.keeps_alive(&get, false));
        assert!(!Answer::NoRoute.keeps_alive(&get, true), "a drain closes");
        assert!(
            !Answer::NoRoute.keeps_alive(&post, false),
            "an unread body closes"
        );
        assert!(!Answer::NoRoute.keeps_alive(&close, false));
        assert!(
            !Answer::NoRoute.keeps_alive(&old, false),
            "HTTP/1.0 closes by default"
        );
        assert!(Answer::NoRoute.keeps_alive(&old_keep, false));
        assert!(!Answer::Failed(ProxyError::ClientTimeout).keeps_alive(&get, false));
        assert!(!Answer::ListenerGone.keeps_alive(&get, false));
    }

    #[test]
    fn an_http10_client_kept_alive_is_told_so() {
        let kept = String::from_utf8(Answer::NoRoute.encode(Version::Http10, true)).expect("text");
        assert!(kept.contains("connection: keep-alive\r\n"), "{kept}");
        let closed = String::from_utf8(Answer::NoRoute.encode(Version::Http10, false)).expect("text");
        assert!(closed.contains("connection: close\r\n"), "{closed}");
        let eleven = String::from_utf8(Answer::NoRoute.encode(Version::Http11, true)).expect("text");
        assert!(!eleven.contains("connection:"), "{eleven}");
    }
}
