//! Integration tests, eBPF verdict tests and benchmarks of Portcullis; the
//! harness they share lives in `portcullis-harness` and is re-exported here.

pub use portcullis_harness::*;
