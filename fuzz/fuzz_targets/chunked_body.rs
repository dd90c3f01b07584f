//! Any bytes as a chunked body, fed whole and in two pieces: the same
//! verdict and the same end either way.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice::proxy::sniff::{ChunkProgress, ChunkedState};

fuzz_target!(|data: &[u8]| {
    let whole = ChunkedState::default().feed(data);
    let cut = data.len() / 2;
    let mut st = ChunkedState::default();
    let split = match st.feed(&data[..cut]) {
        ChunkProgress::Consumed => match st.feed(&data[cut..]) {
            ChunkProgress::Done(n) => ChunkProgress::Done(n + cut),
            other => other,
        },
        other => other,
    };
    assert_eq!(whole, split);
});
