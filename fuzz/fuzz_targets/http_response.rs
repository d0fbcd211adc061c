//! The upstream response head parser: no input panics it, and a head it
//! accepts has a valid status (RFC 9110 §15: 100 to 599).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::parse_response;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = parse_response(data, 100) {
        assert!((100..=599).contains(&head.status), "status {}", head.status);
        assert!(head.wire_len() <= data.len());
    }
});
