//! Any string as an allowlist entry and as a host: never a panic, a parsed
//! entry prints back to itself, and a name always matches its own exact
//! entry.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::host_pattern(data));
