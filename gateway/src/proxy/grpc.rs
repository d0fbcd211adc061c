//! What the gateway knows of gRPC (over HTTP/2, both sides): which requests
//! are gRPC, their deadline (`grpc-timeout`), and the status a refusal the
//! gateway makes itself is given in gRPC form.

use std::time::Duration;

use crate::http::Head;

/// Whether `request` is a gRPC call (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(request: &Head) -> bool {
    request.header("content-type").is_some_and(|ct| {
        ct.len() >= 16
            && ct[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(ct.get(16), None | Some(b'+' | b';'))
    })
}

/// The call's deadline from `grpc-timeout` (`1-8 digits` then `H M S m u n`), if valid.
pub fn deadline(request: &Head) -> Option<Duration> {
    let value = std::str::from_utf8(request.header("grpc-timeout")?).ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status of an answer the gateway makes itself with HTTP `status`.
pub fn status_of(status: u16) -> u32 {
    match status {
        // UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED.
        401 => 16,
        403 => 7,
        429 | 413 => 8,
        // UNIMPLEMENTED: no API serves the method.
        404 => 12,
        // DEADLINE_EXCEEDED.
        408 | 504 => 4,
        // UNAVAILABLE: a closed gate, an unreachable or broken upstream.
        502 | 503 => 14,
        // INTERNAL: a malformed call.
        _ => 13,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HeadLimits, parse_request};

    fn head(extra: &str) -> Head {
        let text = format!("POST /a.B/C HTTP/1.1\r\nhost: x\r\n{extra}\r\n");
        parse_request(text.as_bytes(), &HeadLimits::default()).expect("a valid head")
    }

    #[test]
    fn grpc_calls_and_their_deadlines_are_recognised() {
        assert!(is_grpc(&head("content-type: application/grpc\r\n")));
        assert!(is_grpc(&head("content-type: application/grpc+proto\r\n")));
        assert!(!is_grpc(&head("content-type: application/grpc-web\r\n")));
        assert!(!is_grpc(&head("content-type: application/json\r\n")));
        let d = |v: &str| deadline(&head(&format!("grpc-timeout: {v}\r\n")));
        assert_eq!(d("250m"), Some(Duration::from_millis(250)));
        assert_eq!(d("2S"), Some(Duration::from_secs(2)));
        assert_eq!(d("1H"), Some(Duration::from_hours(1)));
        assert_eq!(d("123456789S"), None, "at most 8 digits");
        assert_eq!(d("5x"), None);
        assert_eq!(d("m"), None);
        assert_eq!(
            [401, 403, 429, 503, 504].map(status_of),
            [16, 7, 8, 14, 4],
            "the refusals the gateway makes itself"
        );
    }
}
