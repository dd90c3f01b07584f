//! Any bytes as a fleet peer's message or score (Redis is peers' input,
//! as hostile as a sandbox's): never a panic; what parses is well formed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::fleet_message(data));
