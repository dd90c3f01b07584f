//! Any bytes as a DNS query to the DNS door: never a panic; every answer
//! built for it parses and keeps its ID.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::dns_message(data));
