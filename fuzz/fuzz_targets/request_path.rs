//! Any bytes as an HTTP request target, normalised as request rules read
//! it: never a panic; the result is in normal form and stable.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::request_path(data));
