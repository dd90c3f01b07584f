//! Any bytes as the start of a TLS connection: never a panic, and a name is
//! only ever returned in normalised form.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice::proxy::sniff::{Parsed, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    if let Parsed::Found(hello) = parse_client_hello(data, 16 * 1024) {
        let name = hello.sni.as_str();
        assert_eq!(name, name.to_ascii_lowercase());
        assert!(!name.ends_with('.'));
    }
});
