//! Embeds the XDP object built by `cargo xtask build-ebpf` into the gateway.

use std::{env, fs, path::PathBuf, process};

fn main() {
    println!("cargo::rerun-if-env-changed=PORTCULLIS_XDP_OBJ");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let default = manifest.join("../target/ebpf/bpfel-unknown-none/release/portcullis-xdp");
    let object = env::var_os("PORTCULLIS_XDP_OBJ").map_or(default, PathBuf::from);
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("portcullis-xdp.o");
    if let Err(error) = fs::copy(&object, &out) {
        eprintln!(
            "error: the XDP object {} is missing ({error}).\n\
             Run `cargo xtask build-ebpf` first (`cargo xtask test` and `cargo xtask demo` do it for you),\n\
             or point PORTCULLIS_XDP_OBJ at a built object.",
            object.display()
        );
        process::exit(1);
    }
}
