//! The chunked body decoder: fed whole or in two pieces it comes to the same
//! payload, end and error, and what it re-encodes decodes back to the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::{ChunkedDecoder, Reencode};

/// Output, whether the body ended, and bytes consumed; `None` on an error.
fn decode(parts: &[&[u8]], mode: Reencode) -> Option<(Vec<u8>, bool, usize)> {
    let mut decoder = ChunkedDecoder::default();
    let mut out = Vec::new();
    let mut consumed = 0;
    for part in parts {
        if decoder.is_done() {
            break;
        }
        consumed += decoder.feed(part, &mut out, mode).ok()?;
    }
    Some((out, decoder.is_done(), consumed))
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) * body.len() / 256;
    let whole = decode(&[body], Reencode::Raw);
    let split = decode(&[&body[..cut], &body[cut..]], Reencode::Raw);
    assert_eq!(whole, split, "the same body fed in two pieces");
    if let Some((payload, true, _)) = whole {
        let (chunked, done, _) = decode(&[body], Reencode::Chunked).expect("decodes again");
        assert!(done);
        let (back, done, used) = decode(&[&chunked], Reencode::Raw).expect("our own chunks decode");
        assert!(done && used == chunked.len());
        assert_eq!(back, payload, "re-encoded chunks carry the same payload");
    }
});
