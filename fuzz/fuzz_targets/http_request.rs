//! The HTTP/1.1 request head parser: no input panics it, and a head it
//! accepts reads the same again from just the bytes it said it took.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::{HeadLimits, check_partial_request, head_end, parse_request};

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    let _ = check_partial_request(data, &limits);
    let _ = head_end(data);
    if let Ok(head) = parse_request(data, &limits) {
        let n = head.wire_len();
        assert!(n <= data.len(), "a head of {n} bytes from {}", data.len());
        let again = parse_request(&data[..n], &limits).expect("the head parses alone");
        assert_eq!(again.method(), head.method());
        assert_eq!(again.target(), head.target());
        assert_eq!(again.framing, head.framing);
        assert_eq!(again.headers().count(), head.headers().count());
    }
});
