//! The upstream the VM test runs inside the appliance image: the harness's
//! HTTP/1.1 upstream on ADDR, counting requests that arrive without the
//! policy chain's tag, with both counts rewritten to FILE every 100 ms as
//! `requests untagged`.
//!
//! Usage: vm-upstream ADDR TAG FILE

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context as _;
use portcullis_harness::http::Upstream;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: vm-upstream ADDR TAG FILE";
    let addr = args.next().context(usage)?;
    let tag = args.next().context(usage)?;
    let file = std::path::PathBuf::from(args.next().context(usage)?);
    let listener = TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))?;
    let upstream = Upstream::serve(listener, None)?;
    upstream.expect_header(&tag);
    let partial = file.with_extension("partial");
    loop {
        std::fs::write(
            &partial,
            format!("{} {}\n", upstream.requests(), upstream.unmarked()),
        )?;
        std::fs::rename(&partial, &file)?;
        std::thread::sleep(Duration::from_millis(100));
    }
}
