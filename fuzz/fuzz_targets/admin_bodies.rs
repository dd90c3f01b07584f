//! Any bytes as an admin API request body, launch validation included:
//! an error or a request, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::admin_bodies(data));
