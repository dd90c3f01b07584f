//! Any bytes as a chunked body, fed whole and in two pieces: the same
//! verdict and the same end either way.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::chunked_body(data));
