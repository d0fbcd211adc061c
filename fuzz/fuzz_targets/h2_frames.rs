//! The HTTP/2 frame path: a client's bytes after the preface meet the
//! gateway's control-frame meter (which must not care how the bytes were
//! cut into reads) and the `h2` server with the gateway's limits, whose
//! accepted streams become heads; nothing panics or hangs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::fuzzing::h2_connection;

fuzz_target!(|data: &[u8]| {
    // The first bytes say where the reads are cut (each is a read's length less one).
    let split = data.first().map_or(0, |n| usize::from(*n % 16));
    let (cuts, client) = data
        .get(1..)
        .unwrap_or_default()
        .split_at(split.min(data.len().saturating_sub(1)));
    h2_connection(client, cuts);
});
