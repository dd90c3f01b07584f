//! Any bytes as an HTTP request head: never a panic; a found head never
//! claims more bytes than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::http_head(data));
