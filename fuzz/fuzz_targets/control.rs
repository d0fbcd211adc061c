//! The control-plane protocol's messages, as a replica and the control plane
//! read them: no input panics the decoders, and a token reads back the same
//! after it is written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::control::protocol::{Issued, Refusal, RegisterRequest, RenewRequest, Snapshot, Token};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(token) = Token::parse(text)
    {
        assert_eq!(
            Token::parse(&token.encode()).ok(),
            Some(token),
            "a token round-trips"
        );
    }
    let _ = serde_json::from_slice::<RegisterRequest>(data);
    let _ = serde_json::from_slice::<RenewRequest>(data);
    let _ = serde_json::from_slice::<Issued>(data);
    let _ = serde_json::from_slice::<Refusal>(data);
    if let Ok(snapshot) = serde_json::from_slice::<Snapshot>(data) {
        let again: Snapshot = serde_json::from_slice(&serde_json::to_vec(&snapshot).expect("encodes"))
            .expect("our own encoding decodes");
        assert_eq!(again, snapshot);
    }
});
