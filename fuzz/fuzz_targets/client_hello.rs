//! Any bytes as the start of a TLS connection: never a panic, and a name is
//! only ever returned in normalised form.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::invariants::client_hello(data));
