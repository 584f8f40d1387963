//! Properties of the frame decoder on arbitrary bytes:
//! - never panics;
//! - the frames (or the violation) do not depend on how the bytes are
//!   split: whole, one byte at a time, and at cut points the input chooses;
//! - every frame it hands out is within the payload limit and its header
//!   passed validation;
//! - staging never reserves more than the payload limit.
#![no_main]

use cnse_proto::{Direction, FrameDecoder};
use libfuzzer_sys::fuzz_target;

const LIMIT: u32 = 4096;

type Frames = Vec<(u8, u64, u32, u64, Vec<u8>)>;

/// Decodes `data` cut into pieces of the sizes `cuts` cycles through.
fn run(data: &[u8], cuts: &[usize]) -> (Frames, Option<u32>) {
    let mut d = FrameDecoder::new(Direction::ToServer, LIMIT);
    let mut frames = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = cuts[i % cuts.len()].clamp(1, rest.len());
        i += 1;
        let (chunk, after) = rest.split_at(n);
        rest = after;
        let mut input = chunk;
        loop {
            match d.next(&mut input) {
                Ok(Some(f)) => {
                    assert_eq!(f.payload.len(), f.header.payload_len() as usize);
                    assert!(f.payload.len() <= LIMIT as usize);
                    assert!(!f.skipped, "no staging limit was set");
                    assert_eq!(f.header.validate(LIMIT, Direction::ToServer), Ok(f.kind));
                    frames.push((
                        f.kind as u8,
                        f.header.stream_id(),
                        f.header.arg(),
                        f.header.aux(),
                        f.payload.to_vec(),
                    ))
                }
                Ok(None) => break,
                Err(v) => {
                    // A violation sticks.
                    assert_eq!(d.next(&mut &b"CNSE"[..]).unwrap_err(), v);
                    return (frames, Some(v.code));
                }
            }
        }
        assert!(input.is_empty(), "Ok(None) with input left");
        assert!(
            d.staging_capacity() <= LIMIT as usize,
            "staged {}",
            d.staging_capacity()
        );
    }
    (frames, None)
}

fuzz_target!(|input: &[u8]| {
    // The first bytes choose the cut points; the rest is the stream.
    let Some(&n) = input.first() else {
        return;
    };
    let ncuts = usize::from(n % 4) + 1;
    let Some(cut_bytes) = input.get(1..=ncuts) else {
        return;
    };
    let cuts: Vec<usize> = cut_bytes.iter().map(|&b| usize::from(b) + 1).collect();
    let data = &input[1 + ncuts..];
    let whole = run(data, &[data.len().max(1)]);
    assert_eq!(run(data, &cuts), whole);
    assert_eq!(run(data, &[1]), whole);
});
