//! Any bytes as an HTTP request head: never a panic; a found head never
//! claims more bytes than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice::proxy::sniff::{Parsed, classify, parse_request_head};

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    if let Parsed::Found(head) = parse_request_head(data, 64 * 1024) {
        assert!(head.head_len <= data.len());
    }
});
