//! The HTTP/2 header path: a stream's pseudo-headers and fields become the
//! head the rest of the gateway reads; no input panics it, and a head it
//! accepts keeps `:authority` as its host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::{HeadLimits, Version, h2_request};

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xff: method, path, authority (empty: none), then name/value pairs.
    let parts: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let [method, path, authority, rest @ ..] = &parts[..] else {
        return;
    };
    let (Ok(method), Ok(path), Ok(authority)) = (
        std::str::from_utf8(method),
        std::str::from_utf8(path),
        std::str::from_utf8(authority),
    ) else {
        return;
    };
    let authority = (!authority.is_empty()).then_some(authority);
    let fields = rest.chunks(2).filter_map(|p| match p {
        [name, value] => Some((*name, *value)),
        _ => None,
    });
    let has_body = data.len() % 2 == 1;
    if let Ok(head) = h2_request(method, path, authority, fields, has_body, &HeadLimits::default()) {
        assert_eq!(head.version, Version::Http2);
        if let Some(a) = authority {
            assert_eq!(head.host(), Some(a), "`:authority` is the host");
        }
    }
});
