//! Any bytes as a token (header, claims, signature): always refused,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::token(data));
