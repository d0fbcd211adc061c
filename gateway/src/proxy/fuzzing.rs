//! Entry points for the libFuzzer targets in `fuzz/`: parts of the proxy
//! that only run inside a connection, reached here without one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::h2::io::{FrameMeter, PREFACE};
use super::h2::{server_builder, stream_head};
use crate::config::ProxySettings;
use crate::http::Version;

/// How long one fuzzed connection may take before it counts as a hang.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// A client's HTTP/2 bytes (after the preface) against the gateway's front:
/// the control-frame meter, fed them whole and cut where `cuts` says, must
/// end in the same place with the same verdict; the `h2` server with the
/// gateway's limits must serve or refuse them without panicking or hanging,
/// and each stream it accepts must become a head or a refusal.
pub fn h2_connection(client: &[u8], cuts: &[u8]) {
    let bytes = [PREFACE, client].concat();
    meter_is_cut_free(&bytes, cuts);
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| {
        // The deadline's timer exists only inside the runtime.
        let served = rt.block_on(async { tokio::time::timeout(CONNECTION_DEADLINE, serve(bytes)).await });
        assert!(served.is_ok(), "the connection hung");
    });
}

fn meter_is_cut_free(bytes: &[u8], cuts: &[u8]) {
    // Two meters with one refill clock, read at one instant: only the cuts differ.
    let mut whole = FrameMeter::new(100);
    let mut cut = whole.clone();
    let now = Instant::now();
    let over_whole = whole.scan(bytes, now);
    let (mut rest, mut over_cut) = (bytes, false);
    for &n in cuts.iter().cycle().take(bytes.len()) {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((usize::from(n) + 1).min(rest.len()));
        over_cut |= cut.scan(piece, now);
        rest = tail;
    }
    over_cut |= cut.scan(rest, now);
    assert_eq!(
        over_whole, over_cut,
        "the verdict depends on how the bytes were cut"
    );
    assert_eq!(
        whole.position(),
        cut.position(),
        "the scan depends on how the bytes were cut"
    );
}

async fn serve(bytes: Vec<u8>) {
    let settings = ProxySettings::default();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let write = async move {
        let _ = to_server.write_all(&bytes).await;
        let _ = to_server.shutdown().await;
    };
    let drain = async move {
        let mut sink = vec![0u8; 16 * 1024];
        while from_server.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    };
    let front = async move {
        let Ok(mut conn) = server_builder(&settings).handshake::<_, Bytes>(server).await else {
            return;
        };
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            let (parts, body) = request.into_parts();
            let (head, _) = stream_head(&parts, !body.is_end_stream(), &settings.limits);
            if let Ok(head) = head {
                assert_eq!(head.version, Version::Http2);
                if let Some(authority) = parts.uri.authority() {
                    assert_eq!(head.host(), Some(authority.as_str()), "`:authority` is the host");
                }
            }
            let response = ::http::Response::builder()
                .status(204)
                .body(())
                .expect("a response");
            let _ = respond.send_response(response, true);
        }
    };
    tokio::join!(write, drain, front);
}
