//! The configuration loader, YAML to the validated model with its secret
//! references: no input panics it, and every error it reports names the
//! file and a line in it.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use portcullis::config::{MemSource, load};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    // YAML breaks lines at `\r` too: a line number is at most one per byte.
    let lines = text.len() + 1;
    let source = MemSource {
        files: vec![("fuzz.yaml".into(), text)],
        base: PathBuf::from("/nonexistent/portcullis-fuzz"),
    };
    if let Err(errors) = load(&source) {
        assert!(!errors.0.is_empty(), "a refusal says why");
        for e in &errors.0 {
            assert_eq!(e.file, "fuzz.yaml", "{e}");
            assert!(e.line >= 1 && e.line <= lines, "{e} beyond the text");
        }
    }
});
