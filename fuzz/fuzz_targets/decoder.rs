//! Properties of the frame decoder on arbitrary bytes:
//! - never panics;
//! - the frames (or the violation) do not depend on how the bytes are split;
//! - staging never reserves more than the payload limit.
#![no_main]

use cnse_proto::{Direction, FrameDecoder};
use libfuzzer_sys::fuzz_target;

const LIMIT: u32 = 4096;

fn run(data: &[u8], piece: usize) -> (Vec<(u8, u64, u32, u64, Vec<u8>)>, Option<u32>) {
    let mut d = FrameDecoder::new(Direction::ToServer, LIMIT);
    let mut frames = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        let mut input = chunk;
        loop {
            match d.next(&mut input) {
                Ok(Some(f)) => {
                    assert_eq!(f.payload.len(), f.header.payload_len() as usize);
                    frames.push((f.kind as u8, f.header.stream_id(), f.header.arg(), f.header.aux(), f.payload.to_vec()))
                }
                Ok(None) => break,
                Err(v) => return (frames, Some(v.code)),
            }
        }
        assert!(d.staging_capacity() <= 2 * LIMIT as usize + 64);
    }
    (frames, None)
}

fuzz_target!(|input: &[u8]| {
    if input.is_empty() {
        return;
    }
    let piece = usize::from(input[0]) + 1;
    let data = &input[1..];
    let whole = run(data, data.len().max(1));
    assert_eq!(run(data, piece), whole);
    assert_eq!(run(data, 1), whole);
});
